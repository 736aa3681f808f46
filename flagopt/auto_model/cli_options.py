"""The ``AutoLoader`` options every ``flagopt`` subcommand shares, from its parsed arguments."""

from __future__ import annotations

import argparse
from typing import Any


def loader_options(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """``AutoLoader`` keyword arguments from ``args``: ``dtype``, ``endpoint``, ``model_dir``,
    ``device`` and any extra ``names`` (e.g. ``quantize``) that are set, plus ``offline`` and
    ``progress=False`` from ``--offline`` / ``--quiet``."""
    options = {name: getattr(args, name, None)
               for name in ("dtype", "endpoint", "model_dir", "device", *names)}
    options = {k: v for k, v in options.items() if v is not None}
    if getattr(args, "offline", False):
        options["offline"] = True
    if getattr(args, "quiet", False):
        options["progress"] = False
    return options
