"""Contrastive search (Su et al. 2022; the decoding write-up that used OPT).

Each step takes the ``top_k`` most likely next tokens, runs all of them through the model at
once (``top_k`` cache rows per prompt), and picks the one maximising

    (1 - penalty_alpha) * p(token) - penalty_alpha * max_j cos(h_token, h_j)

where ``h_j`` are the last-layer hidden states of the prompt (padding excluded) and of the
tokens chosen so far. The chosen candidate's forward pass already gives the next step's logits,
so each step costs one forward pass of ``batch * top_k`` rows.
"""

from __future__ import annotations

import torch

from flagopt.predictor.engine import Chooser, DecodeState, GenerationResult, \
    prefill_once_per_prompt
from flagopt.predictor.params import GenerationParams
from flagopt.predictor.processors import apply_processors


class ContrastiveChooser(Chooser):
    """``top_k`` candidate rows per prompt; the cache rows of a prompt stay identical."""

    def __init__(self, params: GenerationParams, state: DecodeState, pad_id: int) -> None:
        super().__init__(params, state, pad_id)
        self.k = params.top_k
        self.alpha = params.penalty_alpha
        rows, total = state.tokens.shape
        self.b = rows // self.k
        self.group = torch.arange(self.b, device=state.tokens.device) * self.k  # first rows
        self.context: torch.Tensor | None = None  # (B, T + N, E) last-layer hidden states
        self.context_mask: torch.Tensor | None = None  # (B, T + N) 1 where context is real
        self.pending: torch.Tensor | None = None  # (B, V) logits of the chosen candidates

    def prefill(self, state: DecodeState) -> torch.Tensor:
        """Run each prompt once into its ``top_k`` rows; keep its hidden states as context."""
        t, model = state.prompt_len, state.model
        hidden = prefill_once_per_prompt(state, self.k, model.last_hidden_state)  # (B, T, E)
        mask = None if state.mask is None else state.mask[::self.k, :t]
        total = state.tokens.shape[1]
        self.context = hidden.new_zeros(self.b, total, hidden.shape[-1])
        self.context[:, :t] = hidden
        self.context_mask = torch.zeros(self.b, total, dtype=torch.bool, device=hidden.device)
        self.context_mask[:, :t] = True if mask is None else mask.bool()
        return model.logits(hidden[:, -1])  # (B, V)

    def choose(self, logits: torch.Tensor, state: DecodeState) -> torch.Tensor:
        b, k, cur = self.b, self.k, state.length
        scores = logits.float()
        if self.processors:
            scores = self._apply(scores, state)
        probs = scores.softmax(-1)
        top_p, top_ids = probs.topk(k, dim=-1)  # (B, K)
        hidden = self._run_candidates(top_ids.view(-1), state)[:, -1].view(b, k, -1)  # (B, K, E)
        penalty = self._degeneration_penalty(hidden, cur)  # (B, K)
        score = (1.0 - self.alpha) * top_p - self.alpha * penalty
        sel = score.argmax(-1)  # (B,)
        rows = torch.arange(b, device=sel.device)
        nxt = top_ids[rows, sel]
        self.context[:, cur] = hidden[rows, sel]
        self.context_mask[:, cur] = True
        self.pending = state.model.logits(hidden[rows, sel])  # (B, V)
        state.cache.reorder((self.group + sel).repeat_interleave(k))
        logp = scores.log_softmax(-1)[rows, nxt]
        step = cur - state.prompt_len
        done_first = state.done[::k]
        self.scores[:, step] = torch.where(done_first, 0.0, logp).repeat_interleave(k)
        return self._finish(torch.where(state.done, self.pad_id, nxt.repeat_interleave(k)),
                            state)

    def _apply(self, scores: torch.Tensor, state: DecodeState) -> torch.Tensor:
        return apply_processors(self.processors, state.history[::self.k, :state.length], scores)

    def _run_candidates(self, ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Hidden states (R, 1, E) of one candidate token per cache row."""
        end = state.cache.length + 1
        mask = None if state.mask is None else state.mask[:, :end].clone()
        if mask is not None:
            mask[:, -1] = 1
        return state.model.last_hidden_state(ids[:, None], mask, state.cache)

    def _degeneration_penalty(self, hidden: torch.Tensor, cur: int) -> torch.Tensor:
        ctx = self.context[:, :cur]  # (B, S, E)
        ctx = ctx / ctx.norm(dim=-1, keepdim=True)
        cand = hidden / hidden.norm(dim=-1, keepdim=True)
        cos = torch.matmul(cand, ctx.transpose(1, 2))  # (B, K, S)
        cos = cos.masked_fill(~self.context_mask[:, None, :cur], torch.finfo(cos.dtype).min)
        return cos.max(dim=-1).values

    def next_logits(self, next_tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        return self.pending  # computed with the candidates; no second forward pass

    def result(self, state: DecodeState) -> GenerationResult:
        full = super().result(state)
        k = self.k
        return GenerationResult(full.sequences[::k], full.prompt_length,
                                full.num_generated[::k], full.finish_reasons[::k],
                                full.sequence_scores[::k], full.token_scores[::k])
