"""Stopping criteria: when a row of the batch is done generating.

`EosCriterion` runs on the device every step; `StopStrings` works on the host with decoded text;
`max_new_tokens_allowed` caps the length so prompt and generated tokens fit the position table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# A window cut inside a multi-byte character decodes its leftover bytes (at most 3 in UTF-8)
# as one replacement character each; that many extra characters make up for them.
_CUT_CHARACTER_SLACK = 3


class EosCriterion:
    """Which rows just produced one of the EOS ids; device-side, no host synchronisation."""

    def __init__(self, eos_token_ids: Sequence[int], device: torch.device | str) -> None:
        """Args:
            eos_token_ids: the end-of-sequence ids, validated by ``GenerationParams`` (may be
                empty: nothing ever matches).
            device: where the new tokens will live.
        """
        self.eos_token_ids = tuple(eos_token_ids)
        self._ids = torch.tensor(self.eos_token_ids, dtype=torch.long, device=device)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """BoolTensor shaped like ``tokens`` (``[B]``, ``[B, N]`` ...): True at EOS ids."""
        return torch.isin(tokens, self._ids)


class StopStrings:
    """Stop a row once its decoded generated text contains one of the stop strings.

    Host-side. `check` is meant to run after every step (or after every ``new_tokens`` steps):
    a stop string that is found now must end in the text of the newest tokens, so only a tail
    of each row is decoded, long enough to hold the longest stop string in front of them. A stop
    string may span several tokens, and one token may hold many characters.
    """

    def __init__(self, stops: Sequence[str], decode: Callable[[list[int]], str]) -> None:
        """Args:
            stops: the non-empty stop strings, as ``GenerationParams`` validated them (may be
                empty: nothing ever matches).
            decode: turns token ids into text, e.g. a tokenizer's ``decode``.
        """
        self.stops = tuple(stops)
        self._decode = decode
        self._longest = max((len(s) for s in stops), default=0)

    def check(
        self,
        generated: Sequence[Sequence[int]] | torch.Tensor,
        active_rows: Sequence[bool] | torch.Tensor | None = None,
        *,
        new_tokens: int = 1,
    ) -> list[bool]:
        """Whether each row's generated text now contains a stop string.

        Args:
            generated: the generated ids per row (no prompt), as lists or a LongTensor
                ``[B, N]``; negative ids (padding) are skipped.
            active_rows: rows to look at (``[B]`` bools); the others answer False. None: all.
            new_tokens: how many tokens each row gained since the previous check.

        Returns:
            One bool per row.
        """
        if new_tokens < 1:
            raise ValueError(f"new_tokens must be >= 1, got {new_tokens!r}")
        rows = generated.tolist() if isinstance(generated, torch.Tensor) else generated
        if active_rows is None:
            active = [True] * len(rows)
        elif isinstance(active_rows, torch.Tensor):
            active = active_rows.tolist()
        else:
            active = list(active_rows)
        if len(active) != len(rows):
            raise ValueError(f"active_rows has {len(active)} entries for {len(rows)} rows")
        if not self.stops:
            return [False] * len(rows)
        return [bool(on) and self._tail_has_stop(row, new_tokens) for row, on in zip(rows, active)]

    def _tail_has_stop(self, row: Sequence[int], new_tokens: int) -> bool:
        ids = [int(i) for i in row if i >= 0]
        if not ids:
            return False
        # Enough old text = the longest stop minus one character, plus slack for a window that
        # starts inside a multi-byte character. Tokens usually hold >= 1 character, so start
        # with that many old tokens and double while the old text is still too short.
        needed = self._longest - 1 + _CUT_CHARACTER_SLACK
        width = new_tokens + needed
        while True:
            tail = ids[-width:]
            text = self._decode(tail)
            if any(stop in text for stop in self.stops):
                return True
            if width >= len(ids) or len(self._decode(tail[:-new_tokens])) >= needed:
                return False
            width *= 2


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any of ``stops`` (the stop string excluded)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(hits)] if hits else text


def max_new_tokens_allowed(prompt_len: int, requested: int, max_positions: int) -> int:
    """How many new tokens fit: ``prompt_len + new <= max_positions`` (OPT: 2048), never negative.

    Args:
        prompt_len: tokens in the (padded) prompt, >= 0.
        requested: new tokens the caller asked for, >= 0.
        max_positions: the model's position table size (``max_position_embeddings``), >= 1.

    Returns:
        ``min(requested, max_positions - prompt_len)``, or 0 if the prompt already fills the table.

    Raises:
        ValueError: on a negative ``prompt_len`` or ``requested``, or ``max_positions < 1``.
    """
    limits = (("prompt_len", prompt_len, 0), ("requested", requested, 0))
    for name, value, least in (*limits, ("max_positions", max_positions, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return max(0, min(requested, max_positions - prompt_len))
