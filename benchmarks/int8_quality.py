"""What int8 weight-only quantization costs in quality: int8 vs the unquantized model.

    python benchmarks/int8_quality.py --model-dir bench_out/ckpt/opt-125m [--new-tokens 32]

For random token prompts and for structured ones (English sentences, repeated patterns,
code, numbers), it reports: the share of prompts whose greedy continuation is identical,
the share of generated tokens that agree before the first divergence, and the teacher-forced
logit error (max absolute, relative L2) and top-1 agreement of the next-token distribution
at every prompt position. Prints a markdown table; ``--json`` writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flagopt.model.loading import load_pretrained  # noqa: E402
from flagopt.predictor.generation import generate  # noqa: E402
from flagopt.predictor.params import GenerationParams  # noqa: E402
from flagopt.tokenizer import OPTTokenizer  # noqa: E402

STRUCTURED = [
    "The trophy doesn't fit in the suitcase because it is too big.",
    "Paris is the capital of France, and Berlin is the capital of",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "the cat sat on the mat. the cat sat on the mat. the cat sat on the",
    "Once upon a time, in a small village at the edge of the forest, there lived",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
    "import numpy as np\nx = np.zeros((3, 4))\nprint(x.shape)",
]


def _prompts(tokenizer: OPTTokenizer, n_random: int, length: int, seed: int
             ) -> dict[str, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    random_rows = [[2] + torch.randint(3, 50000, (length - 1,), generator=g).tolist()
                   for _ in range(n_random)]
    return {"random": random_rows, "structured": tokenizer.encode_batch(STRUCTURED)}


def _teacher_forced(full, int8, rows: list[list[int]]) -> dict[str, float]:
    max_abs, rel, agree, total = 0.0, [], 0, 0
    for row in rows:
        ids = torch.tensor([row])
        with torch.inference_mode():
            a = full(ids).logits[0].float()
            b = int8(ids).logits[0].float()
        max_abs = max(max_abs, float((a - b).abs().max()))
        rel.append(float((a - b).norm() / a.norm()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    return {"logit_max_abs_err": max_abs, "logit_rel_l2_err": sum(rel) / len(rel),
            "top1_agreement": agree / total}


def _greedy(full, int8, rows: list[list[int]], new_tokens: int) -> dict[str, float]:
    params = GenerationParams(max_new_tokens=new_tokens, eos_token_ids=())
    same, prefix = 0, 0
    for row in rows:
        ids = torch.tensor([row])
        a = generate(full, ids, None, params).new_tokens[0]
        b = generate(int8, ids, None, params).new_tokens[0]
        same += int(a == b)
        prefix += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    return {"identical_continuations": same / len(rows),
            "tokens_before_divergence": prefix / (len(rows) * new_tokens)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--random-prompts", type=int, default=16)
    parser.add_argument("--dtype", default="float32", help="reference and int8 activations")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    full = load_pretrained(args.model_dir, dtype=dtype)
    int8 = load_pretrained(args.model_dir, dtype=dtype, quantize="int8")
    tokenizer = OPTTokenizer.default()
    report = {}
    for kind, rows in _prompts(tokenizer, args.random_prompts, 24, 0).items():
        report[kind] = {**_teacher_forced(full, int8, rows),
                        **_greedy(full, int8, rows, args.new_tokens), "prompts": len(rows)}
    print(f"int8 vs {args.dtype}, {args.model_dir}, {args.new_tokens} greedy tokens\n")
    print("| prompts | n | identical greedy continuations | tokens before divergence "
          "| top-1 agreement (teacher-forced) | logit rel. L2 error | max abs logit error |")
    print("|---|---|---|---|---|---|---|")
    for kind, r in report.items():
        print(f"| {kind} | {r['prompts']} | {r['identical_continuations']:.0%} "
              f"| {r['tokens_before_divergence']:.0%} | {r['top1_agreement']:.1%} "
              f"| {r['logit_rel_l2_err']:.4f} | {r['logit_max_abs_err']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
