"""Time the dense linear kernels that ``flagopt/model/linear.py`` chooses between, by row count,
at opt-1.3b's matrix shapes, with the weights streamed from memory (not from cache).

    python benchmarks/linear_kernels.py [--rows 1,2,4,8,16,32,64] [--threads N] [--mib 512]

For float32 it compares ``F.linear(x, W)`` (``x @ W^T``) with ``W @ x^T`` (what ``Linear`` runs
inside ``ROW_WINDOWS``) and, for one row, with one ``bmm`` over slices split across the threads
(where ``ONE_ROW_SPLIT``); for one bfloat16 row ``F.linear`` with ``addmv`` (where
``ONE_ROW_MV``). Each figure is the median over rounds of one call on each of several copies
of the matrix (``--mib`` of weights in all, so that a round cannot be served from the last
level cache), as GB/s of weight bytes read. The last lines print the row window and the
one-row choices this machine's figures imply, beside the ones ``linear.py`` holds for this
CPU (``cpu_key()``): its tables are these measurements, made on each machine class they name.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from flagopt.model import linear as linear_module

SHAPES = {"q/k/v/out (2048x2048)": (2048, 2048, 4), "fc1 (8192x2048)": (8192, 2048, 1),
          "fc2 (2048x8192)": (2048, 8192, 1)}  # (out, in, matrices per layer)
MARGIN = 1.05  # a kernel is "faster" when a whole layer's products take 5% less time


def stream_rate(fn, weights: list[torch.Tensor], x: torch.Tensor, rounds: int) -> float:
    """Median GB/s of weight bytes over ``rounds`` passes of ``fn(x, w)`` over ``weights``."""
    for w in weights[:2]:
        fn(x, w)  # warm-up: first-call allocations and kernel selection
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for w in weights:
            fn(x, w)
        rates.append(nbytes / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def copies(out_f: int, in_f: int, dtype: torch.dtype, mib: int) -> list[torch.Tensor]:
    count = max(2, mib * 2**20 // (out_f * in_f * torch.finfo(dtype).bits // 8))
    base = (torch.randn(out_f, in_f) * 0.02).to(dtype)
    return [base.clone() for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--mib", type=int, default=512, help="weights per round (default 512)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, CPU capability {capability} ({linear_module.cpu_key()}), "
          f"{torch.get_num_threads()} threads, {args.mib} MiB of weights per round")
    rows_list = [int(r) for r in args.rows.split(",")]
    # seconds per GB summed over a layer's matrices: rows -> [F.linear, W @ x^T]
    layer = {r: [0.0, 0.0] for r in rows_list}
    mv_layer = [0.0, 0.0]  # [F.linear, addmv], one bf16 row
    split_layer = [0.0, 0.0]  # [F.linear, bmm over the threads], one fp32 row
    with torch.inference_mode():
        for label, (out_f, in_f, count) in SHAPES.items():
            weights = copies(out_f, in_f, torch.float32, args.mib)
            for rows in rows_list:
                x = torch.randn(rows, in_f)
                plain = stream_rate(lambda x, w: F.linear(x, w), weights, x, args.rounds)
                left = stream_rate(lambda x, w: torch.mm(w, x.t()).t().contiguous(),
                                   weights, x, args.rounds)
                layer[rows][0] += count / plain
                layer[rows][1] += count / left
                print(f"float32  {label:22s} rows={rows:3d}  F.linear {plain:6.1f} GB/s  "
                      f"W@x^T {left:6.1f} GB/s  ({left / plain:4.2f}x)", flush=True)
                parts = torch.get_num_threads()
                if rows == 1 and parts > 1:
                    split = stream_rate(lambda x, w: linear_module._split_row(x, w, None, parts),
                                        weights, x, args.rounds)
                    split_layer[0] += count / plain
                    split_layer[1] += count / split
                    print(f"float32  {label:22s} rows=  1  F.linear {plain:6.1f} GB/s  "
                          f"split in {parts} {split:6.1f} GB/s  ({split / plain:4.2f}x)",
                          flush=True)
            del weights
            weights = copies(out_f, in_f, torch.bfloat16, args.mib)
            x = torch.randn(1, in_f).bfloat16()
            plain = stream_rate(lambda x, w: F.linear(x, w), weights, x, args.rounds)
            mv = stream_rate(lambda x, w: torch.mv(w, x[0]), weights, x, args.rounds)
            mv_layer[0] += count / plain
            mv_layer[1] += count / mv
            print(f"bfloat16 {label:22s} rows=  1  F.linear {plain:6.1f} GB/s  "
                  f"addmv {mv:6.1f} GB/s  ({mv / plain:4.2f}x)", flush=True)
            del weights
    for rows in rows_list:
        print(f"float32 rows={rows:3d}: a layer's products {layer[rows][0] / layer[rows][1]:4.2f}x "
              "faster as W@x^T")
    faster = [r for r in rows_list if r >= 2 and layer[r][0] / layer[r][1] >= MARGIN]
    implied = (min(faster), max(faster)) if faster else None
    mv = mv_layer[0] / mv_layer[1]
    key = linear_module.cpu_key()
    print(f"implied W@x^T rows (a layer {MARGIN}x faster): {faster}, window {implied}; "
          f"linear.py holds {linear_module.ROW_WINDOWS.get(key)} for {key}")
    if split_layer[1]:
        ratio = split_layer[0] / split_layer[1]
        print(f"float32 one row: a layer {ratio:4.2f}x faster split over the threads, implied "
              f"{ratio >= MARGIN}; linear.py holds {key in linear_module.SPLIT_CAPABILITIES} "
              f"for {key}")
    print(f"bfloat16 one row: a layer {mv:4.2f}x faster as addmv, implied "
          f"{mv >= MARGIN}; linear.py holds {key in linear_module.MV_CAPABILITIES} for {key}")


if __name__ == "__main__":
    main()
