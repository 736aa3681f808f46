"""Time the int8 linear kernels against bf16 at opt-1.3b's matrix shapes, by row count.

    python benchmarks/int8_kernels.py [--rows 1,16,32,128] [--threads N] [--model opt-13b]

Columns, each the median of ``torch.utils.benchmark`` over the same bf16 input (ms per call):
``bf16`` (dense ``F.linear``), ``dequant`` (int8 -> bf16 then ``F.linear``, the pre-issue-14
path above 16 rows), ``int8pack`` (``torch._weight_int8pack_mm``, flagopt's int8 path on CPU)
and ``w8a8`` (flagopt's ``quantize="w8a8"`` product: per-row activation quantization with the
outlier split, ``torch._int_mm``, rescale). Run it on the machine in question: the crossovers
depend on the CPU's bf16 and int8 instructions. ``--model`` picks the matrix shapes (one
decoder layer's) and prints what a whole ``rows``-token prefill would spend in each kernel
(layers x the per-layer sum, LM head excluded).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from flagopt.model.quantize import quantize_rows, w8a8_linear

MODELS = {"opt-1.3b": (2048, 24), "opt-6.7b": (4096, 32), "opt-13b": (5120, 40)}  # width, layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,16,32,128")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default="opt-1.3b", choices=sorted(MODELS))
    args = parser.parse_args()
    width, layers = MODELS[args.model]
    shapes = {f"q/k/v/out ({width}x{width})": (width, width, 4),
              f"fc1 ({4 * width}x{width})": (4 * width, width, 1),
              f"fc2 ({width}x{4 * width})": (width, 4 * width, 1)}  # (out, in, per layer)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    per_layer: dict[tuple[int, str], float] = {}
    for label, (out_f, in_f, count) in shapes.items():
        w = torch.randn(out_f, in_f) * 0.02
        q, scale = quantize_rows(w)
        w_bf16, scale_bf16 = w.bfloat16(), scale.bfloat16()
        kernels = {
            "bf16": lambda x: F.linear(x, w_bf16),
            "dequant": lambda x: F.linear(x, q.to(x.dtype)) * scale_bf16,
            "int8pack": lambda x: torch._weight_int8pack_mm(x, q, scale_bf16),
            "w8a8": lambda x: w8a8_linear(x, q, scale_bf16),
        }
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, in_f).bfloat16()
            ms = {name: benchmark.Timer("fn(x)", globals={"fn": fn, "x": x})
                  .blocked_autorange(min_run_time=0.3).median * 1e3
                  for name, fn in kernels.items()}
            print(f"{label:20s} rows={rows:4d}  " +
                  "  ".join(f"{name}={t:8.2f}ms" for name, t in ms.items()), flush=True)
            for name, t in ms.items():
                per_layer[rows, name] = per_layer.get((rows, name), 0.0) + count * t
    print(f"{args.model}: {layers} layers' matmuls per forward of `rows` tokens, seconds:")
    for rows in sorted({r for r, _ in per_layer}):
        print(f"  rows={rows:4d}  " + "  ".join(
            f"{name}={layers * t / 1e3:7.2f}s" for (r, name), t in per_layer.items()
            if r == rows), flush=True)


if __name__ == "__main__":
    main()
