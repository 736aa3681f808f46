"""Serving the app with uvicorn: a ready callback with the URL, and a graceful stop.

On SIGINT/SIGTERM uvicorn stops accepting connections; the app answers 503 on /health and
on new completions from then on, lets running and queued requests finish within
``shutdown_timeout`` seconds, then returns (the command exits 0).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger("flagopt.serve")


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when shutdown starts and the caller when it's up."""

    def __init__(self, config: uvicorn.Config, app: FastAPI,
                 on_ready: Callable[[str], None] | None) -> None:
        super().__init__(config)
        self._app, self._on_ready = app, on_ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self._on_ready is not None:
            self._on_ready(self.url)

    @property
    def url(self) -> str:
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def handle_exit(self, sig, frame) -> None:
        # uvicorn records the signal and raises it again once it has shut down, which
        # would end the process by that signal; a drained shutdown here exits 0 instead.
        self._app.state.service.shutting_down = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for requests
        else:
            self.should_exit = True


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *,
        shutdown_timeout: float = 30.0, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve ``app`` until SIGINT/SIGTERM, then drain for up to ``shutdown_timeout`` seconds.

    Args:
        app: from ``create_app``.
        host, port: where to listen (port 0: any free port; ``on_ready`` gets the URL).
        on_ready: called once with the base URL when the server accepts connections.
    """
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_config=None,
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    _Server(config, app, on_ready).run()


def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Start ``app`` on a thread (tests and embedding); returns ``(url, stop)``.

    ``stop()`` shuts the server down and waits for it.
    """
    import threading

    ready = threading.Event()
    urls: list[str] = []
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_config=None,
                            lifespan="on", timeout_graceful_shutdown=5)
    server = _Server(config, app, lambda url: (urls.append(url), ready.set()))
    thread = threading.Thread(target=server.run, name="flagopt-serve", daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("the server did not start within 30 s")

    def stop() -> None:
        server.should_exit = True
        thread.join(30)

    return urls[0], stop
