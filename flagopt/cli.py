"""The ``flagopt`` command: ``flagopt generate`` streams a continuation to stdout;
``flagopt download`` fetches models ahead of time (same as ``flagopt-download``).

    flagopt generate --model opt-125m-en "The trophy doesn't fit in the suitcase because"
    echo "Paris is the capital of" | flagopt generate --model opt-125m-en --beam-size 4
    flagopt perplexity --model opt-125m-en --stride 512 wiki.test.txt
    flagopt eval --model opt-125m-en --tasks lambada_openai,piqa --output results.json

With no PROMPT, every line of standard input is one prompt and its continuation is one line of
output, so the command fits in a shell pipeline.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence

from flagopt.errors import FlagOptError


def _parser() -> argparse.ArgumentParser:
    from flagopt.predictor.strategies import STRATEGIES  # torch loads only once a command runs

    parser = argparse.ArgumentParser(prog="flagopt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a continuation of PROMPT (or of each "
                                          "line of stdin)")
    gen.add_argument("prompt", nargs="?", help="the prompt; read from stdin when absent")
    gen.add_argument("--model", default="opt-125m-en",
                     help="registry name, hub repo id (owner/name[@rev]) or local directory")
    gen.add_argument("--max-new-tokens", type=int, default=50)
    gen.add_argument("--input-max-length", type=int, default=256)
    gen.add_argument("--strategy", choices=tuple(STRATEGIES),
                     help="default: beam with --beam-size > 1, sample when a sampling option "
                          "is given, else greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--no-repeat-ngram-size", type=int, default=0)
    gen.add_argument("--beam-size", type=int, default=1)
    gen.add_argument("--penalty-alpha", type=float, default=0.6)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--model-dir", help="where models are stored (default $FLAGOPT_HOME)")
    gen.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    gen.add_argument("--dtype", help="float32, float16 or bfloat16")
    gen.add_argument("--quantize", choices=("int8",), help="int8 weight-only quantization")
    gen.add_argument("--compile", action="store_true",
                     help="compile the decoding step with torch.compile (CUDA graphs on GPU); "
                          "same output, faster after a one-time compilation")
    gen.add_argument("--cache-dtype", choices=("float32", "float16", "bfloat16"),
                     help="KV cache dtype (default: the model's); float32 with a half-precision "
                          "model on CPU is often faster and changes the numbers slightly")
    gen.add_argument("--endpoint", help="hub mirror (default $FLAGOPT_ENDPOINT or the hub)")
    gen.add_argument("--offline", action="store_true", help="never use the network")
    gen.add_argument("--quiet", action="store_true", help="no progress bars or notices")
    sub.add_parser("download", help="download models ahead of time (see flagopt-download -h)",
                   add_help=False)
    from flagopt.eval.commands import add_parsers as add_scoring_parsers

    add_scoring_parsers(sub)  # perplexity, eval
    return parser


def _params(args: argparse.Namespace) -> dict:
    sampling_given = any(v is not None for v in (args.top_k, args.top_p, args.temperature,
                                                 args.seed))
    strategy = args.strategy or ("beam" if args.beam_size > 1 else
                                 "sample" if sampling_given else "greedy")
    params = dict(strategy=strategy, max_new_tokens=args.max_new_tokens,
                  repetition_penalty=args.repetition_penalty,
                  no_repeat_ngram_size=args.no_repeat_ngram_size, stop=tuple(args.stop or ()))
    if strategy == "sample":
        params.update(top_k=30 if args.top_k is None else args.top_k,
                      top_p=1.0 if args.top_p is None else args.top_p,
                      temperature=1.0 if args.temperature is None else args.temperature,
                      seed=args.seed)
    elif strategy == "beam":
        params.update(num_beams=args.beam_size)
    elif strategy == "contrastive":
        params.update(top_k=4 if args.top_k is None else args.top_k,
                      penalty_alpha=args.penalty_alpha)
    return params


def _prompts(args: argparse.Namespace) -> Iterable[str]:
    if args.prompt is not None:
        yield args.prompt
        return
    for line in sys.stdin:
        yield line.rstrip("\r\n")


def _generate(args: argparse.Namespace) -> int:
    from flagopt.auto_model import AutoLoader
    from flagopt.predictor import GenerationParams, Predictor

    params = _params(args)
    GenerationParams(**params)  # validate before any download
    options = {k: v for k, v in dict(dtype=args.dtype, quantize=args.quantize,
                                     endpoint=args.endpoint).items() if v is not None}
    if args.offline:
        options["offline"] = True
    if args.quiet:
        options["progress"] = False
    loader = AutoLoader("lm", args.model, model_dir=args.model_dir, device=args.device,
                        **options)
    predictor = Predictor(loader.get_model(), loader.get_tokenizer(), compile=args.compile,
                          cache_dtype=args.cache_dtype)
    out = sys.stdout
    for prompt in _prompts(args):
        for piece in predictor.stream(prompt, args.input_max_length, **params):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flagopt`` console command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["download"]:
        from flagopt.download import main as download_main

        return download_main(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING,
                        format="flagopt: %(message)s")
    try:
        if args.command != "generate":
            from flagopt.eval.commands import RUNNERS

            return RUNNERS[args.command](args)
        return _generate(args)
    except (FlagOptError, ValueError, TypeError, OSError) as exc:
        print(f"flagopt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
