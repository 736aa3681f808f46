"""Generation parameters, validated once at the API boundary.

``LIMITS`` is the one table of every parameter's type and range; ``GenerationParams`` checks
its fields against it (and the strategy-dependent rules of ``strategies.py``) when it is made,
and everything below (processors, stopping criteria, choosers) trusts the result. Every error
names the parameter as the caller calls it, its value and the allowed range. Any
``numbers.Integral`` is accepted where an integer is meant (also an integer-valued float) and
any ``numbers.Real`` where a float is meant; booleans, NaN and infinity are rejected everywhere.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import InitVar, dataclass

from flagopt.predictor.strategies import STRATEGIES


@dataclass(frozen=True)
class Limit:
    """One parameter's type (``int`` or ``float``) and range, as ``ok(value)`` and its words."""

    kind: type
    ok: Callable[[float], bool]
    allowed: str


LIMITS: dict[str, Limit] = {
    "max_new_tokens": Limit(int, lambda v: v >= 1, "an integer >= 1"),
    "input_max_length": Limit(int, lambda v: v >= 1, "an integer >= 1"),  # the Predictor's
    "num_beams": Limit(int, lambda v: v >= 1, "an integer >= 1"),
    "num_return_sequences": Limit(int, lambda v: v >= 1, "an integer >= 1"),
    "top_k": Limit(int, lambda v: v >= 0, "an integer >= 0 (0 turns it off)"),
    "no_repeat_ngram_size": Limit(int, lambda v: v >= 0, "an integer >= 0 (0 turns it off)"),
    "min_new_tokens": Limit(int, lambda v: v >= 0, "an integer >= 0 (0 turns it off)"),
    "seed": Limit(int, lambda v: 0 <= v < 2 ** 63, "0 <= seed < 2**63"),
    "eos_token_ids": Limit(int, lambda v: v >= 0, "token ids >= 0"),  # each of them
    "temperature": Limit(float, lambda v: v >= 0, ">= 0 (0 means greedy)"),
    "top_p": Limit(float, lambda v: 0 < v <= 1, "0 < top_p <= 1"),
    "min_p": Limit(float, lambda v: 0 <= v <= 1, "0 <= min_p <= 1"),
    "repetition_penalty": Limit(float, lambda v: v > 0, "> 0 (1 is off)"),
    "presence_penalty": Limit(float, lambda v: -2 <= v <= 2, "-2 <= presence_penalty <= 2 "
                                                              "(0 is off)"),
    "frequency_penalty": Limit(float, lambda v: -2 <= v <= 2, "-2 <= frequency_penalty <= 2 "
                                                                "(0 is off)"),
    "length_penalty": Limit(float, lambda v: True, "any finite number"),
    "penalty_alpha": Limit(float, lambda v: 0 <= v <= 1, "0 <= penalty_alpha <= 1"),
}


def check(name: str, value: object, as_name: str | None = None) -> int | float:
    """``value`` checked against ``LIMITS[name]`` and converted to its ``int`` or ``float``.

    Args:
        name: the parameter's entry in ``LIMITS``.
        value: what the caller passed.
        as_name: the caller's name for it in error messages (e.g. ``out_max_length``).

    Raises:
        TypeError: if ``value`` is not a number of the right kind (``bool`` never is).
        ValueError: if it is NaN, infinite or outside the range.
    """
    limit, shown = LIMITS[name], as_name or name
    number = _integer(shown, value) if limit.kind is int else _real(shown, value)
    if not limit.ok(number):
        raise ValueError(f"{shown}={number!r} is out of range; expected {limit.allowed}")
    return number


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number!r}")
    return number


def _integer(name: str, value: object) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) \
            and float(value).is_integer():
        return int(value)
    raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class GenerationParams:
    """Everything one ``generate`` call needs besides the prompts, validated when made.

    Strategies: ``greedy``; ``sample`` (temperature/top-k/top-p/min-p; ``temperature=0``
    turns it into greedy; ``num_return_sequences`` samples per prompt); ``beam``
    (``num_beams``, ``length_penalty``, ``early_stopping``, ``num_return_sequences``);
    ``contrastive`` (``penalty_alpha``, ``top_k``). See ``LIMITS`` for the ranges.
    ``caller_names`` (not stored) renames fields in error messages, e.g.
    ``{"max_new_tokens": "out_max_length"}`` for FlagAI's methods.

    Raises:
        TypeError / ValueError: on a bad value, naming the parameter, value and range.
    """

    max_new_tokens: int = 200
    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
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
    caller_names: InitVar[Mapping[str, str] | None] = None

    def __post_init__(self, caller_names: Mapping[str, str] | None) -> None:
        self._verify_args(caller_names or {})

    def _verify_args(self, names: Mapping[str, str]) -> None:
        """Check and normalise every field (vLLM's ``SamplingParams._verify_args``)."""
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        shown = lambda name: names.get(name, name)  # noqa: E731
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}; expected one of "
                             f"{tuple(STRATEGIES)}")
        for name in ("max_new_tokens", "num_beams", "num_return_sequences", "top_k",
                     "no_repeat_ngram_size", "min_new_tokens", "temperature", "top_p",
                     "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                     "length_penalty", "penalty_alpha"):
            set_(name, check(name, getattr(self, name), shown(name)))
        if self.seed is not None:
            set_("seed", check("seed", self.seed, shown("seed")))
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"{shown('early_stopping')}={self.early_stopping!r}; expected "
                             f"True, False or 'never'")
        set_("eos_token_ids", _token_ids(shown("eos_token_ids"), self.eos_token_ids))
        set_("stop", _stops(shown("stop"), self.stop))
        strategy = STRATEGIES[self.strategy]
        rows_name, rows = strategy.rows_field, getattr(self, strategy.rows_field)
        if rows < 1:
            raise ValueError(f"{shown(rows_name)}={rows!r} is out of range; expected >= 1 for "
                             f"strategy={self.strategy!r}")
        n = self.num_return_sequences
        if not strategy.many_returns and n != 1:
            raise ValueError(f"{shown('num_return_sequences')}={n!r} is out of range; "
                             f"expected 1 for strategy={self.strategy!r} (use 'sample' or "
                             f"'beam' for more)")
        if n > rows:
            raise ValueError(f"{shown('num_return_sequences')}={n!r} is out of range; "
                             f"expected between 1 and {shown(rows_name)}={rows}")

    @property
    def sampling(self) -> bool:
        """Whether the next token is drawn at random (``temperature=0`` samples greedily)."""
        return STRATEGIES[self.strategy].samples and self.temperature > 0

    @property
    def rows_per_prompt(self) -> int:
        """Cache rows each prompt decodes in (beams, contrastive candidates or samples)."""
        return getattr(self, STRATEGIES[self.strategy].rows_field)


def _token_ids(name: str, value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, numbers.Integral) else value
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise TypeError(f"{name} must be an int or a list of ints, got {value!r}")
    return tuple(check("eos_token_ids", v, name) for v in items)


def _stops(name: str, value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(s, str) for s in items):
        raise TypeError(f"{name} must be a non-empty string or a list of them, got {value!r}")
    if not all(items):
        raise ValueError(f"{name} must be a non-empty string or a list of them, got {value!r}")
    return tuple(items)
