"""The continuous-batching scheduler: a waiting queue, running rows, admit / step / retire.

A small object with no threads and no HTTP (tests drive it directly; ``engine.py`` runs it in
a loop). Each ``step``:

1. **admit**: while the oldest waiting request finds ``n`` free rows, run its prompt alone
   through the model into a small ``KVCache`` and copy that into each of its rows
   (``RowCache.admit``); the prompt's logits give each row its first token;
2. **decode**: one forward pass over the running rows (each at its own length, see
   ``RowCache``) gives every row its next token;
3. **retire**: rows that hit EOS, a stop string or their token budget free their row at once.

With a ``draft`` model (speculative decoding) step 1 also prefills the draft's own
``RowCache`` (same rows) with the prompt, and step 2 becomes:

a. **propose**: each running row gets k_i proposals (its own adaptive k, never past its token
   budget or ``max_model_len``). The draft's first forward feeds every row's last two tokens
   (after rolling the row back by one, so every row feeds the same count), each further one
   the previous proposal: max k_i forwards over all running rows. Each proposal is chosen
   with the row's processors over its tentative history: greedy argmax, or a draw from the
   processed softmax q with the row's generator;
b. **verify**: ONE target forward of ``max k_i + 1`` tokens per row (its last token and its
   proposals; shorter rows padded) gives the target's logits at every proposal;
c. **accept**: each row keeps its own agreeing prefix (greedy: the target's argmax equals
   the proposal; sampling: ``accepted_prefix``, accept with min(1, p/q)) plus the target's
   own token after it (greedy: argmax; sampling: ``final_tokens``, a draw from the residual
   norm(max(0, p - q)) or, after all k_i, from p), so every token is the one plain decoding
   would make (greedy) or distributed as the target's p (sampling). The tokens go through
   the row's EOS / stop-string / budget checks one by one: the row's event holds those up
   to the first cut, the rest are dropped;
d. **roll back**: both caches forget each row's rejected positions (``truncate_row``); the
   draft's cache lacks the last proposal and the target's token, which the next step's
   first draft forward feeds. k_i follows the offline engine's ``AcceptanceK`` rule (+2
   after a step that kept at least 3/4 of the proposals, -1 after one that kept fewer than
   half, within [1, K_MAX]): per row, since acceptance depends on the request, and from the
   acceptance alone (not timings), so a seeded row draws the same random numbers whatever
   else runs beside it.

Every row chooses its tokens with its own processors (``build_logits_processors``), its own
``torch.Generator`` and its own stop rules (``EosCriterion``, ``StopAwareStream`` around
``cut_at_stop``), so a request's output does not depend on what else is running: greedy
rows give ``Predictor``'s text for the same prompt, with or without a draft. Log-probabilities
reported are the model's own (``log_softmax`` of the raw target logits), before any
processor; a prompt's (``echo`` with ``logprobs``) come from the scoring core
(``flagopt.predictor.scoring``), the one that ``Predictor.loglikelihood`` and the lm-eval
model use, so scores through HTTP equal theirs.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from flagopt.model.cache import KVCache, RowCache
from flagopt.predictor.engine import SpeculativeStats, check_cache_dtype
from flagopt.predictor.params import GenerationParams
from flagopt.predictor.predictor import StopAwareStream
from flagopt.predictor.processors import LogitsProcessor, apply_processors, \
    build_logits_processors, sample
from flagopt.predictor.scoring import Window, score_windows
from flagopt.predictor.speculative import K_MAX, AcceptanceK, accepted_prefix, check_draft, \
    final_tokens
from flagopt.predictor.stopping import EosCriterion
from flagopt.tokenizer import OPTTokenizer

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20


class QueueFullError(RuntimeError):
    """The waiting queue holds ``max_queue`` requests already; try again later."""


@dataclass
class Request:
    """One completion request: a prompt's ids and how to continue it.

    ``params`` carries the sampling fields, stop strings, EOS ids (the stop token ids
    included), ``seed`` and ``num_return_sequences`` (OpenAI's ``n``); ``max_tokens`` is the
    token budget (0: score the prompt only). ``logprobs`` is the number of top alternatives
    to report per token (None: no log-probabilities); ``prompt_logprobs`` also scores the
    prompt (``echo`` with ``logprobs``).
    """

    request_id: str
    prompt_ids: list[int]
    params: GenerationParams
    max_tokens: int
    logprobs: int | None = None
    prompt_logprobs: bool = False

    @property
    def n(self) -> int:
        return self.params.num_return_sequences


@dataclass
class TokenLogprob:
    """One token's log-probability and the ``top`` alternatives (id -> log-probability)."""

    token_id: int
    logprob: float | None  # None for the prompt's first token
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class Event:
    """What a step produced for one choice of one request.

    ``text`` is the newly released text (never half a character, never past a stop string);
    ``token_ids`` the tokens generated this step (none for a prompt-only event; several with
    a draft), ``logprobs`` one entry per token and ``text_offsets`` where in ``text`` the
    text released so far stood when each token came (0 for a one-token event);
    ``finish_reason`` is ``"stop"``, ``"length"`` or ``"error"`` (then ``error`` says why)
    on the choice's last event, else None. ``prompt_logprobs`` comes once, on the first
    event of choice 0 when the request asked for it.
    """

    request_id: str
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    text_offsets: list[int] = field(default_factory=list)

    def extend(self, later: "Event") -> None:
        """Append a later event of the same choice (the next token of a speculative step)."""
        self.text_offsets += [len(self.text) + at for at in later.text_offsets]
        self.text += later.text
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        self.finish_reason, self.error = later.finish_reason, later.error


class _Row:
    """A running choice: its history, chooser pieces, budget and text stream."""

    def __init__(self, request: Request, index: int, tokenizer: OPTTokenizer,
                 device: torch.device) -> None:
        params = request.params
        self.request, self.index = request, index
        self.history = list(request.prompt_ids)
        self.generated = 0
        self.processors: list[LogitsProcessor] = build_logits_processors(
            prompt_len=len(request.prompt_ids), repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            no_repeat_ngram_size=params.no_repeat_ngram_size,
            min_new_tokens=params.min_new_tokens, eos_token_ids=params.eos_token_ids,
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
            min_p=params.min_p, sampling=params.sampling)
        self.generator = None
        if params.sampling:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:  # choice i of a seeded request: seed + i, so choice 0 is the n=1 answer
                self.generator.manual_seed((params.seed + index) % 2 ** 63)
        self.eos = EosCriterion(params.eos_token_ids, "cpu")
        self.text = StopAwareStream(tokenizer, params.stop)
        self.k_rule = AcceptanceK()  # proposals per step with a draft (see ``adapt``)

    def scores(self, logits: torch.Tensor, tentative: Sequence[int] = ()) -> torch.Tensor:
        """Processed float32 scores (1, V) of ``logits`` (V,), the position after the history
        and the ``tentative`` tokens (proposals not yet verified)."""
        scores = logits.float()[None]  # (1, V)
        if self.processors:
            history = torch.tensor([self.history + list(tentative)], device=logits.device)
            scores = apply_processors(self.processors, history, scores)
        return scores

    def choose(self, logits: torch.Tensor) -> Event:
        """Pick the next token from this row's logits (V,); the event it makes."""
        scores = self.scores(logits)
        token = int(sample(scores, self.generator)[0] if self.generator is not None
                    else scores.argmax(-1)[0])
        return self.emit(token, logits)

    def emit(self, token: int, logits: torch.Tensor) -> Event:
        """Add ``token``, chosen from the raw ``logits`` (V,), to the row; the event it makes
        (its finish reason set when EOS, a stop string or the budget ends the row)."""
        self.history.append(token)
        self.generated += 1
        event = Event(self.request.request_id, self.index, token_ids=[token], text_offsets=[0])
        if self.request.logprobs is not None:
            event.logprobs = [_logprob_of(logits.float().log_softmax(-1), token,
                                          self.request.logprobs)]
        if bool(self.eos(torch.tensor(token))):  # EOS and stop token ids: not in the text
            event.text, event.finish_reason = self.text.finish(), "stop"
            return event
        event.text, stopped = self.text.push(token)
        if stopped:
            event.finish_reason = "stop"
        elif self.generated >= self.request.max_tokens:
            event.text += self.text.finish()
            event.finish_reason = "length"
        return event

    def proposals(self, max_model_len: int) -> int:
        """How many draft tokens to verify this step: the row's k, leaving room for the
        target's own token within the budget and ``max_model_len``."""
        left = min(self.request.max_tokens - self.generated,
                   max_model_len - len(self.history))
        return max(0, min(self.k_rule.k, left - 1))

    def adapt(self, proposed: int, kept: int) -> None:
        """Adapt the row's k to a step that kept ``kept`` of its ``proposed`` tokens (the
        offline engine's ``AcceptanceK``; a step with nothing proposed says nothing)."""
        if proposed:
            self.k_rule.update(proposed, kept, None, 0.0)


def _logprob_of(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s entry in ``logprobs`` (V,) with the ``top`` most likely alternatives."""
    best = {}
    if top:
        values, ids = logprobs.topk(top)
        best = dict(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), best)


def prompt_logprobs(model: nn.Module, prompt_ids: Sequence[int], top: int
                    ) -> list[TokenLogprob]:
    """The model's log-probability of each prompt token given the ones before it, from the
    scoring core (one window scoring every token but the first).

    Args:
        model: the served ``OPTForCausalLM``.
        prompt_ids: the T prompt tokens (at most the model's window).
        top: alternatives to report per position.
    Returns:
        T entries, the first with ``logprob`` None (nothing predicts it).
    """
    ids = [int(i) for i in prompt_ids]
    out = [TokenLogprob(ids[0], None)]
    if len(ids) < 2:
        return out
    score = score_windows(model, [Window(tuple(ids), len(ids) - 1)], batch_size=1,
                          pad_token_id=model.config.pad_token_id, top=top)[0]
    best: list[dict[int, float]] = [{} for _ in ids[1:]]
    if top:
        best = [dict(zip(i, v)) for i, v in zip(score.top_ids.tolist(),
                                                score.top_logprobs.tolist())]
    for token, logprob, alternatives in zip(ids[1:], score.logprobs.tolist(), best):
        out.append(TokenLogprob(token, logprob, alternatives))
    return out


class Scheduler:
    """Requests in, events out, one ``step`` at a time (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: OPTTokenizer, *, max_batch_size: int = 16,
                 max_queue: int = 64, max_model_len: int | None = None,
                 cache_dtype: torch.dtype | str | None = None,
                 draft: nn.Module | str | None = None) -> None:
        """Args:
            model: an ``OPTForCausalLM``, in eval mode.
            tokenizer: its tokenizer (stop strings and text).
            max_batch_size: rows of the cache: choices decoded together.
            max_queue: requests that may wait for rows; more raise ``QueueFullError``.
            max_model_len: positions per row (prompt + generated); default and at most the
                model's position table.
            cache_dtype: the KV cache's dtype; None is the model's own.
            draft: speculative decoding (see the module docstring): a smaller causal LM
                sharing the tokenizer, or ``"int8"`` for the model's own weights in int8
                (``int8_draft``); None decodes one token per step. The output is the same.

        Raises:
            ValueError / TypeError: a bad limit, or a draft ``check_draft`` refuses.
        """
        config = model.config
        table = config.max_position_embeddings
        max_model_len = table if max_model_len is None else max_model_len
        for name, value, high in (("max_batch_size", max_batch_size, None),
                                  ("max_queue", max_queue, None),
                                  ("max_model_len", max_model_len, table)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 \
                    or (high is not None and value > high):
                bound = f"between 1 and {high} (the position table)" if high else ">= 1"
                raise ValueError(f"{name}={value!r}; expected an integer {bound}")
        param = next(p for p in model.parameters() if p.is_floating_point())
        self.model, self.tokenizer = model, tokenizer
        self.device = param.device
        self.max_model_len, self.max_queue = max_model_len, max_queue
        self.draft = None if draft is None else check_draft(model, draft)
        # With a draft, K_MAX slots of slack per row: rows padded to the step's longest
        # proposal write past their own budget (positions dropped by the rollback).
        capacity = max_model_len + (0 if self.draft is None else K_MAX)
        self.cache = RowCache.for_model(config, max_batch_size, capacity,
                                        dtype=check_cache_dtype(cache_dtype) or param.dtype,
                                        device=self.device)
        self.draft_cache: RowCache | None = None
        # The draft's acceptance figures: proposed, accepted (each row's own prefix), kept
        # (those emitted: fewer only where EOS / a stop string / the budget cut a step), rounds.
        self.speculative: SpeculativeStats | None = None
        if self.draft is not None:
            own = next(p.dtype for p in self.draft.parameters() if p.is_floating_point())
            self.draft_cache = RowCache.for_model(self.draft.config, max_batch_size, capacity,
                                                  dtype=own, device=self.device)
            self.speculative = SpeculativeStats()
        self.waiting: deque[Request] = deque()
        self.running: dict[int, _Row] = {}  # cache row -> its choice

    @property
    def max_batch_size(self) -> int:
        return self.cache.rows

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        """Requests with at least one row decoding."""
        return len({row.request.request_id for row in self.running.values()})

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        """Queue ``request``.

        Raises:
            QueueFullError: ``max_queue`` requests are waiting already.
            ValueError: it can never run here (``n`` above the rows, or prompt plus
                ``max_tokens`` past ``max_model_len``; the server checks both first).
        """
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"{len(self.waiting)} requests are waiting (max_queue="
                                 f"{self.max_queue})")
        if request.n > self.max_batch_size:
            raise ValueError(f"n={request.n} is more than max_batch_size="
                             f"{self.max_batch_size} rows")
        if not request.prompt_ids:
            raise ValueError("the prompt has no tokens")
        if len(request.prompt_ids) + request.max_tokens > self.max_model_len:
            raise ValueError(f"{len(request.prompt_ids)} prompt tokens + max_tokens="
                             f"{request.max_tokens} exceed max_model_len={self.max_model_len}")
        self.waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """Drop a request, waiting or running (its rows are freed now); whether it was here."""
        before = len(self.waiting)
        self.waiting = deque(r for r in self.waiting if r.request_id != request_id)
        rows = [i for i, row in self.running.items() if row.request.request_id == request_id]
        for i in rows:
            self._retire(i)
        return bool(rows) or len(self.waiting) < before

    def step(self) -> list[Event]:
        """Admit what fits, decode one token for every running row (with a draft: one or
        more), retire finished rows."""
        with torch.inference_mode():
            events = self._admit()
            if self.running:
                events += self._decode() if self.draft is None else self._speculate()
        return events

    # --- the three parts ------------------------------------------------------------------

    def _admit(self) -> list[Event]:
        events: list[Event] = []
        free = self.cache.free_rows()
        while self.waiting and len(free) >= self.waiting[0].n:
            request = self.waiting.popleft()
            rows, free = free[:request.n], free[request.n:]
            try:
                events += self._prefill(request, rows)
            except Exception as exc:  # this request fails; the others go on
                logger.exception("prefill of request %s failed", request.request_id)
                for i in rows:
                    if i in self.running:
                        self._retire(i)
                events += [Event(request.request_id, k, finish_reason="error",
                                 error=f"{type(exc).__name__}: {exc}")
                           for k in range(request.n)]
            free = self.cache.free_rows()
        return events

    def _prefill(self, request: Request, rows: list[int]) -> list[Event]:
        scored = None
        if request.prompt_logprobs:  # the scoring core's forward, not the cached one's
            scored = prompt_logprobs(self.model, request.prompt_ids, request.logprobs or 0)
        if request.max_tokens == 0:  # scoring only
            return [Event(request.request_id, k, finish_reason="length",
                          prompt_logprobs=scored if k == 0 else None)
                    for k in range(request.n)]
        ids = torch.tensor([request.prompt_ids], device=self.device)
        small = KVCache.for_model(self.model.config, 1, ids.shape[1], dtype=self.cache.dtype,
                                  device=self.device)
        logits = self.model(ids, cache=small, logits_to_keep=1).logits[0]  # (1, V)
        drafted = None
        if self.draft is not None:
            drafted = KVCache.for_model(self.draft.config, 1, ids.shape[1],
                                        dtype=self.draft_cache.dtype, device=self.device)
            self.draft(ids, cache=drafted, logits_to_keep=1)
        events = []
        for k, i in enumerate(rows):
            row = _Row(request, k, self.tokenizer, self.device)
            self.cache.admit(i, small)
            if drafted is not None:
                self.draft_cache.admit(i, drafted)
            self.running[i] = row
            event = row.choose(logits[-1])
            event.prompt_logprobs = scored if k == 0 else None
            events.append(self._after(i, event))
        return events

    def _decode(self) -> list[Event]:
        rows = self.cache.rows
        pad = self.model.config.pad_token_id
        tokens = torch.full((rows, 1), pad, dtype=torch.long)
        for i, row in self.running.items():
            tokens[i, 0] = row.history[-1]
        positions, mask = self.cache.step_inputs(1)
        span = positions.shape[0]
        try:
            hidden = self.model.model.decoder(tokens[:span].to(self.device), positions, mask,
                                              self.cache)
            logits = self.model.logits(hidden[:, -1])  # (span, V)
        except Exception as exc:  # the whole batch failed: fail its rows, keep serving
            return self._fail_all(exc)
        return [self._after(i, self.running[i].choose(logits[i])) for i in list(self.running)]

    def _fail_all(self, exc: Exception) -> list[Event]:
        logger.exception("decoding step failed")
        events = [Event(row.request.request_id, row.index, finish_reason="error",
                        error=f"{type(exc).__name__}: {exc}")
                  for row in self.running.values()]
        for i in list(self.running):
            self._retire(i)
        return events

    # --- speculative decoding (a draft model; see the module docstring) ---------------------

    def _speculate(self) -> list[Event]:
        ks = {i: row.proposals(self.max_model_len) for i, row in self.running.items()}
        k = max(ks.values())
        pad = self.model.config.pad_token_id
        tokens = torch.full((self.cache.rows, k + 1), pad, dtype=torch.long)
        try:
            drafts, q = self._propose(ks, k)
            for i, row in self.running.items():  # (rows, k+1): last token, proposals, pad
                tokens[i, :ks[i] + 1] = torch.tensor(row.history[-1:] + drafts[i])
            logits = self._forward(self.model, self.cache, tokens)  # (span, k+1, V)
        except Exception as exc:  # the whole batch failed: fail its rows, keep serving
            return self._fail_all(exc)
        self.speculative.rounds += 1
        return [self._after(i, self._accept(i, logits[i], drafts[i], q.get(i)))
                for i in list(self.running)]

    def _forward(self, model: nn.Module, cache: RowCache, tokens: torch.Tensor
                 ) -> torch.Tensor:
        """``model``'s logits (span, T, V) of ``tokens`` (rows, T) after each row's cache."""
        positions, mask = cache.step_inputs(tokens.shape[1])
        # Padding past a row's budget may run past the position table: it is rolled back.
        positions = positions.clamp(max=model.config.max_position_embeddings - 1)
        span = positions.shape[0]
        hidden = model.model.decoder(tokens[:span].to(self.device), positions, mask, cache)
        return model.logits(hidden)

    def _propose(self, ks: dict[int, int], k: int
                 ) -> tuple[dict[int, list[int]], dict[int, torch.Tensor]]:
        """Each running row's ``ks[i]`` draft tokens, and when sampling the distributions
        (ks[i], V) they were drawn from; k draft forwards over all running rows."""
        drafts: dict[int, list[int]] = {i: [] for i in self.running}
        probs: dict[int, list[torch.Tensor]] = {i: [] for i in self.running}
        if k == 0:
            return drafts, {}
        pad = self.model.config.pad_token_id
        feed = torch.full((self.cache.rows, 2), pad, dtype=torch.long)
        for i, row in self.running.items():  # the same count for every row: its last two
            self.draft_cache.truncate_row(i, len(row.history) - 2)
            feed[i] = torch.tensor(row.history[-2:])
        for j in range(k):
            logits = self._forward(self.draft, self.draft_cache, feed)[:, -1]  # (span, V)
            # A draft row with NaN/inf logits (fp16 overflow, say) proposes from uniform
            # logits: proposals only change how many are accepted, never the output.
            logits = torch.where(torch.isfinite(logits.sum(-1, keepdim=True)), logits, 0.0)
            feed = torch.full((self.cache.rows, 1), pad, dtype=torch.long)
            for i, row in self.running.items():
                if j >= ks[i]:
                    continue
                scores = row.scores(logits[i], drafts[i])
                if row.generator is None:
                    token = int(scores.argmax(-1)[0])
                else:
                    p = scores.softmax(-1)  # (1, V)
                    token = int(torch.multinomial(p, 1, generator=row.generator)[0, 0])
                    probs[i].append(p[0])
                drafts[i].append(token)
                feed[i, 0] = token
        return drafts, {i: torch.stack(p) for i, p in probs.items() if p}

    def _accept(self, i: int, logits: torch.Tensor, drafts: list[int],
                q: torch.Tensor | None) -> Event:
        """Row ``i``'s verified tokens from the target's ``logits`` (T, V) at its last token
        and its proposals: the accepted prefix plus the target's own token, cut where EOS,
        a stop string or the budget ends the row; both caches are rolled back to them."""
        row, k = self.running[i], len(drafts)
        scores = [row.scores(logits[j], drafts[:j]) for j in range(k + 1)]  # (1, V) each
        if row.generator is None:
            best = [int(s.argmax(-1)[0]) for s in scores]
            accepted = next((j for j in range(k) if best[j] != drafts[j]), k)
            tokens = best[:accepted + 1]
        else:
            p = torch.cat(scores).softmax(-1)[None]  # (1, k+1, V)
            d = torch.tensor([drafts], dtype=torch.long, device=p.device)  # (1, k)
            qs = None if q is None else q[None]  # (1, k, V)
            n = accepted_prefix(p, qs, d, row.generator)
            accepted = int(n[0])
            last = final_tokens(p, qs, d, n, row.generator)
            tokens = drafts[:accepted] + [int(last[0])]
        event = row.emit(tokens[0], logits[0])
        for j in range(1, len(tokens)):
            if event.finish_reason is not None:  # cut here: the later tokens are dropped
                break
            event.extend(row.emit(tokens[j], logits[j]))
        stats = self.speculative
        stats.proposed += k
        stats.accepted += accepted
        stats.kept += min(accepted, len(event.token_ids))
        row.adapt(k, accepted)
        if event.finish_reason is None:  # keep what was emitted: all but the newest token
            self.cache.truncate_row(i, len(row.history) - 1)
            self.draft_cache.truncate_row(i, min(int(self.draft_cache.lengths[i]),
                                                 len(row.history) - 2))
        return event

    def _after(self, i: int, event: Event) -> Event:
        if event.finish_reason is not None:
            self._retire(i)
        return event

    def _retire(self, i: int) -> None:
        self.cache.retire(i)
        if self.draft_cache is not None:
            self.draft_cache.retire(i)
        del self.running[i]
