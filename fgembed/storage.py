"""Where a feature store lives: a local folder, or any fsspec URL.

`locate(where, storage_options)` turns what a user typed into a `Storage`: a local folder (a plain
path or `file://…`) or an object store reached through fsspec (`s3://`, `gs://`, `az://`,
`memory://`, and read-only `http(s)://`). Zarr reads and writes the arrays through its own store
for either (`LocalStore`, `FsspecStore`); a `Storage` adds the few operations on whole objects that
fgembed's bookkeeping needs beside it: whether a metadata document exists and what it says, the
sub-folders of a node, removing a node, and on object storage the create-if-absent write that
writer leases rest on (`leases.py`).

Credentials and endpoints are found the way the filesystem library finds them — s3fs through
botocore (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `~/.aws/config`, `AWS_ENDPOINT_URL`…), gcsfs through
Google's application-default credentials, adlfs through `AZURE_STORAGE_*` — and `storage_options`
(`--storage-option KEY=VALUE`) passes anything else to it. Listing caches are off by default: a
store is shared with other processes, and a cached listing would hide what they wrote.
"""
from __future__ import annotations

import contextlib
import errno
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import fsspec
import zarr
from zarr.storage import FsspecStore, LocalStore

from .errors import FgembedError

# Object stores whose fsspec filesystem makes `pipe_file(mode="create")` one atomic conditional write
# (s3fs: If-None-Match; gcsfs: ifGenerationMatch=0; adlfs: overwrite=False; memory: one process).
# Writer leases need it, so only these take writers; others are read-only.
CONDITIONAL_CREATE = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}
LOCAL_PROTOCOLS = {"file", "local"}
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "abfss": "adlfs", "http": "aiohttp", "https": "aiohttp"}
# Errors these libraries raise for an unreachable or refusing service (not OSError subclasses)
_SERVICE_MODULES = ("botocore", "aiobotocore", "aiohttp", "google", "azure", "s3fs", "gcsfs", "adlfs")


def parse_storage_options(items: list[str] | tuple[str, ...]) -> dict:
    """`--storage-option KEY=VALUE` items as fsspec keyword arguments.

    A value that reads as JSON (`true`, `3`, `{"a": 1}`) is that value, anything else a string;
    a dotted key nests (`client_kwargs.region_name=eu-west-1`). A malformed item or a key given
    twice is one line."""
    options: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise FgembedError(f"--storage-option {item!r}: expected KEY=VALUE (e.g. endpoint_url=http://host:9000)")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        node = options
        for part in parts[:-1]:
            node = node.setdefault(part.strip(), {})
            if not isinstance(node, dict):
                raise FgembedError(f"--storage-option {item!r}: {part} is given a value and sub-keys")
        if parts[-1].strip() in node:
            raise FgembedError(f"--storage-option {key.strip()} is given twice")
        node[parts[-1].strip()] = value
    return options


def locate(where: str | Path | Storage, storage_options: dict | None = None) -> Storage:
    """The storage at `where`: a `Storage` as it is, a Path or plain path a local folder, a URL an
    object store (`file://` is a local folder)."""
    if isinstance(where, Storage):
        if storage_options:
            raise FgembedError("storage options go with a store's URL, not with an opened storage")
        return where
    text = str(where)
    protocol = text.split("://", 1)[0].lower() if isinstance(where, str) and "://" in text else ""
    if not protocol or protocol in LOCAL_PROTOCOLS:
        if storage_options:
            raise FgembedError(f"--storage-option has no effect on a local --store ({text})")
        return LocalStorage(Path(text.split("://", 1)[1]) if protocol else Path(text), text)
    return ObjectStorage(text.rstrip("/"), protocol, dict(storage_options or {}))


class Storage:
    """A store's root: zarr stores for its nodes, and whole-object operations beside them."""

    local = False
    writable = True

    def __init__(self, location: str) -> None:
        self.location = location  # as the user gave it: what messages show

    def __str__(self) -> str:
        return self.location

    @property
    def url(self) -> str:
        """Where the store is, absolute: a `file://` URL for a local folder."""
        raise NotImplementedError

    def zarr_store(self, node: str = "", read_only: bool = False) -> zarr.abc.store.Store:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def read_json(self, key: str) -> dict | None:
        """A JSON document (a node's zarr.json), or None when absent or unreadable."""
        raise NotImplementedError

    def list_dir(self, node: str) -> list[str]:
        """Names of the sub-folders (sub-prefixes) of `node`, sorted; [] when there is none."""
        raise NotImplementedError

    def entries(self, node: str) -> list[str]:
        """Names of everything directly under `node` (objects and sub-folders)."""
        raise NotImplementedError

    def remove(self, node: str) -> None:
        raise NotImplementedError

    def errors(self) -> contextlib.AbstractContextManager:
        """Failures of the storage as one line that says what to do, not a traceback."""
        raise NotImplementedError


class LocalStorage(Storage):
    local = True

    def __init__(self, root: Path, location: str) -> None:
        super().__init__(location)
        self.root = root

    @property
    def url(self) -> str:
        return self.root.resolve().as_uri()

    def zarr_store(self, node: str = "", read_only: bool = False) -> LocalStore:
        return LocalStore(self.root / node, read_only=read_only)

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def read_json(self, key: str) -> dict | None:
        try:
            return json.loads((self.root / key).read_text())
        except (OSError, ValueError):
            return None

    def list_dir(self, node: str) -> list[str]:
        folder = self.root / node
        return sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []

    def entries(self, node: str) -> list[str]:
        folder = self.root / node
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def remove(self, node: str) -> None:
        shutil.rmtree(self.root / node, ignore_errors=True)

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """A full disk or a denied permission is one line that says what to do."""
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FgembedError(f"disk full while writing {self.location} ({exc.strerror}); the store is intact "
                                   "(finished shards are kept, the interrupted one is redone): free space and rerun "
                                   "the same command to resume") from None
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                why = (exc.strerror or "permission denied").lower()
                raise FgembedError(f"cannot use feature store {self.location}: {why} on {exc.filename or self.location}; "
                                   "fix its permissions or choose another --store") from None
            raise


# Options fgembed sets on a filesystem unless the user's `--storage-option` says otherwise.
# s3fs splits a whole-object read into concurrent ranged GETs (`max_concurrency`, default 10),
# and to know whether to it first sends a HEAD for the size: a second request for every shard
# object read. fgembed reads many shards at once (zarr's own concurrency and the views'
# read-ahead), never one object large enough to need splitting, so one request per object it is.
PROTOCOL_DEFAULTS: dict[str, dict] = {"s3": {"max_concurrency": 1}}


class ObjectStorage(Storage):
    """A store under an fsspec URL. `fs` is the synchronous filesystem fgembed's own operations use;
    zarr gets an `FsspecStore` on its asynchronous twin."""

    def __init__(self, url: str, protocol: str, storage_options: dict) -> None:
        super().__init__(url)
        self.protocol = protocol
        self.storage_options = {"use_listings_cache": False, **PROTOCOL_DEFAULTS.get(protocol, {}), **storage_options}
        self.writable = protocol in CONDITIONAL_CREATE
        try:
            self.fs, self.root = fsspec.url_to_fs(url, **self.storage_options)
            self._async = FsspecStore.from_url(url, storage_options=self.storage_options).fs
        except ImportError:
            package = PACKAGES.get(protocol, f"the fsspec filesystem for {protocol}://")
            extra = " (pip install 'fgembed[cloud]')" if package == "s3fs" else f" (pip install {package})"
            raise FgembedError(f"a store at {url} needs {package}{extra}") from None
        except ValueError as exc:
            if "not known" in str(exc).lower():
                raise FgembedError(f"--store {url}: unknown storage protocol {protocol!r}") from None
            raise FgembedError(f"--store {url}: {' '.join(str(exc).split())[:300]}") from None
        except TypeError as exc:  # an option the filesystem does not take
            raise FgembedError(f"--store {url}: {' '.join(str(exc).split())[:300]} (check --storage-option)") from None
        self.root = self.root.rstrip("/")

    @property
    def url(self) -> str:
        return self.location

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def zarr_store(self, node: str = "", read_only: bool = False) -> FsspecStore:
        return FsspecStore(self._async, path=self._path(node), read_only=read_only)

    def exists(self, key: str) -> bool:
        return self.get(key) is not None  # one GET of a small document; a HEAD of a missing key costs two requests

    def read_json(self, key: str) -> dict | None:
        data = self.get(key)
        try:
            return json.loads(data) if data is not None else None
        except ValueError:
            return None

    def list_dir(self, node: str) -> list[str]:
        names = {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self._ls(node) if e.get("type") == "directory"}
        return sorted(names - {""})

    def list_files(self, node: str) -> list[str]:
        """Names of the objects directly under `node` (fresh: never a cached listing)."""
        return sorted(e["name"].rsplit("/", 1)[-1] for e in self._ls(node) if e.get("type") == "file")

    def entries(self, node: str) -> list[str]:
        return sorted({e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self._ls(node)} - {""})

    def _ls(self, node: str) -> list[dict]:
        try:
            return self.fs.ls(self._path(node), detail=True, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove(self, node: str) -> None:
        """Its zarr.json (the node's mark) first, so no moment shows a marked node losing objects."""
        self.delete(f"{node}/zarr.json")
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(node), recursive=True)

    def get(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(key))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write the object whole unless it exists (one conditional write); True when written."""
        try:
            self.fs.pipe_file(self._path(key), data, mode="create")
        except FileExistsError:
            return False
        return True

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Refused credentials, a missing bucket or an unreachable endpoint is one line."""
        try:
            yield
        except FgembedError:
            raise
        except PermissionError as exc:
            raise FgembedError(f"cannot use feature store {self.location}: access denied ({_first_line(exc)}); "
                               "check the credentials (found as the filesystem library finds them) or pass "
                               "--storage-option") from None
        except OSError as exc:
            raise FgembedError(f"cannot use feature store {self.location}: {_first_line(exc)}; the store is intact "
                               "(finished shards are kept): fix the cause and rerun the same command") from None
        except Exception as exc:
            if type(exc).__module__.split(".")[0] not in _SERVICE_MODULES:
                raise
            raise FgembedError(f"cannot reach feature store {self.location}: {type(exc).__name__}: "
                               f"{_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__
