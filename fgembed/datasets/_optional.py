"""The streaming formats' libraries are an extra (`pip install 'fgembed[streaming]'`): a reader
that needs one says so in one line instead of an ImportError."""
from __future__ import annotations

import importlib

from ..errors import FgembedError


def require(package: str, kind: str) -> None:
    """Import `package` now, or refuse `--dataset kind` naming the extra that installs it."""
    try:
        importlib.import_module(package)
    except ImportError:
        raise FgembedError(f"--dataset {kind} needs the {package} package: pip install 'fgembed[streaming]'") from None
