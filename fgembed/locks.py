"""Writer locks for a feature store, under `<store>/.fgembed/locks/`. Two kinds:

- `setup`: held briefly while the store's structure changes (samples/ written, a backbone group
  created or replaced); a second job waits for it, since setup takes seconds.
- `features-<key>`: held by the job that writes one backbone's group, for the whole job; a second
  job on the same backbone is refused at once, with one line naming the holder. Jobs on different
  backbones run at once.

One design, two mechanisms. On a local disk a lock is an OS file lock (`fcntl.flock`) on a file
there: the kernel drops it when its process exits, however it exits (kill -9 too), so a crashed
job never leaves a stale lock. Object storage has no file locks; there a lock is a lease
(`leases.py`): an object created only where absent, renewed by a heartbeat, taken over at once
when its holder's process is gone from this machine and after its expiry when it ran elsewhere.

Readers (`info`, `fit`, …) take no lock: shards are written whole and `done` last. Under
torchrun, rank 0 takes the locks for the job; the ranks write disjoint shards without them.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator, Protocol

from .errors import FgembedError
from .leases import Lease, describe
from .storage import Storage

HIDDEN = ".fgembed"  # fgembed's own bookkeeping inside a store: locks, staging, trash


def lock_dir(store: Path) -> Path:
    path = Path(store) / HIDDEN / "locks"
    path.mkdir(parents=True, exist_ok=True)
    return path


class FileLock:
    """One exclusive flock on `path`; the file records who holds it (for the refusal message)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: bool) -> bool:
        """True once held; False if `wait` is off and another process holds it."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return True

    def check(self) -> None:
        """The kernel holds a flock until release: nothing can take it away."""

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock

    def __del__(self) -> None:  # a store dropped without release() (an exception) frees its locks
        self.release()


class Lock(Protocol):
    def check(self) -> None: ...

    def release(self) -> None: ...


@contextlib.contextmanager
def setup_lock(storage: Storage) -> Iterator[None]:
    """Serialise changes to a store's structure across processes (waits for the holder)."""
    lock = FileLock(lock_dir(storage.root) / "setup") if storage.local else Lease(storage, f"{HIDDEN}/locks/setup")
    lock.acquire(wait=True)
    try:
        yield
    finally:
        lock.release()


def features_lock(storage: Storage, key: str, name: str) -> Lock:
    """The writer lock of one backbone group; refuses at once when another job holds it."""
    if storage.local:
        lock = FileLock(lock_dir(storage.root) / f"features-{key}")
        if lock.acquire(wait=False):
            return lock
        holder = lock.holder()
    else:
        lock = Lease(storage, f"{HIDDEN}/locks/features-{key}")
        if lock.acquire(wait=False):
            return lock
        holder = describe(lock.holder)
    raise FgembedError(f"another fgembed job ({holder}) is writing features {name!r} to {storage.location}; "
                       "let it finish, then rerun this command to resume (nothing to repair)")
