"""Prepared weights: a checkpoint converted once per (dtype, quantization, layout), then
memory-mapped on every later load with no conversion at all.

Where: beside the checkpoint, ``<checkpoint dir>/.flagopt-prepared/<entry>/`` holding
``model.safetensors`` (every parameter and buffer of the built model, in its final dtype and
layout: int8 weights and their scales, a tied matrix once) and ``manifest.json``.

The key (``prepared_material``) is everything the stored bytes depend on: this module's
``FORMAT_VERSION``, flagopt's version, the model class, dtype, quantize mode, attention
implementation, the full config, the model's parameter/buffer layout (names, shapes, dtypes as
built on the meta device, so a fused or re-laid-out module is a new key), and the identity of
every checkpoint file. The hub's checksums are not recorded next to a download, so a file's
identity is its name, size, ``st_mtime_ns``, ``st_ctime_ns`` and the sha256 of 16 blocks of
64 KiB spread over it (the whole file when smaller): a file rewritten with other bytes, even of
the same size and with its mtime put back, has a new ctime, so it is never served stale. The
entry's name carries a hash of the key; the manifest carries the key itself, compared exactly.

A read is verified before anything is assigned: the manifest parses and its key is this load's
key, the weights file has the recorded size and mtime and the recorded sampled sha256, its
safetensors header is valid (``checkpoint.iter_tensors``) and lists exactly the manifest's
tensors, which are exactly the model's. Anything else is logged, the entry discarded and
rebuilt: never a crash, never wrong weights.

Building happens under ``<entry>.lock`` (``fcntl.flock``; a second process waits, then uses
what the first built), into ``.tmp-<entry>-<pid>-<random>/``, fsynced, and renamed into place
atomically; free space is checked first and a failed write (ENOSPC...) leaves nothing behind.
Entries of the same options built from an older version of the checkpoint are removed then.
A directory that cannot be written gets a normal load (logged), and so does a legacy pickle
checkpoint whose headers cannot be listed.

Alignment: every tensor's bytes start at a multiple of ``ALIGN`` (64) in the file, so in the
page-aligned mapping too: torch's fused int8 kernel crashes (SIGSEGV, AVX-512 CPUs) on an
int8 weight that is not, and vector kernels read aligned rows faster. The gaps are explicit
``uint8`` padding tensors (``PAD_PREFIX``), so the file stays a valid safetensors file (no
holes); reads skip them.

Memory: the weights file is mapped copy-on-write (``mmap.ACCESS_COPY``), each tensor a view of
it, so a warm load holds one copy of the weights (file-backed pages, shared with the page
cache) and writes to a loaded model never reach the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flagopt import settings
from flagopt.errors import CheckpointError
from flagopt.model import checkpoint, loading
from flagopt.model.config import OPTConfig
from flagopt.model.heads import OPTForCausalLM
from flagopt.model.quantize import QUANTIZE_MODES, int8_modules
from flagopt.version import __version__

__all__ = ["FORMAT_VERSION", "PREPARED_DIRNAME", "load_prepared", "prepared_material"]

logger = logging.getLogger(__name__)

PREPARED_DIRNAME = ".flagopt-prepared"
FORMAT_VERSION = 2  # 2: tensors 64-byte aligned (entries of 1 are rebuilt: a new key)
ALIGN = 64
PAD_PREFIX = "__flagopt_padding_"  # the uint8 tensors that fill the gaps between tensors
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"
LOCK_TIMEOUT_S = 3600.0  # a first load of a big model takes minutes; the waiter uses its result
_LOCK_POLL_S = 0.05
_SAMPLE_BLOCK = 64 * 1024
_SAMPLE_BLOCKS = 16
_READ_ONLY_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_FRESH_HEADS = ("score.", "qa_outputs.")  # task heads a checkpoint may lack (start fresh)
_ST_DTYPES = {v: k for k, v in checkpoint._SAFETENSORS_DTYPES.items()}


class _Unusable(Exception):
    """A prepared entry that must not be used (missing, stale or damaged); says why."""


def load_prepared(directory: str | os.PathLike,
                  model_class: type[nn.Module] = OPTForCausalLM,
                  *,
                  dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu",
                  config: OPTConfig | None = None,
                  attn_implementation: str = "sdpa",
                  fresh_heads: bool = True,
                  quantize: str | None = None) -> nn.Module:
    """``loading.load_pretrained``'s model, through the prepared-weights cache.

    Arguments and errors are ``load_pretrained``'s. The first load (per key, see the module
    docstring) loads normally and writes the prepared entry; later loads map it with no
    conversion. Task heads the checkpoint lacks are never cached: they start fresh each time.

    Returns:
        The model in eval mode, with the same tensors ``load_pretrained`` gives, bit for bit.
    """
    directory = Path(directory)
    config = config or OPTConfig.from_json(directory / "config.json")
    if quantize not in (None, *QUANTIZE_MODES):
        raise ValueError(f"quantize={quantize!r}; expected None or one of {QUANTIZE_MODES}")
    files = checkpoint.find_weight_files(directory)
    args = dict(model_class=model_class, dtype=dtype, device=device, config=config,
                attn_implementation=attn_implementation, fresh_heads=fresh_heads,
                quantize=quantize)
    model = _meta_model(model_class, config, attn_implementation, quantize, dtype)
    material = prepared_material(directory, files, model, model_class, config, dtype, quantize,
                                 attn_implementation)
    root = directory / PREPARED_DIRNAME
    entry = root / _entry_name(material)
    try:
        return _use(entry, material, model, args)
    except _Unusable as why:
        if entry.exists():
            logger.warning("not using prepared weights %s: %s; rebuilding them", entry, why)
    if not _make_root(root):
        return loading.load_pretrained(directory, **args)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_lock(root / f"{entry.name}.lock"))
            try:  # another process may have built it while we waited
                return _use(entry, material, _meta_model(model_class, config,
                                                         attn_implementation, quantize, dtype),
                            args)
            except _Unusable:
                _discard(entry, root)
        except OSError as exc:  # TimeoutError included
            logger.warning("%s; loading %s without the prepared cache", exc, directory)
            return loading.load_pretrained(directory, **args)
        return _build(directory, files, entry, material, args)


# --- the key ----------------------------------------------------------------------------------


def prepared_material(directory: Path, files: list[Path], meta_model: nn.Module,
                      model_class: type[nn.Module], config: OPTConfig, dtype: torch.dtype,
                      quantize: str | None, attn_implementation: str) -> dict[str, Any]:
    """Everything the prepared bytes depend on, as JSON-able data (see the module docstring).

    Args:
        meta_model: the model as built on the meta device before loading (its layout).
    """
    index = [p for p in (directory / name for name in checkpoint.WEIGHT_FILES
                         if name.endswith(".index.json")) if p.is_file()]
    return {
        "format": FORMAT_VERSION,
        "flagopt": __version__,
        "options": {"model_class": f"{model_class.__module__}.{model_class.__qualname__}",
                    "dtype": str(dtype).removeprefix("torch."), "quantize": quantize,
                    "attn_implementation": attn_implementation},
        "config": json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str)),
        "layout": [[name, kind, list(t.shape), str(t.dtype).removeprefix("torch.")]
                   for name, kind, t in _state(meta_model)],
        "sources": [file_identity(p, directory) for p in [*index, *files]],
    }


def file_identity(path: Path, directory: Path) -> dict[str, Any]:
    """A checkpoint file's identity: name, size, mtime and ctime (ns), sampled sha256."""
    st = os.stat(path)
    return {"name": os.path.relpath(path, directory), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "sample_sha256": sample_digest(path, st.st_size)}


def sample_digest(path: Path, size: int) -> str:
    """sha256 of ``_SAMPLE_BLOCKS`` blocks spread evenly over the file (all of a small one),
    first and last included: a cheap content check of a multi-GB file."""
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= _SAMPLE_BLOCK * _SAMPLE_BLOCKS:
            digest.update(fh.read())
        else:
            step = (size - _SAMPLE_BLOCK) / (_SAMPLE_BLOCKS - 1)
            for i in range(_SAMPLE_BLOCKS):
                fh.seek(int(i * step))
                digest.update(fh.read(_SAMPLE_BLOCK))
    return digest.hexdigest()


def _entry_name(material: dict[str, Any]) -> str:
    """``<class>-<dtype>-<quantize>-<attn>-<options hash>-<sources hash>``: readable, and the
    entries of one set of options differ only in their last part."""
    opts = material["options"]
    options = {k: v for k, v in material.items() if k != "sources"}
    return "-".join([opts["model_class"].rpartition(".")[2], opts["dtype"],
                     opts["quantize"] or "full", opts["attn_implementation"],
                     _hash(options)[:12], _hash(material["sources"])[:16]])


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# --- the model's state ------------------------------------------------------------------------


def _meta_model(model_class: type[nn.Module], config: OPTConfig, attn_implementation: str,
                quantize: str | None, dtype: torch.dtype) -> nn.Module:
    """The empty model as ``load_pretrained`` builds it before reading any tensor."""
    with torch.device("meta"), loading.no_init():
        model = model_class(config, attn_implementation=attn_implementation)
    if quantize is not None:
        int8_modules(model, dtype, quantize)
    return model


def _state(model: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """``(name, "param" | "buffer", tensor)`` for every parameter and buffer, shared ones
    under each of their names."""
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for kind, tensors in (("param", module._parameters), ("buffer", module._buffers)):
            for name, tensor in tensors.items():
                if tensor is not None:
                    yield prefix + name, kind, tensor


def _set(model: nn.Module, name: str, kind: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if kind == "param":
        value = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(
            tensor, requires_grad=False)
        module._parameters[attr] = value
    else:
        module._buffers[attr] = tensor


# --- reading ----------------------------------------------------------------------------------


def _use(entry: Path, material: dict[str, Any], model: nn.Module,
         args: dict[str, Any]) -> nn.Module:
    """``model`` (on meta) given the entry's tensors, after verifying them all.

    Raises:
        _Unusable: the entry is missing, stale or damaged (nothing was assigned then).
    """
    manifest = _read_manifest(entry, material)
    weights = entry / WEIGHTS_NAME
    try:
        st = os.stat(weights)
        if (st.st_size, st.st_mtime_ns) != (manifest["size"], manifest["mtime_ns"]):
            raise _Unusable(f"{WEIGHTS_NAME} changed since it was written (size or mtime)")
        if sample_digest(weights, st.st_size) != manifest["sample_sha256"]:
            raise _Unusable(f"{WEIGHTS_NAME}'s sampled sha256 differs from the manifest's")
        tensors = {name: t for name, t in checkpoint.iter_tensors(weights, device=args["device"])
                   if not name.startswith(PAD_PREFIX)}
    except (OSError, CheckpointError) as exc:  # CheckpointError: a damaged header
        raise _Unusable(f"{WEIGHTS_NAME} cannot be read ({exc})") from exc
    stored = {name: [dtype, shape] for name, dtype, shape in manifest["tensors"]}
    found = {n: [str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in tensors.items()}
    if found != stored:
        raise _Unusable(f"{WEIGHTS_NAME}'s tensors differ from the manifest's")
    aliases, fresh = manifest["aliases"], set(manifest["fresh"])
    if fresh and not args["fresh_heads"]:
        raise _Unusable("the checkpoint lacks task-head tensors and fresh_heads=False")
    state = list(_state(model))
    named = {n for n, _, _ in state}
    if set(stored) | set(aliases) | fresh != named or set(aliases.values()) - set(stored):
        raise _Unusable("its tensors are not this model's")
    for name, kind, meta in state:
        if name in fresh:
            continue
        tensor = tensors[aliases.get(name, name)]
        if tuple(tensor.shape) != tuple(meta.shape):
            raise _Unusable(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model "
                            f"needs {tuple(meta.shape)}")
    shared: dict[str, torch.Tensor] = {}
    for name, kind, _ in state:
        if name in fresh:
            continue
        key = aliases.get(name, name)
        if key not in shared:  # one Parameter object for all the names of a tied tensor
            shared[key] = tensors[key] if kind == "buffer" else nn.Parameter(
                tensors[key], requires_grad=False)
        _set(model, name, kind, shared[key])
    if fresh:
        logger.warning("%s: no weights for %s in the checkpoint; they start fresh (train them "
                       "first)", type(model).__name__, ", ".join(sorted(fresh)))
        for name in sorted(fresh):
            loading._assign(model, name, loading.fresh_tensor(
                model, name, model.get_parameter(name).shape, dtype=args["dtype"],
                device=args["device"]), None)
    logger.info("loaded prepared weights from %s", entry)
    return model.eval()


def _read_manifest(entry: Path, material: dict[str, Any]) -> dict[str, Any]:
    try:
        manifest = json.loads((entry / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _Unusable("not built yet") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise _Unusable(f"{MANIFEST_NAME} cannot be read ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("material") != material:
        raise _Unusable(f"{MANIFEST_NAME} was written for another checkpoint or options")
    try:
        ok = (isinstance(manifest["size"], int) and isinstance(manifest["mtime_ns"], int)
              and isinstance(manifest["sample_sha256"], str)
              and isinstance(manifest["aliases"], dict) and isinstance(manifest["fresh"], list)
              and all(isinstance(t, list) and len(t) == 3 for t in manifest["tensors"]))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise _Unusable(f"{MANIFEST_NAME} is malformed")
    return manifest


# --- building ---------------------------------------------------------------------------------


def _build(directory: Path, files: list[Path], entry: Path, material: dict[str, Any],
           args: dict[str, Any]) -> nn.Module:
    """Load normally, then write the entry (under the caller's lock). A write that fails is
    logged and leaves nothing; the loaded model is returned either way."""
    start = time.perf_counter()
    model = loading.load_pretrained(directory, **args)
    layouts = checkpoint.read_layouts(files)
    if {path for _, _, path in layouts.values()} != set(files):
        logger.info("%s: a legacy pickle checkpoint's tensors cannot be listed without reading "
                    "it; not preparing it (convert it to safetensors to get fast loads)",
                    directory)
        return model
    fresh = [n for n, _, _ in _state(model) if n.startswith(_FRESH_HEADS) and n not in layouts]
    tensors: list[tuple[str, torch.Tensor]] = []
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, _, tensor in _state(model):
        if name in fresh:
            continue
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
            tensors.append((name, tensor))
    needed = sum(t.numel() * t.element_size() for _, t in tensors) + (1 << 20)
    tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        _check_disk_space(entry.parent, needed)
        tmp.mkdir()
        manifest = _write_weights(tmp / WEIGHTS_NAME, tensors)
        manifest.update(material=material, aliases=aliases, fresh=fresh)
        _write_json(tmp / MANIFEST_NAME, manifest)
        os.rename(tmp, entry)
        _fsync_dir(entry.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("could not write prepared weights %s (%s); this load is a normal one, "
                       "and the next will try again", entry, exc.strerror or exc)
        return model
    _prune(entry)
    logger.info("prepared %s weights in %s (%.1f s)", directory, entry,
                time.perf_counter() - start)
    return model


def _write_weights(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """Write a safetensors file one tensor at a time (no second copy of the weights), every
    tensor's bytes starting ``ALIGN``-aligned (zero ``uint8`` padding tensors in the gaps);
    returns the manifest's file part (which lists the real tensors only)."""
    tensors = sorted(tensors, key=lambda nt: (-nt[1].element_size(), nt[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": "flagopt"}}
    pads: list[int] = []  # the padding before each tensor, in bytes
    offset = 0
    for name, t in tensors:
        pad = -offset % ALIGN
        if pad:
            header[f"{PAD_PREFIX}{len(header)}"] = {"dtype": "U8", "shape": [pad],
                                                     "data_offsets": [offset, offset + pad]}
        pads.append(pad)
        offset += pad
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)  # tensor data starts ALIGN-aligned
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for pad, (_, t) in zip(pads, tensors):
            fh.write(bytes(pad))
            if t.numel():  # as bytes, a view: (numel * itemsize,) uint8
                fh.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        fh.flush()
        os.fsync(fh.fileno())
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sample_sha256": sample_digest(path, st.st_size),
            "tensors": [[n, str(t.dtype).removeprefix("torch."), list(t.shape)]
                        for n, t in tensors]}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_disk_space(directory: Path, needed: int) -> None:
    """Raises OSError(ENOSPC) unless ``needed`` bytes fit (or the check is off)."""
    if settings.get().skip_disk_check:
        return
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"not enough disk space in {directory}: need {needed} "
                                    f"bytes, {free} free")


def _make_root(root: Path) -> bool:
    """Create ``.flagopt-prepared``; False (logged) where the directory cannot be written."""
    if root.is_symlink():
        logger.warning("%s is a symbolic link; flagopt never writes through a link it did not "
                       "make, so this load does not use the prepared cache", root)
        return False
    try:
        root.mkdir(exist_ok=True)
        probe = root / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        read_only = exc.errno in _READ_ONLY_ERRNOS
        logger.log(logging.INFO if read_only else logging.WARNING,
                   "%s cannot be written (%s): loading without the prepared cache", root,
                   exc.strerror or exc)
        return False
    return True


@contextlib.contextmanager
def _lock(path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (released by the kernel if the process dies); the
    lock file is removed on release, as the downloader's are.

    Raises:
        TimeoutError: another process held it for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"waited {timeout:g}s for {path}, held by another process "
                                   f"preparing the same weights") from None
            if not announced:
                logger.info("waiting for %s: another process is preparing these weights", path)
                announced = True
            time.sleep(_LOCK_POLL_S)
            continue
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed this lock file while we waited: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # still holding the lock, so no one else is using this inode
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _discard(entry: Path, root: Path) -> None:
    """Remove a bad entry and builders' leftovers (the caller holds the entry's lock).

    The entry is renamed away first, so no one finds it half deleted; a process that mapped
    it keeps its pages until it lets go of them.
    """
    for leftover in root.glob(f".tmp-{entry.name}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if entry.exists():
        trash = root / f".trash-{entry.name}-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _prune(entry: Path) -> None:
    """Remove entries with the same options built from an older version of the checkpoint."""
    prefix = entry.name.rpartition("-")[0] + "-"
    for other in entry.parent.glob(f"{prefix}*"):
        if other != entry and other.is_dir() and not other.is_symlink():
            logger.info("removing %s: built from an older version of the checkpoint", other)
            shutil.rmtree(other, ignore_errors=True)
