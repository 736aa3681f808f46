"""The decoding strategies: one table that says what each supports.

``GenerationParams`` checks the strategy-dependent rules with it, ``Predictor.stream`` asks it
whether a strategy streams, the CLI takes its choices from it, and ``generation.CHOOSERS``
(the one dispatch, keyed by the same names) says which ``Chooser`` picks each one's tokens.
The table is plain data and imports nothing from the engine, so the parameter checks sit
below the choosers in the import graph.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    """One decoding strategy.

    Attributes:
        rows_field: the ``GenerationParams`` field giving each prompt's cache rows
            (``num_return_sequences`` samples, ``num_beams`` beams, ``top_k`` candidates).
        many_returns: ``num_return_sequences`` may exceed 1 (up to the rows per prompt).
        samples: draws tokens at random (unless ``temperature=0``).
        stop_strings: stop strings end rows while decoding (else the text is cut after).
        compile: its one-token steps can run through ``torch.compile``.
        streaming: ``Predictor.stream`` yields text as it is made (else all at the end).
        draft: speculative decoding with a draft model (``speculative.py``) keeps its
            output exactly (greedy: the same tokens; sampling: the same distribution).
    """

    rows_field: str
    many_returns: bool
    samples: bool
    stop_strings: bool
    compile: bool
    streaming: bool
    draft: bool


STRATEGIES: dict[str, Strategy] = {
    "greedy": Strategy("num_return_sequences", many_returns=False, samples=False,
                       stop_strings=True, compile=True, streaming=True, draft=True),
    "sample": Strategy("num_return_sequences", many_returns=True, samples=True,
                       stop_strings=True, compile=True, streaming=True, draft=True),
    # Beams are re-ranked to the end: stop strings cut the final text, nothing streams.
    "beam": Strategy("num_beams", many_returns=True, samples=False,
                     stop_strings=False, compile=True, streaming=False, draft=False),
    # Beams and candidates choose among several continuations per step, not one token that a
    # draft could guess: neither takes a draft.
    # The candidates' forward pass returns hidden states: it runs eagerly.
    "contrastive": Strategy("top_k", many_returns=False, samples=False,
                            stop_strings=True, compile=False, streaming=True, draft=False),
}
