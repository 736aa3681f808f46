"""Build an OPT model from a checkpoint directory without a second copy of the weights.

The model is built on the ``meta`` device (no random weights allocated), then each tensor is
read (memory-mapped), converted straight to the target dtype and device, and assigned by
name. Peak memory stays close to one copy of the weights in the target dtype: the source pages
of a converted tensor are dropped as soon as it is converted (see ``checkpoint``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from flagopt.errors import CorruptCheckpointError, MissingWeightsError, ShapeMismatchError
from flagopt.model import checkpoint
from flagopt.model.config import OPTConfig
from flagopt.model.heads import OPTForCausalLM
from flagopt.model.quantize import QUANTIZE_MODES, int8_modules, is_quantized_param, tie_int8

logger = logging.getLogger(__name__)

# How a loaded tensor is placed in its module: (module, param_name, tensor) -> None.
TensorHook = Callable[[nn.Module, str, torch.Tensor], None]
# What a loaded tensor becomes before it is placed: (name, tensor) -> tensor.
TensorTransform = Callable[[str, torch.Tensor], torch.Tensor]

_HEAD_KEYS = ("lm_head.", "score.", "qa_outputs.")


def load_pretrained(directory: str | os.PathLike,
                    model_class: type[nn.Module] = OPTForCausalLM,
                    *,
                    dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu",
                    config: OPTConfig | None = None,
                    attn_implementation: str = "sdpa",
                    fresh_heads: bool = True,
                    quantize: str | None = None,
                    transform: TensorTransform | None = None) -> nn.Module:
    """Load a model of ``model_class`` from a checkpoint directory in any OPT layout.

    Args:
        directory: holds ``config.json`` and the weights (see ``checkpoint.WEIGHT_FILES``).
        model_class: ``OPTForCausalLM``, ``OPTForSequenceClassification``,
            ``OPTForQuestionAnswering`` or ``OPTModel``.
        dtype / device: where the weights end up; floating tensors are converted on the way.
        config: overrides the directory's ``config.json`` (e.g. ``num_labels``).
        fresh_heads: task-head tensors the checkpoint lacks (``score``, ``qa_outputs``) are
            initialised fresh (and logged once) instead of being an error.
        quantize: ``"int8"`` stores every linear layer and the tied embedding/LM head as
            int8 with per-output-channel scales, quantizing each tensor as it is read (the
            full-precision model never exists); ``dtype`` is then the activation dtype.
            ``"w8a8"``: the same weights, and products of 2+ rows with int8 activations too
            (``quantize.py``: faster batches and prefill on CPUs with int8 matrix units).
        transform: ``transform(name, tensor)`` is applied to each tensor as it is read,
            before it is checked, converted to ``dtype`` and quantized (how a LoRA adapter is
            merged in float before int8: ``adapters.LoadMerger``).
    Returns:
        The model in eval mode.
    Raises:
        CheckpointError and subclasses: missing/unexpected tensors, bad shapes, unreadable
            or unsafe files (each message names the tensor or file and what to do).
    """
    directory = Path(directory)
    config = config or OPTConfig.from_json(directory / "config.json")
    if quantize not in (None, *QUANTIZE_MODES):
        raise ValueError(f"quantize={quantize!r}; expected None or one of {QUANTIZE_MODES}")
    files = checkpoint.find_weight_files(directory)
    _check_config_fits(config, checkpoint.read_layouts(files), directory)
    with torch.device("meta"), no_init():
        model = model_class(config, attn_implementation=attn_implementation)
    assign_hook = None
    read_dtype = dtype
    if quantize is not None:
        int8_modules(model, dtype, quantize)
        assign_hook = _int8_assign(dtype, device)
        read_dtype = None  # quantized straight from the mapped source, pages dropped after
    expected = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model, "tied", False)
    prefix = "" if any(k.startswith("model.") for k in expected) else "model."
    skip_head = tied or "lm_head.weight" not in expected  # tied to embed_tokens, or no LM head

    def keep(stored_name: str) -> bool:  # a skipped tensor is never read, let alone converted
        return not (skip_head and checkpoint.hf_name(stored_name) == "lm_head.weight")

    loaded: dict[str, Path] = {}
    unexpected: list[str] = []
    for path in files:
        for stored_name, stored in checkpoint.iter_tensors(path, dtype=read_dtype,
                                                           device=device, keep=keep,
                                                           transient=quantize is not None):
            for name, tensor in checkpoint.hf_names(stored_name, stored):
                name = name[len(prefix):] if prefix and name.startswith(prefix) else name
                if name not in expected:
                    unexpected.append(name)
                    continue
                if name in loaded:
                    raise checkpoint.duplicate_tensor(name, loaded[name], path)
                if transform is not None:
                    tensor = transform(name, tensor)
                    if read_dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(read_dtype)
                _check_tensor(name, tensor, expected[name], path)
                _assign(model, name, tensor, assign_hook)
                loaded[name] = path
    _finish(model, expected, loaded, unexpected, tied, fresh_heads, dtype, device, directory,
            assign_hook)
    return model.eval()


_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Skip random initialisation of modules built on the meta device.

    Initialising a meta tensor computes nothing, but the first call costs about a second of
    one-time torch setup per process. Modules on real devices (another thread's, say) are
    initialised as usual while this is active.
    """
    classes = (nn.Linear, nn.Embedding, nn.LayerNorm)
    with _INIT_LOCK:
        saved = [c.reset_parameters for c in classes]

        def skip_on_meta(original):
            def reset(self) -> None:
                weight = getattr(self, "weight", None)
                if weight is None or weight.device.type != "meta":
                    original(self)
            return reset

        try:
            for c, fn in zip(classes, saved):
                c.reset_parameters = skip_on_meta(fn)
            yield
        finally:
            for c, fn in zip(classes, saved):
                c.reset_parameters = fn


def _int8_assign(dtype: torch.dtype, device: torch.device | str) -> TensorHook:
    """Quantize int8 modules' weights; put every other tensor in ``dtype``."""
    def assign(module: nn.Module, param_name: str, tensor: torch.Tensor) -> None:
        if is_quantized_param(module, param_name):
            module.set_weight(tensor, device)
        else:
            module._parameters[param_name] = nn.Parameter(
                tensor.to(device=device, dtype=dtype, copy=True), requires_grad=False)
    return assign


def _check_config_fits(config: OPTConfig,
                       layouts: dict[str, tuple[torch.dtype, tuple[int, ...], Path]],
                       directory: Path) -> None:
    """Compare the config's sizes with the checkpoint's tensors before anything is built, so
    ``num_hidden_layers=20000`` over a 3-layer checkpoint fails at once, not after a long
    build (the full per-tensor check still runs while loading)."""
    layers = {int(m.group(1)) for name in layouts
              if (m := re.match(r"model\.decoder\.layers\.(\d+)\.", name))}
    # Only more layers than stored is refused here; fewer is cheap to build, and the strict
    # load then names the unexpected tensors.
    if layers and config.num_hidden_layers > max(layers) + 1:
        raise ShapeMismatchError(
            f"config num_hidden_layers={config.num_hidden_layers} but the checkpoint in "
            f"{directory} holds {max(layers) + 1} layers; config.json and the weights disagree")
    h, e = config.hidden_size, config.word_embed_proj_dim
    implied = {
        "model.decoder.embed_tokens.weight": ((config.vocab_size, e),
                                              f"vocab_size={config.vocab_size}, "
                                              f"word_embed_proj_dim={e}"),
        "model.decoder.embed_positions.weight": ((config.max_position_embeddings + 2, h),
                                                 f"max_position_embeddings + 2, hidden_size={h}"),
        "model.decoder.layers.0.fc1.weight": ((config.ffn_dim, h),
                                              f"ffn_dim={config.ffn_dim}, hidden_size={h}"),
    }
    for name, (shape, fields) in implied.items():
        if name in layouts and layouts[name][1] != shape:
            raise ShapeMismatchError(
                f"tensor {name!r} in {layouts[name][2].name} has shape {layouts[name][1]} but "
                f"the config implies {shape} ({fields}); config.json and the weights disagree")


def _check_tensor(name: str, tensor: torch.Tensor, param: torch.Tensor, path: Path) -> None:
    """Every OPT weight is floating point (int8 is made here, never read) with the config's
    shape."""
    if not tensor.is_floating_point():
        raise CorruptCheckpointError(
            f"tensor {name!r} in {path.name} is stored as {tensor.dtype}, but the model needs "
            f"a floating-point weight there; the file's header is wrong (corrupt or hostile): "
            f"re-download it")
    if tuple(tensor.shape) != tuple(param.shape):
        raise ShapeMismatchError(
            f"tensor {name!r} in {path.name} has shape {tuple(tensor.shape)} but the config "
            f"implies {tuple(param.shape)}; config.json and the weights disagree")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor,
            hook: TensorHook | None) -> None:
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    if hook is not None:
        hook(module, param_name, tensor)
    else:
        module._parameters[param_name] = nn.Parameter(tensor, requires_grad=False)


def _finish(model: nn.Module, expected: dict[str, torch.Tensor], loaded: dict[str, Path],
            unexpected: list[str], tied: bool, fresh_heads: bool, dtype: torch.dtype,
            device: torch.device | str, directory: Path, hook: TensorHook | None) -> None:
    skip = {"lm_head.weight"} if tied else set()
    missing = [n for n in expected if n not in loaded and n not in skip]
    fresh = [n for n in missing if fresh_heads and n.startswith(_HEAD_KEYS[1:])]
    missing = [n for n in missing if n not in fresh]
    if missing or unexpected:
        raise MissingWeightsError(
            checkpoint.describe_missing(missing, unexpected, str(directory)))
    if fresh:
        logger.warning("%s: no weights for %s in %s; they start fresh (train them first)",
                       type(model).__name__, ", ".join(sorted(fresh)), directory)
        for name in fresh:
            _assign(model, name, fresh_tensor(model, name, expected[name].shape, dtype=dtype,
                                              device=device), hook)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    tie_int8(model)


def fresh_model(model_class: type[nn.Module], config: OPTConfig, *, dtype: torch.dtype,
                device: torch.device | str, attn_implementation: str = "sdpa",
                generator: torch.Generator | None = None) -> nn.Module:
    """A model of ``model_class`` with the reference's fresh initialisation (``fresh_tensor``),
    built on the meta device and then given its tensors straight on ``device``.

    Args:
        generator: where the random weights come from; None is torch's global generator
            (so ``torch.manual_seed`` governs it).
    Returns:
        The model in eval mode.
    """
    with torch.device("meta"), no_init():
        model = model_class(config, attn_implementation=attn_implementation)
    for name, param in model.named_parameters():  # the tied head once, with the embedding
        _assign(model, name, fresh_tensor(model, name, param.shape, dtype=dtype, device=device,
                                          generator=generator), None)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def fresh_tensor(model: nn.Module, name: str, shape: torch.Size, *, dtype: torch.dtype,
                 device: torch.device | str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The reference's initialisation of parameter ``name`` of ``model``.

    Linear and Embedding weights ~ normal(0, config.init_std), drawn in float32 on the
    generator's device and then converted (so the values do not depend on ``dtype`` or
    ``device``), with an Embedding's padding row zero; biases zero; LayerNorm weights one.

    Args:
        generator: None is torch's global generator, drawing on ``device``.
    """
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    if param_name == "bias":
        return torch.zeros(shape, dtype=dtype, device=device)
    if isinstance(module, nn.LayerNorm):
        return torch.ones(shape, dtype=dtype, device=device)
    draw_on = generator.device if generator is not None else device
    weight = torch.empty(shape, dtype=torch.float32, device=draw_on)
    weight.normal_(0.0, model.config.init_std, generator=generator)
    padding_idx = getattr(module, "padding_idx", None)
    if isinstance(module, nn.Embedding) and padding_idx is not None:
        weight[padding_idx].zero_()
    return weight.to(device=device, dtype=dtype)
