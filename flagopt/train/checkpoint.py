"""Training checkpoints: written whole or not at all, found again through ``latest``.

A checkpoint is a directory ``save_dir/checkpoint-{step}`` holding

- ``trainable.safetensors``: the trainable parameters (names as in ``model.state_dict()``),
- ``trainer_state.pt``: optimizer, scheduler, loss scaler, RNG states and the data position,
  plain tensors and containers only, so it loads with ``torch.load(weights_only=True)``.

It is written under a temporary name, every file and the directory fsync-ed, then renamed into
place; ``save_dir/latest`` (a one-line file naming the directory) is replaced the same way. A
failed write (a full disk) removes the temporary directory and leaves the previous checkpoint
and ``latest`` as they were. Older checkpoints beyond ``keep`` are pruned after a success.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from flagopt.errors import CheckpointError, CheckpointSaveError

__all__ = ["LATEST", "STATE_FILE", "TRAINABLE_FILE", "load_checkpoint", "resolve_checkpoint",
           "save_checkpoint", "save_tensors"]

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.pt"
LATEST = "latest"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def save_checkpoint(save_dir: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor],
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``checkpoint-{step}`` atomically, point ``latest`` at it, prune beyond ``keep``.

    Raises:
        CheckpointSaveError: the write failed (``errno`` kept); nothing half-written remains
            and the previous checkpoint is untouched.
    """
    save_dir = Path(save_dir)
    final = save_dir / f"checkpoint-{step}"
    tmp = save_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_bytes(tmp / TRAINABLE_FILE, save_safetensors(_contiguous(tensors)))
        buffer = io.BytesIO()
        torch.save(state, buffer)
        _write_bytes(tmp / STATE_FILE, buffer.getvalue())
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
        _fsync_dir(save_dir)
        _write_latest(save_dir, final.name)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointSaveError(
            e.errno, f"could not write checkpoint {final}: {why}; the previous checkpoint "
                     f"({_latest_name(save_dir) or 'none'}) is left as it was") from e
    _prune(save_dir, keep, final.name)
    return final


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` as one safetensors file, via a temporary name and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        _write_bytes(tmp, save_safetensors(_contiguous(tensors), metadata={"format": "pt"}))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_checkpoint(load_dir: str | os.PathLike) -> Path:
    """The checkpoint directory ``load_dir`` means: itself if it is one, else the one its
    ``latest`` names.

    Raises:
        CheckpointError: neither.
    """
    load_dir = Path(load_dir)
    if (load_dir / STATE_FILE).is_file():
        return load_dir
    name = _latest_name(load_dir)
    if name is None:
        raise CheckpointError(f"load_dir={str(load_dir)!r} is neither a checkpoint directory "
                              f"(with {STATE_FILE}) nor a save_dir with a {LATEST!r} file")
    path = load_dir / name
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{load_dir / LATEST} names {name!r}, which is not a checkpoint")
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable tensors and the trainer state of the checkpoint directory ``path``."""
    path = Path(path)
    tensors = load_safetensors((path / TRAINABLE_FILE).read_bytes())
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return tensors, state


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _write_bytes(path: Path, data: bytes) -> None:
    """The one writer: every checkpoint byte goes through here, and is fsync-ed."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """``os.replace`` for directories: a non-empty target is moved aside first."""
    if not final.exists():
        os.replace(tmp, final)
        return
    aside = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def _write_latest(save_dir: Path, name: str) -> None:
    tmp = save_dir / f".{LATEST}.tmp-{os.getpid()}"
    try:
        _write_bytes(tmp, (name + "\n").encode())
        os.replace(tmp, save_dir / LATEST)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(save_dir)


def _latest_name(save_dir: Path) -> str | None:
    try:
        name = (save_dir / LATEST).read_text().strip()
    except OSError:
        return None
    return name if _NAME.match(name) else None


def _prune(save_dir: Path, keep: int, current: str) -> None:
    steps = sorted((int(m.group(1)), p) for p in save_dir.iterdir()
                   if p.is_dir() and (m := _NAME.match(p.name)))
    for _, path in steps[:-keep] if keep > 0 else []:
        if path.name != current:
            shutil.rmtree(path, ignore_errors=True)
