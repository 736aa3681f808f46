"""Download zoo models ahead of time: ``python -m model_zoo.download opt-1.3b-en``.

A thin entry point; the work (and ``--help``) is in ``flagopt.download``.
"""

from __future__ import annotations

import sys

from flagopt.download import main

if __name__ == "__main__":
    sys.exit(main())
