"""The OPT decoder: embeddings, pre-/post-LN blocks, attention over a KV cache.

One stack, ``OPTDecoder.forward(x, positions, mask, cache)``, serves every caller: the
HF-style ``OPTModel.forward`` (2-D attention mask, ``use_cache``, ``output_*``, ``head_mask``)
and the static-shape one-token step that ``torch.compile`` captures each build positions and
a mask and call it. HF's ``head_mask`` / ``output_hidden_states`` / ``output_attentions`` ride
on one optional ``Trace`` argument, so callers that need none of them pass nothing.

Module names are the checkpoint's keys (``decoder.embed_tokens``, ``layers.{i}.self_attn.q_proj``,
``fc1``, ``final_layer_norm``, ``project_in`` ...), so weights load by name with no mapping
table. Numerics follow Hugging Face's ``OPTForCausalLM``, the reference implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flagopt.model.cache import Cache, KVCache, StaticCacheView
from flagopt.model.config import OPTConfig
from flagopt.model.linear import Linear
from flagopt.model.outputs import ModelOutput
from flagopt.model.quantize import shared_w8a8

# OPT's learned position table has 2 extra rows: position p is looked up at row p + 2.
POSITION_OFFSET = 2

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class Trace:
    """HF's per-layer extras for one forward pass, in one optional argument.

    ``head_mask`` (layers, heads) multiplies each layer's attention weights; the lists, when
    not None, collect the input of every layer plus the final output (``hidden_states``)
    and each layer's attention weights (``attentions``). Any of them switches attention to
    the explicit-softmax ("eager") path where weights are needed.
    """

    head_mask: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None
    attentions: list[torch.Tensor] | None = None

    @classmethod
    def of(cls, config: OPTConfig, head_mask: torch.Tensor | None, output_hidden_states: bool,
           output_attentions: bool) -> "Trace | None":
        """The trace HF's flags ask for, or None when they ask for nothing."""
        if head_mask is None and not output_hidden_states and not output_attentions:
            return None
        return cls(_layer_head_mask(head_mask, config),
                   [] if output_hidden_states else None, [] if output_attentions else None)

    def run(self, layer: "OPTDecoderLayer", i: int, x: torch.Tensor, mask: torch.Tensor | None,
            is_causal: bool, cache: Cache | None, implementation: str) -> torch.Tensor:
        """Layer ``i`` on ``x`` with its head mask, recording what was asked for."""
        if self.hidden_states is not None:
            self.hidden_states.append(x)
        head_mask = None if self.head_mask is None else self.head_mask[i]
        x, weights = layer(x, mask, is_causal, cache, implementation, head_mask,
                           self.attentions is not None)
        if self.attentions is not None:
            self.attentions.append(weights)
        return x


@dataclass
class DecoderOutput(ModelOutput):
    """What ``OPTModel`` returns. ``hidden_states`` / ``attentions`` are per layer when asked."""

    last_hidden_state: torch.Tensor
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def _activation(name: str):
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    return F.silu  # "silu" / "swish"; the config validates the name


class OPTAttention(nn.Module):
    """Multi-head self-attention; q is scaled by ``head_dim ** -0.5`` before the product."""

    def __init__(self, config: OPTConfig, layer_idx: int) -> None:
        super().__init__()
        h, bias = config.hidden_size, config.enable_bias
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.dropout = config.attention_dropout
        self.q_proj = Linear(h, h, bias=bias)
        self.k_proj = Linear(h, h, bias=bias)
        self.v_proj = Linear(h, h, bias=bias)
        self.out_proj = Linear(h, h, bias=bias)
        self.qkv_proj: Linear | None = None  # set by fuse_qkv()

    def fuse_qkv(self) -> None:
        """Replace q/k/v by one projection (one matmul per step instead of three)."""
        if self.qkv_proj is not None:
            return
        q, k, v = self.q_proj, self.k_proj, self.v_proj
        fused = Linear(q.in_features, 3 * q.out_features, bias=q.bias is not None,
                          device=q.weight.device, dtype=q.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            if q.bias is not None:
                fused.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        fused.requires_grad_(q.weight.requires_grad)
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is not None:
            return self.qkv_proj(x).chunk(3, dim=-1)
        shared = shared_w8a8(x, (self.q_proj, self.k_proj, self.v_proj))  # quantize x once
        if shared is not None:
            return shared[0], shared[1], shared[2]
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                cache: Cache | None, implementation: str,
                head_mask: torch.Tensor | None = None, output_attentions: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, t, _ = x.shape
        q, k, v = self._project(x)
        q = q * self.scaling  # the reference scales q before the product, not inside it
        q = q.view(bsz, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(bsz, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(bsz, t, self.num_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H, past + T, D)
            q = q.to(k.dtype)  # the cache may store another dtype (``cache_dtype``)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if implementation == "eager" or head_mask is not None or output_attentions:
            out, weights = _eager_attention(q, k, v, mask, is_causal, dropout, head_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal, scale=1.0)
        out = out.transpose(1, 2).reshape(bsz, t, -1).to(x.dtype)  # (B, T, H*D)
        return self.out_proj(out), weights


def _eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None, is_causal: bool, dropout: float,
                     head_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, T, S)
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if head_mask is not None:
        weights = weights * head_mask.view(1, -1, 1, 1).to(weights.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, v), weights


class OPTDecoderLayer(nn.Module):
    """One block: attention then MLP, each with a residual; LN before (pre-LN) or after."""

    def __init__(self, config: OPTConfig, layer_idx: int) -> None:
        super().__init__()
        h, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.pre_ln = config.do_layer_norm_before  # 350m is post-LN
        self.dropout = config.dropout
        self.activation = _activation(config.activation_function)
        self.self_attn = OPTAttention(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(h, elementwise_affine=affine)
        self.fc1 = Linear(h, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = Linear(config.ffn_dim, h, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(h, elementwise_affine=affine)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                cache: Cache | None, implementation: str,
                head_mask: torch.Tensor | None = None, output_attentions: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        residual = x
        if self.pre_ln:
            x = self.self_attn_layer_norm(x)
        x, weights = self.self_attn(x, mask, is_causal, cache, implementation, head_mask,
                                    output_attentions)
        x = residual + F.dropout(x, p=self.dropout, training=self.training)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)

        residual = x
        if self.pre_ln:
            x = self.final_layer_norm(x)
        x = self.fc2(self.activation(self.fc1(x)))
        x = residual + F.dropout(x, p=self.dropout, training=self.training)
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x, weights


class OPTLearnedPositionalEmbedding(nn.Embedding):
    """Position table of ``max_position_embeddings + 2`` rows (OPT's offset of 2)."""

    def __init__(self, num_positions: int, dim: int) -> None:
        super().__init__(num_positions + POSITION_OFFSET, dim)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(positions + POSITION_OFFSET)


class OPTDecoder(nn.Module):
    """Token + position embeddings, the blocks, the final LN and projections: the one stack."""

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        h, e = config.hidden_size, config.word_embed_proj_dim
        self.config = config
        self.attn_implementation = attn_implementation
        self.embed_tokens = nn.Embedding(config.vocab_size, e, config.pad_token_id)
        self.embed_positions = OPTLearnedPositionalEmbedding(config.max_position_embeddings, h)
        # 350m: 512-wide embeddings, projected to the 1024-wide blocks and back, no bias.
        self.project_in = Linear(e, h, bias=False) if config.has_projections else None
        self.project_out = Linear(h, e, bias=False) if config.has_projections else None
        self.final_layer_norm = (
            nn.LayerNorm(h, elementwise_affine=config.layer_norm_elementwise_affine)
            if config.has_final_layer_norm else None)
        self.layers = nn.ModuleList(
            [OPTDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        # Training only: recompute each layer in backward instead of keeping its activations.
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                cache: Cache | None = None, *, is_causal: bool = False,
                trace: Trace | None = None) -> torch.Tensor:
        """embed -> project_in -> + positions -> layers -> final LN -> project_out.

        Args:
            x: (B, T) token ids, or (B, T, word_embed_proj_dim) embeddings.
            positions: (B, T) positions of the new tokens (before OPT's offset of 2).
            mask: (B, 1, T, S) bool, True where a query may see a key (S = what the cache's
                ``update`` returns, or T without a cache); None with ``is_causal`` or when
                every query sees every key.
            cache: any ``Cache``; written by every layer, advanced by T once at the end.
            trace: HF's ``head_mask`` and per-layer outputs (see ``Trace``).
        Returns:
            The last hidden state (B, T, word_embed_proj_dim).
        """
        if not x.is_floating_point():
            x = self.embed_tokens(x)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions).to(x.dtype)
        drop = self.config.layerdrop if self.training else 0.0
        for i, layer in enumerate(self.layers):
            if drop > 0 and torch.rand(()) < drop:
                continue
            if trace is None and self._checkpointing(cache):
                x, _ = checkpoint(layer, x, mask, is_causal, cache, self.attn_implementation,
                                  use_reentrant=False)
            elif trace is None:
                x, _ = layer(x, mask, is_causal, cache, self.attn_implementation)
            else:
                x = trace.run(layer, i, x, mask, is_causal, cache, self.attn_implementation)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        if trace is not None and trace.hidden_states is not None:
            trace.hidden_states.append(x)
        if cache is not None:
            cache.advance(positions.shape[1])
        return x


    def _checkpointing(self, cache: Cache | None) -> bool:
        # Dropout masks are replayed on recompute (torch preserves the RNG state), so the
        # numbers are those of the plain pass; a cache is never written twice.
        return (self.gradient_checkpointing and self.training and cache is None
                and torch.is_grad_enabled())


def positions_from_mask(attention_mask: torch.Tensor, past: int) -> torch.Tensor:
    """Positions of the new tokens from a 2-D mask over past + new tokens.

    Padding does not shift real tokens: ``cumsum(mask) * mask - 1``; pads get -1.
    """
    positions = (attention_mask.cumsum(dim=1) * attention_mask - 1).long()
    return positions[:, past:]


def attention_mask_4d(attention_mask: torch.Tensor | None, past: int, t: int,
                      device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """The boolean (B, 1, T, past + T) mask for SDPA, or None plus ``is_causal``.

    Keys are visible when causal and not padding; every query also sees itself so a
    padding query never has an empty row (which would turn into NaN and spread).
    """
    if attention_mask is None:
        if t == 1:
            return None, False
        if past == 0:
            return None, True
    total = past + t
    query_pos = torch.arange(past, total, device=device)[:, None]  # (T, 1)
    key_pos = torch.arange(total, device=device)[None, :]  # (1, S)
    causal = key_pos <= query_pos  # (T, S)
    if attention_mask is None:
        return causal[None, None], False
    keys = attention_mask[:, None, None, :total].bool()  # (B, 1, 1, S)
    return (causal & keys) | (key_pos == query_pos), False


class OPTModel(nn.Module):
    """OPT's decoder stack with HF's calling convention: token ids (or embeddings) in,
    hidden states out.

    ``attn_implementation`` is ``"sdpa"`` (default, ``scaled_dot_product_attention``) or
    ``"eager"`` (explicit softmax; used automatically for ``head_mask`` and
    ``output_attentions``).
    """

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation={attn_implementation!r}; expected one of "
                             f"{ATTENTION_IMPLEMENTATIONS}")
        self.config = config
        self.decoder = OPTDecoder(config, attn_implementation)

    @property
    def attn_implementation(self) -> str:
        return self.decoder.attn_implementation

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                use_cache: bool = False,
                output_attentions: bool = False,
                output_hidden_states: bool = False,
                head_mask: torch.Tensor | None = None) -> DecoderOutput:
        """Run the decoder.

        Args:
            input_ids: (B, T) token ids; or ``inputs_embeds`` (B, T, word_embed_proj_dim).
            attention_mask: (B, past + T), 1 for real tokens, 0 for padding (left or right).
            cache: a ``KVCache`` to read past keys/values from and append to.
            position_ids: (B, T) positions; by default derived from the mask and the cache.
            use_cache: allocate a cache when none is given, and return it.
            head_mask: (layers, heads) or (heads,) multipliers of the attention weights.
        Returns:
            ``DecoderOutput`` with the last hidden state (B, T, word_embed_proj_dim).
        """
        x = self._embed(input_ids, inputs_embeds)
        bsz, t = x.shape[:2]
        device = x.device
        if cache is None and use_cache:
            cache = KVCache.for_model(self.config, bsz, t, dtype=x.dtype, device=device)
        past = cache.length if cache is not None else 0
        if past + t > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {past + t} positions exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}")
        if position_ids is None:
            position_ids = self._positions(attention_mask, past, bsz, t, device)
        mask, is_causal = attention_mask_4d(attention_mask, past, t, device)
        trace = Trace.of(self.config, head_mask, output_hidden_states, output_attentions)
        hidden = self.decoder(x, position_ids, mask, cache, is_causal=is_causal, trace=trace)
        return DecoderOutput(
            hidden, cache,
            tuple(trace.hidden_states) if output_hidden_states else None,
            tuple(trace.attentions) if output_attentions else None)

    def static_step(self, input_ids: torch.Tensor, key_mask: torch.Tensor,
                    cache_k: torch.Tensor, cache_v: torch.Tensor, write_at: torch.Tensor
                    ) -> torch.Tensor:
        """One new token per row with shapes that never change, for ``torch.compile``.

        Args:
            input_ids: (B, 1) the new tokens.
            key_mask: (B, capacity) bool, True for every real position up to and including
                the new token's slot ``write_at``, False elsewhere.
            cache_k / cache_v: a ``KVCache``'s ``k`` and ``v`` buffers, written in place.
            write_at: (1,) long, the slot the new token's keys/values go to.
        Returns:
            The last hidden state (B, 1, word_embed_proj_dim).
        """
        positions = key_mask.sum(dim=1, keepdim=True) - 1  # (B, 1): padding does not count
        mask = key_mask[:, None, None, :]  # (B, 1, 1, capacity)
        cache = StaticCacheView(cache_k, cache_v, write_at)
        return self.decoder(input_ids, positions, mask, cache)

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
               ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3:
                raise ValueError(f"inputs_embeds must be (batch, seq, dim), got shape "
                                 f"{tuple(inputs_embeds.shape)}")
            return inputs_embeds
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        return self.decoder.embed_tokens(input_ids)

    @staticmethod
    def _positions(attention_mask: torch.Tensor | None, past: int, bsz: int, t: int,
                   device: torch.device) -> torch.Tensor:
        if attention_mask is None:
            return torch.arange(past, past + t, device=device).expand(bsz, t)
        if attention_mask.shape != (bsz, past + t):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                             f"(batch, past + new) = ({bsz}, {past + t})")
        return positions_from_mask(attention_mask, past)

    def fuse_qkv(self) -> None:
        """Fuse every layer's q/k/v projections (a speed option; results are unchanged)."""
        for layer in self.decoder.layers:
            layer.self_attn.fuse_qkv()


def _layer_head_mask(head_mask: torch.Tensor | None, config: OPTConfig
                     ) -> torch.Tensor | None:
    if head_mask is None:
        return None
    if head_mask.dim() == 1:
        head_mask = head_mask.expand(config.num_hidden_layers, -1)
    if head_mask.shape != (config.num_hidden_layers, config.num_attention_heads):
        raise ValueError(f"head_mask has shape {tuple(head_mask.shape)}, expected (heads,) or "
                         f"({config.num_hidden_layers}, {config.num_attention_heads})")
    return head_mask

