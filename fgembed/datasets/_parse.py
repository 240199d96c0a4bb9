"""Small parsing helpers shared by the readers: each failure names the file it came from."""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import FgembedError


def require_dir(root: Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FgembedError(f"dataset root not found: {root}")
    return root


def read_rows(path: Path, n_fields: int) -> list[list[str]]:
    """Whitespace-separated rows (CUB's metadata files); the last field keeps its spaces."""
    if not path.is_file():
        raise FgembedError(f"missing dataset file: {path}")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=n_fields - 1)
        if len(parts) != n_fields:
            raise FgembedError(f"malformed line {lineno} in {path}: expected {n_fields} fields")
        rows.append(parts)
    return rows


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FgembedError(f"missing dataset file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FgembedError(f"malformed JSON in {path}: {exc}") from None


def to_int(value: str, path: Path, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise FgembedError(f"malformed {what} {value!r} in {path}") from None


def relative_inside(path: str, source: Path, where: str) -> str:
    """A dataset file's image path, refused if it leaves the dataset root (absolute, or `..` past
    the top): CUB and iNat define their paths relative to the root, so anything else is damage
    or a trick. Checked on the text, so a root that holds symlinks to another disk still works."""
    posix = PurePosixPath(path.replace("\\", "/"))
    depth = 0
    for part in posix.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            break
    if posix.is_absolute() or PureWindowsPath(path).drive or depth < 0:
        raise FgembedError(f"{where} in {source} points outside the dataset root: {path!r}")
    return path
