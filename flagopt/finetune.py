"""``python -m flagopt.finetune ...``: ``flagopt finetune`` as a module, for ``torchrun``.

    torchrun --nproc-per-node 2 -m flagopt.finetune --model opt-125m-en --task lm \\
        --train notes.txt --lora-r 16 --output runs/notes

Each process trains on its share of every global batch (DistributedDataParallel); rank 0
logs, saves checkpoints and writes the result.
"""

from __future__ import annotations

import sys
from typing import Sequence

from flagopt.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flagopt finetune`` with ``argv`` (default: the command line)."""
    return cli_main(["finetune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
