"""The decoding engine: one loop over a static KV cache for every strategy.

    prefill the prompt -> [choose next tokens -> append -> stop checks -> one-token forward]*

The loop lives in ``decode_steps``. Strategies differ only in how they run the model and choose
the next token (``Chooser`` subclasses here and in ``beam.py`` / ``contrastive.py``, listed in
``generation.CHOOSERS``). Work stays on the device: the only host synchronisation per step is the "are all rows done?" check (every step
on CPU, every few steps on CUDA, where rows that are done just emit padding meanwhile), which
also reads whether any logits so far were NaN/inf, and, only when stop strings are given,
decoding the newest text. Non-finite logits therefore raise ``NonFiniteLogitsError`` at the
next check: before that step's tokens are yielded on CPU, within ``check_every`` steps on CUDA.

The KV cache stores the model's own dtype unless ``cache_dtype`` says otherwise; float32
for a bf16/fp16 model on CPU is often faster there (its attention kernels are), but changes
the numbers slightly, so it is a choice, never a default.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from flagopt.errors import NonFiniteLogitsError
from flagopt.model.cache import KVCache
from flagopt.predictor.params import GenerationParams
from flagopt.predictor.processors import LogitsProcessor, apply_processors, \
    build_logits_processors, sample
from flagopt.predictor.stopping import EosCriterion, StopStrings


PAD_HISTORY = -1  # "no token here" in the history processors see (left padding)


@dataclass
class GenerationResult:
    """Token ids and scores of one ``generate`` call.

    ``sequences`` is ``(N, prompt + new)`` with the prompt as given (left-padded) and padding
    after each row's end, N = batch * num_return_sequences. ``num_generated[i]`` counts the
    new tokens of row i including a final EOS. ``token_scores`` (greedy, sampling,
    contrastive) are the log-probabilities of the chosen tokens under the processed
    distribution; ``sequence_scores`` are their sums, or the beam scores for beam search.
    ``speculative`` holds the draft's acceptance figures when a draft model took part.
    """

    sequences: torch.Tensor
    prompt_length: int
    num_generated: list[int]
    finish_reasons: list[str]
    sequence_scores: torch.Tensor
    token_scores: torch.Tensor | None = None
    speculative: "SpeculativeStats | None" = None

    @property
    def new_tokens(self) -> list[list[int]]:
        """Each row's generated ids (EOS included when it ended on one)."""
        rows = self.sequences[:, self.prompt_length:].tolist()
        return [row[:n] for row, n in zip(rows, self.num_generated)]


@dataclass
class SpeculativeStats:
    """How a draft model fared in one ``generate`` call (speculative decoding).

    Attributes:
        proposed: draft tokens proposed, summed over the rows still decoding.
        accepted: of those, the ones the target agreed with (each row's own agreeing prefix).
        kept: the ones emitted as proposed: ``accepted`` less those past an EOS or a row's
            last position.
        rounds: target forward passes that verified proposals.
    """

    proposed: int = 0
    accepted: int = 0
    kept: int = 0
    rounds: int = 0

    @property
    def rate(self) -> float:
        """``accepted / proposed`` (0.0 before any proposal)."""
        return self.accepted / self.proposed if self.proposed else 0.0


@dataclass
class DecodeState:
    """What the loop knows about the rows being decoded (R rows = batch x beams or batch)."""

    model: nn.Module
    cache: KVCache
    tokens: torch.Tensor  # (R, T + N): prompt, then generated ids (pad after a row's end)
    history: torch.Tensor  # (R, T + N): the same with PAD_HISTORY at left padding
    mask: torch.Tensor | None  # (R, T + N) attention mask, or None when nothing is padded
    prompt_len: int
    max_new: int
    length: int  # positions filled in tokens
    done: torch.Tensor  # (R,) bool
    reasons: list[str] = field(default_factory=list)  # "stop" once a stop string ends a row
    stop_counts: dict[int, int] = field(default_factory=dict)  # row -> new tokens at its stop
    step: Callable | None = None  # compiled ``type(model).static_step`` (compile=True)
    key_mask: torch.Tensor | None = None  # (R, cache capacity) bool, for ``step``
    write_at: torch.Tensor | None = None  # (1,) long, for ``step``

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the model on ``input_ids`` (R, t) after what the cache holds; last logits."""
        if self.step is not None and input_ids.shape[1] == 1:
            return self._static_forward(input_ids)
        end = self.cache.length + input_ids.shape[1]
        mask = None if self.mask is None else self.mask[:, :end]
        out = self.model(input_ids, attention_mask=mask, cache=self.cache, logits_to_keep=1)
        return out.logits[:, -1]

    def forward_all(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the model on ``input_ids`` (R, t) after what the cache holds; the logits of
        all t positions (R, t, V) (speculative decoding verifies t tokens at once)."""
        t = input_ids.shape[1]
        end = self.cache.length + t
        mask = None if self.mask is None else self.mask[:, :end]
        return self.model(input_ids, attention_mask=mask, cache=self.cache,
                          logits_to_keep=t).logits

    def _static_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        slot = self.cache.length
        self.key_mask[:, slot] = True
        self.write_at.fill_(slot)
        logits = self.step(self.model, input_ids, self.key_mask, self.cache.k, self.cache.v,
                           self.write_at)
        self.cache.advance(1)
        return logits

    def append(self, next_tokens: torch.Tensor) -> None:
        self.tokens[:, self.length] = next_tokens
        self.history[:, self.length] = next_tokens
        if self.mask is not None:
            self.mask[:, self.length] = 1
        self.length += 1


class Chooser:
    """Greedy or sampling choice of the next token, with the processors applied.

    The loop calls four methods, which are all a strategy may change: ``prefill`` (the
    prompt's logits), ``choose`` (the next tokens; marks rows done), ``next_logits`` (the
    logits after them) and ``result``.
    """

    def __init__(self, params: GenerationParams, state: DecodeState, pad_id: int) -> None:
        self.params = params
        self.pad_id = pad_id
        self.processors: list[LogitsProcessor] = build_logits_processors(
            prompt_len=state.prompt_len, repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            no_repeat_ngram_size=params.no_repeat_ngram_size,
            min_new_tokens=params.min_new_tokens, eos_token_ids=params.eos_token_ids,
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
            min_p=params.min_p, sampling=params.sampling, num_beams=1)
        device = state.tokens.device
        self.generator = _generator(params.seed, device) if params.sampling else None
        self.eos = EosCriterion(params.eos_token_ids, device)
        self.scores = torch.zeros(state.tokens.shape[0], state.max_new, device=device)

    def prefill(self, state: DecodeState) -> torch.Tensor:
        """Run the prompt through the model; logits of its last position (R, V)."""
        return state.forward(state.tokens[:, :state.prompt_len])

    def choose(self, logits: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Next token per row (R,), padding for rows already done; rows ending on EOS are
        marked done."""
        scores = logits.float()
        if self.processors:
            scores = apply_processors(self.processors, state.history[:, :state.length], scores)
        nxt = sample(scores, self.generator) if self.generator is not None \
            else scores.argmax(-1)
        self._record(scores, nxt, state)
        return self._finish(torch.where(state.done, self.pad_id, nxt), state)

    def _record(self, scores: torch.Tensor, nxt: torch.Tensor, state: DecodeState) -> None:
        step = state.length - state.prompt_len
        # log p(token) = score - logsumexp(scores): no (rows, vocab) log_softmax written out
        logp = scores.gather(1, nxt[:, None])[:, 0] - scores.logsumexp(-1)
        self.scores[:, step] = torch.where(state.done, 0.0, logp)

    def _finish(self, nxt: torch.Tensor, state: DecodeState) -> torch.Tensor:
        state.done |= self.eos(nxt)
        return nxt

    def next_logits(self, next_tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Logits (R, V) after ``next_tokens`` (R,), which the loop just appended."""
        return state.forward(next_tokens[:, None])

    def result(self, state: DecodeState) -> GenerationResult:
        """The ids, lengths, reasons and scores of every row."""
        new = state.tokens[:, state.prompt_len:state.length]
        n = new.shape[1]
        finished_at = _first_true(self.eos(new), n)  # index of EOS or n
        counts = (finished_at + (finished_at < n).long()).clamp(max=n)
        limit = length_reason(self.params, state)
        reasons = [r or ("eos" if int(f) < n else limit)
                   for r, f in zip(state.reasons, finished_at.tolist())]
        # A stop string ended its row at the token it was found after.
        counts_list = [state.stop_counts[i] if r == "stop" else c
                       for i, (r, c) in enumerate(zip(reasons, counts.tolist()))]
        width = max(counts_list, default=0)
        counts = torch.tensor(counts_list, device=new.device)
        beyond = torch.arange(n, device=new.device)[None] >= counts[:, None]  # (R, n)
        seqs = state.tokens[:, :state.prompt_len + width].clone()
        seqs[:, state.prompt_len:] = seqs[:, state.prompt_len:].masked_fill(
            beyond[:, :width], self.pad_id)
        token_scores = self.scores[:, :n].masked_fill(beyond, 0.0)
        return GenerationResult(seqs, state.prompt_len, counts_list, reasons,
                                token_scores.sum(-1), token_scores)


Out = TypeVar("Out")


def prefill_once_per_prompt(state: DecodeState, k: int,
                            run: Callable[[torch.Tensor, torch.Tensor | None, KVCache], Out]
                            ) -> Out:
    """Run each prompt once and copy its cache into its ``k`` rows (beams, candidates).

    Args:
        state: rows are prompt-major, ``k`` identical rows per prompt.
        k: rows per prompt.
        run: ``(input_ids (B, T), attention_mask (B, T) or None, cache of B rows) -> out``,
            the model call on one row per prompt.

    Returns:
        What ``run`` returned, for B = rows / k prompts.
    """
    t, rows = state.prompt_len, state.tokens.shape[0]
    first = slice(0, None, k)  # row 0 of each prompt's k rows
    small = KVCache.for_model(state.model.config, rows // k, t, dtype=state.cache.dtype,
                              device=state.cache.device)
    mask = None if state.mask is None else state.mask[first, :t]
    out = run(state.tokens[first, :t], mask, small)
    state.cache.copy_rows_from(small, k)
    return out


def length_reason(params: GenerationParams, state: DecodeState) -> str:
    """Why a row that ran out of steps ended: ``"positions"`` when the position table (not
    ``max_new_tokens``) set the number of steps, else ``"length"``."""
    return "positions" if state.max_new < params.max_new_tokens else "length"


def _first_true(flags: torch.Tensor, default: int) -> torch.Tensor:
    """Index of the first True per row of (R, n) flags, ``default`` where there is none."""
    n = flags.shape[1]
    idx = torch.arange(n, device=flags.device).expand_as(flags)
    return torch.where(flags, idx, default).min(dim=1).values if n else \
        torch.full((flags.shape[0],), default, device=flags.device)


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def start_state(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                max_new: int, rows_per_prompt: int = 1, compile: bool = False,
                cache_dtype: torch.dtype | None = None) -> DecodeState:
    """Allocate the cache and token buffers for the whole generation (no later growth).

    ``compile`` runs each one-token step through ``torch.compile`` of the model's
    static-shape step (CUDA graphs on GPU); the results are the same. ``cache_dtype`` is the
    KV cache's dtype (see ``check_cache_dtype``); None is the model's own.
    """
    bsz, t = input_ids.shape
    rows = bsz * rows_per_prompt
    total = t + max_new
    device = input_ids.device
    padded = not bool(attention_mask.all())
    tokens = torch.full((rows, total), model.config.pad_token_id, dtype=torch.long,
                        device=device)
    tokens[:, :t] = input_ids.repeat_interleave(rows_per_prompt, 0)
    history = tokens.clone()
    mask = None
    if padded:
        mask = torch.zeros(rows, total, dtype=torch.long, device=device)
        mask[:, :t] = attention_mask.repeat_interleave(rows_per_prompt, 0)
        history[:, :t] = history[:, :t].masked_fill(mask[:, :t] == 0, PAD_HISTORY)
    # A compiled step is specialised to its cache capacity: round it up so that calls of
    # similar lengths share one compilation.
    capacity = _bucket(total, model.config.max_position_embeddings) if compile else total
    cache = KVCache.for_model(model.config, rows, capacity,
                              dtype=_cache_dtype(model, cache_dtype), device=device)
    state = DecodeState(model, cache, tokens, history, mask, t, max_new, t,
                        torch.zeros(rows, dtype=torch.bool, device=device), [""] * rows)
    if compile:
        state.step = compiled_step(model)
        state.key_mask = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
        state.key_mask[:, :t] = True if mask is None else mask[:, :t].bool()
        state.write_at = torch.zeros(1, dtype=torch.long, device=device)
    return state


def _bucket(total: int, max_positions: int, step: int = 128) -> int:
    """``total`` rounded up to a multiple of ``step``, but never past the position table."""
    return max(total, min(-(-total // step) * step, max_positions))


# Compiled steps by model, off the model itself. Each is compiled from the class's unbound
# ``static_step`` and called with the model, so the entry holds no reference to its key and
# goes when the model does.
_COMPILED_STEPS: "weakref.WeakKeyDictionary[nn.Module, Callable]" = weakref.WeakKeyDictionary()


def compiled_step(model: nn.Module) -> Callable:
    """``torch.compile`` of ``type(model).static_step``, made once per model; call it as
    ``step(model, input_ids, key_mask, cache_k, cache_v, write_at)``.

    On CUDA it uses CUDA graphs ("reduce-overhead"). Shapes are static per (rows, capacity),
    so a new batch size or length compiles once more.
    """
    step = _COMPILED_STEPS.get(model)
    if step is None:
        if not hasattr(model, "static_step"):
            raise TypeError(f"compile=True needs a causal LM, got {type(model).__name__}")
        device = next(model.parameters()).device
        mode = "reduce-overhead" if device.type == "cuda" else None
        step = torch.compile(type(model).static_step, dynamic=False, mode=mode)
        _COMPILED_STEPS[model] = step
    return step


CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_cache_dtype(cache_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Validate a ``cache_dtype`` option: None (the model's dtype), a ``torch.dtype`` or its
    name among float32, float16 and bfloat16. Returns the ``torch.dtype`` or None.

    Raises:
        ValueError / TypeError: any other value.
    """
    if cache_dtype is None:
        return None
    names = ", ".join(str(d).removeprefix("torch.") for d in CACHE_DTYPES)
    if isinstance(cache_dtype, str):
        dtype = getattr(torch, cache_dtype.removeprefix("torch."), None)
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype={cache_dtype!r}; expected None or one of {names}")
        return dtype
    if not isinstance(cache_dtype, torch.dtype):
        raise TypeError(f"cache_dtype must be a torch.dtype, its name or None, got "
                        f"{type(cache_dtype).__name__}")
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype={cache_dtype}; expected None or one of {names}")
    return cache_dtype


def _cache_dtype(model: nn.Module, cache_dtype: torch.dtype | None) -> torch.dtype:
    """``cache_dtype`` (already checked by the caller's boundary) when given, else the model's
    float dtype (the reference's numerics)."""
    if cache_dtype is not None:
        return cache_dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def decode_steps(state: DecodeState, chooser: Chooser,
                 stop_strings: StopStrings | None = None,
                 check_every: int = 1) -> Iterator[torch.Tensor]:
    """The decoding loop. Yields each step's tokens (R,); ``chooser.result(state)`` after.

    Args:
        state: from ``start_state``; the prompt is prefilled here.
        chooser: the strategy.
        stop_strings: host-side stop strings, checked each step when given.
        check_every: steps between "all rows done?" host checks (1 on CPU).
    Raises:
        NonFiniteLogitsError: the model produced NaN/inf logits (read at the host check).
    """
    logits = chooser.prefill(state)
    bad_at = torch.full((), _NO_POSITION, dtype=torch.long, device=state.done.device)
    for step in range(state.max_new):
        logits = _track_finite(logits, bad_at, state)
        nxt = chooser.choose(logits, state)
        state.append(nxt)
        if stop_strings is not None:
            _apply_stop_strings(stop_strings, state)
        last = step == state.max_new - 1
        if last or (step + 1) % check_every == 0:
            done, first_bad = torch.stack([state.done.all().long(), bad_at]).tolist()
            _raise_if_bad(first_bad, logits.dtype)
            last = last or bool(done)
        yield nxt
        if last:
            break
        logits = chooser.next_logits(nxt, state)


_NO_POSITION = 2 ** 62  # "no non-finite logits yet"


def _track_finite(logits: torch.Tensor, bad_at: torch.Tensor, state: DecodeState
                  ) -> torch.Tensor:
    """Record in ``bad_at`` (on the device, no sync) the first position whose logits hold
    NaN/inf, and zero those rows so that the choice cannot fail on them (sampling would)
    before the next host check raises."""
    # NaN and +-inf survive a row sum, so one reduction finds them (finite logits are far too
    # small for a float32 sum over the vocabulary to overflow).
    finite = torch.isfinite(logits.sum(-1, dtype=torch.float32))  # (R,)
    all_finite = finite.all()
    torch.minimum(bad_at, torch.where(all_finite, _NO_POSITION, state.length), out=bad_at)
    return torch.where(finite[:, None], logits, 0.0)


def _raise_if_bad(first_bad: int, dtype: torch.dtype) -> None:
    if first_bad == _NO_POSITION:
        return
    name = str(dtype).removeprefix("torch.")
    hint = (f"this is usually {name} overflow: load the model in float32 or bfloat16"
            if dtype == torch.float16 else
            "the weights or the inputs hold NaN/inf, or the activations overflowed")
    raise NonFiniteLogitsError(
        f"the model produced NaN/inf logits in {name} at position {first_bad}; {hint}")


def _apply_stop_strings(stops: StopStrings, state: DecodeState) -> None:
    generated = state.tokens[:, state.prompt_len:state.length]
    hits = stops.check(generated, ~state.done)
    for i, hit in enumerate(hits):
        if hit:
            state.reasons[i] = "stop"
            state.stop_counts[i] = state.length - state.prompt_len
    if any(hits):
        state.done |= torch.tensor(hits, device=state.done.device)

