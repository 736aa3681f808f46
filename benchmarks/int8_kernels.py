"""Time the int8 linear kernels against bf16 at opt-1.3b's matrix shapes, by row count.

    python benchmarks/int8_kernels.py [--rows 1,16,32,128] [--threads N]

Columns, each the median of ``torch.utils.benchmark`` over the same bf16 input (ms per call):
``bf16`` (dense ``F.linear``), ``dequant`` (int8 -> bf16 then ``F.linear``, the pre-issue-14
path above 16 rows), ``int8pack`` (``torch._weight_int8pack_mm``, flagopt's int8 path on CPU)
and ``int_mm`` (W8A8: per-row activation quantization, ``torch._int_mm``, rescale). Run it on
the machine in question: the crossovers depend on the CPU's bf16 and int8 instructions.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from flagopt.model.quantize import quantize_rows

SHAPES = {"qkv/out (2048x2048)": (2048, 2048), "fc1 (8192x2048)": (8192, 2048),
          "fc2 (2048x8192)": (2048, 8192)}


def _w8a8(x: torch.Tensor, q_t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    xs = xf.abs().amax(1, keepdim=True).clamp_(min=1e-12).div_(127.0)  # (rows, 1)
    xq = (xf / xs).round_().to(torch.int8)
    return (torch._int_mm(xq, q_t).float() * xs * scale).to(x.dtype)  # int32 -> (rows, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,16,32,128")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    for label, (out_f, in_f) in SHAPES.items():
        w = torch.randn(out_f, in_f) * 0.02
        q, scale = quantize_rows(w)
        w_bf16, scale_bf16 = w.bfloat16(), scale.bfloat16()
        kernels = {
            "bf16": lambda x: F.linear(x, w_bf16),
            "dequant": lambda x: F.linear(x, q.to(x.dtype)) * scale_bf16,
            "int8pack": lambda x: torch._weight_int8pack_mm(x, q, scale_bf16),
            "int_mm": lambda x: _w8a8(x, q.t(), scale),
        }
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, in_f).bfloat16()
            ms = {name: benchmark.Timer("fn(x)", globals={"fn": fn, "x": x})
                  .blocked_autorange(min_run_time=0.3).median * 1e3
                  for name, fn in kernels.items()}
            print(f"{label:20s} rows={rows:4d}  " +
                  "  ".join(f"{name}={t:8.2f}ms" for name, t in ms.items()), flush=True)


if __name__ == "__main__":
    main()
