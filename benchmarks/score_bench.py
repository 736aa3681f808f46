"""Scoring throughput: flagopt against lm-eval's ``hf`` model and transformers, same weights.

    python benchmarks/score_bench.py --shapes opt-125m opt-1.3b --pairs 256 --ppl-tokens 8192

For each shape, a random-weight checkpoint at the real OPT shape is written once (hub layout:
``save_pretrained`` plus the packaged tokenizer files) under ``--work-dir``. Then, in one run:

* log-likelihood of a fixed set of (context, continuation) pairs: flagopt's
  ``Predictor.loglikelihood``, lm-eval's ``HFLM.loglikelihood``, and transformers directly
  (one forward per pair, log-softmax over all positions);
* perplexity of one long text: ``Predictor.perplexity`` and the perplexity guide's loop on
  transformers.

Throughput is scored tokens per second (the continuation tokens, or the guide's token count).
Each engine's scores are compared with transformers' (max absolute difference), so a speed-up
at different numbers shows. Prints one JSON object; a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4),
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                     num_attention_heads=12),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192,
                     num_attention_heads=32),
}
WORDS = ("the of and to in is was for on that with as by at from his her an it which were "
         "city river music season film team war school world king house church game north "
         "century station album league water history record family number village").split()


def checkpoint(shape: str, work: Path) -> Path:
    """A random-weight OPT of ``shape`` in the hub layout (cached)."""
    import transformers

    import flagopt

    directory = work / f"score-bench-{shape}"
    if (directory / "config.json").is_file():
        return directory
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=50272, max_position_embeddings=2048,
                                    word_embed_proj_dim=SHAPES[shape]["hidden_size"],
                                    **SHAPES[shape])
    model = transformers.OPTForCausalLM(config)
    tmp = directory.with_suffix(".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in (Path(flagopt.__file__).parent / "data" / "opt-tokenizer").iterdir():
        shutil.copy(f, tmp / f.name)
    tmp.rename(directory)
    return directory


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        context = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200))).capitalize()
        continuation = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        pairs.append((context, continuation))
    return pairs


def long_text(n_words: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_shape(shape: str, work: Path, n_pairs: int, ppl_words: int, batch_size: int,
                stride: int) -> dict:
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from flagopt import AutoLoader, Predictor

    directory = checkpoint(shape, work)
    pairs = make_pairs(n_pairs)
    loader = AutoLoader("lm", str(directory), device="cpu", dtype="float32")
    predictor = Predictor(loader.get_model(), loader.get_tokenizer())
    hf = transformers.OPTForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    hflm = HFLM(pretrained=hf, tokenizer=transformers.AutoTokenizer.from_pretrained(directory),
                batch_size=batch_size, device="cpu")
    tok = predictor.tokenizer
    from flagopt.predictor.scoring import encode_pair

    encoded = [encode_pair(tok, c, x) for c, x in pairs]
    n_scored = sum(len(x) for _, x in encoded)

    def transformers_direct() -> list[float]:
        out = []
        with torch.inference_mode():
            for ctx, cont in encoded:
                ids = (ctx + cont)[-2049:][:-1]
                logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
                out.append(float(logp[-len(cont):].gather(-1, torch.tensor(cont)[:, None]).sum()))
        return out

    ours, t_ours = timed(lambda: [lp for lp, _ in predictor.loglikelihood(pairs, batch_size)])
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    theirs, t_hflm = timed(lambda: [lp for lp, _ in hflm.loglikelihood(requests,
                                                                       disable_tqdm=True)])
    ref, t_hf = timed(transformers_direct)
    text = long_text(ppl_words)
    ppl, t_ppl = timed(lambda: predictor.perplexity(text, stride=stride, batch_size=batch_size))
    ref_ppl, t_ref_ppl = timed(lambda: _guide(hf, tok.encode(text, add_bos=True), stride))
    diff = lambda a: max(abs(x - y) for x, y in zip(a, ref))  # noqa: E731
    return {
        "shape": shape, "pairs": n_pairs, "scored_tokens": n_scored, "batch_size": batch_size,
        "loglikelihood_tok_s": {"flagopt": n_scored / t_ours, "lm_eval_hf": n_scored / t_hflm,
                                "transformers": n_scored / t_hf},
        "loglikelihood_max_abs_diff_vs_transformers": {"flagopt": diff(ours),
                                                       "lm_eval_hf": diff(theirs)},
        "perplexity": {"tokens": ppl.tokens, "stride": stride,
                       "flagopt_tok_s": ppl.tokens / t_ppl,
                       "transformers_guide_tok_s": ppl.tokens / t_ref_ppl,
                       "ppl_flagopt": ppl.ppl, "ppl_guide": ref_ppl},
    }


def _guide(hf, ids: list[int], stride: int, max_length: int = 2048) -> float:
    """transformers' perplexity guide's loop."""
    input_ids = torch.tensor([ids])
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    with torch.inference_mode():
        for begin in range(0, seq_len, stride):
            end = min(begin + max_length, seq_len)
            trg_len = end - prev_end
            x = input_ids[:, begin:end]
            target = x.clone()
            target[:, :-trg_len] = -100
            loss = hf(x, labels=target).loss
            n = int((target != -100).sum()) - 1
            nll_sum += float(loss) * n
            n_tokens += n
            prev_end = end
            if end == seq_len:
                break
    return float(torch.exp(torch.tensor(nll_sum / n_tokens)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["opt-125m", "opt-1.3b"],
                        choices=sorted(SHAPES))
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--ppl-words", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--work-dir", default="benchmarks/.work")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    runs = [bench_shape(s, work, args.pairs, args.ppl_words, args.batch_size, args.stride)
            for s in args.shapes]
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
