"""LoRA adapters on disk in PEFT's format, and loading them into a model.

A directory holds ``adapter_config.json`` (PEFT's ``LoraConfig`` fields) and
``adapter_model.safetensors`` (or an older ``adapter_model.bin``) whose keys are the model's
module names under ``base_model.model.`` with no adapter name, as PEFT's
``get_peft_model_state_dict`` writes them:

    base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight   (r, in)
    base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_B.weight   (out, r)
    base_model.model.score.weight                                            (modules_to_save)

Every option of the config either is implemented, is training-only, or is refused by name
(``UnsupportedAdapterOptionError``); none is dropped. Tensors must be exactly the ones the
config implies for the model (unknown or missing keys and wrong shapes are errors naming the
key), so an adapter for another model size fails before anything is merged.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flagopt.errors import (AdapterError, AdapterMismatchError, CheckpointError,
                            UnsupportedAdapterOptionError)
from flagopt.model import checkpoint
from flagopt.model.config import OPTConfig
from flagopt.model.lora import (LoraConfig, apply_lora, complete_config, lora_state_dict,
                                mark_only_lora_trainable, merge_lora, saved_module_names,
                                target_names)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "Adapter", "LoadMerger", "adapter_config_dict",
           "attach_adapter", "read_adapter", "read_adapter_config", "save_adapter"]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # first found is read
KEY_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (ours)

_SUPPORTED = {f.name for f in fields(LoraConfig)}
# Bookkeeping that changes nothing at inference or in training here.
_INFORMATIONAL = {"peft_type", "peft_version", "revision", "inference_mode", "auto_mapping",
                  "megatron_core", "qalora_group_size", "init_lora_weights"}
# Initialisations that only choose lora_A/lora_B's starting values (training-only). Others
# (pissa, olora, loftq, eva, corda ...) also rewrite the base weights, so their adapter does
# not fit the original model unless PEFT converted it when saving.
_PLAIN_INITS = (True, False, "gaussian")


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter read from ``directory``: its config and tensors by flagopt name
    (``model.decoder.layers.0.self_attn.q_proj.lora_A.weight``, ``score.weight``)."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    directory: Path


# --- reading ------------------------------------------------------------------------------------


def read_adapter(directory: str | os.PathLike) -> Adapter:
    """Read and validate an adapter directory (config and weights).

    Raises:
        AdapterError: no such directory or files, malformed JSON, keys outside
            ``base_model.model.``. UnsupportedAdapterOptionError: an option flagopt does not
            implement, named. CheckpointError: an unreadable or unsafe weights file.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    path = next((directory / n for n in ADAPTER_WEIGHTS if (directory / n).is_file()), None)
    if path is None:
        raise AdapterError(f"adapter directory {directory} has {ADAPTER_CONFIG} but no "
                           f"weights: expected one of {', '.join(ADAPTER_WEIGHTS)}")
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in checkpoint.iter_tensors(path):  # .bin: torch.load(weights_only=True)
        if not key.startswith(KEY_PREFIX):
            raise AdapterMismatchError(f"adapter tensor {key!r} in {path} does not start with "
                                       f"{KEY_PREFIX!r}; not a PEFT adapter of a whole model")
        if not tensor.is_floating_point():
            raise AdapterMismatchError(f"adapter tensor {key!r} in {path} is {tensor.dtype}; "
                                       f"expected floating point")
        tensors[key[len(KEY_PREFIX):]] = tensor.clone()  # small; no tie to the mapped file
    return Adapter(config, tensors, directory)


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """``adapter_config.json`` as a ``LoraConfig``, every field accounted for.

    Raises:
        AdapterError / UnsupportedAdapterOptionError: see ``read_adapter``.
    """
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{directory} is not a LoRA adapter directory: no {ADAPTER_CONFIG} "
                           f"(expected PEFT's save_pretrained layout)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path} holds {type(data).__name__}; expected a JSON object")
    return config_from_dict(data, str(path))


def config_from_dict(data: dict[str, Any], source: str = ADAPTER_CONFIG) -> LoraConfig:
    """A ``LoraConfig`` from PEFT's fields; see ``read_adapter_config``."""
    if data.get("peft_type") != "LORA":
        raise UnsupportedAdapterOptionError(
            f"{source}: peft_type={data.get('peft_type')!r}; flagopt loads only LoRA adapters "
            f"(peft_type 'LORA')")
    init = data.get("init_lora_weights", True)
    if not any(init is v or init == v for v in _PLAIN_INITS):
        raise UnsupportedAdapterOptionError(
            f"{source}: init_lora_weights={init!r} changes the base model's weights too, so "
            f"this adapter does not fit the original model; save it with PEFT's "
            f"path_initial_model_for_weight_conversion to get a plain LoRA adapter")
    refused = {k: v for k, v in data.items()
               if k not in _SUPPORTED and k not in _INFORMATIONAL and not _neutral(k, v)}
    if refused:
        raise UnsupportedAdapterOptionError(
            f"{source} uses option(s) flagopt does not implement: "
            f"{', '.join(f'{k}={v!r}' for k, v in sorted(refused.items()))}; flagopt's LoRA "
            f"is plain LoRA (optionally rsLoRA) on whole linear layers, bias 'none'")
    given = {k: data[k] for k in _SUPPORTED if data.get(k) is not None}
    if "target_modules" in given and not isinstance(given["target_modules"], str):
        given["target_modules"] = tuple(given["target_modules"])
    try:
        return LoraConfig(**given)
    except AdapterError as exc:
        raise AdapterError(f"{source}: {exc}") from None


def _neutral(key: str, value: Any) -> bool:
    """Whether an unimplemented option is at its off value (PEFT's defaults)."""
    if key == "bias":
        return value == "none"
    return value is None or value is False or value == {} or value == []


# --- checking against a model -------------------------------------------------------------------


def expected_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an adapter with ``config`` has for ``model`` (which may
    live on the meta device; it is not changed)."""
    config = complete_config(model, config)
    shapes = {}
    for name in target_names(model, config):
        base = model.get_submodule(name)
        shapes[f"{name}.lora_A.weight"] = (config.r, base.in_features)
        shapes[f"{name}.lora_B.weight"] = (base.out_features, config.r)
    for name in saved_module_names(model, config):
        for pname, p in model.get_submodule(name).named_parameters():
            shapes[f"{name}.{pname}"] = tuple(p.shape)
    return shapes


def check_adapter(adapter: Adapter, model: nn.Module) -> None:
    """Exactly the tensors ``adapter.config`` implies for ``model``, each of its shape.

    Raises:
        AdapterMismatchError: naming the unknown/missing keys or the key with a wrong shape
            (an adapter made for another model size, layer count or head).
    """
    expected = expected_shapes(model, adapter.config)
    unknown = sorted(set(adapter.tensors) - set(expected))
    missing = sorted(set(expected) - set(adapter.tensors))
    where = f"adapter {adapter.directory}"
    if unknown or missing:
        parts = ([f"unknown tensor(s) {', '.join(KEY_PREFIX + k for k in unknown[:4])}"
                  + (" ..." if len(unknown) > 4 else "")] if unknown else []) + \
                ([f"missing tensor(s) {', '.join(KEY_PREFIX + k for k in missing[:4])}"
                  + (" ..." if len(missing) > 4 else "")] if missing else [])
        raise AdapterMismatchError(
            f"{where} does not fit {type(model).__name__} with "
            f"{_sizes(model)}: {'; '.join(parts)}; was it made for another model?")
    for key, tensor in adapter.tensors.items():
        if tuple(tensor.shape) != expected[key]:
            raise AdapterMismatchError(
                f"{where}: tensor {KEY_PREFIX + key!r} has shape {tuple(tensor.shape)} but "
                f"this model ({_sizes(model)}) needs {expected[key]}; the adapter was made "
                f"for another model size")


def _sizes(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if not isinstance(config, OPTConfig):
        return "its sizes"
    return f"hidden_size={config.hidden_size}, num_hidden_layers={config.num_hidden_layers}"


# --- loading into a model -----------------------------------------------------------------------


def attach_adapter(model: nn.Module, adapter: Adapter, *, merge: bool = False,
                   is_trainable: bool = False) -> nn.Module:
    """Put ``adapter`` on a loaded ``model`` (in place) and return it.

    Args:
        merge: merge into the base weights and drop the LoRA layers (float bases only: for
            int8, merge while loading instead, see ``LoadMerger``).
        is_trainable: leave the adapters and ``modules_to_save`` trainable (PEFT's name);
            by default every parameter is frozen, as for inference.
    Raises:
        AdapterMismatchError, AdapterError: see ``check_adapter``, ``LoRALinear.merge``.
    """
    check_adapter(adapter, model)
    config = apply_lora(model, adapter.config)
    with torch.no_grad():
        for name, param in _named_targets(model, lora_state_dict(model, config)):
            param.copy_(adapter.tensors[name].to(param.dtype))
    if merge:
        merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if is_trainable:
        mark_only_lora_trainable(model, config)
    return model


def _named_targets(model: nn.Module, state: dict[str, torch.Tensor]
                   ) -> list[tuple[str, torch.Tensor]]:
    params = dict(model.named_parameters())
    return [(name, params[name]) for name in state if name in params]


class LoadMerger:
    """Merges an adapter into the weights as ``load_pretrained`` reads them (its
    ``transform``), so the merge happens in float before any int8 quantization.

        merger = LoadMerger(adapter, model_class, config)    # checks the adapter first
        model = load_pretrained(directory, ..., transform=merger)
        merger.finish(model)                                  # all merged? heads copied

    Args:
        adapter: the adapter. model_class / config: the model that will be loaded (checked
            on the meta device, before any weight is read).
    Raises:
        AdapterMismatchError: see ``check_adapter``.
    """

    def __init__(self, adapter: Adapter, model_class: type[nn.Module], config: OPTConfig) -> None:
        with torch.device("meta"):
            probe = model_class(config)
        check_adapter(adapter, probe)
        self.config = complete_config(probe, adapter.config)
        self.adapter = adapter
        scaling = self.config.scaling
        self._deltas: dict[str, torch.Tensor] = {}
        for name in target_names(probe, self.config):
            a = adapter.tensors[f"{name}.lora_A.weight"].float()
            b = adapter.tensors[f"{name}.lora_B.weight"].float()
            self._deltas[f"{name}.weight"] = (b @ a) * scaling  # (out, in) float32
        self._heads = {k: t for k, t in adapter.tensors.items() if ".lora_" not in k}
        self._merged: set[str] = set()

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` + its update in float32 (returned in float32), or ``tensor`` itself."""
        delta = self._deltas.get(name)
        if delta is None or not tensor.is_floating_point() or tensor.shape != delta.shape:
            return tensor  # not a target, or a bad tensor load_pretrained names next
        if name in self._merged:
            raise CheckpointError(f"tensor {name!r} was read twice while merging "
                                  f"{self.adapter.directory}")
        self._merged.add(name)
        return tensor.float() + delta.to(tensor.device)

    def finish(self, model: nn.Module) -> nn.Module:
        """Check every update was merged and copy the adapter's ``modules_to_save`` tensors
        (task heads) into ``model``; returns it.

        Raises:
            AdapterMismatchError: a target weight was never read (e.g. the tied LM head).
        """
        left = sorted(set(self._deltas) - self._merged)
        if left:
            raise AdapterMismatchError(f"adapter {self.adapter.directory} targets "
                                       f"{', '.join(left[:4])}, which the checkpoint never "
                                       f"provided (a tied or absent weight); use merge=False")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in self._heads.items():
                params[name].copy_(tensor.to(params[name].dtype))
        return model


# --- saving -------------------------------------------------------------------------------------


def adapter_config_dict(config: LoraConfig, *, inference_mode: bool = True) -> dict[str, Any]:
    """``config`` in PEFT's ``adapter_config.json`` fields (what PEFT 0.21 writes for plain
    LoRA; the options flagopt does not implement at their off values)."""
    targets = config.target_modules
    return {
        "peft_type": "LORA", "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "modules_to_save": None if config.modules_to_save is None
        else list(config.modules_to_save),
        "use_rslora": config.use_rslora, "bias": "none", "fan_in_fan_out": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": inference_mode,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "layers_pattern": None, "revision": None,
    }


def save_adapter(directory: str | os.PathLike, model: nn.Module, config: LoraConfig) -> Path:
    """Write ``model``'s adapter as PEFT does (``adapter_config.json`` +
    ``adapter_model.safetensors``), each file to a temporary name first and then renamed.

    Args:
        config: the config ``apply_lora`` returned.
    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {KEY_PREFIX + k: v.detach().to("cpu").contiguous()
             for k, v in lora_state_dict(model, config).items()}
    weights = directory / ADAPTER_WEIGHTS[0]
    save_file(state, os.fspath(weights.with_name(weights.name + ".tmp")),
              metadata={"format": "pt"})
    os.replace(weights.with_name(weights.name + ".tmp"), weights)
    stale = directory / ADAPTER_WEIGHTS[1]
    if stale.is_file():  # an older .bin beside it would be ambiguous to readers
        stale.unlink()
    cfg = directory / ADAPTER_CONFIG
    tmp = cfg.with_name(cfg.name + ".tmp")
    tmp.write_text(json.dumps(adapter_config_dict(config), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, cfg)
    return directory
