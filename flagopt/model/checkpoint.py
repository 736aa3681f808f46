"""Reading OPT checkpoint files safely: which files, which tensors, under which names.

Every layout the OPT family ships in is read here: ``model.safetensors`` (+ sharded with
index), ``pytorch_model.bin`` (+ sharded with index), keys with or without the ``model.``
prefix, and original metaseq names. Tensors are yielded one at a time, already in their final
dtype and device, and ``hf_names`` gives the Hugging Face names our modules use.

Memory: a file is memory-mapped once; each tensor is a view of its bytes. A tensor that needs
no conversion stays that view (zero copy); one that is converted has its source pages dropped
from memory as soon as the copy exists, so loading costs one copy of the weights in the target
dtype plus one tensor, never the file *and* the converted copy.

Safety: pickle files are read only with ``torch.load(weights_only=True)`` passed explicitly
(an environment override cannot turn it off) and never retried unsafely; anything that is not
a weights file gets a typed error that says what to do.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
    "U64": torch.uint64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

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
        MissingWeightsError: an index names a shard that is not there.
        UnsafePathError: an index names a shard outside the directory.
    """
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            return _shard_paths(path) if name.endswith(".index.json") else [path]
    raise CheckpointError(
        f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")


def read_index(index_path: Path) -> list[str]:
    """Shard file names of a ``*.index.json`` (``{"weight_map": {tensor: shard}}``), in order
    of first appearance; the download side fetches them, the load side opens them.

    Raises:
        CorruptCheckpointError: not JSON, or no usable ``weight_map``.
        UnsafePathError: a shard name would escape the index's directory.
    """
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSON and UnicodeDecodeError: ValueErrors
        raise CorruptCheckpointError(
            f"{index_path} is not valid JSON in UTF-8 ({type(exc).__name__}: {str(exc)[:200]}); "
            f"re-download the checkpoint") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(
            f"{index_path} has no usable 'weight_map' (tensor name -> shard file); "
            f"re-download the checkpoint")
    shards = list(dict.fromkeys(weight_map.values()))  # ordered, unique
    for shard in shards:
        safe_join(index_path.parent, shard)
    return shards


def _shard_paths(index_path: Path) -> list[Path]:
    paths = [safe_join(index_path.parent, shard) for shard in read_index(index_path)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise MissingWeightsError(
            f"{index_path.name} names shard(s) missing from {index_path.parent}: "
            f"{', '.join(missing)}; re-download the checkpoint")
    return paths


def read_layouts(paths: list[Path]) -> dict[str, tuple[torch.dtype, tuple[int, ...], Path]]:
    """``{our name: (dtype, shape, file)}`` from the files' headers alone, no tensor data.

    Covers safetensors and zip ``.bin`` files; a legacy pickle (read whole anyway) is left
    out. Used to compare a config with the checkpoint before anything is built.

    Raises:
        CorruptCheckpointError: a header is malformed, or one tensor is stored in two files.
    """
    layouts: dict[str, tuple[torch.dtype, tuple[int, ...], Path]] = {}
    for path in paths:
        _reject_non_weights(path)
        if path.suffix == ".safetensors":
            stored = _safetensors_entries(path)
        else:
            stored = (_zip_entries(path) if zipfile.is_zipfile(path) else None) or []
        for entry in stored:
            name = hf_name(entry.name)
            if name in layouts:
                raise duplicate_tensor(name, layouts[name][2], path)
            layouts[name] = (entry.dtype, entry.shape, path)
    return layouts


def duplicate_tensor(name: str, first: Path, second: Path) -> CorruptCheckpointError:
    """The error for a tensor stored twice: which copy is right cannot be known."""
    where = f"both {first.name} and {second.name}" if first != second else f"{first.name} twice"
    return CorruptCheckpointError(
        f"tensor {name!r} is stored in {where} (a shard from another checkpoint, or a "
        f"hostile file); refusing to pick one: re-download the checkpoint")


@dataclass(frozen=True)
class _Stored:
    """Where one tensor's bytes lie in a weights file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its storage, in bytes from the start of the file
    nbytes: int  # of its storage
    stride: tuple[int, ...] | None = None  # None: contiguous over the whole storage
    storage_offset: int = 0  # in elements


def iter_tensors(path: Path, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None,
                 keep: Callable[[str], bool] | None = None,
                 transient: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from one weights file under its names as stored.

    Args:
        dtype: convert floating-point tensors to this dtype (others keep theirs).
        device: move every tensor there.
        keep: ``keep(name)`` False skips a tensor without reading its bytes.
        transient: the caller copies whatever it keeps (e.g. quantizes it), so a tensor's
            file pages are dropped from memory as soon as the caller asks for the next one.
    Raises:
        CorruptCheckpointError: the file is truncated, hostile or not weights at all.
        UnsafeCheckpointError: a pickle that would import or run code.
    """
    path = Path(path)
    _reject_non_weights(path)
    if path.suffix == ".safetensors":
        stored = _safetensors_entries(path)
    else:
        stored = _zip_entries(path) if zipfile.is_zipfile(path) else None
        if stored is None:  # legacy (pre-1.6) pickle or compressed zip: read it whole
            yield from _iter_loaded(path, dtype, device, keep)
            return
    yield from _iter_mapped(path, stored, dtype, device, keep, transient)


def _iter_mapped(path: Path, stored: list[_Stored], dtype: torch.dtype | None,
                 device: torch.device | str | None, keep: Callable[[str], bool] | None,
                 transient: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    with open(path, "rb") as fh:  # ACCESS_COPY: private pages, writes never reach the file
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    for entry in stored:
        if keep is not None and not keep(entry.name):
            continue
        if entry.offset + entry.nbytes > len(mapped):
            raise CorruptCheckpointError(
                f"{path}: tensor {entry.name!r} lies past the end of the file (truncated?); "
                f"re-download it")
        source = _view(mapped, entry, path)
        tensor = _convert(source, dtype, device)
        if tensor is not source:
            del source
            _release(mapped, entry.offset, entry.nbytes)
        yield entry.name, tensor
        if transient and tensor is source:  # read pages are clean: a later read re-faults them
            _release(mapped, entry.offset, entry.nbytes)


def _view(mapped: mmap.mmap, entry: _Stored, path: Path) -> torch.Tensor:
    """The tensor as a zero-copy view of the mapped file."""
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    raw = torch.frombuffer(mapped, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset)
    try:
        tensor = raw.view(entry.dtype)
        if entry.stride is None:
            tensor = tensor.view(entry.shape)
        else:
            tensor = tensor.as_strided(entry.shape, entry.stride, entry.storage_offset)
    except RuntimeError as exc:
        raise CorruptCheckpointError(
            f"{path}: tensor {entry.name!r} does not fit its stored bytes ({exc}); "
            f"re-download it") from exc
    if entry.offset % entry.dtype.itemsize:
        tensor = tensor.clone()  # misaligned in the file; kernels expect aligned data
    return tensor


def _convert(tensor: torch.Tensor, dtype: torch.dtype | None,
             device: torch.device | str | None) -> torch.Tensor:
    """``tensor`` itself when nothing changes, else a converted copy."""
    if dtype is None or not tensor.is_floating_point():
        dtype = tensor.dtype
    return tensor.to(device=tensor.device if device is None else device, dtype=dtype)


def _release(mapped: mmap.mmap, offset: int, nbytes: int) -> None:
    """Drop the pages wholly inside ``[offset, offset + nbytes)`` from this process's memory.

    Only ever called on bytes nothing has written to, so a later read (another tensor sharing
    the storage) reads the same bytes back from the file.
    """
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None:  # Windows: the pages go when the mapping does
        return
    start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        mapped.madvise(advice, start, end - start)


def _iter_loaded(path: Path, dtype: torch.dtype | None, device: torch.device | str | None,
                 keep: Callable[[str], bool] | None) -> Iterator[tuple[str, torch.Tensor]]:
    state = _load_pickle(path)
    for name in list(state):
        tensor = state.pop(name)  # each source is freed once converted
        if keep is None or keep(name):
            yield name, _convert(tensor, dtype, device)


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


def _safetensors_entries(path: Path) -> list[_Stored]:
    """Read and validate the header: JSON, known dtypes, sizes that match the shapes, and
    byte ranges inside the file that do not overlap. Returned in file order."""
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
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise CorruptCheckpointError(
                f"{path} has a malformed safetensors header ({type(exc).__name__}: "
                f"{str(exc)[:200]}); re-download it") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path} has a malformed safetensors header; re-download it")
    data_start = 8 + header_len
    stored = sorted((_safetensors_entry(path, name, info, data_start, size)
                     for name, info in header.items() if name != "__metadata__"),
                    key=lambda e: (e.offset, e.nbytes))
    for a, b in zip(stored, stored[1:]):
        if b.offset < a.offset + a.nbytes:
            raise CorruptCheckpointError(
                f"{path}: tensors {a.name!r} and {b.name!r} claim the same bytes (corrupt or "
                f"hostile); re-download it")
    return stored


def _safetensors_entry(path: Path, name: str, info: object, data_start: int,
                       size: int) -> _Stored:
    if not isinstance(info, dict):
        raise CorruptCheckpointError(
            f"{path}: header entry {name!r:.100} is a {type(info).__name__}, not an object "
            f"(truncated or hostile); re-download it")
    dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
    shape, offsets = info.get("shape"), info.get("data_offsets")
    problem = None
    if dtype is None:
        problem = f"dtype {info.get('dtype')!r:.100} is not a safetensors dtype flagopt reads"
    elif not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        problem = f"shape {shape!r:.100} is not a list of sizes"
    elif not (isinstance(offsets, list) and len(offsets) == 2
              and all(type(o) is int for o in offsets)
              and 0 <= offsets[0] <= offsets[1] <= size - data_start):
        problem = (f"data offsets {offsets!r:.100} are not inside the file's "
                   f"{size - data_start} data bytes")
    elif offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
        problem = (f"data offsets {offsets!r} hold {offsets[1] - offsets[0]} bytes, but "
                   f"{dtype} {tuple(shape)} needs {math.prod(shape) * dtype.itemsize}")
    if problem:
        raise CorruptCheckpointError(
            f"{path}: tensor {name!r:.100}: {problem} (truncated or hostile); re-download it")
    return _Stored(name, dtype, tuple(shape), data_start + offsets[0],
                   offsets[1] - offsets[0])


def _zip_entries(path: Path) -> list[_Stored] | None:
    """Tensor layouts of a zip ``.bin``, read from its pickle alone (no tensor data).

    ``torch.load(map_location="meta", weights_only=True)`` gives each storage's byte offset
    in the file; None if that is unavailable (then the file is read whole).
    """
    try:
        records = _zip_records(path)
    except (zipfile.BadZipFile, struct.error, OSError) as exc:
        raise CorruptCheckpointError(
            f"{path} is a damaged zip archive ({exc}); delete it and re-download") from exc
    if records is None:
        return None
    stored = []
    for name, tensor in _load_pickle(path, map_location="meta").items():
        storage = tensor.untyped_storage()
        offset = getattr(storage, "_checkpoint_offset", None)
        if not isinstance(offset, int):
            return None
        if storage.nbytes() > records.get(offset, -1):
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} needs {storage.nbytes()} bytes that no record of the "
                f"archive holds (corrupt or hostile); re-download it")
        stored.append(_Stored(name, tensor.dtype, tuple(tensor.shape), offset,
                              storage.nbytes(), tuple(tensor.stride()),
                              tensor.storage_offset()))
    return stored


def _zip_records(path: Path) -> dict[int, int] | None:
    """``{data offset: size}`` of every record of a zip; None if any is compressed."""
    records = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as fh:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                return None  # compressed bytes cannot be mapped as tensors
            fh.seek(info.header_offset + 26)  # local header: name and extra-field lengths
            name_len, extra_len = struct.unpack("<HH", fh.read(4))
            records[info.header_offset + 30 + name_len + extra_len] = info.file_size
    return records


def _load_pickle(path: Path, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < MIN_TORCH_FOR_PICKLE:
        raise UnsafeCheckpointError(
            f"refusing to unpickle {path} with torch {torch.__version__}: releases before "
            f"{'.'.join(map(str, MIN_TORCH_FOR_PICKLE))} have known bypasses of the safe "
            f"unpickler; upgrade torch or use a safetensors checkpoint")
    try:
        # weights_only=True passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot undo it.
        state = torch.load(path, map_location=map_location, weights_only=True)
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


def hf_name(name: str) -> str:
    """Our module name for a stored name (``model.decoder.*``, heads unchanged), before
    metaseq's fused ``qkv_proj`` is split."""
    if name.startswith("model."):
        name = name[len("model."):]
    for old, new in _METASEQ_RENAMES:
        if name.startswith(old):
            name = new + name[len(old):]
    return "model." + name if name.startswith("decoder.") else name


def hf_names(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map one stored tensor to our module names (``model.decoder.*``, heads unchanged).

    Handles the ``model.`` prefix or its absence and metaseq's names, splitting its fused
    ``qkv_proj`` (stored in K, V, Q order). Returns [] for metaseq bookkeeping entries.
    """
    if name.removeprefix("model.") in _METASEQ_DROPPED:
        return []
    name = hf_name(name)
    if ".self_attn.qkv_proj." not in name:
        # Heads keep their names; anything else unknown is reported as unexpected by the caller.
        return [(name, tensor)]
    k, v, q = tensor.chunk(3, dim=0)
    return [(name.replace("qkv_proj", proj), part)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v))]


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
