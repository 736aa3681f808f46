"""Lossless speculative decoding: a draft model proposes tokens, the target verifies them.

Each row keeps its own verified tokens, ahead of what the loop has emitted. A round runs when
an unfinished row has none left (``SpeculativeChooser._round``):

1. every row's newest token goes into the next cache slot and the draft proposes k tokens
   after it, one forward each (after catching its cache up), chosen from its logits after
   the processors the target's choices get (greedy: argmax; sampling: a draw from the
   warped distribution q);
2. the target runs the newest tokens and the k proposals in ONE forward: k+1 logits per row;
3. at each position j the processors run over the row's history up to j (proposals
   included, as plain decoding would have them) and the target chooses: greedy keeps
   proposal j+1 while it equals the target's argmax; sampling keeps it with probability
   min(1, p/q) and at the first rejection draws from norm(max(0, p - q)) (the
   speculative-sampling rule of Leviathan et al. and Chen et al., 2023), so each token is
   distributed as the target's own p;
4. each row keeps its own accepted proposals plus the target's token after them (cut after an
   EOS and at its last position). Both caches share one slot per position and one length,
   so the slots a row rejected stay behind as holes: masked out of attention and not
   counted in the positions (OPT's positions are the cumulative attention mask, as with
   left padding), so every logit is the one the row's tokens give without holes. When the
   holes fill the room left, ``_compact`` moves each row's slots to the front.

The tokens go out one per step through the engine's one loop (``decode_steps``): ``choose``
takes each row's next verified token and its score, and ``next_logits`` runs a round when
needed. EOS, stop strings, the length limit, scores and the NaN check (``next_logits``
reports where the target's logits were not finite) are therefore the loop's own. k adapts
each round: greedy to the acceptance and the measured seconds of the draft's steps and the
target's pass (``CostK``, down to 0, plain decoding, when the draft does not pay), sampling
to the acceptance alone (``AcceptanceK``, so that seeded draws do not depend on timing).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from flagopt.model.cache import KVCache
from flagopt.model.decoder import attention_mask_4d, positions_from_mask
from flagopt.model.loading import no_init  # the loader's skip of meta-device init
from flagopt.model.quantize import Int8Embedding, Int8Linear, int8_modules, \
    is_quantized_param, tie_int8
from flagopt.predictor.engine import Chooser, DecodeState, GenerationResult, \
    SpeculativeStats, _cache_dtype
from flagopt.predictor.params import GenerationParams
from flagopt.predictor.processors import apply_processors

K_START = 4  # proposals in the first round
K_MAX = 8  # most proposals per round
HOLE_ROUNDS = 3  # rounds of rejected slots the caches have room for before compacting


def check_draft(model: nn.Module, draft: nn.Module | str) -> nn.Module:
    """The draft model for ``model``: ``draft`` itself when it fits, or ``"int8"``'s model.

    Args:
        model: the target, an ``OPTForCausalLM``.
        draft: another causal LM over the same vocabulary (sharing the tokenizer), or
            ``"int8"`` for the target's own weights quantized to int8 (``int8_draft``).

    Raises:
        TypeError: ``draft`` is neither a causal LM nor a string.
        ValueError: another string, a different vocabulary size, a smaller position table
            or another device.
    """
    if isinstance(draft, str):
        if draft != "int8":
            raise ValueError(f"draft={draft!r}; expected 'int8' or a model (load a named draft "
                             f"with AutoLoader, as `flagopt generate --draft NAME` does)")
        return int8_draft(model)
    if not isinstance(draft, nn.Module) or not hasattr(draft, "lm_head"):
        raise TypeError(f"draft must be a causal LM (OPTForCausalLM) or 'int8', got "
                        f"{type(draft).__name__}")
    target, mine = model.config, draft.config
    if mine.vocab_size != target.vocab_size:
        raise ValueError(f"the draft's vocab_size={mine.vocab_size} differs from the target's "
                         f"{target.vocab_size}; a draft must share the target's tokenizer")
    if mine.max_position_embeddings < target.max_position_embeddings:
        raise ValueError(f"the draft's max_position_embeddings={mine.max_position_embeddings} "
                         f"is below the target's {target.max_position_embeddings}; expected "
                         f"at least as many positions")
    here, there = _device(model), _device(draft)
    if here != there:
        raise ValueError(f"the draft is on {there} but the target on {here}; put both on "
                         f"one device")
    return draft


def int8_draft(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A separate copy of ``model`` with quantize.py's int8 weights (per output channel):
    nothing is shared with the target and nothing is read from disk.

    Args:
        model: a full-precision ``OPTForCausalLM``.
        dtype: the draft's activation dtype. None: the target's, except bfloat16 for a
            float32 target on CPU, where the fused int8 kernel needs half-precision
            activations. Only the draft's agreement depends on it, never the output.

    Raises:
        ValueError: ``model`` is already int8.
    """
    if any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules()):
        raise ValueError("draft='int8' needs a full-precision target, but this model is "
                         "already int8 (loaded with quantize='int8'): load it unquantized")
    device = _device(model)
    own = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cpu" and own == torch.float32 else own
    with torch.device("meta"), no_init():
        draft = type(model)(model.config, attn_implementation=model.model.attn_implementation)
        if model.model.decoder.layers[0].self_attn.qkv_proj is not None:
            draft.fuse_qkv()
    int8_modules(draft, dtype)
    source = dict(model.named_parameters())
    for name, _ in list(draft.named_parameters()):
        if name == "lm_head.weight" and draft.tied:
            continue  # tied below to the embedding's int8 matrix
        module_name, _, param_name = name.rpartition(".")
        module = draft.get_submodule(module_name)
        tensor = source[name].detach()
        if is_quantized_param(module, param_name):
            module.set_weight(tensor, device)
        else:
            module._parameters[param_name] = nn.Parameter(
                tensor.to(device=device, dtype=dtype, copy=True), requires_grad=False)
    draft.tie_weights()
    tie_int8(draft)
    return draft.eval()


class AcceptanceK:
    """k from the acceptance alone: +2 after a round whose rows kept at least 3/4 of the
    proposals, -1 after one that kept fewer than half, within [1, k_max]. Deterministic,
    so seeded sampling with a draft is reproducible."""

    def __init__(self, k_max: int = K_MAX) -> None:
        self.k, self.k_max = min(K_START, k_max), k_max

    def update(self, k: int, kept_per_row: float, step_s: float | None,
               round_s: float) -> None:
        """Record a round of ``k`` proposals whose rows kept ``kept_per_row`` on average
        (the times are not used here)."""
        if kept_per_row >= 0.75 * k:
            self.k = min(self.k + 2, self.k_max)
        elif kept_per_row < 0.5 * k:
            self.k = max(1, self.k - 1)


class CostK:
    """k from the acceptance and the measured costs: the k in [0, k_max] that emits the most
    tokens per second, ``E(k) / seconds(k)``. ``E(k) = 1 + a + ... + a^k`` tokens per row
    for a per-proposal acceptance a (its running mean); ``seconds(k)`` is the measured time of
    a whole round of k proposals (draft steps, the target's pass, the bookkeeping), or for
    a k not run yet the nearest one's plus or minus its draft steps (measured). k = 0 is
    plain decoding: a draft that costs more than it saves is not run (it is tried again
    every ``PROBE`` rounds). Greedy only: the output never depends on k, but sampling's
    random draws would."""

    PROBE = 8  # rounds at k = 0 before one round at k = 1 re-measures the draft
    WEIGHT = 0.3  # of the newest measurement in the running means

    def __init__(self, k_max: int = K_MAX) -> None:
        self.k, self.k_max = min(K_START, k_max), k_max
        self.rate: float | None = None
        self.draft: float | None = None
        self.seconds: dict[int, float] = {}
        self.idle = 0

    def update(self, k: int, kept_per_row: float, step_s: float | None,
               round_s: float) -> None:
        """Record a round: ``k`` proposals, ``kept_per_row`` of them kept on average, the
        seconds of one draft step (None: not measured) and of the whole round."""
        if k:
            self.rate = self._mean(self.rate, min(1.0, kept_per_row / k))
        if step_s is not None:
            self.draft = self._mean(self.draft, step_s)
        self.seconds[k] = self._mean(self.seconds.get(k), round_s)
        self.k = self.best()
        self.idle = self.idle + 1 if k == 0 else 0  # rounds run without the draft
        if self.k == 0 and self.idle >= self.PROBE:
            self.k, self.idle = 1, 0

    def best(self) -> int:
        """The k with the most expected tokens per second (see the class docstring)."""
        if self.rate is None or self.draft is None:
            return self.k
        a, draft = self.rate, self.draft

        def per_second(k: int) -> float:
            tokens = k + 1.0 if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)
            near = min(self.seconds, key=lambda m: (abs(m - k), -m))
            seconds = self.seconds[near] + (k - near) * draft
            return tokens / max(seconds, 1e-9)
        return max(range(self.k_max + 1), key=per_second)

    def _mean(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.WEIGHT) * old + self.WEIGHT * new


class SpeculativeChooser(Chooser):
    """Greedy or sampling choice of the next token, with a draft model proposing ahead and
    each row keeping its own accepted proposals (see the module docstring). ``stats`` counts
    the proposals."""

    greedy_policy: type = CostK  # how greedy rounds choose k (sampling: AcceptanceK)

    def __init__(self, params: GenerationParams, state: DecodeState, pad_id: int,
                 draft: nn.Module, k_max: int = K_MAX) -> None:
        super().__init__(params, state, pad_id)
        rows, total = state.tokens.shape
        device = state.tokens.device
        self.model, self.draft_model = state.model, draft
        # Greedy adapts k to the measured costs too; sampling to the acceptance alone.
        self.policy = AcceptanceK(k_max) if self.generator is not None else \
            self.greedy_policy(k_max)
        self.k_max = k_max
        # One slot per cached position, shared by both caches; a slot a row rejected stays
        # behind as a hole (mask 0) until ``_compact`` runs out of room for them.
        capacity = total + (1 + HOLE_ROUNDS) * (k_max + 1)
        state.cache.reserve(capacity)
        self.draft_cache = KVCache.for_model(draft.config, rows, capacity,
                                             dtype=_cache_dtype(draft, None), device=device)
        self.slot_tokens = torch.full((rows, capacity), pad_id, dtype=torch.long,
                                      device=device)
        self.slot_mask = torch.ones(rows, capacity, dtype=torch.long, device=device)
        if state.mask is not None:
            self.slot_mask[:, :state.prompt_len] = state.mask[:, :state.prompt_len]
        self.slot_tokens[:, :state.prompt_len] = state.tokens[:, :state.prompt_len]
        # One row has no holes (it keeps what it accepts): positions need no mask there.
        self.masked = rows > 1 or state.mask is not None
        # Each row's own verified sequence (history layout: PAD_HISTORY at left padding),
        # ahead of what the loop has emitted; and per verified token its log-probability
        # and whether the target's logits there were finite.
        width = total + k_max + 1
        self.seq = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
        self.logp = torch.zeros(rows, width, device=device)
        self.finite = torch.ones(rows, width, dtype=torch.bool, device=device)
        self.lengths: list[int] = []  # per row, tokens in ``seq`` (host; set at the first round)
        self.complete = [False] * rows  # the row verified EOS or its last position
        self.logits_dtype = _cache_dtype(state.model, None)
        self.stats = SpeculativeStats()

    def choose(self, logits: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """The prompt's first token as plain decoding picks it, then the verified tokens."""
        if not self.lengths:
            return super().choose(logits, state)
        at = state.length
        nxt = self.seq[:, at]
        self.scores[:, at - state.prompt_len] = torch.where(state.done, 0.0, self.logp[:, at])
        return self._finish(torch.where(state.done, self.pad_id, nxt), state)

    def next_logits(self, next_tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """What the loop reads of the target's logits at the next position: (R, 1), NaN
        where they were not finite (the tokens and scores are taken from the verified
        rounds; a round runs when an unfinished row has none verified there)."""
        if not self.lengths:
            self._start(state)
        at = state.length
        behind = [i for i, n in enumerate(self.lengths) if n <= at]
        if behind and not bool(state.done[behind].all()):
            self._round(state)
        bad = ~self.finite[:, at, None]
        return torch.zeros(bad.shape, dtype=self.logits_dtype,
                           device=bad.device).masked_fill(bad, float("nan"))

    def result(self, state: DecodeState) -> GenerationResult:
        """The ids, lengths, reasons and scores (as ``Chooser.result``) and the draft's
        acceptance figures."""
        out = super().result(state)
        out.speculative = self.stats
        return out

    # --- one round ----------------------------------------------------------------------------

    def _start(self, state: DecodeState) -> None:
        """Take the loop's first token as every row's verified history."""
        n = state.length
        self.seq[:, :n] = state.history[:, :n]
        self.lengths = [n] * state.tokens.shape[0]

    def _round(self, state: DecodeState) -> None:
        cache, end = state.cache, state.prompt_len + state.max_new  # a row's last position
        done = state.done.tolist()
        for i, d in enumerate(done):
            self.complete[i] = self.complete[i] or d or self.lengths[i] >= end
        live = [i for i, c in enumerate(self.complete) if not c]
        need = [end - n for n in self.lengths]  # tokens each row may still add
        k = min(self.policy.k, max(need[i] for i in live) - 1)
        if cache.length + k + 1 > cache.capacity:
            self._compact(state, live)
        started = time.perf_counter()  # after a compaction: not a cost of this k
        device = state.tokens.device
        slot = cache.length  # each row's newest token goes here, its proposals after it
        lengths = torch.tensor(self.lengths, device=device)
        self.slot_tokens[:, slot] = self.seq.gather(1, lengths[:, None] - 1)[:, 0]
        # Slots a row cannot use (it is finished, or past its last position) stay masked.
        alive = set(live)
        room = torch.tensor([n if i in alive else 0 for i, n in enumerate(need)],
                            device=device)
        j = torch.arange(k + 1, device=device)
        self.slot_mask[:, slot:slot + k + 1] = (j[None] < room[:, None]).long()
        drafts, q = self._propose(state, k, slot)  # (R, k), (R, k, V) or None
        proposed = _seconds(drafts, started)
        logits = self._run(self.model, cache, self.slot_tokens[:, slot:slot + k + 1])
        scores = [self._process(logits[:, i], drafts[:, :i]) for i in range(k + 1)]
        if self.generator is None:
            tokens = torch.stack([s.argmax(-1) for s in scores], 1)  # (R, k+1)
            accepted = _prefix(tokens[:, :-1] == drafts)
        else:
            p = torch.stack([s.softmax(-1) for s in scores], 1)  # (R, k+1, V)
            accepted = accepted_prefix(p, q, drafts, self.generator)
            last = final_tokens(p, q, drafts, accepted, self.generator)
            tokens = torch.cat([drafts, last[:, None]], 1)
            tokens.scatter_(1, accepted[:, None], last[:, None])
        # Each row keeps its accepted proposals and the target's token after them, cut at
        # its last position and after an EOS: m + 1 tokens.
        eos = self.eos(tokens) & (j[None] <= accepted[:, None])
        first_eos = torch.where(eos, j[None], k + 1).min(1).values
        m = torch.minimum(torch.minimum(accepted, first_eos), (room - 1).clamp(min=0))
        logp = torch.stack([s.gather(1, tokens[:, i, None])[:, 0] - s.logsumexp(-1)
                            for i, s in enumerate(scores)], 1)
        finite = torch.isfinite(logits.float().sum(-1))  # (R, k+1)
        ended = first_eos <= m
        kept, agreed, ended = torch.stack([m, accepted, ended.long()]).tolist()  # one sync
        self._keep(tokens, logp, finite, kept, live, lengths)
        for i in live:
            self.complete[i] = bool(ended[i]) or self.lengths[i] >= end
        rejected = j[None, :k] >= m[:, None]  # proposal i sits in slot + 1 + i
        self.slot_mask[:, slot + 1:slot + k + 1].masked_fill_(rejected, 0)
        used = slot + 1 + max(kept[i] for i in live)
        cache.truncate(used)
        self.draft_cache.truncate(min(self.draft_cache.length, used))
        self._count(k, kept, agreed, live)
        self.policy.update(k, sum(kept[i] for i in live) / len(live), self._step_seconds(k, proposed),
                           time.perf_counter() - started)

    def _keep(self, tokens: torch.Tensor, logp: torch.Tensor, finite: torch.Tensor,
              kept: list[int], live: list[int], lengths: torch.Tensor) -> None:
        """Append each live row's kept tokens (its first ``kept[i] + 1``) to ``seq``."""
        k1 = tokens.shape[1]
        index = lengths[:, None] + torch.arange(k1, device=tokens.device)  # (R, k+1)
        take = torch.zeros_like(tokens, dtype=torch.bool)
        for i in live:
            take[i, :kept[i] + 1] = True
            self.lengths[i] += kept[i] + 1
        for buf, new in ((self.seq, tokens), (self.logp, logp), (self.finite, finite)):
            buf.scatter_(1, index, torch.where(take, new, buf.gather(1, index)))

    def _step_seconds(self, k: int, proposing: float) -> float | None:
        """Seconds of one draft step in the last round: its one-token steps, or the
        catch-up step when it fed at most 2 tokens (a long catch-up after rounds without a
        draft is no step's cost); None when neither was run."""
        behind, catch_up = self._catch_up
        if k >= 2:
            return (proposing - catch_up) / (k - 1)
        return catch_up if k == 1 and behind <= 2 else None

    def _count(self, k: int, kept: list[int], agreed: list[int], live: list[int]) -> None:
        rows = len(live)
        self.stats.proposed += k * rows
        self.stats.accepted += sum(min(agreed[i], k) for i in live)
        self.stats.kept += sum(kept[i] for i in live)
        self.stats.rounds += 1

    def _process(self, logits: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        """Processed float32 scores (R, V) of the position after each row's verified tokens
        and ``proposals`` (R, j): the processors see exactly the history plain decoding
        would have there (rows of one length at a time)."""
        scores = logits.float()
        if not self.processors:
            return scores
        out = torch.empty_like(scores)
        for n in sorted(set(self.lengths)):
            rows = [i for i, m in enumerate(self.lengths) if m == n]
            history = torch.cat([self.seq[rows, :n], proposals[rows]], 1)
            out[rows] = apply_processors(self.processors, history, scores[rows])
        return out

    def _run(self, model: nn.Module, cache: KVCache, tokens: torch.Tensor,
             keep: int | None = None) -> torch.Tensor:
        """``model``'s logits (R, keep, V) (keep None: all t) of ``tokens`` (R, t) written at
        ``cache.length``; positions and attention come from the slot mask, so holes are
        neither seen nor counted."""
        t = tokens.shape[1]
        past = cache.length
        if self.masked:
            mask2d = self.slot_mask[:, :past + t]
            positions = positions_from_mask(mask2d, past)
        else:
            mask2d = None
            positions = torch.arange(past, past + t, device=tokens.device).expand_as(tokens)
        mask, is_causal = attention_mask_4d(mask2d, past, t, tokens.device)
        hidden = model.model.decoder(tokens, positions, mask, cache, is_causal=is_causal)
        return model.logits(hidden[:, -(keep or t):])

    def _propose(self, state: DecodeState, k: int, slot: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The draft's k tokens (R, k), written to the slots after ``slot``, and, when
        sampling, the distributions they were drawn from (R, k, V)."""
        rows, device = state.tokens.shape[0], state.tokens.device
        cache, tokens, probs = self.draft_cache, [], []
        drafts = torch.zeros(rows, 0, dtype=torch.long, device=device)
        self._catch_up = (0, 0.0)
        if k:  # catch up on what the draft's cache lacks, up to each row's newest token
            started, behind = time.perf_counter(), slot + 1 - cache.length
            logits = self._run(self.draft_model, cache,
                               self.slot_tokens[:, cache.length:slot + 1], keep=1)[:, 0]
            self._catch_up = (behind, _seconds(logits, started))
        for i in range(k):
            # A draft row with NaN/inf logits (fp16 overflow, say) proposes from uniform
            # logits: proposals only change how many are accepted, never the output.
            logits = torch.where(torch.isfinite(logits.sum(-1, keepdim=True)), logits, 0.0)
            scores = self._process(logits, drafts)
            if self.generator is None:
                tok = scores.argmax(-1)
            else:
                q = scores.softmax(-1)
                tok = torch.multinomial(q, 1, generator=self.generator)[:, 0]
                probs.append(q)
            self.slot_tokens[:, slot + 1 + i] = tok
            tokens.append(tok)
            drafts = torch.stack(tokens, 1)
            if i < k - 1:
                logits = self._run(self.draft_model, cache, tok[:, None])[:, 0]
        return drafts, (torch.stack(probs, 1) if probs else None)

    def _compact(self, state: DecodeState, live: list[int]) -> None:
        """Move each live row's filled slots to the front of both caches (holes after them);
        finished rows keep none (no query of theirs matters any more). Then the newest slot
        is at most a row's last position, and a round of ``k_max + 1`` fits the capacity."""
        cache, draft = state.cache, self.draft_cache
        if draft.length < cache.length:  # the draft lacks the last kept proposal: run it
            self._run(self.draft_model, draft, self.slot_tokens[:, draft.length:cache.length],
                      keep=1)
        used = cache.length
        alive = torch.zeros(self.slot_mask.shape[0], 1, dtype=torch.bool, device=cache.device)
        alive[live] = True
        keep = self.slot_mask[:, :used].bool() & alive
        order = torch.sort((~keep).long(), dim=1, stable=True).indices  # filled slots first
        length = int(keep.sum(1).max())
        order = order[:, :length]
        for c in (cache, draft):
            c.gather_slots(order)
        for buf in (self.slot_tokens, self.slot_mask):
            buf[:, :length] = buf.gather(1, order)
        self.slot_mask[:, :length] = (torch.arange(length, device=keep.device)[None]
                                      < keep.sum(1)[:, None]).long()


def accepted_prefix(p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor,
                    generator: torch.Generator | None) -> torch.Tensor:
    """Each row's accepted proposals (R,) long: proposal j is accepted with probability
    ``min(1, p_j(d) / q_j(d))``, and only while every earlier one was.

    Args:
        p: the target's distributions (R, k+1, V); q: the draft's (R, k, V), None for k = 0.
        drafts: the proposals (R, k), each drawn from its row of q.
    """
    k = drafts.shape[1]
    if k == 0:
        return torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
    p_draft = p[:, :k].gather(2, drafts[..., None])[..., 0]  # (R, k)
    q_draft = q.gather(2, drafts[..., None])[..., 0]
    u = torch.rand(p_draft.shape, generator=generator, device=p.device)
    return _prefix(u * q_draft < p_draft)


def final_tokens(p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor,
                 accepted: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The token (R,) each row emits after its own ``accepted`` proposals: where proposal
    ``a = accepted[i]`` was rejected, a draw from ``norm(max(0, p_a - q_a))``; after all k
    were accepted, a draw from ``p_k``. With the proposals kept before it, each emitted token
    is distributed as p at its position, given the ones before (speculative sampling).

    Args:
        p: the target's distributions (R, k+1, V); q: the draft's (R, k, V), None for k = 0.
        drafts: the proposals (R, k); accepted: each row's accepted prefix (R,) long.
    """
    k = drafts.shape[1]
    rows = torch.arange(p.shape[0], device=p.device)
    dist = p[rows, accepted]  # (R, V)
    if k:
        at = accepted.clamp(max=k - 1)
        residual = (dist - q[rows, at]).clamp(min=0)
        # A rejection leaves residual mass > 0; a row of zeros (p == q) is never rejected.
        rejected = (accepted < k)[:, None] & (residual.sum(-1, keepdim=True) > 0)
        dist = torch.where(rejected, residual, dist)
    return torch.multinomial(dist, 1, generator=generator)[:, 0]


def _seconds(result: torch.Tensor, since: float) -> float:
    """Seconds from ``since`` until ``result`` is computed (a CUDA device is synchronised)."""
    if result.device.type == "cuda":
        torch.cuda.synchronize(result.device)
    return time.perf_counter() - since


def _prefix(agree: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of True per row of (R, k) bools: (R,) long."""
    return agree.long().cumprod(1).sum(1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
