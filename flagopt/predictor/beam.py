"""Beam search as vectorized state shaped (batch, beams, ...), the reference's semantics.

Each step, for every prompt: add the beams' running scores to the next-token
log-probabilities, keep the best ``2 * beams`` continuations (more with several EOS ids), move
those that end (EOS or the length limit) among the top ``beams`` into a finished pool scored
``sum_logprobs / generated_length ** length_penalty``, and continue with the best ``beams``
that did not end. The cache is reordered in place by the chosen beams. All rows of all
prompts run in one forward pass per step.
"""

from __future__ import annotations

import torch

from flagopt.model.cache import KVCache
from flagopt.predictor.engine import Chooser, DecodeState, GenerationResult, length_reason
from flagopt.predictor.params import GenerationParams
from flagopt.predictor.processors import apply_processors

_NEG = -1.0e9  # the reference's "impossible" score; kept identical so ties break alike


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b, j], ...] for (B, M, ...) x and (B, J) idx."""
    while idx.dim() < x.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(x, idx, dim=1)


class BeamChooser(Chooser):
    """Chooses the next tokens of ``num_beams`` beams per prompt and keeps the finished pool."""

    def __init__(self, params: GenerationParams, state: DecodeState, pad_id: int) -> None:
        super().__init__(params, state, pad_id)  # processors: the non-sampling ones
        self.k = params.num_beams
        rows, total = state.tokens.shape
        self.b = rows // self.k
        dev = state.tokens.device
        self.keep = max(2, 1 + len(params.eos_token_ids)) * self.k
        self.top_mask = torch.arange(self.keep, device=dev) < self.k  # (2K,)
        self.running = torch.zeros(self.b, self.k, device=dev)
        self.running[:, 1:] = _NEG  # only beam 0 is real at the start
        self.pool_tokens = state.tokens.view(self.b, self.k, total).clone()
        self.pool_scores = torch.full((self.b, self.k), _NEG, device=dev)
        self.pool_done = torch.zeros(self.b, self.k, dtype=torch.bool, device=dev)
        self.pool_len = torch.zeros(self.b, self.k, dtype=torch.long, device=dev)
        self.improvable = torch.ones(self.b, 1, dtype=torch.bool, device=dev)
        self.all_hit = torch.zeros((), dtype=torch.bool, device=dev)
        self.batch_offset = torch.arange(self.b, device=dev)[:, None] * self.k

    def prefill(self, state: DecodeState) -> torch.Tensor:
        """Run each prompt once and copy its cache into its beams' rows."""
        t = state.prompt_len
        first = slice(0, None, self.k)  # row 0 of each prompt's beams
        small = KVCache.for_model(state.model.config, self.b, t, dtype=state.cache.dtype,
                                  device=state.cache.device)
        mask = None if state.mask is None else state.mask[first, :t]
        logits = state.model(state.tokens[first, :t], attention_mask=mask, cache=small,
                             logits_to_keep=1).logits[:, -1]
        state.cache.copy_rows_from(small, self.k)
        return logits.repeat_interleave(self.k, dim=0)

    def choose(self, logits: torch.Tensor, state: DecodeState) -> torch.Tensor:
        b, k, cur = self.b, self.k, state.length
        log_probs = logits.float().log_softmax(-1)
        if self.processors:
            log_probs = apply_processors(self.processors, state.history[:, :cur], log_probs)
        vocab = log_probs.shape[-1]
        acc = (log_probs.view(b, k, vocab) + self.running[:, :, None]).view(b, k * vocab)
        top_lp, top_idx = torch.topk(acc, self.keep)  # (B, 2K)
        beam, token = top_idx // vocab, top_idx % vocab
        cand = _gather(state.tokens.view(b, k, -1), beam)  # (B, 2K, S)
        cand[:, :, cur] = token
        hits = self.eos(token)
        if cur + 1 >= state.prompt_len + state.max_new:
            hits = torch.ones_like(hits)
        self._update_pool(cand, top_lp, hits, cur + 1 - state.prompt_len)
        src = self._update_running(top_lp, hits, beam, cand, state)
        state.cache.reorder((src + self.batch_offset).view(-1))
        self.all_hit = hits.all()
        self._update_improvable(cur + 1 - state.prompt_len, state.max_new)
        return state.tokens[:, cur].clone()

    def _update_running(self, top_lp: torch.Tensor, hits: torch.Tensor, beam: torch.Tensor,
                        cand: torch.Tensor, state: DecodeState) -> torch.Tensor:
        b, k = self.b, self.k
        run_lp = top_lp + hits.to(torch.float32) * _NEG
        nxt = torch.topk(run_lp, k)[1]  # (B, K)
        self.running = _gather(run_lp, nxt)
        state.tokens.view(b, k, -1).copy_(_gather(cand, nxt))
        # The beams of one prompt share its (padded) prompt; only generated ids move.
        gen = slice(state.prompt_len, state.length + 1)
        state.history[:, gen] = state.tokens[:, gen]
        return _gather(beam, nxt)  # (B, K): which old beam each new beam extends

    def _update_pool(self, cand: torch.Tensor, top_lp: torch.Tensor, hits: torch.Tensor,
                     gen_len: int) -> None:
        p = self.params
        just = hits & self.top_mask[None, :]
        score = top_lp / (gen_len ** p.length_penalty)
        full = self.pool_done.all(-1, keepdim=True) & (p.early_stopping is True)
        score = score + full.to(torch.float32) * _NEG
        score = score + (~self.improvable).to(torch.float32) * _NEG
        score = score + (~just) * _NEG
        merged_scores = torch.cat([self.pool_scores, score], dim=1)
        best = torch.topk(merged_scores, self.k)[1]
        self.pool_tokens = _gather(torch.cat([self.pool_tokens, cand], 1), best)
        self.pool_scores = _gather(merged_scores, best)
        self.pool_done = _gather(torch.cat([self.pool_done, just], 1), best)
        lengths = torch.full_like(top_lp, gen_len, dtype=torch.long)
        self.pool_len = _gather(torch.cat([self.pool_len, lengths], 1), best)

    def _update_improvable(self, gen_len: int, max_new: int) -> None:
        p = self.params
        best_len = max_new if (p.early_stopping == "never" and p.length_penalty > 0) else gen_len
        best_running = self.running[:, :1] / (best_len ** p.length_penalty)
        worst_done = torch.where(self.pool_done, self.pool_scores.min(1, keepdim=True)[0], _NEG)
        self.improvable = self.improvable & (best_running > worst_done).any(-1, keepdim=True)

    def after_append(self, next_tokens: torch.Tensor, state: DecodeState) -> None:
        """Beams never end one by one: the pool takes finished hypotheses instead."""

    def all_done(self, state: DecodeState) -> torch.Tensor:
        open_beam = ~(self.pool_done.all() & (self.params.early_stopping is True))
        return ~(self.improvable.any() & open_beam & ~self.all_hit)

    def result(self, state: DecodeState) -> GenerationResult:
        n = self.params.num_return_sequences
        tokens = self.pool_tokens[:, :n].reshape(self.b * n, -1)
        lengths = self.pool_len[:, :n].reshape(-1)
        longest = int(lengths.max()) if lengths.numel() else 0
        seqs = tokens[:, :state.prompt_len + longest].clone()
        counts = lengths.tolist()
        last = seqs[torch.arange(seqs.shape[0]), (state.prompt_len + lengths - 1).clamp(min=0)]
        ended = self.eos(last).tolist()
        limit = length_reason(self.params, state)
        reasons = ["eos" if e and c > 0 else limit for e, c in zip(ended, counts)]
        return GenerationResult(seqs, state.prompt_len, counts, reasons,
                                self.pool_scores[:, :n].reshape(-1))
