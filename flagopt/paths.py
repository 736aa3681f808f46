"""Path safety: file names that come from data (a registry, an index, a server) stay inside
the directory they are meant for.

The rule has two halves. A name from *untrusted data* is checked lexically: it must be a plain
relative path, without ``..``, a drive, a backslash or a NUL byte, so it cannot name anything
outside the directory. Links the *user's own file system* holds are followed for reading: a
model directory that is itself a symlink to another disk, or huggingface_hub's cache whose
``snapshots/<rev>/`` files are symlinks into ``../../blobs``, load as they are. Files flagopt
creates or appends to are opened without following links (see ``hub``).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from flagopt.errors import UnsafePathError


def safe_join(root: str | os.PathLike, name: str) -> Path:
    """Join ``name`` (a relative POSIX path from untrusted data) under ``root``.

    Symlinks already on disk are not resolved: they are the user's, and are followed when the
    file is read.

    Raises:
        UnsafePathError: ``name`` is absolute, empty, contains ``..``, a backslash, a drive
            letter or a NUL byte.
    """
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise UnsafePathError(f"refusing file name {name!r}: expected a relative path")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or (len(name) > 1 and name[1] == ":") \
            or pure.parts in ((), (".",)):
        raise UnsafePathError(
            f"refusing file name {name!r}: it would escape the model directory {os.fspath(root)!r}")
    # Absolute (so a later chdir cannot move it), but links the user made are kept as they are.
    return Path(root).absolute() / pure
