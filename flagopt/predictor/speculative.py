"""Lossless speculative decoding: a draft model proposes tokens, the target verifies them.

One round (``SpeculativeChooser._round``), with ``L`` tokens so far and the target's cache
holding all but the newest of them:

1. the draft feeds what its own cache lacks and proposes k tokens, one forward each, chosen
   from its logits after the same processors the target's choices get (greedy: argmax;
   sampling: drawn from the warped distribution q);
2. the target runs its newest token and the k proposals in ONE forward: k+1 logits;
3. at each position j the processors run over the history up to j (proposals included, as
   plain decoding would have them) and the target chooses: greedy keeps proposal j+1 while
   it equals the target's argmax; sampling keeps it with probability min(1, p/q) and at the
   first rejection draws from norm(max(0, p - q)) (the speculative-sampling rule of
   Leviathan et al. and Chen et al., 2023), so each emitted token is distributed as the
   target's own p;
4. the rows of a batch advance together by the fewest proposals any unfinished row kept
   (m), plus the target's token after them: m + 1 tokens, each the token plain decoding
   makes there. A row that agreed further proposes those tokens again next round
   (correctness first: one length for all rows, as ``KVCache`` has). Both caches
   ``truncate`` the positions past what was kept.

The emitted tokens go out one per step through the engine's one loop (``decode_steps``):
``next_logits`` runs a round when its queue is empty and returns the target's logits for the
next queued position; ``choose`` takes the queued token. EOS, stop strings, the length
limit, scores and the NaN checks are therefore the loop's own. k adapts to the acceptance:
+2 after a round whose proposals were all kept, -1 otherwise, within [1, k_max].
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn

from flagopt.model.cache import KVCache
from flagopt.model.loading import no_init  # the loader's skip of meta-device init
from flagopt.model.quantize import Int8Embedding, Int8Linear, int8_modules, \
    is_quantized_param, tie_int8
from flagopt.predictor.engine import Chooser, DecodeState, GenerationResult, \
    SpeculativeStats, _cache_dtype
from flagopt.predictor.params import GenerationParams
from flagopt.predictor.processors import apply_processors

K_START = 4  # proposals in the first round
K_MAX = 8  # most proposals per round


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


class SpeculativeChooser(Chooser):
    """Greedy or sampling choice of the next token, with a draft model proposing ahead (see
    the module docstring). ``stats`` counts the proposals."""

    def __init__(self, params: GenerationParams, state: DecodeState, pad_id: int,
                 draft: nn.Module, k_max: int = K_MAX) -> None:
        super().__init__(params, state, pad_id)
        rows, capacity = state.tokens.shape
        cache = KVCache.for_model(draft.config, rows, capacity,
                                  dtype=_cache_dtype(draft, None), device=state.tokens.device)
        # The draft reads the same token, history and mask buffers through its own cache.
        self.draft = DecodeState(draft, cache, state.tokens, state.history, state.mask,
                                 state.prompt_len, state.max_new, 0, state.done)
        self.k, self.k_max = min(K_START, k_max), k_max
        self.queue: deque[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = deque()
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.stats = SpeculativeStats()

    def choose(self, logits: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """The prompt's first token as plain decoding picks it, then the verified tokens."""
        if self.pending is None:
            return super().choose(logits, state)
        scores, nxt = self.pending
        self.pending = None
        self._record(scores, nxt, state)
        return self._finish(torch.where(state.done, self.pad_id, nxt), state)

    def next_logits(self, next_tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """The target's logits (R, V) at the next verified position (a round when none is
        queued)."""
        if not self.queue:
            self._round(state)
        logits, scores, token = self.queue.popleft()
        self.pending = (scores, token)
        return logits

    def result(self, state: DecodeState) -> GenerationResult:
        """The ids, lengths, reasons and scores (as ``Chooser.result``) and the draft's
        acceptance figures."""
        out = super().result(state)
        out.speculative = self.stats
        return out

    # --- one round ----------------------------------------------------------------------------

    def _round(self, state: DecodeState) -> None:
        length = state.length  # the target's cache holds length - 1 positions
        left = state.max_new - (length - state.prompt_len)  # >= 1, or the loop had ended
        k = min(self.k, left - 1)
        if state.mask is not None:
            state.mask[:, length:length + k] = 1  # proposals are real tokens
        drafts, q = self._propose(state, k)  # (R, k), (R, k, V) or None
        logits = state.forward_all(state.tokens[:, length - 1:length + k])  # (R, k+1, V)
        scores = [self._process(logits[:, j], state, length + j) for j in range(k + 1)]
        if self.generator is None:
            tokens, agreed = self._verify_greedy(scores, drafts)
            m = self._kept(agreed, k, state)
        else:
            tokens, agreed, m = self._verify_sampled(scores, drafts, q, state)
        for j in range(m + 1):
            self.queue.append((logits[:, j], scores[j], tokens[:, j]))
        state.cache.truncate(length + m)
        self.draft.cache.truncate(min(self.draft.cache.length, length + m))
        self.k = min(self.k + 2, self.k_max) if m == k else max(1, self.k - 1)

    def _process(self, logits: torch.Tensor, state: DecodeState, end: int) -> torch.Tensor:
        """Processed float32 scores (R, V) of the position after ``history[:, :end]``."""
        scores = logits.float()
        if self.processors:
            scores = apply_processors(self.processors, state.history[:, :end], scores)
        return scores

    def _propose(self, state: DecodeState, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The draft's k tokens (R, k), written after ``state.length`` as tentative history,
        and, when sampling, the distributions they were drawn from (R, k, V)."""
        length, draft = state.length, self.draft
        rows = state.tokens.shape[0]
        tokens, probs = [], []
        if k:
            logits = draft.forward(state.tokens[:, draft.cache.length:length])  # catch up
        for i in range(k):
            # A draft row with NaN/inf logits (fp16 overflow, say) proposes from uniform
            # logits: proposals only change how many are accepted, never the output.
            logits = torch.where(torch.isfinite(logits.sum(-1, keepdim=True)), logits, 0.0)
            scores = self._process(logits, state, length + i)
            if self.generator is None:
                tok = scores.argmax(-1)
            else:
                q = scores.softmax(-1)
                tok = torch.multinomial(q, 1, generator=self.generator)[:, 0]
                probs.append(q)
            state.tokens[:, length + i] = tok
            state.history[:, length + i] = tok
            tokens.append(tok)
            if i < k - 1:
                logits = draft.forward(tok[:, None])
        device = state.tokens.device
        drafts = torch.stack(tokens, 1) if tokens else \
            torch.zeros(rows, 0, dtype=torch.long, device=device)
        return drafts, (torch.stack(probs, 1) if probs else None)

    def _verify_greedy(self, scores: list[torch.Tensor], drafts: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's argmax at every position (R, k+1) and each row's agreeing prefix."""
        tokens = torch.stack([s.argmax(-1) for s in scores], 1)
        return tokens, _prefix(tokens[:, :-1] == drafts)

    def _verify_sampled(self, scores: list[torch.Tensor], drafts: torch.Tensor,
                        q: torch.Tensor | None, state: DecodeState
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The speculative-sampling rule: tokens (R, m+1), each row's accepted prefix, m."""
        p = torch.stack([s.softmax(-1) for s in scores], 1)  # (R, k+1, V)
        accepted = accepted_prefix(p, q, drafts, self.generator)
        m = self._kept(accepted, drafts.shape[1], state)
        last = final_tokens(p, q, drafts, accepted.clamp(max=m), self.generator)
        if m < drafts.shape[1]:
            last = torch.where(accepted > m, drafts[:, m], last)
        return torch.cat([drafts[:, :m], last[:, None]], 1), accepted, m

    def _kept(self, agreed: torch.Tensor, k: int, state: DecodeState) -> int:
        """Proposals every unfinished row keeps (the batch's shortest agreeing prefix); also
        counts them in ``stats``. One host synchronisation per round."""
        live = ~state.done
        shortest, agreed_sum, rows = torch.stack([
            agreed.masked_fill(state.done, k).min(), (agreed * live).sum(), live.sum()]).tolist()
        self.stats.proposed += k * rows
        self.stats.accepted += agreed_sum
        self.stats.kept += shortest * rows if rows else 0
        self.stats.rounds += 1
        return shortest if rows else 0


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


def _prefix(agree: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of True per row of (R, k) bools: (R,) long."""
    return agree.long().cumprod(1).sum(1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
