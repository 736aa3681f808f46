"""``AutoLoader``: a model name in, a ready OPT model and its tokenizer out (FlagAI's call).

    loader = AutoLoader("lm", model_name="opt-125m-en", model_dir="./checkpoints")
    model, tokenizer = loader.get_model(), loader.get_tokenizer()

Four steps, one helper each: resolve the name (``registry.resolve_model``), download what is
missing (``fetch.fetch_model``), read the config, build and load the model (``_build_model``).
Where the files are is in ``AutoLoader``'s docstring (``fetch.search_dirs``); when a complete
copy is found no network request is made.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flagopt import hub, settings
from flagopt.auto_model.fetch import FetchOptions, fetch_model
from flagopt.auto_model.registry import ModelSpec, RegistrySource, resolve_model
from flagopt.errors import UnknownTaskError
from flagopt.model.adapters import LoadMerger, attach_adapter, read_adapter
from flagopt.model.config import OPTConfig
from flagopt.model.decoder import ATTENTION_IMPLEMENTATIONS
from flagopt.model.heads import TASK_CLASSES
from flagopt.model.loading import fresh_model, load_pretrained
from flagopt.model.prepared import load_prepared
from flagopt.model.quantize import QUANTIZE_MODES as WEIGHT_QUANTIZE_MODES
from flagopt.tokenizer import OPTTokenizer

__all__ = ["AutoLoader", "DTYPES", "TASKS", "LoadOptions", "resolve_device", "resolve_dtype",
           "resolve_task"]

logger = logging.getLogger(__name__)

TASKS: dict[str, type[nn.Module]] = dict(TASK_CLASSES)  # "lm", "classification", "qa"
# FlagAI loads OPT under "lm" and "seq2seq" alike: both are the causal LM.
TASK_ALIASES = {"seq2seq": "lm", "seq_cls": "classification", "cls": "classification"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
QUANTIZE_MODES = (None, *WEIGHT_QUANTIZE_MODES)
# FlagAI callers pass these; they do not change loading, so they are accepted and ignored.
IGNORED_KWARGS = ("use_cache", "checkpoint_activations")
OPTION_KWARGS = ("dtype", "torch_dtype", "fp16", "num_labels", "class_num",
                 "attn_implementation", "quantize", "registry", "endpoint", "offline",
                 "progress", "token", "lora_dir", "adapter_dir", "merge",
                 "prepared_cache")

@dataclass(frozen=True)
class LoadOptions:
    """``AutoLoader``'s arguments, validated once."""

    task: str
    device: torch.device
    dtype: torch.dtype
    fetch: FetchOptions
    num_labels: int | None = None
    attn_implementation: str = "sdpa"
    quantize: str | None = None
    registry: RegistrySource | None = None
    lora_dir: Path | None = None
    merge: bool = True
    prepared_cache: bool = True

    @property
    def model_class(self) -> type[nn.Module]:
        return TASKS[self.task]


class AutoLoader:
    """Resolve, download, build and load an OPT model for a task (FlagAI-compatible).

    Args:
        task_name: ``"lm"`` (FlagAI's alias ``"seq2seq"``), ``"classification"`` (aliases
            ``"seq_cls"``, ``"cls"``) or ``"qa"``.
        model_name: a registry name (``"opt-125m-en"``, case-insensitive), a hub repo id
            ``"owner/name[@revision]"``, or a local checkpoint directory (used in place).
        model_dir: where the files are, searched in this order, the first complete directory
            winning with no network request: with ``model_dir``, ``model_dir/<model_name as
            typed>/`` then ``model_dir/<name>/``; without it, for a registry name,
            ``./checkpoints/<model_name as typed>/`` (FlagAI's default, relative to the
            working directory) then ``./checkpoints/<name>/``, then ``$FLAGOPT_HOME/<name>/``
            (default ``~/.cache/flagopt``). A hub repo id's ``<name>`` is
            ``owner--name[@revision]``. When none is complete, the missing files are
            downloaded into the last one. Complete: ``config.json``, weights in any layout
            the loader reads (the hub's shards, or one merged ``pytorch_model.bin`` as FlagAI
            writes it), ``vocab.json`` and ``merges.txt``; the other files are optional.
        only_download_config: fetch config and tokenizer files only; the model gets fresh
            random weights (normal(0, init_std), zero biases, LayerNorm ones/zeros).
        device: default CUDA when available, else CPU.
        **kwargs: ``dtype`` (alias ``torch_dtype``; a ``torch.dtype`` or one of ``DTYPES``;
            default float16 on CUDA, float32 elsewhere) or FlagAI's ``fp16=True``;
            ``num_labels`` (FlagAI: ``class_num``) for classification; ``attn_implementation``
            (``"sdpa"``/``"eager"``); ``quantize`` (``"int8"``: int8 weights,
            bf16 activations on CPU unless a dtype is given; ``"w8a8"``: the same weights
            and int8 activations in products of 2+ rows); ``registry`` (extra
            registry path or dict); hub options ``endpoint``, ``offline``, ``progress``,
            ``token``; ``lora_dir`` (alias ``adapter_dir``): a PEFT LoRA adapter directory,
            merged into the weights in float as they load (before int8 quantization) unless
            ``merge=False``, which keeps ``LoRALinear`` layers beside the frozen base;
            ``prepared_cache`` (default True, or ``FLAGOPT_PREPARED_CACHE=0`` for False):
            weights are prepared once per (checkpoint, dtype, quantize, layout) in
            ``<local_dir>/.flagopt-prepared/`` and memory-mapped on later loads with no
            conversion (``flagopt.model.prepared``); a directory that cannot be written loads
            normally, and so does a load that merges an adapter (its weights are not the
            checkpoint's). ``use_cache`` and ``checkpoint_activations`` are accepted and
            ignored.

    Attributes:
        model, config, options, target (what ``model_name`` resolved to), spec (None for a
        local directory), local_dir (alias model_dir: the directory holding this model's
        files), model_name, task_name, device, dtype.

    Raises:
        TypeError: an unknown keyword argument. ValueError (UnknownModelError,
        UnknownTaskError...): a bad name or option. OSError (DownloadError, OfflineError,
        HubUnreachableError, CheckpointError...): files could not be fetched or read.
    """

    def __init__(self, task_name: str = "lm", model_name: str | os.PathLike = "opt-125m-en",
                 model_dir: str | os.PathLike | None = None, only_download_config: bool = False,
                 device: str | torch.device | None = None, **kwargs: Any) -> None:
        self.options = _parse_options(task_name, device, kwargs)
        self.target = resolve_model(model_name, registry=self.options.registry)
        typed = model_name if isinstance(model_name, str) else None
        self.local_dir = fetch_model(self.target, model_dir, only_download_config,
                                     self.options.fetch, typed_name=typed)
        self.config = self._read_config()
        self.model = self._build_model(only_download_config)

    # --- the steps ----------------------------------------------------------------------------

    def _read_config(self) -> OPTConfig:
        """config.json, with ``num_labels`` applied; checked against the registry entry."""
        config = OPTConfig.from_json(self.local_dir / "config.json")
        if self.spec is not None:
            _check_architecture(self.spec, config)
        if self.options.num_labels is not None:
            config = config.replace(num_labels=self.options.num_labels)
        return config

    def _build_model(self, only_download_config: bool) -> nn.Module:
        """Build the task model on the target device and dtype, loading the weights unless
        ``only_download_config``; ``quantize="int8"`` quantizes while loading, and the
        prepared cache (``prepared_cache``) makes a later load a memory map."""
        opts = self.options
        adapter = read_adapter(opts.lora_dir) if opts.lora_dir is not None else None
        if only_download_config:
            model = fresh_model(opts.model_class, self.config, dtype=opts.dtype,
                                device=opts.device, attn_implementation=opts.attn_implementation)
            return model if adapter is None else attach_adapter(model, adapter, merge=opts.merge)
        common = dict(dtype=opts.dtype, device=opts.device, config=self.config,
                      attn_implementation=opts.attn_implementation, fresh_heads=True,
                      quantize=opts.quantize)
        if adapter is not None and opts.merge:  # merged as read: not the checkpoint's weights
            merger = LoadMerger(adapter, opts.model_class, self.config)
            model = load_pretrained(self.local_dir, opts.model_class, transform=merger, **common)
            return merger.finish(model)
        load = load_prepared if opts.prepared_cache else load_pretrained
        model = load(self.local_dir, opts.model_class, **common)
        return model if adapter is None else attach_adapter(model, adapter).eval()

    # --- FlagAI's API -------------------------------------------------------------------------

    def get_model(self) -> nn.Module:
        """The model, in eval mode on ``device`` in ``dtype``."""
        return self.model

    def get_tokenizer(self) -> OPTTokenizer:
        """The checkpoint's tokenizer (OPT's packaged one if the directory has no vocab)."""
        return self.tokenizer

    @functools.cached_property
    def tokenizer(self) -> OPTTokenizer:
        """Built on first use from ``local_dir``."""
        if (self.local_dir / "vocab.json").is_file():
            return OPTTokenizer.from_dir(self.local_dir)
        logger.info("%s has no vocab.json; using OPT's standard tokenizer", self.local_dir)
        return OPTTokenizer.default()

    @property
    def spec(self) -> ModelSpec | None:
        """The registry or hub-repo entry; None for a local directory."""
        return self.target if isinstance(self.target, ModelSpec) else None

    @property
    def model_name(self) -> str:
        """The registry name (canonical case), hub repo id, or directory."""
        return self.spec.name if self.spec is not None else str(self.target)

    @property
    def model_dir(self) -> Path:
        """The directory holding this model's files (same as ``local_dir``)."""
        return self.local_dir

    @property
    def task_name(self) -> str:
        return self.options.task

    @property
    def device(self) -> torch.device:
        return self.options.device

    @property
    def dtype(self) -> torch.dtype:
        return self.options.dtype

    def __repr__(self) -> str:
        return (f"AutoLoader(task_name={self.task_name!r}, model_name={self.model_name!r}, "
                f"local_dir='{self.local_dir}', device='{self.device}', dtype={self.dtype})")


# --- options --------------------------------------------------------------------------------------


def _parse_options(task_name: str, device: str | torch.device | None,
                   kwargs: dict[str, Any]) -> LoadOptions:
    unknown = [k for k in kwargs if k not in OPTION_KWARGS and k not in IGNORED_KWARGS]
    if unknown:
        raise TypeError(_unknown_kwargs_message(unknown))
    for name in IGNORED_KWARGS:
        if name in kwargs:
            logger.debug("AutoLoader ignores %s=%r (it does not affect loading)", name,
                         kwargs[name])
    task = resolve_task(task_name)
    target = resolve_device(device)
    quantize = kwargs.get("quantize")
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r} is not supported; supported: "
                         f"{', '.join(map(repr, QUANTIZE_MODES))}")
    attn = kwargs.get("attn_implementation", "sdpa")
    if attn not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={attn!r}; expected one of "
                         f"{ATTENTION_IMPLEMENTATIONS}")
    endpoint = kwargs.get("endpoint")
    if endpoint is not None:
        endpoint = hub.get_endpoint(endpoint)
    fetch = FetchOptions(endpoint=endpoint, token=kwargs.get("token"),
                         offline=hub.is_offline(kwargs.get("offline", False)),
                         progress=bool(kwargs.get("progress", True)))
    prepared = kwargs.get("prepared_cache")
    if prepared is None:
        prepared = settings.get().prepared_cache
    elif not isinstance(prepared, bool):
        raise TypeError(f"prepared_cache={prepared!r}; expected True or False")
    dtype = resolve_dtype(kwargs, target)
    if quantize is not None and target.type == "cpu" and not _dtype_given(kwargs):
        dtype = torch.bfloat16  # the fused CPU int8 kernel takes bf16 activations
    lora_dir, merge = _lora_options(kwargs)
    return LoadOptions(task=task, device=target, dtype=dtype,
                       fetch=fetch, num_labels=_num_labels(kwargs, task),
                       attn_implementation=attn, quantize=quantize,
                       registry=kwargs.get("registry"), lora_dir=lora_dir, merge=merge,
                       prepared_cache=prepared)


def _lora_options(kwargs: dict[str, Any]) -> tuple[Path | None, bool]:
    """``lora_dir`` (FlagAI's name) or its alias ``adapter_dir``, and ``merge``."""
    given = {k: kwargs[k] for k in ("lora_dir", "adapter_dir") if kwargs.get(k) is not None}
    if len(given) > 1:
        raise ValueError(f"lora_dir={given['lora_dir']!r} and adapter_dir="
                         f"{given['adapter_dir']!r} both given; they are the same option, "
                         f"pass one")
    merge = kwargs.get("merge", True)
    if not isinstance(merge, bool):
        raise ValueError(f"merge={merge!r}; expected True or False")
    if not given and "merge" in kwargs:
        raise ValueError(f"merge={merge!r} applies to a LoRA adapter; pass lora_dir= too")
    lora_dir = next(iter(given.values()), None)
    return (None if lora_dir is None else Path(lora_dir)), merge


def _unknown_kwargs_message(unknown: list[str]) -> str:
    accepted = (*OPTION_KWARGS, *IGNORED_KWARGS)
    parts = []
    for name in unknown:
        near = difflib.get_close_matches(name, accepted, n=1, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    hint = ""
    if "load_pretrain_params" in unknown:
        hint = " (weights are always loaded; only_download_config=True gives random weights)"
    return (f"AutoLoader() got unexpected keyword argument(s) {', '.join(parts)}{hint}. "
            f"Accepted: {', '.join(accepted)}")


def resolve_task(task_name: str) -> str:
    """The canonical task name.

    Raises:
        UnknownTaskError: not a task or alias; lists the tasks and the nearest name.
    """
    key = task_name.strip().lower() if isinstance(task_name, str) else ""
    key = TASK_ALIASES.get(key, key)
    if key in TASKS:
        return key
    names = [*TASKS, *TASK_ALIASES]
    near = difflib.get_close_matches(key, names, n=2, cutoff=0.5)
    hint = f"; did you mean {' or '.join(map(repr, near))}?" if near else "."
    raise UnknownTaskError(f"unknown task_name {task_name!r}{hint} Tasks: "
                           f"{', '.join(TASKS)} (aliases: "
                           f"{', '.join(f'{a}={t}' for a, t in TASK_ALIASES.items())})")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when available, else CPU.

    Raises:
        ValueError: not a device name, or CUDA asked for but not available.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device ({exc}); "
                         f"use e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu'")
    return target


def _dtype_given(kwargs: dict[str, Any]) -> bool:
    return any(kwargs.get(k) is not None for k in ("dtype", "torch_dtype")) or \
        bool(kwargs.get("fp16"))


def resolve_dtype(kwargs: dict[str, Any], device: torch.device) -> torch.dtype:
    """From ``dtype``/``torch_dtype``/``fp16``; default float16 on CUDA, float32 elsewhere.

    Raises:
        ValueError: an unknown dtype, or options that disagree.
    """
    given = {k: _as_dtype(k, kwargs[k]) for k in ("dtype", "torch_dtype")
             if kwargs.get(k) is not None}
    if kwargs.get("fp16"):
        given["fp16"] = torch.float16
    if len(set(given.values())) > 1:
        raise ValueError(f"conflicting dtype options: "
                         f"{', '.join(f'{k}={kwargs[k]!r}' for k in given)}; pass one")
    default = torch.float16 if device.type == "cuda" else torch.float32
    dtype = next(iter(given.values()), default)
    if dtype == torch.float16 and device.type == "cpu":
        logger.warning("float16 on CPU is slow and some operations lack CPU kernels; "
                       "bfloat16 or float32 is usually the better choice there")
    return dtype


def _as_dtype(option: str, value: Any) -> torch.dtype:
    allowed = sorted(set(DTYPES.values()), key=str)
    if isinstance(value, torch.dtype) and value in allowed:
        return value
    if isinstance(value, str) and value.strip().lower().removeprefix("torch.") in DTYPES:
        return DTYPES[value.strip().lower().removeprefix("torch.")]
    raise ValueError(f"{option}={value!r} is not supported; use one of "
                     f"{', '.join(map(repr, DTYPES))} or {', '.join(map(str, allowed))}")


def _num_labels(kwargs: dict[str, Any], task: str) -> int | None:
    given = {k: kwargs[k] for k in ("num_labels", "class_num") if kwargs.get(k) is not None}
    if not given:
        return None
    if task != "classification":
        raise ValueError(f"{', '.join(given)} applies to task_name='classification', "
                         f"not {task!r}")
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if len(set(given.values())) > 1:
        raise ValueError(f"num_labels={given['num_labels']} and class_num={given['class_num']}"
                         f" disagree; pass one")
    return next(iter(given.values()))


# --- config ---------------------------------------------------------------------------------------


def _check_architecture(spec: ModelSpec, config: OPTConfig) -> None:
    """A registry entry whose architecture disagrees with config.json is worth a warning (the
    registry is stale); the config decides."""
    wrong = {k: (v, getattr(config, k)) for k, v in spec.architecture.items()
             if getattr(config, k) != v}
    if wrong:
        logger.warning("registry entry %r disagrees with %s/config.json on %s; using the config",
                       spec.name, spec.repo, ", ".join(f"{k} ({a!r} vs {b!r})"
                                                        for k, (a, b) in wrong.items()))
