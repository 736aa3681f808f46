"""Path safety: file names that come from data (a registry, an index, a server) stay inside
the directory they are meant for."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from flagopt.errors import UnsafePathError


def safe_join(root: str | os.PathLike, name: str) -> Path:
    """Join ``name`` (a relative POSIX path from untrusted data) under ``root``.

    Raises:
        UnsafePathError: ``name`` is absolute, empty, contains ``..``, a backslash or a NUL
            byte, or otherwise resolves outside ``root``.
    """
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise UnsafePathError(f"refusing file name {name!r}: expected a relative path")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(
            f"refusing file name {name!r}: it would escape the model directory {os.fspath(root)!r}")
    base = Path(root).resolve()
    target = (base / pure).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(
            f"refusing file name {name!r}: it resolves to {target}, outside {base}")
    return base / pure
