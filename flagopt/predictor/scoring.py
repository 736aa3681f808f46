"""Scoring: log-probabilities of given tokens, in one batched forward per group of windows.

Every scoring request becomes a ``Window``: ``tokens`` of which all but the last are fed to
the model (at most ``max_position_embeddings`` of them) and whose last ``scored`` tokens are
the ones scored, each given everything before it in the window. ``loglikelihood`` pairs,
rolling windows over a long text (lm-eval's ``loglikelihood_rolling``) and the perplexity
guide's sliding windows are all lists of windows, and ``score_windows`` runs them: sorted by
length (longest first, so a batch pads little), right-padded, one forward per batch, the LM
head applied to the scored positions only, log-softmax in float32.

Tokenization follows lm-evaluation-harness's ``hf`` model for a causal LM (its
``_encode_pair`` and ``loglikelihood``), which for OPT's tokenizer means:

1. trailing whitespace of the context moves to the front of the continuation;
2. ``whole = [</s>] + encode(context + continuation)``, ``ctx = [</s>] + encode(context)``
   (no ``</s>`` is added to a text that already starts with the literal ``"</s>"``), and the
   continuation is ``whole[len(ctx):]``;
3. an empty context becomes ``[</s>]`` and the continuation ``encode(continuation)``;
4. a pair longer than the window keeps its last ``window + 1`` tokens (the oldest context
   tokens go).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from flagopt.errors import ScoringError
from flagopt.tokenizer import OPTTokenizer

# Rows of LM-head logits computed at once: bounds the (rows, vocab) float32 block (~200 MB).
_LOGIT_ROWS = 1024
_BOS_TEXT = "</s>"


@dataclass(frozen=True)
class Window:
    """One forward's worth of scoring: feed ``tokens[:-1]``, score the last ``scored`` tokens.

    Attributes:
        tokens: token ids, at most the model's window + 1 of them.
        scored: how many of the last tokens to score (1 <= scored < len(tokens)).
    """

    tokens: tuple[int, ...]
    scored: int


@dataclass
class WindowScore:
    """Per scored token: its log-probability (float32), whether it was the argmax, and
    (when asked for) the ``top`` most likely tokens at its position."""

    logprobs: torch.Tensor  # (scored,) float32, on the CPU
    greedy: torch.Tensor  # (scored,) bool
    top_ids: torch.Tensor | None = None  # (scored, top) int64, most likely first
    top_logprobs: torch.Tensor | None = None  # (scored, top) float32

    @property
    def logprob(self) -> float:
        return float(self.logprobs.sum())

    @property
    def is_greedy(self) -> bool:
        return bool(self.greedy.all())


def window_of(model: nn.Module) -> int:
    """The model's window: ``config.max_position_embeddings`` (2048 for every OPT)."""
    return int(model.config.max_position_embeddings)


# --- tokenization, as lm-eval's hf model ------------------------------------------------------


def encode_with_bos(tokenizer: OPTTokenizer, text: str) -> list[int]:
    """``[</s>] + encode(text)``, or ``encode(text)`` when ``text`` already starts with the
    literal ``"</s>"`` (lm-eval's ``tok_encode``: the tokenizer's special tokens are added
    unless the string starts with the BOS text)."""
    return tokenizer.encode(text, add_bos=not text.startswith(_BOS_TEXT))


def encode_pair(tokenizer: OPTTokenizer, context: str, continuation: str
                ) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-eval's ``hf`` model splits them (module docstring,
    rules 1-3). The continuation may come out empty; callers check."""
    if context == "":
        cont = tokenizer.encode(continuation)
        bos = tokenizer.bos_token_id
        if cont and cont[0] == bos:
            return cont[:1], cont[1:]
        return [bos], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode_with_bos(tokenizer, context + continuation)
    ctx = encode_with_bos(tokenizer, context)
    return ctx, whole[len(ctx):]


def pair_window(context: Sequence[int], continuation: Sequence[int], window: int) -> Window:
    """The window scoring ``continuation`` after ``context``: the last ``window + 1`` tokens
    (rule 4). ``continuation`` must be 1..window tokens long."""
    tokens = (list(context) + list(continuation))[-(window + 1):]
    return Window(tuple(tokens), len(continuation))


def rolling_windows(tokens: Sequence[int], prefix_token: int, window: int) -> list[Window]:
    """Disjoint windows scoring every one of ``tokens``, the first given ``prefix_token``
    only: lm-eval's ``get_rolling_token_windows(..., context_len=1)`` followed by
    ``make_disjoint_window``. Each later window scores up to ``window`` new tokens with the
    preceding tokens as context, so the inputs are at most ``window`` long."""
    tokens = list(tokens)
    out: list[Window] = []
    if not tokens:
        return out
    first = min(window, len(tokens))
    out.append(Window(tuple([prefix_token] + tokens[:first]), first))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, window)
        end = done + n
        # context tokens[end - window - 1 : done] (disjoint from the n predicted ones)
        out.append(Window(tuple(tokens[max(end - window - 1, 0):end]), n))
        done = end
    return out


# --- the forward ------------------------------------------------------------------------------


def score_windows(model: nn.Module, windows: Sequence[Window], batch_size: int = 8,
                  pad_token_id: int = 1, progress: Callable[[int, int], None] | None = None,
                  top: int = 0) -> list[WindowScore]:
    """Log-probabilities of each window's scored tokens, in the order given.

    Args:
        model: an ``OPTForCausalLM`` (anything with ``last_hidden_state`` and ``logits``).
        windows: what to score; each feeds at most the model's window of tokens.
        batch_size: windows per forward, grouped by length (longest first).
        pad_token_id: the id right padding uses (it is masked out).
        progress: called after each batch with (windows it held, total windows).
        top: also return the ``top`` most likely tokens at each scored position (the
            server's ``logprobs``); 0 returns none.

    Raises:
        ValueError: a window is longer than the model's window + 1 or scores nothing, or
            ``top`` is negative.
    """
    limit = window_of(model)
    if top < 0:
        raise ValueError(f"top={top}; expected >= 0")
    for i, w in enumerate(windows):
        if not 1 <= w.scored < len(w.tokens) or len(w.tokens) > limit + 1:
            raise ValueError(f"window {i} has {len(w.tokens)} tokens scoring {w.scored}; "
                             f"expected 1 <= scored < tokens <= {limit + 1}")
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].tokens))
    results: list[WindowScore | None] = [None] * len(windows)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            scores = _score_batch(model, [windows[i] for i in batch], pad_token_id, device,
                                  top)
            for i, score in zip(batch, scores):
                results[i] = score
            if progress is not None:
                progress(len(batch), len(windows))
    return results  # type: ignore[return-value]


def _score_batch(model: nn.Module, windows: list[Window], pad_token_id: int,
                 device: torch.device, top: int = 0) -> list[WindowScore]:
    width = max(len(w.tokens) for w in windows) - 1
    input_ids = torch.full((len(windows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for b, w in enumerate(windows):
        fed = len(w.tokens) - 1
        input_ids[b, :fed] = torch.tensor(w.tokens[:-1])
        mask[b, :fed] = 1
        rows += [b] * w.scored
        cols += range(fed - w.scored, fed)  # position t predicts token t + 1
        targets += w.tokens[-w.scored:]
    hidden = model.last_hidden_state(input_ids.to(device), mask.to(device))  # (B, T, D)
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    target = torch.tensor(targets, device=device)
    logprobs, greedy, top_ids, top_lps = [], [], [], []
    for s in range(0, picked.shape[0], _LOGIT_ROWS):  # (N, D) -> (N, vocab) in chunks
        logp = torch.log_softmax(model.logits(picked[s:s + _LOGIT_ROWS]).float(), dim=-1)
        t = target[s:s + _LOGIT_ROWS]
        logprobs.append(logp.gather(-1, t[:, None])[:, 0])
        greedy.append(logp.argmax(-1) == t)
        if top:
            values, ids = logp.topk(top, dim=-1)  # (n, top)
            top_lps.append(values)
            top_ids.append(ids)
    sizes = [w.scored for w in windows]
    flat_lp = torch.cat(logprobs).cpu().split(sizes)
    flat_g = torch.cat(greedy).cpu().split(sizes)
    if not top:
        return [WindowScore(lp, g) for lp, g in zip(flat_lp, flat_g)]
    flat_ids = torch.cat(top_ids).cpu().split(sizes)
    flat_top = torch.cat(top_lps).cpu().split(sizes)
    return [WindowScore(*parts) for parts in zip(flat_lp, flat_g, flat_ids, flat_top)]


# --- perplexity, as transformers' perplexity guide ----------------------------------------------


@dataclass(frozen=True)
class PerplexityWindow:
    """One of the guide's windows: ``window`` to score and the guide's weight for its mean."""

    window: Window
    weight: int


def perplexity_windows(ids: Sequence[int], stride: int, max_length: int
                       ) -> list[PerplexityWindow]:
    """The sliding windows of transformers' perplexity guide over ``ids``.

    Windows of ``max_length`` tokens start every ``stride`` tokens until one reaches the end;
    each scores only the ``trg_len`` tokens the previous window did not reach (the first
    window's first token has nothing before it and is never scored). The guide weights each
    window's mean loss by ``trg_len - 1`` ("the internal label shift"), also for windows
    where all ``trg_len`` tokens are scored; that weighting is kept, so the result equals the
    guide's number. ``stride`` must be at most ``max_length`` and ``ids`` at least 2 long.
    """
    out, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        tokens = tuple(ids[begin:end])
        if len(tokens) > 1:  # a last window of one token scores nothing (the guide: NaN * 0)
            out.append(PerplexityWindow(Window(tokens, min(trg_len, len(tokens) - 1)),
                                        trg_len - 1))
        prev_end = end
        if end == len(ids):
            break
    return out


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll)``, ``nll`` the guide's weighted mean negative log-likelihood over
    ``tokens`` (the guide's token count)."""

    tokens: int
    nll: float
    ppl: float
    stride: int
    max_length: int

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "nll": self.nll, "ppl": self.ppl,
                "stride": self.stride, "max_length": self.max_length}


def combine_perplexity(windows: Sequence[PerplexityWindow], scores: Sequence[WindowScore],
                       stride: int, max_length: int) -> PerplexityResult:
    """The guide's ``exp(sum(mean_loss * weight) / sum(weight))`` from scored windows."""
    nll_sum = 0.0
    n_tokens = 0
    for pw, score in zip(windows, scores):
        mean = -float(score.logprobs.double().mean())
        nll_sum += mean * pw.weight
        n_tokens += pw.weight
    nll = nll_sum / n_tokens
    return PerplexityResult(n_tokens, nll, math.exp(nll), stride, max_length)


# --- requests: pairs, texts, perplexity ------------------------------------------------------


class LogLikelihood(NamedTuple):
    """lm-eval's answer to a ``(context, continuation)`` pair."""

    logprob: float  # sum of the continuation tokens' log-probabilities
    is_greedy: bool  # greedy decoding would have produced exactly these tokens


@dataclass(frozen=True)
class TextScore:
    """Log-probabilities of a text's tokens, each given ``</s>`` and the tokens before it
    (within the model's window)."""

    tokens: list[int]  # the text's ids, without the ``</s>`` in front
    token_logprobs: list[float]
    logprob: float  # their sum


def loglikelihood(model: nn.Module, tokenizer: OPTTokenizer,
                  pairs: Sequence[tuple[str, str]], batch_size: int = 8,
                  progress: Callable[[int, int], None] | None = None) -> list[LogLikelihood]:
    """``(logprob, is_greedy)`` per ``(context, continuation)`` pair, as lm-eval's ``hf``
    model computes them (module docstring).

    Raises:
        ScoringError: a continuation encodes to no tokens, or to more than the window.
    """
    window = window_of(model)
    windows = []
    for i, (context, continuation) in enumerate(pairs):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            why = ("is empty" if continuation == "" else
                   f"({continuation!r}) has no tokens of its own after context "
                   f"{context[-40:]!r}: it merges into the context's last token")
            raise ScoringError(f"pairs[{i}] has an empty continuation: it {why}; a "
                               f"continuation needs >= 1 token")
        if len(cont) > window:
            raise ScoringError(f"pairs[{i}]: the continuation is {len(cont)} tokens, longer "
                               f"than the model's window of {window} (max_position_embeddings)"
                               f"; a long context is truncated, a long continuation cannot be")
        windows.append(pair_window(ctx, cont, window))
    scores = score_windows(model, windows, batch_size, tokenizer.pad_token_id, progress)
    return [LogLikelihood(s.logprob, s.is_greedy) for s in scores]


def rolling_loglikelihood(model: nn.Module, tokens: Sequence[Sequence[int]], prefix_token: int,
                          batch_size: int = 8,
                          progress: Callable[[int, int], None] | None = None) -> list[WindowScore]:
    """Per token list, the scores of all its tokens over disjoint rolling windows (the first
    given ``prefix_token``), all windows of all lists batched together."""
    window = window_of(model)
    per_text = [rolling_windows(t, prefix_token, window) for t in tokens]
    flat = [w for ws in per_text for w in ws]
    scores = iter(score_windows(model, flat, batch_size, 1, progress))
    out = []
    for ws in per_text:
        parts = [next(scores) for _ in ws]
        out.append(WindowScore(torch.cat([p.logprobs for p in parts]),
                               torch.cat([p.greedy for p in parts])))
    return out


def score_texts(model: nn.Module, tokenizer: OPTTokenizer, texts: Sequence[str],
                batch_size: int = 8, progress: Callable[[int, int], None] | None = None
                ) -> list[TextScore]:
    """Every token of each text scored after ``</s>``; texts longer than the window roll
    over disjoint windows (lm-eval's ``loglikelihood_rolling``, without its second ``</s>``).

    Raises:
        ScoringError: a text encodes to no tokens.
    """
    ids = tokenizer.encode_batch(list(texts), add_bos=False)
    for i, row in enumerate(ids):
        if not row:
            raise ScoringError(f"texts[{i}] is empty: there is no token to score")
    scores = rolling_loglikelihood(model, ids, tokenizer.bos_token_id, batch_size, progress)
    return [TextScore(row, s.logprobs.tolist(), s.logprob) for row, s in zip(ids, scores)]


def perplexity(model: nn.Module, tokenizer: OPTTokenizer, text: str, stride: int,
               max_length: int, batch_size: int = 8,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """The perplexity guide's sliding-window perplexity of ``text``, encoded as the guide's
    ``tokenizer(text)`` does: one ``</s>`` in front, which only the first window sees and
    which is never scored.

    Raises:
        ScoringError: the text encodes to no tokens.
    """
    ids = tokenizer.encode(text, add_bos=True)
    if len(ids) < 2:
        raise ScoringError("the text is empty: perplexity needs at least one token after </s>")
    windows = perplexity_windows(ids, stride, max_length)
    scores = score_windows(model, [w.window for w in windows], batch_size,
                           tokenizer.pad_token_id, progress)
    return combine_perplexity(windows, scores, stride, max_length)

