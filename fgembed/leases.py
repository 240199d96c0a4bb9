"""Writer locks on object storage: lease objects, created only where absent, kept alive by a heartbeat.

Object stores have no file locks and no rename, but they have one atomic primitive: a write that
creates an object only if none exists under its key (S3 `If-None-Match: *`, GCS
`ifGenerationMatch=0`, Azure `If-None-Match: *`). A lease is a numbered series of such objects
under `.fgembed/locks/<name>/` (`0000000000`, `0000000001`, …), each naming its holder (a random
token, host name, boot id, pid and the process's start time) and when it was last renewed.

- Take: list the series; if the holder of the highest entry is alive, refuse (the setup lease
  waits instead). Otherwise create the next number — create-if-absent, so of two racers exactly
  one writes it — then list again: if a higher number appeared meanwhile, its writer saw this one
  and holds the lease, and ours is withdrawn. The winner deletes the entries below its own.
- Alive: on the same machine (host name and boot id) the recorded pid is running and started when
  recorded, so a job killed with kill -9 is seen gone at once and the next run does not wait.
  Elsewhere, the entry was renewed within its own `seconds` (clocks agreeing within a few seconds,
  as NTP keeps them): a job that died on another machine lets go after at most that long.
- Heartbeat: a daemon thread rewrites the entry every `seconds / 4`. If a higher number appears (a
  stalled or cut-off job was judged gone and another took over) or renewal fails for `seconds`,
  the lease is lost; a writer checks before each shard and stops with one line.
- Release: delete the entry. One left by a killed holder is deleted by the next taker.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
import weakref
from pathlib import Path

from .errors import FgembedError
from .storage import ObjectStorage

LEASE_SECONDS = 60.0  # an entry not renewed for this long is expired: its holder is gone
POLL_SECONDS = 0.2  # how often a waiting taker looks again


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None without /proc."""
    if not Path("/proc/self/stat").is_file():
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ("X", "")  # gone
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return fields[0], fields[19]


def _running(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    proc = _process(pid)
    if proc is None:
        return True
    state, start = proc
    return state not in ("Z", "X") and (started is None or start == started)


def alive(holder: dict) -> bool:
    """Whether the job that wrote a lease entry may still be running (see the module docstring)."""
    if holder.get("host") == socket.gethostname() and holder.get("boot") == _boot_id():
        return _running(int(holder.get("pid", -1)), holder.get("started"))
    return time.time() - float(holder.get("renewed", 0)) < float(holder.get("seconds", LEASE_SECONDS))


def describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    age = max(0.0, time.time() - float(holder.get("renewed", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, renewed {age:.0f} s ago"


class Lease:
    """One named lease on an object store (see the module docstring)."""

    def __init__(self, storage: ObjectStorage, node: str, seconds: float = LEASE_SECONDS) -> None:
        self.storage, self.node, self.seconds = storage, node, seconds
        self.token = uuid.uuid4().hex
        self.entry: int | None = None
        self.holder: dict | None = None  # the live holder that refused us, for the message
        self._lost: list[str] = []  # why the lease was lost (set by the heartbeat)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self.entry is not None

    def _key(self, number: int) -> str:
        return f"{self.node}/{number:010d}"

    def _series(self) -> list[int]:
        return sorted(int(n) for n in self.storage.list_files(self.node) if n.isdigit())

    def _record(self) -> bytes:
        proc = _process(os.getpid())
        return json.dumps({"token": self.token, "host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(),
                           "started": proc[1] if proc else None, "renewed": time.time(),
                           "seconds": self.seconds}).encode()

    def acquire(self, wait: bool) -> bool:
        """True once held; False if `wait` is off and a live job holds it."""
        while self.entry is None:
            series = self._series()
            top = series[-1] if series else -1
            holder = self.storage.read_json(self._key(top)) if top >= 0 else None
            if holder is not None and alive(holder):
                self.holder = holder
                if not wait:
                    return False
                time.sleep(POLL_SECONDS)
                continue
            mine = top + 1
            if not self.storage.put_if_absent(self._key(mine), self._record()):
                continue  # a racer wrote that number first: look again
            if self._series()[-1] != mine:  # a racer that saw ours went higher: it holds the lease
                self.storage.delete(self._key(mine))
                continue
            for old in series:
                self.storage.delete(self._key(old))
            self.entry = mine
            self._stop.clear()
            self._thread = threading.Thread(target=_heartbeat, args=(weakref.ref(self), self._stop),
                                            name="fgembed-lease", daemon=True)
            self._thread.start()
        return True

    def check(self) -> None:
        """Raise if the heartbeat lost the lease: writing on could mix two jobs' rows."""
        if self._lost:
            raise FgembedError(f"lost the writer lease {self.node} of {self.storage.location} ({self._lost[0]}); "
                               "stopped before writing more: rerun the same command to resume")

    def release(self) -> None:
        if self.entry is None:
            return
        entry, self.entry = self.entry, None
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):  # unreachable storage: the entry expires on its own
            self.storage.delete(self._key(entry))

    def __del__(self) -> None:  # a store dropped without release() (an exception) lets go
        with contextlib.suppress(Exception):
            self.release()


def _heartbeat(ref: weakref.ref, stop: threading.Event) -> None:
    """Renew the entry every seconds/4 until released; note a loss (a weak reference, so a dropped
    lease is collected and released)."""
    lease = ref()
    if lease is None:
        return
    interval, renewed = lease.seconds / 4, time.monotonic()
    del lease
    while not stop.wait(interval):
        lease = ref()
        if lease is None or lease.entry is None:
            return
        try:
            series = lease._series()
            if lease.entry not in series or series[-1] > lease.entry:
                lease._lost.append("another job judged this one gone and took it over")
                return
            lease.storage.put(lease._key(lease.entry), lease._record())
            renewed = time.monotonic()
        except Exception as exc:  # a network hiccup: try again next beat, give up after `seconds`
            if time.monotonic() - renewed > lease.seconds:
                lease._lost.append(f"not renewed for {lease.seconds:.0f} s: {type(exc).__name__}")
                return
        del lease
