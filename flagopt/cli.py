"""The ``flagopt`` command: ``flagopt generate`` streams a continuation to stdout;
``flagopt download`` fetches models ahead of time (same as ``flagopt-download``);
``flagopt serve MODEL`` answers OpenAI's completions API over HTTP (``flagopt.serve``);
``flagopt finetune`` trains LoRA adapters or the whole model on a local file (``flagopt.train``).

    flagopt generate --model opt-125m-en "The trophy doesn't fit in the suitcase because"
    echo "Paris is the capital of" | flagopt generate --model opt-125m-en --beam-size 4
    flagopt perplexity --model opt-125m-en --stride 512 wiki.test.txt
    flagopt eval --model opt-125m-en --tasks lambada_openai,piqa --output results.json
    flagopt finetune --model opt-125m-en --task lm --train notes.txt --lora-r 16 --output runs/n

With no PROMPT, every line of standard input is one prompt and its continuation is one line of
output, so the command fits in a shell pipeline: in that mode a backslash in the continuation is
written as two backslashes, a newline as the two characters backslash-n and a carriage return as
backslash-r. ``--jsonl`` writes one JSON object per prompt instead (``prompt``, ``text``,
``finish_reason``, ``truncated``). A stdin line that is not valid UTF-8 gets an empty output line
(an object with ``error`` under ``--jsonl``) and an error on stderr naming its line number; the
other prompts go on and the exit status is 1. Every failure is one line ``flagopt: error: ...``
on stderr and exit status 1 (2 for a malformed command line); every argument is checked before
anything is downloaded, and ``--debug`` adds the traceback. A closed stdout (``| head -1``) ends the command
quietly with status 141, as SIGPIPE ends a Unix filter.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import NoReturn

from flagopt.errors import FlagOptError

# flagopt.model.quantize.QUANTIZE_MODES, spelled out so that --help needs no torch import
# (tests/test_cli.py checks that the two agree)
QUANTIZE_CHOICES = ("int8", "w8a8")
QUANTIZE_HELP = ("int8: int8 weights (weight-only); w8a8: the same weights and int8 activations "
                 "in batches and prefill (faster on CPUs with int8 matrix units, less exact)")


# GenerationParams fields and the flags that set them, so that errors name the flag.
FLAGS = {"max_new_tokens": "--max-new-tokens", "input_max_length": "--input-max-length",
         "num_beams": "--beam-size", "top_k": "--top-k", "top_p": "--top-p",
         "temperature": "--temperature", "repetition_penalty": "--repetition-penalty",
         "no_repeat_ngram_size": "--no-repeat-ngram-size", "penalty_alpha": "--penalty-alpha",
         "seed": "--seed", "stop": "--stop"}


class UsageError(Exception):
    """The command line does not parse (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised, so that ``main`` prints them as one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _parser() -> argparse.ArgumentParser:
    from flagopt.predictor.strategies import STRATEGIES  # torch loads only once a command runs

    parser = _Parser(prog="flagopt", description=__doc__.split("\n\n")[0])
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
    gen.add_argument("--quantize", choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    gen.add_argument("--lora", metavar="DIR", help="a PEFT LoRA adapter directory, merged "
                     "into the weights as they load")
    gen.add_argument("--compile", action="store_true",
                     help="compile the decoding step with torch.compile (CUDA graphs on GPU); "
                          "same output, faster after a one-time compilation")
    gen.add_argument("--cache-dtype", choices=("float32", "float16", "bfloat16"),
                     help="KV cache dtype (default: the model's); float32 with a half-precision "
                          "model on CPU is often faster and changes the numbers slightly")
    gen.add_argument("--draft", metavar="NAME|int8",
                     help="speculative decoding (greedy, sampling): a smaller OPT sharing the "
                          "tokenizer (registry name, repo id or directory, e.g. opt-125m-en) "
                          "proposes tokens, or 'int8' for the model's own weights in int8; "
                          "the same output as without it")
    gen.add_argument("--endpoint", help="hub mirror (default $FLAGOPT_ENDPOINT or the hub)")
    gen.add_argument("--offline", action="store_true", help="never use the network")
    gen.add_argument("--quiet", action="store_true", help="no progress bars or notices")
    gen.add_argument("--jsonl", action="store_true",
                     help="one JSON object per prompt (prompt, text, finish_reason, "
                          "truncated) instead of the bare continuation")
    gen.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub.add_parser("download", help="download models ahead of time (see flagopt-download -h)",
                   add_help=False)
    _add_serve_parser(sub)

    from flagopt.eval.commands import add_parsers as add_scoring_parsers

    add_scoring_parsers(sub)  # perplexity, eval
    from flagopt.train.commands import add_parser as add_finetune_parser

    add_finetune_parser(sub)
    return parser


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="serve MODEL over an OpenAI-compatible HTTP API "
                                       "(needs the serve extra: pip install 'flagopt[serve]')")
    srv.add_argument("model", help="registry name, hub repo id (owner/name[@rev]) or local "
                                   "directory")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                                                         "127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    srv.add_argument("--served-model-name", help="the model id clients send (default: MODEL)")
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    srv.add_argument("--max-batch-size", type=int, default=16,
                     help="sequences decoded together (rows of the KV cache)")
    srv.add_argument("--max-queue", type=int, default=64,
                     help="requests that may wait for a row; more are answered 429")
    srv.add_argument("--max-model-len", type=int,
                     help="positions per request, prompt + completion (default: the model's)")
    srv.add_argument("--max-tokens-default", type=int, default=16,
                     help="max_tokens when a request leaves it out")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="seconds to let requests finish after SIGINT/SIGTERM")
    srv.add_argument("--chat-template", help="a Jinja chat template file for "
                                             "/v1/chat/completions (OPT has none)")
    srv.add_argument("--model-dir", help="where models are stored (default $FLAGOPT_HOME)")
    srv.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    srv.add_argument("--dtype", help="float32, float16 or bfloat16")
    srv.add_argument("--quantize", choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    srv.add_argument("--lora", metavar="DIR", help="a PEFT LoRA adapter directory, merged "
                     "into the weights as they load")
    srv.add_argument("--cache-dtype", choices=("float32", "float16", "bfloat16"),
                     help="KV cache dtype (default: the model's)")
    srv.add_argument("--draft", metavar="NAME|int8",
                     help="speculative decoding: a smaller OPT sharing the tokenizer (registry "
                          "name, repo id or directory, loaded with the same options) proposes "
                          "tokens, or 'int8' for the model's own weights in int8; the same "
                          "output as without it")
    srv.add_argument("--endpoint", help="hub mirror (default $FLAGOPT_ENDPOINT or the hub)")
    srv.add_argument("--offline", action="store_true", help="never use the network")
    srv.add_argument("--quiet", action="store_true", help="no progress bars, no request log")


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


def _checked(args: argparse.Namespace) -> tuple[dict, dict]:
    """Every argument checked before anything is downloaded: the generation parameters and
    the loader's options.

    Raises:
        ValueError / TypeError: naming the flag, its value and the allowed range.
    """
    from flagopt.auto_model.auto_loader import resolve_device, resolve_dtype
    from flagopt.predictor import GenerationParams
    from flagopt.predictor.params import check
    from flagopt.predictor.strategies import STRATEGIES

    # Every number given is checked, whether or not the strategy uses it.
    for name in ("input_max_length", "num_beams", "top_k", "top_p", "temperature",
                 "seed", "penalty_alpha"):
        value = getattr(args, "beam_size" if name == "num_beams" else name)
        if value is not None:
            check(name, value, FLAGS[name])
    if args.beam_size > 1 and args.strategy not in (None, "beam"):
        raise ValueError(f"--beam-size {args.beam_size} applies to --strategy beam, not "
                         f"--strategy {args.strategy}")
    params = _params(args)
    GenerationParams(**params, caller_names=FLAGS)
    if args.draft is not None and not STRATEGIES[params["strategy"]].draft:
        takes = " or ".join(n for n, s in STRATEGIES.items() if s.draft)
        raise ValueError(f"--draft applies to --strategy {takes}, not --strategy "
                         f"{params['strategy']}")
    if args.draft == "int8" and args.quantize is not None:
        raise ValueError("--draft int8 drafts with the model's own weights in int8, so the "
                         "model itself must be full precision: drop --quantize")
    device = resolve_device(args.device)
    if device.type == "meta":
        raise ValueError(f"--device {args.device} holds no weights; use cpu or cuda")
    if args.dtype is not None:
        resolve_dtype({"dtype": args.dtype}, device)
    options = _loader_options(args)
    options.update(model_dir=args.model_dir, device=device)
    return params, options


def _loader_options(args: argparse.Namespace) -> dict:
    """AutoLoader options of ``generate`` / ``serve``: the shared ones plus quantize, LoRA."""
    from flagopt.auto_model.cli_options import loader_options

    options = loader_options(args, "quantize")
    if args.lora is not None:
        options["lora_dir"] = args.lora
    return options


def _prompts(args: argparse.Namespace) -> Iterator[tuple[int, str | None]]:
    """(line number, prompt) pairs; the prompt is None for a stdin line that is not UTF-8
    (reported on stderr)."""
    if args.prompt is not None:
        yield 1, args.prompt
        return
    raw = getattr(sys.stdin, "buffer", None)
    lines = raw if raw is not None else (line.encode("utf-8") for line in sys.stdin)
    for number, line in enumerate(lines, start=1):
        try:
            prompt = line.rstrip(b"\r\n").decode("utf-8")
        except UnicodeDecodeError as exc:
            _error(f"stdin line {number} is not valid UTF-8 ({exc.reason} at byte "
                   f"{exc.start}); skipped it")
            prompt = None
        yield number, prompt


def escape_line(text: str) -> str:
    """``text`` on one line: backslash -> two backslashes, newline -> backslash-n, carriage
    return -> backslash-r (stdin mode's output)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _generate(args: argparse.Namespace) -> int:
    params, options = _checked(args)
    from flagopt.auto_model import AutoLoader
    from flagopt.predictor import Predictor

    loader = AutoLoader("lm", args.model, **options)
    draft = args.draft
    if draft is not None and draft != "int8":
        draft = AutoLoader("lm", draft, **options).get_model()
    predictor = Predictor(loader.get_model(), loader.get_tokenizer(), compile=args.compile,
                          cache_dtype=args.cache_dtype, draft=draft)
    out, status = sys.stdout, 0
    escape = escape_line if args.prompt is None else (lambda text: text)
    for number, prompt in _prompts(args):
        if prompt is None:
            status = 1
            if args.jsonl:
                out.write(json.dumps({"line": number, "error": "not valid UTF-8"}))
        elif args.jsonl:
            text = predictor.generate(prompt, args.input_max_length, **params).texts[0]
            out.write(json.dumps({"prompt": prompt, "text": str(text),
                                  "finish_reason": text.finish_reason,
                                  "truncated": text.truncated}, ensure_ascii=False))
        else:
            for piece in predictor.stream(prompt, args.input_max_length, **params):
                out.write(escape(piece))
                out.flush()
        out.write("\n")
        out.flush()
    return status


def _serve(args: argparse.Namespace) -> int:
    if args.draft == "int8" and args.quantize is not None:
        raise ValueError("--draft int8 drafts with the model's own weights in int8, so the "
                         "model itself must be full precision: drop --quantize")
    try:
        from flagopt.serve import create_app, run
        from flagopt.serve.app import read_chat_template
    except ImportError as exc:
        raise OSError(f"flagopt serve needs FastAPI and uvicorn ({exc}): "
                      f"pip install 'flagopt[serve]'") from None
    from flagopt.auto_model import AutoLoader

    template = read_chat_template(args.chat_template) if args.chat_template else None
    options = _loader_options(args)
    loader = AutoLoader("lm", args.model, **options)
    draft = args.draft
    if draft is not None and draft != "int8":
        draft = AutoLoader("lm", draft, **options).get_model().eval()
    name = args.served_model_name or args.model
    app = create_app(loader.get_model().eval(), loader.get_tokenizer(), served_model_name=name,
                     api_key=args.api_key, max_batch_size=args.max_batch_size,
                     max_queue=args.max_queue, max_model_len=args.max_model_len,
                     max_tokens_default=args.max_tokens_default, chat_template=template,
                     cache_dtype=args.cache_dtype, draft=draft)
    logging.getLogger("flagopt.serve").setLevel(logging.WARNING if args.quiet
                                                else logging.INFO)

    def ready(url: str) -> None:
        print(f"flagopt: serving {name} at {url}/v1 (Ctrl-C to stop)", flush=True)

    run(app, args.host, args.port, shutdown_timeout=args.shutdown_timeout, on_ready=ready)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flagopt`` console command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["download"]:
        from flagopt.download import main as download_main

        return download_main(argv[1:])
    debug = "--debug" in argv
    try:
        args = _parser().parse_args(argv)
        logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING,
                            format="flagopt: %(message)s")
        if args.command == "serve":
            return _serve(args)
        if args.command == "finetune":
            from flagopt.train.commands import run_finetune

            return run_finetune(args)
        if args.command != "generate":
            from flagopt.eval.commands import RUNNERS

            return RUNNERS[args.command](args)
        return _generate(args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _closed_stdout()
    except Exception as exc:  # noqa: BLE001 - the command's last line of defence
        if debug:
            traceback.print_exc()
        _error(_one_line(exc))
        return 2 if isinstance(exc, UsageError) else 1


def _one_line(exc: BaseException) -> str:
    """The error's message on one line; its type too when it is not one of ours or a
    builtin users expect (ValueError, TypeError, OSError)."""
    text = " / ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    plain = isinstance(exc, (UsageError, FlagOptError, ValueError, TypeError, OSError)) \
        and not isinstance(exc, UnicodeError)
    if not plain or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text


def _error(message: str) -> None:
    print(f"flagopt: error: {message}", file=sys.stderr, flush=True)


def _closed_stdout() -> int:
    """The reader of stdout went away (``| head -1``): stop quietly, as SIGPIPE would."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush goes nowhere
    except (OSError, ValueError):
        pass
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    raise SystemExit(main())
