"""``flagopt-download``: fetch models ahead of time, or list the zoo.

    python -m flagopt.download opt-1.3b-en facebook/opt-350m@main --model-dir ./checkpoints
    python -m flagopt.download --list

Uses the same machinery as ``AutoLoader`` (``download_model``): registry names, hub repo ids,
resume, verification, locks, ``FLAGOPT_ENDPOINT``/``FLAGOPT_OFFLINE``/``FLAGOPT_REGISTRY``.
This module is the command line: it alone prints. Exit codes: 0 done, 1 a download failed,
2 bad arguments (unknown model, bad option).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from flagopt.auto_model.fetch import download_model, flagopt_home
from flagopt.auto_model.registry import ModelSpec, load_registry, resolve_model
from flagopt.errors import FlagOptError

__all__ = ["format_zoo_table", "main"]

PROG = "flagopt-download"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (never calls ``sys.exit``)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits after --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.list:
            print(format_zoo_table(load_registry(args.registry)))
            return 0
        if not args.models:
            parser.print_usage(sys.stderr)
            return _fail("name at least one model, or pass --list", 2)
        for name in args.models:  # every name is checked before anything is downloaded
            resolve_model(name, registry=args.registry)
        for name in args.models:
            path = download_model(name, args.model_dir, only_config=args.config_only,
                                  registry=args.registry, endpoint=args.endpoint,
                                  offline=args.offline, progress=not args.quiet)
            print(f"{name}: {path}")
    except (ValueError, TypeError) as exc:  # UnknownModelError, RegistryError, bad URL...
        return _fail(exc, 2)
    except (OSError, FlagOptError) as exc:  # DownloadError, OfflineError, CheckpointError...
        return _fail(exc, 1)
    except KeyboardInterrupt:
        return _fail("interrupted; run the same command again to resume", 130)
    return 0


def _fail(error: object, code: int) -> int:
    message = " ".join(str(error).split())  # one line
    kind = f"{type(error).__name__}: " if isinstance(error, BaseException) else ""
    print(f"{PROG}: error: {kind}{message}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Download OPT checkpoints ahead of time (registry names such as "
        "opt-1.3b-en, or hub repo ids owner/name[@revision]).")
    parser.add_argument("models", nargs="*", metavar="MODEL", help="models to download")
    parser.add_argument("--model-dir", metavar="DIR",
                        help=f"put MODEL's files in DIR/MODEL/ (default: $FLAGOPT_HOME, now "
                        f"{flagopt_home()})")
    parser.add_argument("--endpoint", metavar="URL",
                        help="hub URL (default: $FLAGOPT_ENDPOINT, else https://huggingface.co)")
    parser.add_argument("--offline", action="store_true",
                        help="never use the network; fail if files are missing")
    parser.add_argument("--config-only", action="store_true",
                        help="config and tokenizer files only, no weights")
    parser.add_argument("--registry", metavar="JSON",
                        help="extra registry file (added to $FLAGOPT_REGISTRY)")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bars or info messages")
    parser.add_argument("--list", action="store_true", help="list the model zoo and exit")
    return parser


def format_zoo_table(specs: dict[str, ModelSpec]) -> str:
    """The zoo as a text table: name, hub repo, parameters, size of the weights on disk.

    Sizes come from the registry; where it does not know them they are estimated as
    parameters x 2 bytes (float16) and marked with "~".
    """
    rows = [("name", "hub repo", "parameters", "size")]
    for spec in specs.values():
        rows.append((spec.name, f"{spec.repo}@{spec.revision}" if spec.revision != "main"
                     else spec.repo, _count(spec.parameters), _size(spec)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append("~ estimated as parameters x 2 bytes (float16)")
    return "\n".join(lines)


def _count(parameters: int | None) -> str:
    if parameters is None:
        return "?"
    if parameters >= 10**9:
        return f"{parameters / 1e9:.1f}B"
    if parameters >= 10**6:
        return f"{parameters / 1e6:.0f}M"
    return f"{parameters / 1e3:.0f}K"


def _size(spec: ModelSpec) -> str:
    size, mark = spec.weights_size, ""
    if size is None:
        if spec.parameters is None:
            return "?"
        size, mark = spec.parameters * 2, "~"
    if size >= 10**9:
        return f"{mark}{size / 1e9:.1f} GB"
    if size >= 10**6:
        return f"{mark}{size / 1e6:.0f} MB"
    return f"{mark}{size / 1e3:.0f} kB"


if __name__ == "__main__":
    raise SystemExit(main())
