"""``flagopt serve``: an OpenAI-compatible HTTP server with continuous batching.

``scheduler.py`` (admit / step / retire over a per-row ``RowCache``) is plain Python and torch;
``engine.py`` runs it on one thread; ``app.py`` is the HTTP layer (FastAPI, the ``serve``
extra): ``create_app`` builds it, ``run`` serves it with uvicorn.
"""

from __future__ import annotations

__all__ = ["create_app", "run"]


def __getattr__(name: str):
    # FastAPI and uvicorn load only when the HTTP layer is asked for (the `serve` extra).
    if name == "create_app":
        from flagopt.serve.app import create_app

        return create_app
    if name == "run":
        from flagopt.serve.server import run

        return run
    raise AttributeError(f"module 'flagopt.serve' has no attribute {name!r}")
