"""Generation parameters, validated once at the API boundary.

Every check names the parameter, its value and the allowed range. Ints are accepted where
floats are meant; booleans, NaN and infinity are rejected everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

STRATEGIES = ("greedy", "sample", "beam", "contrastive")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return value


def _check(name: str, value: float, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range; expected {allowed}")


@dataclass(frozen=True)
class GenerationParams:
    """Everything one ``generate`` call needs besides the prompts.

    Strategies: ``greedy``; ``sample`` (temperature/top-k/top-p/min-p; ``temperature=0``
    turns it into greedy; ``num_return_sequences`` samples per prompt); ``beam``
    (``num_beams``, ``length_penalty``, ``early_stopping``, ``num_return_sequences``);
    ``contrastive`` (``penalty_alpha``, ``top_k``).
    """

    max_new_tokens: int = 200
    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    penalty_alpha: float = 0.6
    eos_token_ids: tuple[int, ...] = (2,)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}; expected one of {STRATEGIES}")
        for name in ("max_new_tokens", "num_beams", "num_return_sequences"):
            value = _integer(name, getattr(self, name))
            _check(name, value, value >= 1, "an integer >= 1")
            set_(name, value)
        for name in ("top_k", "no_repeat_ngram_size", "min_new_tokens"):
            value = _integer(name, getattr(self, name))
            _check(name, value, value >= 0, "an integer >= 0 (0 turns it off)")
            set_(name, value)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "length_penalty",
                     "penalty_alpha"):
            set_(name, _number(name, getattr(self, name)))
        _check("temperature", self.temperature, self.temperature >= 0,
               ">= 0 (0 means greedy)")
        _check("top_p", self.top_p, 0 < self.top_p <= 1, "0 < top_p <= 1")
        _check("min_p", self.min_p, 0 <= self.min_p <= 1, "0 <= min_p <= 1")
        _check("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0,
               "> 0 (1 is off)")
        _check("penalty_alpha", self.penalty_alpha, 0 <= self.penalty_alpha <= 1,
               "0 <= penalty_alpha <= 1")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping={self.early_stopping!r}; expected True, False "
                             f"or 'never'")
        if self.strategy == "beam":
            _check("num_return_sequences", self.num_return_sequences,
                   self.num_return_sequences <= self.num_beams,
                   f"between 1 and num_beams={self.num_beams}")
        elif self.strategy != "sample":  # one deterministic answer per prompt
            _check("num_return_sequences", self.num_return_sequences,
                   self.num_return_sequences == 1,
                   f"1 for strategy={self.strategy!r} (use 'sample' or 'beam' for more)")
        if self.strategy == "contrastive":
            _check("top_k", self.top_k, self.top_k >= 1, ">= 1 for contrastive search")
        set_("eos_token_ids", _token_ids("eos_token_id", self.eos_token_ids))
        set_("stop", _stops(self.stop))
        if self.seed is not None:
            seed = _integer("seed", self.seed)
            _check("seed", seed, 0 <= seed < 2 ** 63, "0 <= seed < 2**63")
            set_("seed", seed)

    @property
    def sampling(self) -> bool:
        return self.strategy == "sample" and self.temperature > 0


def _token_ids(name: str, value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, int) else value
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise TypeError(f"{name} must be an int or a list of ints, got {value!r}")
    out = tuple(_integer(name, v) for v in items)
    for v in out:
        _check(name, v, v >= 0, "token ids >= 0")
    return out


def _stops(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(s, str) for s in items):
        raise TypeError(f"stop must be a non-empty string or a list of them, got {value!r}")
    if not all(items):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {value!r}")
    return tuple(items)
