"""flagopt's model zoo: ``registry.json``, the one data file that names the OPT checkpoints.

Read it through ``flagopt.auto_model.registry`` (which validates it); this package only ships
the file.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["registry_path"]


def registry_path() -> Path:
    """Path of the packaged ``registry.json``."""
    return Path(__file__).resolve().with_name("registry.json")
