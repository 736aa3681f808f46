"""Reading OPT checkpoint files safely: which files, which tensors, under which names.

Every layout the OPT family ships in is read here: ``model.safetensors`` (+ sharded with
index), ``pytorch_model.bin`` (+ sharded with index), keys with or without the ``model.``
prefix, and original metaseq names. Tensors are yielded one at a time, under the Hugging Face
names our modules use, so the caller can place each straight into its final dtype and device.

Safety: pickle files are read only with ``torch.load(weights_only=True)`` passed explicitly
(an environment override cannot turn it off) and never retried unsafely; anything that is not
a weights file gets a typed error that says what to do.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from flagopt.errors import (CheckpointError, CorruptCheckpointError, MissingWeightsError,
                            UnsafeCheckpointError)
from flagopt.paths import safe_join

# In order of preference: safetensors first (no pickle, memory-mapped).
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
MIN_TORCH_FOR_PICKLE = (2, 10)
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

# Original metaseq names -> Hugging Face names (the fused qkv_proj is split separately).
_METASEQ_RENAMES = (
    ("decoder.layer_norm.", "decoder.final_layer_norm."),
    ("decoder.project_in_dim.", "decoder.project_in."),
    ("decoder.project_out_dim.", "decoder.project_out."),
    ("decoder.output_projection.", "lm_head."),
)
_METASEQ_DROPPED = ("decoder.version", "decoder.embed_positions._float_tensor")


def find_weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint directory, by preference (safetensors first).

    Raises:
        CheckpointError: no weights file is there.
        CorruptCheckpointError: an index is malformed.
        UnsafePathError: an index names a shard outside the directory.
    """
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            return read_index(path) if name.endswith(".index.json") else [path]
    raise CheckpointError(
        f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")


def read_index(index_path: Path) -> list[Path]:
    """Shard paths named by a ``*.index.json`` (``{"weight_map": {tensor: shard}}``)."""
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{index_path} is not valid JSON ({exc}); re-download the checkpoint") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(
            f"{index_path} has no usable 'weight_map' (tensor name -> shard file); "
            f"re-download the checkpoint")
    shards = list(dict.fromkeys(weight_map.values()))  # ordered, unique
    paths = [safe_join(index_path.parent, shard) for shard in shards]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise MissingWeightsError(
            f"{index_path.name} names shard(s) missing from {index_path.parent}: "
            f"{', '.join(missing)}; re-download the checkpoint")
    return paths


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from one weights file under its names as stored.

    Safetensors are memory-mapped; ``.bin`` zip archives are memory-mapped through
    ``torch.load(mmap=True, weights_only=True)``.
    """
    _reject_non_weights(path)
    if path.suffix == ".safetensors":
        yield from _iter_safetensors(path)
    else:
        yield from _load_pickle(path).items()


def _reject_non_weights(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not head:
        raise CorruptCheckpointError(f"{path} is empty; re-download it")
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"{\"error", b"<head")):
        raise CorruptCheckpointError(
            f"{path} is an HTML/text page, not weights (a server error page saved under the "
            f"weights name?); delete it and re-download")


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    _check_safetensors_header(path)
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)
    except SafetensorError as exc:
        raise CorruptCheckpointError(
            f"{path} is not a valid safetensors file ({exc}); re-download it") from exc


def _check_safetensors_header(path: Path) -> None:
    """Validate the header before the library maps it: size, JSON, offsets inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(f"{path} is truncated ({size} bytes); re-download it")
        header_len = int.from_bytes(raw, "little")
        if header_len > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise CorruptCheckpointError(
                f"{path} declares a {header_len}-byte header in a {size}-byte file (truncated "
                f"or hostile); re-download it")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(
                f"{path} has a malformed safetensors header ({exc}); re-download it") from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path} has a malformed safetensors header; re-download it")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} has data offsets {offsets!r} outside the file's "
                f"{data_len} data bytes (truncated or hostile); re-download it")


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < MIN_TORCH_FOR_PICKLE:
        raise UnsafeCheckpointError(
            f"refusing to unpickle {path} with torch {torch.__version__}: releases before "
            f"{'.'.join(map(str, MIN_TORCH_FOR_PICKLE))} have known bypasses of the safe "
            f"unpickler; upgrade torch or use a safetensors checkpoint")
    mmap = zipfile.is_zipfile(path)  # torch can memory-map only the zip format
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refusing {path}: it is not a plain tensor checkpoint (its pickle asks to run or "
            f"import code, which flagopt never does). Use a trusted safetensors copy. "
            f"Detail: {str(exc).splitlines()[0]}") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise CorruptCheckpointError(
            f"{path} cannot be read as a PyTorch checkpoint (truncated or corrupt: {exc}); "
            f"delete it and re-download") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # metaseq wraps its weights as {"model": {...}, "cfg": ...}
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CorruptCheckpointError(
            f"{path} does not hold a mapping of tensor names to tensors; re-download it")
    return state


def hf_names(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map one stored tensor to our module names (``model.decoder.*``, heads unchanged).

    Handles the ``model.`` prefix or its absence and metaseq's names, splitting its fused
    ``qkv_proj`` (stored in K, V, Q order). Returns [] for metaseq bookkeeping entries.
    """
    if name.startswith("model."):
        name = name[len("model."):]
    if name in _METASEQ_DROPPED:
        return []
    for old, new in _METASEQ_RENAMES:
        if name.startswith(old):
            name = new + name[len(old):]
    pairs = [(name, tensor)]
    if ".self_attn.qkv_proj." in name:
        k, v, q = tensor.chunk(3, dim=0)
        pairs = [(name.replace("qkv_proj", proj), part)
                 for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v))]
    # Heads keep their names; anything else unknown is reported as unexpected by the caller.
    return [("model." + n if n.startswith("decoder.") else n, t) for n, t in pairs]


def describe_missing(missing: list[str], unexpected: list[str], source: str) -> str:
    """A message naming the first few missing/unexpected tensors."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}"
                     + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:5])}"
                     + (" ..." if len(unexpected) > 5 else ""))
    return (f"checkpoint {source} does not match the model config: " + "; ".join(parts)
            + ". Check that config.json belongs to these weights, or re-download.")
