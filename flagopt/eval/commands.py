"""``flagopt perplexity FILE`` and ``flagopt eval --tasks ...``: parsers and runners.

``flagopt.cli`` adds these subcommands with ``add_parsers`` and runs them with ``RUNNERS``.
Both print one JSON line of results to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flagopt.auto_model.cli_options import loader_options
from flagopt.errors import ScoringError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``perplexity`` and ``eval`` to the ``flagopt`` command's subparsers."""
    ppl = sub.add_parser("perplexity", help="sliding-window perplexity of a text file "
                                            "(transformers' perplexity guide)")
    ppl.add_argument("file", help="UTF-8 text file, scored as one text ('-' for stdin)")
    ppl.add_argument("--stride", type=int, default=512, help="tokens each window moves")
    ppl.add_argument("--max-length", type=int,
                     help="window length (default: the model's max_position_embeddings)")
    ppl.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    _model_options(ppl)
    ev = sub.add_parser("eval", help="lm-evaluation-harness tasks (needs flagopt[eval])")
    ev.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    ev.add_argument("--include-path", help="directory of extra YAML task definitions")
    ev.add_argument("--num-fewshot", type=int)
    ev.add_argument("--limit", type=float, help="examples per task (a fraction if < 1)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--output", help="write lm-eval's full results here as JSON")
    _model_options(ev)


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="opt-125m-en",
                        help="registry name, hub repo id (owner/name[@rev]) or local directory")
    parser.add_argument("--model-dir", help="where models are stored (default $FLAGOPT_HOME)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", help="float32, float16 or bfloat16")
    parser.add_argument("--endpoint", help="hub mirror (default $FLAGOPT_ENDPOINT or the hub)")
    parser.add_argument("--offline", action="store_true", help="never use the network")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or notices")


def read_text(path: str) -> str:
    """The whole file as text.

    Raises:
        ScoringError: the bytes are not UTF-8 (names the file and the byte offset).
        OSError: the file cannot be read.
    """
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        name = "standard input" if path == "-" else path
        raise ScoringError(f"{name} is not UTF-8 text: byte 0x{data[exc.start]:02x} at "
                           f"offset {exc.start} ({exc.reason}); convert it first, e.g. "
                           f"iconv -f latin1 -t utf-8") from None


def run_perplexity(args: argparse.Namespace) -> int:
    """Perplexity of ``args.file``; prints ``{"tokens", "nll", "ppl", "stride",
    "max_length"}`` as one JSON line."""
    from tqdm import tqdm

    from flagopt.auto_model import AutoLoader
    from flagopt.predictor import Predictor

    text = read_text(args.file)  # before any download
    loader = AutoLoader("lm", args.model, **loader_options(args))
    predictor = Predictor(loader.get_model(), loader.get_tokenizer())
    with tqdm(desc="perplexity", unit="window", disable=args.quiet, file=sys.stderr) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done)

        result = predictor.perplexity(text, stride=args.stride, max_length=args.max_length,
                                      batch_size=args.batch_size, progress=progress)
    print(json.dumps(result.to_dict()), flush=True)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """``lm_eval.simple_evaluate`` over ``args.tasks``; prints ``{task: metrics}`` as one
    JSON line and writes the full results to ``args.output``."""
    from flagopt.eval import harness  # ImportError with the install hint without lm-eval

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--tasks names no task: {args.tasks!r}")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1
                                             else args.limit)
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=args.include_path)
    harness.check_tasks(tasks, manager)  # before any download
    lm = harness.FlagOptLM.from_pretrained(args.model, batch_size=args.batch_size,
                                           **loader_options(args))
    results = harness.evaluate(lm, tasks, manager, args.num_fewshot, limit)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n",
                                     encoding="utf-8")
    print(json.dumps(results["results"], default=str), flush=True)
    return 0


RUNNERS = {"perplexity": run_perplexity, "eval": run_eval}
