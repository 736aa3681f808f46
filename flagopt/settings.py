"""Every environment variable flagopt reads, read here and only here, once, at import.

As in huggingface_hub's ``constants.py``, the rest of the package never touches ``os.environ``:
it asks ``get()`` for these values and passes them down. An explicit argument always wins
over the environment (``endpoint=``, ``offline=``, ``token=``, ``model_dir=``, ``registry=``).

===========================  ====================================================
``FLAGOPT_ENDPOINT``         hub base URL (default ``https://huggingface.co``)
``FLAGOPT_HOME``             models directory (default ``~/.cache/flagopt``)
``FLAGOPT_OFFLINE``          ``1``: never use the network
``FLAGOPT_REGISTRY``         extra registry files, ``os.pathsep``-separated
``FLAGOPT_DISABLE_PROGRESS`` ``1``: no progress bars
``FLAGOPT_SKIP_DISK_CHECK``  ``1``: skip the free-space check before a download
``FLAGOPT_PREPARED_CACHE``   ``0``: ``AutoLoader`` does not use the prepared-weights cache
``HF_TOKEN``                 bearer token for the hub
``RANK``                     this process's rank under ``torchrun`` (training, DDP)
``WORLD_SIZE``               the number of processes under ``torchrun``
``LOCAL_RANK``               this process's rank on its machine (picks its GPU)
===========================  ====================================================

``torch.distributed``'s ``env://`` initialisation reads ``MASTER_ADDR`` / ``MASTER_PORT``
itself; flagopt only reads the three rank variables, to know before that whether it runs
under a launcher and which GPU is its own (the trainer parses them and names a bad one).

Flags are on for ``1``, ``true``, ``yes`` or ``on`` (any case); ``FLAGOPT_PREPARED_CACHE``,
on by default, is off for ``0``, ``false``, ``no`` or ``off``. Values are stored as given:
the modules that use them validate them (a bad endpoint fails at the first download, not at
import).

Overriding: a program that changes ``os.environ`` after ``import flagopt`` calls ``reload()``;
a test that sets variables with ``monkeypatch.setenv`` then calls ``reload()`` (tests use the
``env`` fixture in ``tests/conftest.py``, which does both and undoes both), or replaces the
values outright with ``monkeypatch.setattr(settings, "_current", Settings(...))``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_HOME", "ENDPOINT_ENV", "HOME_ENV", "LOCAL_RANK_ENV", "OFFLINE_ENV",
           "RANK_ENV", "REGISTRY_ENV", "Settings", "WORLD_SIZE_ENV", "get", "reload"]

ENDPOINT_ENV = "FLAGOPT_ENDPOINT"
HOME_ENV = "FLAGOPT_HOME"
OFFLINE_ENV = "FLAGOPT_OFFLINE"
REGISTRY_ENV = "FLAGOPT_REGISTRY"
DISABLE_PROGRESS_ENV = "FLAGOPT_DISABLE_PROGRESS"
SKIP_DISK_CHECK_ENV = "FLAGOPT_SKIP_DISK_CHECK"
PREPARED_CACHE_ENV = "FLAGOPT_PREPARED_CACHE"
TOKEN_ENV = "HF_TOKEN"
RANK_ENV = "RANK"
WORLD_SIZE_ENV = "WORLD_SIZE"
LOCAL_RANK_ENV = "LOCAL_RANK"

DEFAULT_HOME = "~/.cache/flagopt"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Settings:
    """The environment's say, parsed. ``home`` is not yet ``expanduser``-ed."""

    endpoint: str | None = None
    home: Path = Path(DEFAULT_HOME)
    offline: bool = False
    registry_paths: tuple[str, ...] = ()
    disable_progress: bool = False
    skip_disk_check: bool = False
    token: str | None = None
    rank: str | None = None
    world_size: str | None = None
    local_rank: str | None = None
    prepared_cache: bool = True

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        """Parse the variables above from ``environ`` (unset and empty mean the default)."""
        registry = environ.get(REGISTRY_ENV, "")
        return cls(endpoint=environ.get(ENDPOINT_ENV) or None,
                   home=Path(environ.get(HOME_ENV) or DEFAULT_HOME),
                   offline=_flag(environ, OFFLINE_ENV),
                   registry_paths=tuple(p for p in registry.split(os.pathsep) if p.strip()),
                   disable_progress=_flag(environ, DISABLE_PROGRESS_ENV),
                   skip_disk_check=_flag(environ, SKIP_DISK_CHECK_ENV),
                   token=environ.get(TOKEN_ENV) or None,
                   rank=environ.get(RANK_ENV) or None,
                   world_size=environ.get(WORLD_SIZE_ENV) or None,
                   local_rank=environ.get(LOCAL_RANK_ENV) or None,
                   prepared_cache=environ.get(PREPARED_CACHE_ENV, "").strip().lower()
                   not in _FALSE)


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in _TRUE


_current = Settings.from_environ(os.environ)


def get() -> Settings:
    """The settings read at import (or at the last ``reload()``)."""
    return _current


def reload() -> Settings:
    """Read the environment again; for programs and tests that change it after import."""
    global _current
    _current = Settings.from_environ(os.environ)
    return _current
