"""Where a flagopt decoding step (or a prefill) spends its time: ``torch.profiler`` over real
generation steps of a benchmark checkpoint, ops grouped into the weight products, attention
and the rest, beside the weights' streaming rate and the machine's read bandwidth.

    python benchmarks/profile_step.py --model opt-1.3b --dtype bfloat16 [--quantize w8a8]
        [--batch 1] [--steps 16] [--prompt-len 32] [--prefill] [--threads N] [--top 12]
        [--checkpoint DIR]

It reads the checkpoints ``bench.py`` writes (``--work-dir``, default ``bench_out/``; run
bench.py with that model first) and loads them through the prepared cache as bench.py does.
Decoding: the prompt and the first token are generated outside the profile, then ``--steps``
steps inside it. ``--prefill``: one forward of ``--prompt-len`` tokens per row, as bench.py's
prefill metric. The figures are one process on a shared machine: read them as shares, not as
speeds (bench.py is where speeds come from).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import checkpoints  # noqa: E402  (benchmarks/checkpoints.py)
import engines  # noqa: E402
import worker  # noqa: E402

from flagopt.model.prepared import load_prepared  # noqa: E402
from flagopt.predictor.generation import iter_generate  # noqa: E402
from flagopt.predictor.params import GenerationParams  # noqa: E402

# ops that multiply by a weight matrix (the layers and the LM head); bmm/baddbmm are the
# one-row float32 product split over the threads (model/linear.py): attention is sdpa here
PRODUCTS = {"aten::addmm", "aten::mm", "aten::mv", "aten::addmv", "aten::_weight_int8pack_mm",
            "aten::_int_mm", "aten::linear", "aten::matmul", "aten::bmm", "aten::baddbmm"}
ATTENTION = {"aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_attention_math", "aten::_softmax",
             "aten::scaled_dot_product_attention"}


def bytes_per_token(model: torch.nn.Module) -> int:
    """The weight bytes one step reads, as bench.py counts them for its ceiling (every tensor
    once, less the position table, of which a step reads one row)."""
    view = SimpleNamespace(model=model)
    return engines._TorchEngine.weights_bytes(view) - engines._TorchEngine.position_bytes(view)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-1.3b", choices=sorted(checkpoints.MODELS))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", default=None, choices=("int8", "w8a8"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--prefill", action="store_true", help="profile one prefill instead")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--membw-mib", type=int, default=1024, help="bandwidth test size")
    parser.add_argument("--work-dir", default=str(HERE.parent / "bench_out"))
    parser.add_argument("--checkpoint", help="a checkpoint directory instead of --model's")
    args = parser.parse_args()
    if args.batch < 1 or args.steps < 1 or args.prompt_len < 1:
        parser.error("--batch, --steps and --prompt-len must be at least 1")
    torch.set_num_threads(args.threads)
    directory = Path(args.checkpoint) if args.checkpoint else \
        Path(args.work_dir) / "checkpoints" / f"{args.model}-bin"
    if not directory.is_dir():
        parser.error(f"no checkpoint at {directory}: run benchmarks/bench.py --models "
                     f"{args.model} first (or pass --work-dir or --checkpoint)")
    dtype = getattr(torch, args.dtype)
    model = load_prepared(directory, dtype=dtype, quantize=args.quantize)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len),
                        generator=generator)
    cache_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else None
    params = GenerationParams(max_new_tokens=args.steps + 1, strategy="greedy",
                              eos_token_ids=())
    with torch.inference_mode():
        model(ids, logits_to_keep=1)  # warm-up: first-call allocations and kernel choice
        if args.prefill:
            with torch.profiler.profile() as prof:
                start = time.perf_counter()
                model(ids, logits_to_keep=1)
                wall = time.perf_counter() - start
            units = 1
        else:
            steps = iter_generate(model, ids, None, params, cache_dtype=cache_dtype)
            next(steps)  # the prompt and the first token, outside the profile
            with torch.profiler.profile() as prof:
                start = time.perf_counter()
                for _ in range(args.steps):
                    next(steps)
                wall = time.perf_counter() - start
            units = args.steps
    report(prof, wall, units, bytes_per_token(model), args, directory.name)


def report(prof, wall: float, units: int, nbytes: int, args: argparse.Namespace,
           name: str) -> None:
    by_op: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in prof.key_averages():
        by_op[event.key] += event.self_cpu_time_total / 1e6
        calls[event.key] += event.count
    total = sum(by_op.values())
    groups = {"weight products": sum(t for k, t in by_op.items() if k in PRODUCTS),
              "attention": sum(t for k, t in by_op.items() if k in ATTENTION)}
    groups["everything else"] = total - sum(groups.values())
    what = (f"prefill of {args.prompt_len} tokens x {args.batch} rows" if args.prefill else
            f"{units} decoding steps at batch {args.batch}")
    mode = args.quantize or args.dtype
    print(f"{name} {mode} ({args.dtype} activations), {what}, {args.threads} threads, "
          f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")
    per = wall / units
    bw = worker.memory_bandwidth({"device": "cpu", "threads": args.threads,
                                  "bytes": args.membw_mib * 2**20, "runs": 5})["read_gb_s"]
    print(f"wall {per * 1e3:.1f} ms per {'prefill' if args.prefill else 'step'} "
          f"(profiled; the profiler adds a little); weights {nbytes / 1e9:.2f} GB -> "
          f"{nbytes / per / 1e9:.1f} GB/s streamed, read bandwidth {bw:.1f} GB/s")
    print(f"self CPU time {total * 1e3 / units:.1f} ms per unit: " + ", ".join(
        f"{group} {t / total:.0%}" for group, t in groups.items()))
    print(f"{'op':48s} {'share':>6s} {'calls/unit':>10s}")
    for key, t in sorted(by_op.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{key[:48]:48s} {t / total:6.1%} {calls[key] / units:10.1f}")
    print(f"ops per unit: {sum(calls.values()) / units:.0f}")


if __name__ == "__main__":
    main()
