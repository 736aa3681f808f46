"""LoRA: a trainable low-rank update ``scaling * B @ A`` beside a frozen linear layer.

Numerics and names follow PEFT's LoRA (``peft.tuners.lora``) so adapters move between the two
(see ``adapters``): ``lora_A`` (r, in) starts kaiming-uniform (a = sqrt(5)), ``lora_B`` (out, r)
starts at zero, ``scaling = lora_alpha / r`` (``use_rslora``: ``lora_alpha / sqrt(r)``), and the
wrapped layer sits under ``base_layer``. The base may be an ``nn.Linear`` or an ``Int8Linear``
(the int8 + LoRA recipe: frozen int8 weights, adapters in float).

    config = LoraConfig(r=16, lora_alpha=32)
    config = apply_lora(model, config)       # wraps q_proj / v_proj, freezes everything else
    trainable_parameters(model)              # 589,824 for opt-125m, as PEFT counts
    merge_lora(model)                        # W += scaling * B @ A, LoRALinear -> its base
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from flagopt.errors import AdapterError
from flagopt.model.quantize import Int8Linear

__all__ = ["LoraConfig", "LoRALinear", "TASK_TYPES", "apply_lora", "lora_modules",
           "lora_state_dict", "mark_only_lora_trainable", "merge_lora", "target_names",
           "task_type_of", "trainable_parameters"]

# PEFT's task_type for each of flagopt's heads (the class name, so no import of heads here).
TASK_TYPES = {"OPTForCausalLM": "CAUSAL_LM", "OPTForSequenceClassification": "SEQ_CLS",
              "OPTForQuestionAnswering": "QUESTION_ANS"}
# The heads PEFT adds to modules_to_save for a task (``peft_model.py``), trained in full.
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


@dataclass(frozen=True)
class LoraConfig:
    """What PEFT's ``LoraConfig`` holds that flagopt implements (field names are PEFT's).

    Args:
        r: rank of the update. lora_alpha: scale numerator. lora_dropout: dropout on the
            adapter's input (training only; 0 is PEFT's default and keeps runs deterministic).
        target_modules: module names (a name matches when it is the module's dotted name or
            its last components, as in PEFT) or one regular expression that must match the
            whole dotted name.
        use_rslora: scaling ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
        modules_to_save: modules trained in full and saved with the adapter (PEFT fills in
            the task head for SEQ_CLS / QUESTION_ANS).
        task_type: PEFT's ``CAUSAL_LM``, ``SEQ_CLS`` or ``QUESTION_ANS`` (None: from the model).
        base_model_name_or_path: recorded in ``adapter_config.json``.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise AdapterError(f"LoRA r={self.r!r}; expected a positive integer")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha):
            raise AdapterError(f"lora_alpha={self.lora_alpha!r}; expected a finite number")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise AdapterError(f"lora_dropout={self.lora_dropout!r}; expected 0 <= p < 1")
        targets = self.target_modules
        if not isinstance(targets, str):
            targets = tuple(targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise AdapterError(f"target_modules={self.target_modules!r}; expected module "
                                   f"names such as ['q_proj', 'v_proj'] or one regex string")
            object.__setattr__(self, "target_modules", targets)
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))
        if self.task_type not in (None, *TASK_TYPES.values()):
            raise AdapterError(f"task_type={self.task_type!r}; expected one of "
                               f"{sorted(TASK_TYPES.values())} or None")

    @property
    def scaling(self) -> float:
        """The factor on ``B @ A``."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`` over a frozen base.

    The adapters live in ``adapter_dtype`` (float32 by default) whatever the base is: the input
    is cast to it and the update back to the base's output dtype, as PEFT does.
    """

    def __init__(self, base_layer: nn.Linear | Int8Linear, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, use_rslora: bool = False,
                 adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Int8Linear)):
            raise AdapterError(f"LoRA wraps nn.Linear or Int8Linear, not "
                               f"{type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r = r
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        device = base_layer.weight.device
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device,
                                dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device,
                                dtype=adapter_dtype)
        self.reset_lora_parameters()
        self.merged = False

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A kaiming-uniform (a = sqrt(5)), B zero (so the update is 0)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` (out, in) in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        a, b = self.lora_A.weight, self.lora_B.weight
        h = F.linear(self.lora_dropout(x.to(a.dtype)), a)  # (..., r)
        if y.dtype == b.dtype:
            # y + scaling * h @ B^T as one addmm: no separate scale and add passes over
            # (rows, out), forward or backward (as 2-D rows, see OPTForCausalLM.logits).
            rows = torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, self.r), b.t(),
                               alpha=self.scaling)
            return rows.view(y.shape)
        return y + (F.linear(h, b) * self.scaling).to(y.dtype)

    def merge(self) -> None:
        """Add the update into the base weight (in float32, then cast back).

        Raises:
            AdapterError: the base is int8 (merging into int8 weights loses the update to
                rounding; merge before quantizing, as ``AutoLoader(lora_dir=...)`` does).
        """
        self._add_delta(+1)

    def unmerge(self) -> None:
        """Subtract the merged update again."""
        self._add_delta(-1)

    def _add_delta(self, sign: int) -> None:
        if self.merged == (sign > 0):
            return
        weight = self.base_layer.weight
        if isinstance(self.base_layer, Int8Linear):
            raise AdapterError(
                "cannot merge a LoRA update into int8 weights (rounding would lose it); "
                "merge in float before quantizing: AutoLoader(..., lora_dir=DIR, "
                "quantize='int8') merges while loading, or keep merge=False")
        with torch.no_grad():
            weight.copy_((weight.float() + sign * self.delta_weight()).to(weight.dtype))
        self.merged = sign > 0

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


# --- applying LoRA to a model --------------------------------------------------------------------


def task_type_of(model: nn.Module) -> str | None:
    """PEFT's task_type for a flagopt head (None for a bare ``OPTModel``)."""
    return TASK_TYPES.get(type(model).__name__)


def _matches(name: str, targets: tuple[str, ...] | str) -> bool:
    """PEFT's matching: a regex string must match the whole name; a list entry must be the
    name itself or its trailing dotted components."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def target_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """Dotted names of the linear layers ``config`` puts LoRA on, in model order.

    Raises:
        AdapterError: a target that matches no linear layer (named, with what there is).
    """
    saved = config.modules_to_save or ()
    linears = [name for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, Int8Linear)) and ".lora_" not in name
               and not _matches(name, tuple(saved))]
    found = [name for name in linears if _matches(name, config.target_modules)]
    targets = config.target_modules
    missing = ([targets] if not found else []) if isinstance(targets, str) else \
        [t for t in targets if not any(_matches(n, (t,)) for n in found)]
    if missing:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise AdapterError(f"LoRA target_modules {missing} match no linear layer of "
                           f"{type(model).__name__}; its linear layers are named {kinds}")
    return found


def complete_config(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` with the model's task_type and, as PEFT does for SEQ_CLS / QUESTION_ANS, the
    task head added to ``modules_to_save``.

    Raises:
        AdapterError: ``config.task_type`` is not the model's.
    """
    task = task_type_of(model)
    if config.task_type is not None and task is not None and config.task_type != task:
        raise AdapterError(f"the adapter's task_type is {config.task_type!r} but the model is "
                           f"{type(model).__name__} ({task!r}); load it with the matching task")
    task = config.task_type or task
    saved = list(config.modules_to_save or ())
    saved += [h for h in TASK_HEADS.get(task, ()) if h not in saved]
    return replace(config, task_type=task, modules_to_save=tuple(saved) or None)


def apply_lora(model: nn.Module, config: LoraConfig,
               adapter_dtype: torch.dtype = torch.float32) -> LoraConfig:
    """Wrap every target linear layer of ``model`` in a ``LoRALinear`` (in place) and make
    only the adapters (and ``modules_to_save``) trainable.

    Returns:
        The config as applied (``complete_config``): save this one with the adapter.
    Raises:
        AdapterError: a target matching nothing, a task_type for another head, or layers
            already wrapped.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise AdapterError(f"{type(model).__name__} already has LoRA layers; merge_lora() or "
                           f"load a fresh model before applying another adapter")
    config = complete_config(model, config)
    for name in target_names(model, config):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), config.r, config.lora_alpha,
                                          config.lora_dropout, config.use_rslora, adapter_dtype))
    mark_only_lora_trainable(model, config)
    return config


def saved_module_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """Dotted names of the modules ``config.modules_to_save`` matches (none is fine: PEFT's
    SEQ_CLS default names ``classifier``, which OPT lacks)."""
    saved = tuple(config.modules_to_save or ())
    return [n for n, _ in model.named_modules() if saved and _matches(n, saved)]


def mark_only_lora_trainable(model: nn.Module, config: LoraConfig) -> None:
    """``requires_grad`` on the adapters and ``modules_to_save`` only (PEFT's bias="none")."""
    saved = tuple(saved_module_names(model, config))
    for name, param in model.named_parameters():
        param.requires_grad = ".lora_A." in name or ".lora_B." in name or \
            any(name.startswith(s + ".") for s in saved)


def trainable_parameters(model: nn.Module) -> int:
    """How many parameters train (PEFT's ``get_nb_trainable_parameters``'s first number)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(dotted name, module) of every ``LoRALinear`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_state_dict(model: nn.Module, config: LoraConfig) -> dict[str, torch.Tensor]:
    """The adapter's tensors by flagopt name: ``<module>.lora_A.weight`` / ``.lora_B.weight``
    per LoRA layer and every parameter of ``modules_to_save`` (``score.weight`` ...)."""
    state: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model):
        state[f"{name}.lora_A.weight"] = module.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = module.lora_B.weight.detach()
    for name in saved_module_names(model, config):
        for pname, p in model.get_submodule(name).named_parameters():
            state[f"{name}.{pname}"] = p.detach()
    return state


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer into its base weight and put the base back in its place (PEFT's
    ``merge_and_unload``); returns ``model``.

    Raises:
        AdapterError: a base is int8 (see ``LoRALinear.merge``).
    """
    for name, module in list(lora_modules(model)):
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.base_layer)
    return model
