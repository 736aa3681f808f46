"""Logits processors: small pure functions over next-token scores of shape ``[batch, vocab]``.

Every processor is a callable ``(input_ids, scores) -> scores`` where ``input_ids`` is
``LongTensor [B, T]`` (prompt and generated tokens so far, left-padded) and ``scores`` is
``FloatTensor [B, V]``. A ``-1`` in ``input_ids`` means "no token here" (left padding) and is
ignored by every processor, so a row's result never depends on how much padding it has.

Each processor is the identity at its neutral value, is built once from parameters that
``GenerationParams`` has validated (the processors trust them and check nothing), and uses
only vectorized torch ops (no loop over rows or vocabulary, no host synchronisation), so it
can run every decoding step on any device and in any float dtype.

The semantics follow Hugging Face transformers' ``generate``; see `build_logits_processors` for
the order in which they are applied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(input_ids: LongTensor [B, T], scores: FloatTensor [B, V]) -> FloatTensor [B, V]``."""

_NEG_INF = -math.inf


def _token_mask(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool ``[B, V]``: True where the token id occurs in the row of ``ids`` ``[B, N]``.

    Ids that are negative (padding) or outside the score vocabulary are sent to a spare
    column ``V`` that is dropped, so they mark nothing.
    """
    spare = vocab_size
    ids = ids.masked_fill(ids < 0, spare).clamp(max=spare)
    mask = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, ids, True)
    return mask[:, :vocab_size]


class RepetitionPenalty:
    """Penalise every token that already occurs in the row (prompt included), once per token.

    A seen token's score is divided by ``penalty`` when positive and multiplied by it when
    negative, so ``penalty > 1`` discourages repetition and ``penalty < 1`` encourages it.
    Extreme penalties saturate at the dtype's finite range instead of overflowing to +-inf
    (a penalty that is 0 in the scores' dtype leaves a score of 0 at 0, not NaN), so what
    follows never sees NaN. Neutral value: ``penalty == 1.0``.
    """

    def __init__(self, penalty: float) -> None:
        self.penalty = float(penalty)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = _token_mask(input_ids, scores.shape[-1])  # (B, V)
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        # NaN here is 0 / 0 and +-inf from a finite score is overflow; finite results are
        # left as the reference computes them, and a score that was -inf (banned) stays so.
        finfo = torch.finfo(scores.dtype)
        penalised = torch.nan_to_num(penalised, nan=0.0, posinf=finfo.max, neginf=finfo.min)
        penalised = torch.where(torch.isneginf(scores), scores, penalised)
        return torch.where(seen, penalised, scores)


def _generated_counts(input_ids: torch.Tensor, prompt_len: int, vocab_size: int) -> torch.Tensor:
    """Float ``[B, V]``: how often each token occurs after the first ``prompt_len`` positions."""
    ids = input_ids[:, prompt_len:]
    spare = vocab_size  # padding and ids outside the scores go to a dropped column
    ids = ids.masked_fill(ids < 0, spare).clamp(max=spare)
    counts = torch.zeros(ids.shape[0], vocab_size + 1, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab_size]


class PresencePenalty:
    """OpenAI's additive presence penalty: subtract ``penalty`` from the score of every token
    generated at least once (the prompt does not count).

    ``scores[j] -= penalty * (count[j] > 0)``; ``penalty < 0`` encourages repetition.
    Neutral value: ``penalty == 0``.
    """

    def __init__(self, prompt_len: int, penalty: float) -> None:
        self.prompt_len = prompt_len
        self.penalty = float(penalty)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = _generated_counts(input_ids, self.prompt_len, scores.shape[-1])
        return scores - self.penalty * (counts > 0).to(scores.dtype)


class FrequencyPenalty:
    """OpenAI's additive frequency penalty: subtract ``penalty`` times the number of times a
    token was generated so far (the prompt does not count).

    ``scores[j] -= penalty * count[j]``. Neutral value: ``penalty == 0``.
    """

    def __init__(self, prompt_len: int, penalty: float) -> None:
        self.prompt_len = prompt_len
        self.penalty = float(penalty)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = _generated_counts(input_ids, self.prompt_len, scores.shape[-1])
        return scores - self.penalty * counts.to(scores.dtype)


class NoRepeatNGram:
    """Forbid (score ``-inf``) any token that would complete an n-gram already in the row.

    The last ``n - 1`` tokens of the row are the prefix of the n-gram the next token would
    complete; every earlier n-gram that starts with that prefix bans its last token. n-grams
    that touch padding (``-1``) do not count. ``n == 1`` bans every token already present.
    Neutral value: ``n == 0``.
    """

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n, length = self.n, input_ids.shape[-1]
        if n == 0 or length < n:
            return scores
        windows = input_ids.unfold(1, n, 1)  # (B, T - n + 1, n): every n-gram of the row
        prefix = input_ids[:, length - n + 1 :]  # (B, n - 1): what the next token would extend
        # With left padding a window that holds -1 never equals the prefix: it holds more -1s
        # than the prefix does, or the prefix is all padding and so is the window's last token.
        hits = (windows[..., :-1] == prefix[:, None, :]).all(dim=-1)  # (B, T - n + 1)
        banned_ids = windows[..., -1].masked_fill(~hits, -1)  # misses become padding: no ban
        return scores.masked_fill(_token_mask(banned_ids, scores.shape[-1]), _NEG_INF)


class MinNewTokens:
    """Forbid every EOS id while fewer than ``min_new_tokens`` tokens have been generated.

    The number generated is ``T - prompt_len``; ``T`` is the same for every row because rows
    are left-padded to one prompt length. Neutral value: ``min_new_tokens == 0`` or no EOS ids.
    EOS ids outside the score vocabulary are ignored.
    """

    def __init__(self, prompt_len: int, min_new_tokens: int, eos_token_ids: Sequence[int]) -> None:
        self.prompt_len = prompt_len
        self.min_new_tokens = min_new_tokens
        self.eos_token_ids = tuple(eos_token_ids)
        self._eos_mask: torch.Tensor | None = None  # (V,) bool, built on first use

    def _mask_like(self, scores: torch.Tensor) -> torch.Tensor:
        mask = self._eos_mask
        vocab_size = scores.shape[-1]
        if mask is None or mask.shape[0] != vocab_size or mask.device != scores.device:
            ids = torch.tensor(self.eos_token_ids, dtype=torch.long)
            mask = torch.zeros(vocab_size, dtype=torch.bool)
            mask[ids[ids < vocab_size]] = True
            mask = mask.to(scores.device)
            self._eos_mask = mask
        return mask

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.eos_token_ids or input_ids.shape[-1] - self.prompt_len >= self.min_new_tokens:
            return scores
        return scores.masked_fill(self._mask_like(scores), _NEG_INF)


class Temperature:
    """Divide scores by ``t``: ``t < 1`` sharpens, ``t > 1`` flattens. Neutral: ``t == 1.0``.

    ``t > 0``: ``temperature=0`` means greedy, so no sampler (and no ``Temperature``) is built.
    A row whose best score overflows when divided (``t`` of 1e-40 and less in float32) gets
    the limit as ``t -> 0`` instead: 0 for its best tokens (ties kept), ``-inf`` for the rest,
    so sampling it is greedy. Other rows are divided exactly as the reference divides them.
    """

    def __init__(self, t: float) -> None:
        self.t = float(t)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scaled = scores / self.t
        overflow = ~torch.isfinite(scaled.amax(dim=-1, keepdim=True))  # (B, 1): inf or NaN
        best = scores.amax(dim=-1, keepdim=True)  # (B, 1)
        greedy = torch.zeros_like(scores).masked_fill(scores < best, _NEG_INF)
        return torch.where(overflow, greedy, scaled)


class TopK:
    """Keep the ``k`` highest scores per row (all tokens tied with the k-th are kept too).

    ``k`` is raised to ``min_tokens_to_keep`` and capped at the vocabulary size. The rest get
    ``-inf``. Neutral value: ``k == 0``.
    """

    def __init__(self, k: int, min_tokens_to_keep: int = 1) -> None:
        self.k = k
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.k == 0:
            return scores
        k = min(max(self.k, self.min_tokens_to_keep), scores.shape[-1])
        kth_best = torch.topk(scores, k, dim=-1).values[:, -1:]  # (B, 1)
        return scores.masked_fill(scores < kth_best, _NEG_INF)


class TopP:
    """Nucleus filtering: keep the most likely tokens whose probabilities add up to ``p``.

    Walking the tokens from least to most likely, a token is dropped while the running sum of
    probabilities (itself included) is at most ``1 - p``; the ``min_tokens_to_keep`` most
    likely tokens are always kept. The rest get ``-inf``. Neutral value: ``p == 1.0``.
    """

    def __init__(self, p: float, min_tokens_to_keep: int = 1) -> None:
        self.p = float(p)
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.p >= 1.0:
            return scores
        # Ties are broken by torch.sort's default (unstable) order, as in the reference.
        ascending, order = torch.sort(scores, dim=-1)  # (B, V) least likely first
        mass_up_to = ascending.softmax(dim=-1, dtype=torch.float32).cumsum(dim=-1)
        drop_sorted = mass_up_to <= 1.0 - self.p
        drop_sorted[:, scores.shape[-1] - self.min_tokens_to_keep :] = False
        drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)  # back to vocab order
        return scores.masked_fill(drop, _NEG_INF)


class MinP:
    """Drop tokens whose probability is below ``p`` times the row's top probability.

    The ``min_tokens_to_keep`` most likely tokens are always kept; the rest get ``-inf``.
    Neutral value: ``p == 0.0``.
    """

    def __init__(self, p: float, min_tokens_to_keep: int = 1) -> None:
        self.p = float(p)
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return scores
        probs = scores.softmax(dim=-1, dtype=torch.float32)  # (B, V)
        drop = probs < self.p * probs.amax(dim=-1, keepdim=True)
        k = min(self.min_tokens_to_keep, scores.shape[-1])
        drop.scatter_(1, torch.topk(probs, k, dim=-1).indices, False)
        return scores.masked_fill(drop, _NEG_INF)


def build_logits_processors(
    *,
    prompt_len: int,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    no_repeat_ngram_size: int = 0,
    min_new_tokens: int = 0,
    eos_token_ids: Sequence[int] = (),
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    sampling: bool,
    num_beams: int = 1,
) -> list[LogitsProcessor]:
    """Build the processors for one ``generate`` call, leaving out every neutral one.

    They are applied in the order of Hugging Face transformers' ``generate``:

    1. `RepetitionPenalty` (``repetition_penalty != 1``)
    2. `PresencePenalty` (``presence_penalty != 0``; OpenAI's, which transformers lacks:
       with the other penalties, before any warper, as vLLM applies it)
    3. `FrequencyPenalty` (``frequency_penalty != 0``; likewise)
    4. `NoRepeatNGram` (``no_repeat_ngram_size > 0``)
    5. `MinNewTokens` (``min_new_tokens > 0`` and some EOS id)

    then, only when ``sampling``, the warpers:

    6. `Temperature` (``temperature != 1``)
    7. `TopK` (``top_k > 0``)
    8. `TopP` (``top_p < 1``)
    9. `MinP` (``min_p > 0``; after temperature, as in the reference)

    Beam sampling (``num_beams > 1``) keeps at least ``len(eos_token_ids) + 1`` tokens (2 at
    least) in the warpers, as the reference does, so a beam can always continue past an EOS.
    Note that Hugging Face's own default for an unset ``top_k`` is 50, not 0: pass it explicitly
    to match a ``generate`` call that leaves ``top_k`` unset. The reference feeds float32 logits
    to greedy search and sampling, but *log-softmaxed* float32 logits to beam search (where,
    for one, every score is negative, so a repetition penalty > 1 always multiplies).

    Args:
        prompt_len: length ``T`` of the (left-padded) prompt batch.
        repetition_penalty, presence_penalty, frequency_penalty, no_repeat_ngram_size, min_new_tokens, eos_token_ids, temperature,
            top_k, top_p, min_p: as in the classes above, in ``GenerationParams``' ranges
            (checked there, not here).
        sampling: whether the next token is sampled; warpers are built only then.
        num_beams: beams per prompt; only changes ``min_tokens_to_keep`` when sampling.

    Returns:
        The processors to give to `apply_processors`, possibly empty.
    """
    processors: list[LogitsProcessor] = []
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(repetition_penalty))
    if presence_penalty != 0.0:
        processors.append(PresencePenalty(prompt_len, presence_penalty))
    if frequency_penalty != 0.0:
        processors.append(FrequencyPenalty(prompt_len, frequency_penalty))
    if no_repeat_ngram_size != 0:
        processors.append(NoRepeatNGram(no_repeat_ngram_size))
    if min_new_tokens != 0 and len(eos_token_ids) > 0:
        processors.append(MinNewTokens(prompt_len, min_new_tokens, eos_token_ids))
    if not sampling:
        return processors
    keep = max(2, len(eos_token_ids) + 1) if num_beams > 1 else 1
    if temperature != 1.0:
        processors.append(Temperature(temperature))
    if top_k != 0:
        processors.append(TopK(top_k, min_tokens_to_keep=keep))
    if top_p < 1.0:
        processors.append(TopP(top_p, min_tokens_to_keep=keep))
    if min_p != 0.0:
        processors.append(MinP(min_p, min_tokens_to_keep=keep))
    return processors


def apply_processors(
    processors: Sequence[LogitsProcessor], input_ids: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    """Run ``processors`` in order on ``scores`` ``[B, V]`` given ``input_ids`` ``[B, T]``."""
    for process in processors:
        scores = process(input_ids, scores)
    return scores


def sample(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row from ``softmax(scores)``; ``-inf`` scores are never drawn.

    Args:
        scores: processed scores (logits, not probabilities) ``[B, V]``, any float dtype.
        generator: source of randomness, on the scores' device; ``None`` uses torch's global
            generator. The same seed and scores give the same tokens.

    Returns:
        LongTensor ``[B]`` of token ids.
    """
    probs = scores.softmax(dim=-1, dtype=torch.float32)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
