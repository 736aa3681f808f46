"""OPTConfig: the hub's ``config.json`` as one frozen dataclass.

Field names are the hub's own, so a config round-trips through ``from_dict``/``to_dict``
unchanged; keys flagopt does not use are kept in ``extra`` and written back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from flagopt.errors import ConfigError

_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")
_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "max_position_embeddings",
          "num_attention_heads", "word_embed_proj_dim", "num_labels")
_MAX_SIZE = 2**31 - 1  # indices and element counts of one dimension stay int32
_FLAGS = ("do_layer_norm_before", "_remove_final_layer_norm", "use_cache", "enable_bias",
          "layer_norm_elementwise_affine")
_PROBABILITIES = ("dropout", "attention_dropout", "layerdrop")
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
_DTYPES = ("float32", "float16", "bfloat16", "float64")
_PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclass(frozen=True)
class OPTConfig:
    """Architecture of one OPT model. Defaults are opt-125m's."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.0
    num_attention_heads: int = 12
    activation_function: str = "relu"
    layerdrop: float = 0.0
    init_std: float = 0.02
    use_cache: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    torch_dtype: str | None = None
    num_labels: int = 2
    problem_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        """Check every field's type and range; raises ConfigError naming field and value."""
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        for name in _SIZES:
            self._check(name, lambda v: _is_int(v) and 0 < v <= _MAX_SIZE,
                        f"an integer in [1, {_MAX_SIZE}]")
        for name in _FLAGS:
            self._check(name, lambda v: isinstance(v, bool), "true or false")
        for name in _PROBABILITIES:
            self._check(name, lambda v: _is_real(v) and 0 <= v <= 1, "a number in [0, 1]")
        self._check("init_std", lambda v: _is_real(v) and v > 0, "a finite number > 0")
        for name in _TOKEN_IDS:
            self._check(name, lambda v: _is_int(v) and 0 <= v < self.vocab_size,
                        f"an integer in [0, vocab_size={self.vocab_size})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"OPTConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})")
        self._check("activation_function", lambda v: isinstance(v, str) and v in _ACTIVATIONS,
                    f"one of {_ACTIVATIONS}")
        self._check("torch_dtype", lambda v: v is None or (isinstance(v, str) and v in _DTYPES),
                    f"null or one of {_DTYPES}")
        self._check("problem_type", lambda v: v is None or (isinstance(v, str)
                                                            and v in _PROBLEM_TYPES),
                    f"one of {_PROBLEM_TYPES}")
        self._check("extra", lambda v: isinstance(v, dict), "a dict")

    def _check(self, name: str, valid: Any, allowed: str) -> None:
        value = getattr(self, name)
        if not valid(value):
            raise ConfigError(f"OPTConfig.{name} must be {allowed}, got {value!r:.200}")

    # ---- derived values ----------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_projections(self) -> bool:
        """350m-style: embeddings narrower than the hidden size, projected in and out."""
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        # Post-LN models (350m) and configs with _remove_final_layer_norm have none.
        return self.do_layer_norm_before and not self._remove_final_layer_norm

    @property
    def num_parameters(self) -> int:
        """Parameter count of the causal LM (the tied head counted once)."""
        h, f, e, b = self.hidden_size, self.ffn_dim, self.word_embed_proj_dim, self.enable_bias
        ln = 2 * h if self.layer_norm_elementwise_affine else 0
        per_layer = 4 * h * h + 2 * h * f + (4 * h + f + h if b else 0) + 2 * ln
        total = self.num_hidden_layers * per_layer
        total += self.vocab_size * e + (self.max_position_embeddings + 2) * h
        if self.has_projections:
            total += 2 * h * e
        if self.has_final_layer_norm:
            total += ln
        return total

    # ---- (de)serialisation -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OPTConfig":
        """Build from a ``config.json`` dictionary; unknown keys go to ``extra``."""
        if not isinstance(data, dict):
            raise ConfigError(f"an OPT config must be a JSON object, got {type(data).__name__}")
        if data.get("model_type", "opt") != "opt":
            raise ConfigError(f"config model_type is {data['model_type']!r}, expected 'opt'")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        extra.update(data.get("extra", {}) if isinstance(data.get("extra"), dict) else {})
        if "id2label" in data and not isinstance(data["id2label"], dict):
            raise ConfigError(f"config field id2label must be an object of id -> label, got "
                              f"{data['id2label']!r:.200}")
        if "id2label" in data and "num_labels" not in data:
            kwargs["num_labels"] = len(data["id2label"])
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as exc:  # a field of the wrong JSON type
            raise ConfigError(f"malformed OPT config: {exc}") from exc

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "OPTConfig":
        """Read a hub ``config.json`` (or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (ValueError, RecursionError) as exc:  # JSON and UnicodeDecodeError: ValueErrors
            raise ConfigError(f"{path} is not valid JSON in UTF-8 ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); re-download it") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The hub's ``config.json`` form, with the keys flagopt did not use restored."""
        data: dict[str, Any] = {"model_type": "opt", "architectures": ["OPTForCausalLM"]}
        data.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                data[f.name] = getattr(self, f.name)
        return data

    def to_json(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` (to ``path``, or into it when it is a directory)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")

    def replace(self, **changes: Any) -> "OPTConfig":
        """A copy with some fields changed (the config itself is frozen)."""
        return dataclasses.replace(self, **changes)
