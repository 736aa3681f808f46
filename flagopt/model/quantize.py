"""int8 weight-only quantization, applied while the checkpoint loads.

Every linear layer (q/k/v/out projections, fc1, fc2, project_in/out) and the LM head keep
their weights as int8 with one scale per output channel (symmetric, ``max|w| / 127``);
activations stay in the compute dtype. The tied token embedding shares the LM head's int8
matrix (a row's scale is the head's output-channel scale). Each tensor is quantized as it is
read, so the full-precision model never sits in memory.

Two modes, the same int8 weights:

- ``"int8"``: weight-only. Kernels are torch's own: ``torch._weight_int8pack_mm`` on CPU for
  bf16/fp16 activations (fused int8 GEMM/GEMV, at every row count, so a batch computes each
  row exactly as that row alone would) and a dequantizing ``linear`` elsewhere.
- ``"w8a8"``: as ``"int8"`` for one row (decoding one sequence: the fused GEMV is the fastest
  kernel and activations cost nothing to keep), and for products of 2 rows or more (batches,
  prefill, speculative verification) int8 activations too, on torch's int8 GEMM
  (``torch._int_mm``, int32 sums). Each row is quantized on its own (symmetric, per row),
  after LLM.int8()'s decomposition: activation entries above ``OUTLIER_THRESHOLD`` in
  magnitude (OPT from 6.7b up has a few feature dimensions of them) stay out of int8 and go
  through a float32 product over just those columns. On an AMX CPU that GEMM ran 5-9x faster
  than the fused kernel at 32-256 rows; the price is activation rounding (3-4x the
  weight-only error on a product) and rows of a batch that agree with the row alone to
  rounding, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZE_MODES = ("int8", "w8a8")
OUTLIER_THRESHOLD = 6.0  # LLM.int8()'s: larger activation entries skip int8 (w8a8 mode)
_TASK_HEADS = ("score", "qa_outputs")  # tiny, freshly trained heads stay in full precision
_ROWS_PER_CHUNK = 1024  # quantize big matrices in slices to bound the temporary fp32 copy


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (int8 weight, fp32 scale per row)."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], _ROWS_PER_CHUNK):
        # (chunk, in) float32 copy, the only temporary; worked on in place
        rows = weight[start:start + _ROWS_PER_CHUNK].to(torch.float32, copy=True)
        s = rows.abs().amax(dim=1).clamp_(min=1e-12).div_(127.0)
        q[start:start + _ROWS_PER_CHUNK] = rows.div_(s[:, None]).round_().clamp_(-127, 127)
        scale[start:start + _ROWS_PER_CHUNK] = s
    return q, scale


class Int8Linear(nn.Module):
    """``y = x @ (q * scale)^T + bias`` with int8 ``q`` (out, in) and per-row ``scale``."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 int8_activations: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.int8_activations = int8_activations  # "w8a8": int8 GEMMs for 2+ rows
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8,
                                               device=device), requires_grad=False)
        self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, dtype: torch.dtype, int8_activations: bool = False
             ) -> "Int8Linear":
        """An empty (meta) int8 twin of ``linear``, computing in ``dtype``."""
        return cls(linear.in_features, linear.out_features, linear.bias is not None, dtype,
                   linear.weight.device, int8_activations)

    def set_weight(self, weight: torch.Tensor, device: torch.device | str) -> None:
        q, scale = quantize_rows(weight.to(device))
        self.weight = nn.Parameter(q, requires_grad=False)
        self.scale = scale.to(self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scale, self.bias, self.int8_activations)

    def extra_repr(self) -> str:
        acts = ", int8 activations from 2 rows" if self.int8_activations else ""
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel{acts}"


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, int8_activations: bool = False) -> torch.Tensor:
    """Linear layer over an int8 weight; the activation dtype is kept.

    On CPU, bf16/fp16 activations go through the fused int8 kernel at any number of rows
    (decoding, batches and prefill alike): it reads a quarter of fp32's bytes and, unlike a
    dequantize plus a dense matmul, runs at the same per-row numerics whatever the batch.
    fp32 activations, where that kernel is slow, and other devices dequantize and matmul.
    ``int8_activations`` (the ``"w8a8"`` mode): products of 2 rows or more on CPU run as
    int8 GEMMs (``quantize_activations`` + ``w8a8_product``) instead, except when a
    gradient must flow to ``x``.
    """
    if int8_activations and _takes_int8_activations(x):
        return w8a8_product(quantize_activations(x), q, scale, bias)
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        if x.requires_grad and torch.is_grad_enabled():  # LoRA over a frozen int8 base
            y = _FusedInt8.apply(x, q, scale)
        else:
            y = _fused_int8(x, q, scale)
    else:  # the scale applies per output channel, so it goes on the (rows, out) result
        y = F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias


def _takes_int8_activations(x: torch.Tensor) -> bool:
    """Whether a w8a8 product quantizes ``x``: 2 rows or more, on CPU, no gradient to it."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return rows >= 2 and x.device.type == "cpu" and not (
        x.requires_grad and torch.is_grad_enabled())


class Int8Rows(NamedTuple):
    """Activations quantized for ``torch._int_mm``: one scale per row, outliers kept aside.
    Products that read the same input (q/k/v) share one of these (``quantize_activations``)."""

    values: torch.Tensor  # (rows, width) int8
    scale: torch.Tensor  # (rows, 1) float32
    cols: torch.Tensor | None  # (n,) the columns holding an outlier, None if none
    outliers: torch.Tensor | None  # (rows, n) float32, the outlier entries (others 0)
    shape: torch.Size  # the input's shape and dtype, for the result
    dtype: torch.dtype


def quantize_activations(x: torch.Tensor) -> Int8Rows:
    """Quantize ``x`` per row (symmetric) after taking out the entries above
    ``OUTLIER_THRESHOLD`` in magnitude, so that they neither lose precision nor coarsen
    their row's scale (LLM.int8()'s mixed decomposition)."""
    rows, width = x.numel() // x.shape[-1], x.shape[-1]
    xf = x.reshape(rows, width).to(torch.float32, copy=True)  # worked on in place
    magnitude = xf.abs()
    peak = magnitude.amax(1, keepdim=True)  # (rows, 1); outliers only when it says so
    cols = outliers = None
    if float(peak.max()) > OUTLIER_THRESHOLD:
        big = magnitude > OUTLIER_THRESHOLD
        cols = big.any(0).nonzero()[:, 0]
        outliers = torch.where(big, xf, 0.0)[:, cols]  # (rows, n) only the big entries
        xf.masked_fill_(big, 0.0)
        peak = magnitude.masked_fill_(big, 0.0).amax(1, keepdim=True)
    xs = peak.clamp_(min=1e-12).div_(127.0)  # (rows, 1)
    return Int8Rows(xf.div_(xs).round_().to(torch.int8), xs, cols, outliers, x.shape, x.dtype)


def w8a8_product(a: Int8Rows, q: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ (q * scale)^T + bias``: int32 sums on ``torch._int_mm``, rescaled by the row's
    and the channel's scales, plus the outlier columns' dense float32 product."""
    y = torch._int_mm(a.values, q.t()).float().mul_(a.scale)  # int32 (rows, out) -> float32
    if a.cols is not None:
        y += a.outliers @ q[:, a.cols].float().t()
    y = y.mul_(scale.float()).to(a.dtype)
    return (y if bias is None else y + bias).view(*a.shape[:-1], q.shape[0])


def w8a8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (q * scale)^T`` with ``x`` quantized to int8 per row (``quantize_activations``)
    on ``torch._int_mm``."""
    return w8a8_product(quantize_activations(x), q, scale)


def shared_w8a8(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor] | None:
    """The outputs of ``layers`` on the same input ``x`` when they all take the w8a8 path
    (``Int8Linear`` with int8 activations, 2+ rows on CPU, no gradient): ``x`` is quantized
    once for all of them, with the results each would give alone. None otherwise."""
    if not (_takes_int8_activations(x) and all(
            isinstance(m, Int8Linear) and m.int8_activations for m in layers)):
        return None
    a = quantize_activations(x)
    return [w8a8_product(a, m.weight, m.scale, m.bias) for m in layers]


def _fused_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    y = torch._weight_int8pack_mm(x.reshape(rows, x.shape[-1]).contiguous(), q,
                                  scale.to(x.dtype))
    return y.view(*x.shape[:-1], q.shape[0])


class _FusedInt8(torch.autograd.Function):
    """The fused int8 kernel with a backward for its input (the weight is frozen): training
    adapters over an int8 base needs gradients to flow through the base layers, and torch
    has no derivative for ``_weight_int8pack_mm``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, scale)
        return _fused_int8(x, q, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # dL/dx = (grad * scale) @ q
        q, scale = ctx.saved_tensors
        return (grad * scale.to(grad.dtype)) @ q.to(grad.dtype), None, None


class Int8Embedding(nn.Module):
    """Token embedding over an int8 matrix with per-row scales (shared with the LM head)."""

    def __init__(self, num_embeddings: int, dim: int, padding_idx: int | None,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, dtype=torch.int8,
                                               device=device), requires_grad=False)
        self.register_buffer("scale", torch.empty(num_embeddings, dtype=dtype, device=device))

    set_weight = Int8Linear.set_weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).to(self.scale.dtype)  # (..., dim)
        return rows * self.scale[ids][..., None]


def int8_modules(model: nn.Module, dtype: torch.dtype, mode: str = "int8") -> None:
    """Swap every ``nn.Linear`` and the token embedding for int8 twins (on meta, pre-load);
    ``mode`` is one of ``QUANTIZE_MODES``."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize={mode!r}; expected one of {QUANTIZE_MODES}")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name not in _TASK_HEADS:
                setattr(module, child_name, Int8Linear.like(child, dtype, mode == "w8a8"))
            elif isinstance(child, nn.Embedding) and child_name == "embed_tokens":
                setattr(module, child_name, Int8Embedding(
                    child.num_embeddings, child.embedding_dim, child.padding_idx, dtype,
                    child.weight.device))


def tie_int8(model: nn.Module) -> None:
    """Share the embedding's int8 matrix and scales with the LM head (OPT ties them)."""
    if not hasattr(model, "get_output_embeddings") or not getattr(model, "tied", False):
        return
    head = model.get_output_embeddings()
    if isinstance(head, Int8Linear):
        embed = model.get_input_embeddings()
        head.weight = embed.weight
        head.scale = embed.scale


def is_quantized_param(module: nn.Module, param_name: str) -> bool:
    return isinstance(module, (Int8Linear, Int8Embedding)) and param_name == "weight"
