"""Task heads on top of ``OPTModel``: causal LM, sequence classification, extractive QA.

Each wraps the decoder as ``self.model`` so checkpoint keys read ``model.decoder.*`` exactly
as the hub's do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flagopt.model.cache import KVCache
from flagopt.model.config import OPTConfig
from flagopt.model.linear import Linear
from flagopt.model.decoder import OPTModel
from flagopt.model.outputs import ModelOutput


@dataclass
class CausalLMOutput(ModelOutput):
    logits: torch.Tensor  # (B, T_kept, vocab)
    loss: torch.Tensor | None = None
    cache: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    logits: torch.Tensor  # (B, num_labels)
    loss: torch.Tensor | None = None
    cache: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class QuestionAnsweringOutput(ModelOutput):
    start_logits: torch.Tensor  # (B, T)
    end_logits: torch.Tensor  # (B, T)
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class _OPTHead(nn.Module):
    """Shared plumbing: the decoder under ``self.model`` and its keyword arguments."""

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.model = OPTModel(config, attn_implementation)

    def fuse_qkv(self) -> None:
        """Fuse q/k/v projections in every layer (speed; results unchanged)."""
        self.model.fuse_qkv()

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding, ``model.decoder.embed_tokens`` (HF's name for the accessor)."""
        return self.model.decoder.embed_tokens

    def tie_weights(self) -> None:
        """Nothing to tie by default; the LM head overrides this."""


class OPTForCausalLM(_OPTHead):
    """OPT with its language-model head, tied to the token embeddings."""

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__(config, attn_implementation)
        self.lm_head = Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.tie_weights()

    @property
    def tied(self) -> bool:
        return bool(self.config.extra.get("tie_word_embeddings", True))

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the token-embedding matrix (OPT's head has no weights of
        its own unless the config says ``tie_word_embeddings: false``)."""
        if self.tied:
            self.lm_head.weight = self.get_input_embeddings().weight

    def get_output_embeddings(self) -> nn.Module:
        """The LM head (HF's name for the accessor)."""
        return self.lm_head

    def last_hidden_state(self, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None = None,
                          cache: KVCache | None = None) -> torch.Tensor:
        """The decoder's output (B, T, word_embed_proj_dim) for ``input_ids`` (B, T) after
        what ``cache`` holds; ``attention_mask`` (B, past + T) as in ``forward``."""
        return self.model(input_ids, attention_mask, cache).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits (..., vocab) of hidden states (..., word_embed_proj_dim).

        Pass only the positions you need (e.g. ``hidden[:, -1]``): the head is the largest
        matrix product of a decoding step.
        """
        # As 2-D rows: a 3-D slice can miss matmul's folding and copy the whole (vocab, dim)
        # head weight into a batched product (measured: 90 ms and gigabytes in bf16).
        rows = hidden.reshape(-1, hidden.shape[-1])
        return self.lm_head(rows).view(*hidden.shape[:-1], -1)

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                use_cache: bool = False,
                output_attentions: bool = False,
                output_hidden_states: bool = False,
                head_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> CausalLMOutput:
        """Logits for each position (or the last ``logits_to_keep``); loss from ``labels``.

        ``labels`` (B, T) are the input ids themselves; they are shifted inside so position
        t predicts token t+1, and -100 marks positions to ignore.
        """
        out = self.model(input_ids, attention_mask, cache, inputs_embeds, position_ids,
                         use_cache, output_attentions, output_hidden_states, head_mask)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.logits(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutput(logits, loss, out.cache, out.hidden_states, out.attentions)

    def static_step(self, input_ids: torch.Tensor, key_mask: torch.Tensor,
                    cache_k: torch.Tensor, cache_v: torch.Tensor, write_at: torch.Tensor
                    ) -> torch.Tensor:
        """Next-token logits (B, vocab) for one new token per row, static shapes (see
        ``OPTModel.static_step``); what ``generate(compile=True)`` compiles."""
        hidden = self.model.static_step(input_ids, key_mask, cache_k, cache_v, write_at)
        return self.logits(hidden[:, 0])


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in fp32, ignoring labels equal to -100."""
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]  # (B, T): the token each position predicts
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                           ignore_index=-100)


class OPTForSequenceClassification(_OPTHead):
    """Scores the last non-padding token of each row; ``config.num_labels`` outputs."""

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__(config, attn_implementation)
        self.score = nn.Linear(config.word_embed_proj_dim, config.num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                output_attentions: bool = False,
                output_hidden_states: bool = False,
                head_mask: torch.Tensor | None = None) -> SequenceClassifierOutput:
        """Pooled logits (B, num_labels); loss by ``config.problem_type``, inferred as the
        reference does when unset (1 label: regression; integer labels: single-label;
        otherwise multi-label)."""
        out = self.model(input_ids, attention_mask, None, inputs_embeds, position_ids, False,
                         output_attentions, output_hidden_states, head_mask)
        logits = self.score(out.last_hidden_state)  # (B, T, labels)
        bsz, t = logits.shape[:2]
        if input_ids is not None:
            # Rightmost non-pad token: the last real token under left or right padding.
            not_pad = (input_ids != self.config.pad_token_id).int()
            last = (torch.arange(t, device=logits.device) * not_pad).argmax(-1)
        else:
            last = torch.full((bsz,), t - 1, device=logits.device)
        pooled = logits[torch.arange(bsz, device=logits.device), last]
        loss = None if labels is None else self._loss(pooled, labels)
        return SequenceClassifierOutput(pooled, loss, None, out.hidden_states, out.attentions)

    def _loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = self.config.num_labels
        kind = self.config.problem_type
        if kind is None:
            if n == 1:
                kind = "regression"
            elif labels.dtype in (torch.long, torch.int):
                kind = "single_label_classification"
            else:
                kind = "multi_label_classification"
        if kind == "regression":
            if n == 1:
                return F.mse_loss(pooled.squeeze(), labels.squeeze().to(pooled.dtype))
            return F.mse_loss(pooled, labels.to(pooled.dtype))
        if kind == "single_label_classification":
            return F.cross_entropy(pooled.view(-1, n), labels.view(-1))
        return F.binary_cross_entropy_with_logits(pooled, labels.to(pooled.dtype))


class OPTForQuestionAnswering(_OPTHead):
    """Start and end logits over the tokens (extractive QA)."""

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__(config, attn_implementation)
        self.qa_outputs = nn.Linear(config.word_embed_proj_dim, 2)

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None,
                start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                output_attentions: bool = False,
                output_hidden_states: bool = False,
                head_mask: torch.Tensor | None = None) -> QuestionAnsweringOutput:
        """Start/end logits (B, T); with both position tensors, the mean of the two cross
        entropies, positions outside the sequence ignored."""
        out = self.model(input_ids, attention_mask, None, inputs_embeds, position_ids, False,
                         output_attentions, output_hidden_states, head_mask)
        start, end = self.qa_outputs(out.last_hidden_state).unbind(-1)  # (B, T) each
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start.shape[1]
            s = start_positions.reshape(-1).clamp(0, ignored)
            e = end_positions.reshape(-1).clamp(0, ignored)
            loss = (F.cross_entropy(start, s, ignore_index=ignored)
                    + F.cross_entropy(end, e, ignore_index=ignored)) / 2
        return QuestionAnsweringOutput(start.contiguous(), end.contiguous(), loss,
                                       out.hidden_states, out.attentions)


TASK_CLASSES = {
    "lm": OPTForCausalLM,
    "classification": OPTForSequenceClassification,
    "qa": OPTForQuestionAnswering,
}
