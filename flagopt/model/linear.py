"""The decoder's linear layer: ``nn.Linear``, with the CPU products of one row and of a few
float32 rows computed the way that streams the weights fastest.

``F.linear(x, W, b)`` is ``x @ W^T + b``. On CPU, for float32 and a few rows (2 to 32: a
small batch decoding, or speculative decoding verifying a few proposals), MKL's kernel for
that shape streams the weights at a fraction of the memory bandwidth. The same product
written as ``(W @ x^T + b)^T`` (``addmm`` with the weights as the left operand) runs 1.5-3×
faster. Where it pays depends on the CPU: on 2-core AVX2 and AVX-512 EPYCs (torch 2.13's MKL)
it did for 2 to 32 rows; on a 2-core AVX-512 Xeon with AMX, ``F.linear`` reads the weights
once for 2 rows (as fast as for one) and ``W @ x^T`` wins only from 8 rows to 32.
``ROW_WINDOWS`` holds those measurements (``benchmarks/linear_kernels.py``) by ``cpu_key()``;
a CPU not measured gets plain ``F.linear``.
Both forms are float32 products of the same numbers summed in a different order: they agree
to float32 rounding, as ``F.linear`` at two row counts does (tests check the agreement and
the reference's tokens). Rows outside the window, other dtypes and devices are plain
``F.linear``.

One bfloat16 row (batch-1 decoding in bf16): on the AVX-512 Xeon with AMX, ``F.linear``
streams the weights at ~16 GB/s and ``addmv`` (matrix-vector) at ~25 GB/s (opt-1.3b bf16
decoding 9.0 vs 6.5 tok/s in an ad-hoc A/B); on the AVX-512 EPYC without AMX it is the other
way round (``addmv`` 0.6-0.8x). Both sum in float32 and round once to bf16; most products
come out bit-identical, long rows (fc2's 8192 inputs) now and then differ in the last bit,
with the same mean error against a float64 product. ``MV_CAPABILITIES`` lists where that
was measured; elsewhere it is ``F.linear``.

One float32 row (batch-1 decoding in fp32): torch computes it on one thread whatever
``torch.set_num_threads`` says. On the Zen 5 EPYC one core streams 19-24 GB/s of a measured
62; the same product as one ``bmm`` over ``torch.get_num_threads()`` slices of the output
rows spreads over the threads and streamed 27-42 GB/s (opt-1.3b fp32 decoding 4.94 vs 3.19
tok/s in an ad-hoc A/B, same tokens). Each output is still one dot product summed in float32,
in a different order than ``F.linear``'s kernel: they agree to float32 rounding.
``SPLIT_CAPABILITIES`` lists where that was measured; on the AMX Xeon fp32 decoding already
ran at ~96% of the bandwidth ceiling, so it is not used there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cpu_key() -> str:
    """torch's CPU capability (``AVX2``, ``AVX512``, ...) plus ``+AMX`` where the CPU has AMX
    tiles: the same capability covers CPUs whose products favour different kernels (an
    AVX-512 Xeon with AMX and an AVX-512 EPYC without it did, in opposite ways)."""
    key = torch.backends.cpu.get_cpu_capability()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)  # private in torch 2.13
    return key + "+AMX" if amx() else key


# cpu_key() -> the row counts computed as W @ x^T, as measured faster (a whole layer's
# products 5% or more) by benchmarks/linear_kernels.py with torch 2.13: AVX2 on a 2-core EPYC
# (Zen 3 class), AVX512 on a 2-core EPYC (Zen 5), AVX512+AMX on a 2-core Xeon
ROW_WINDOWS: dict[str, tuple[int, int]] = {"AVX2": (2, 32), "AVX512": (2, 32),
                                           "AVX512+AMX": (8, 32)}
MIN_ROWS, MAX_ROWS = ROW_WINDOWS.get(cpu_key(), (0, -1))
# ... and where one bfloat16 row runs as addmv (on the Zen 5 EPYC addmv was 0.6-0.8x F.linear)
MV_CAPABILITIES = frozenset({"AVX512+AMX"})
ONE_ROW_MV = cpu_key() in MV_CAPABILITIES
# ... and where one float32 row is split across the intra-op threads (a batched product):
# torch runs a one-row product on one thread, which on the Zen 5 EPYC streams 19-24 of its
# 62 GB/s; split in two it streamed 27-42 (benchmarks/linear_kernels.py)
SPLIT_CAPABILITIES = frozenset({"AVX512"})
ONE_ROW_SPLIT = cpu_key() in SPLIT_CAPABILITIES


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and, to float32 rounding, results) whose
    float32 CPU products of ``MIN_ROWS`` to ``MAX_ROWS`` rows (this CPU's window in
    ``ROW_WINDOWS``) run as ``W @ x^T``, one float32 row split over the threads where
    ``ONE_ROW_SPLIT``, and one bfloat16 row as ``addmv`` where ``ONE_ROW_MV`` (see the module
    docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, as ``W @ x^T``, a split ``bmm`` or ``addmv`` where that
    is faster."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (rows == 1 and ONE_ROW_SPLIT and x.dtype == torch.float32 and weight.dtype == x.dtype
            and x.device.type == "cpu" and weight.is_contiguous()):
        parts = torch.get_num_threads()
        if parts > 1 and weight.shape[0] % parts == 0:
            return _split_row(x, weight, bias, parts)
    if (rows == 1 and ONE_ROW_MV and x.dtype == torch.bfloat16 and weight.dtype == x.dtype
            and x.device.type == "cpu" and (bias is None or bias.dtype == x.dtype)):
        v = x.reshape(x.shape[-1])
        out = torch.mv(weight, v) if bias is None else torch.addmv(bias, weight, v)
        return out.view(*x.shape[:-1], weight.shape[0])
    if not (MIN_ROWS <= rows <= MAX_ROWS and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    out = torch.mm(weight, flat.t()) if bias is None else \
        torch.addmm(bias[:, None], weight, flat.t())
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


def _split_row(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               parts: int) -> torch.Tensor:
    """One row times ``weight^T`` as ``parts`` products over slices of the output rows, in
    one ``bmm`` (which spreads its batch over the threads)."""
    out_f, in_f = weight.shape
    w = weight.view(parts, out_f // parts, in_f)  # (P, out/P, in)
    v = x.reshape(1, in_f).t().expand(parts, in_f, 1)  # (P, in, 1); strides (0, 1, in)
    out = torch.bmm(w, v) if bias is None else torch.baddbmm(bias.view(parts, -1, 1), w, v)
    return out.view(*x.shape[:-1], out_f)
