"""The engine loop: one thread owns the model and the scheduler and steps it while there is work.

Other threads (the HTTP server's event loop) only ``submit`` and ``abort``; both go through an
inbox the loop drains before each step, so no lock is held while the model runs. Each
request's events go to the ``on_event`` callback given with it, called on the engine thread.
If the loop itself dies, ``healthy`` turns False and every request still here gets an error
event.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from flagopt.serve.scheduler import Event, QueueFullError, Request, Scheduler

logger = logging.getLogger(__name__)

EventCallback = Callable[[Event], None]


class Engine:
    """Runs a ``Scheduler`` on its own thread; ``submit`` / ``abort`` from any thread."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.healthy = True
        self.prompt_tokens = 0  # counters for /metrics, written by the engine thread
        self.generated_tokens = 0
        self._callbacks: dict[str, EventCallback] = {}
        self._inbox: list[tuple[str, object]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="flagopt-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop after the current step (work still here is dropped)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def num_waiting(self) -> int:
        """Requests queued for rows, including those not yet handed to the scheduler."""
        with self._wake:
            queued = sum(1 for kind, _ in self._inbox if kind == "add")
        return self.scheduler.num_waiting + queued

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    def submit(self, request: Request, on_event: EventCallback) -> None:
        """Queue ``request``; its events go to ``on_event`` (on the engine thread).

        Raises:
            QueueFullError: ``max_queue`` requests are waiting.
            RuntimeError: the engine is not running.
        """
        if not self.healthy or self._stopping:
            raise RuntimeError("the engine is not running")
        with self._wake:
            queued = sum(1 for kind, _ in self._inbox if kind == "add")
            if self.scheduler.num_waiting + queued >= self.scheduler.max_queue:
                raise QueueFullError(f"{self.scheduler.num_waiting + queued} requests are "
                                     f"waiting (max_queue={self.scheduler.max_queue})")
            self._callbacks[request.request_id] = on_event
            self._inbox.append(("add", request))
            self._wake.notify()

    def abort(self, request_id: str) -> None:
        """Drop a request (a client went away); its row is freed before the next step."""
        with self._wake:
            self._callbacks.pop(request_id, None)
            self._inbox.append(("abort", request_id))
            self._wake.notify()

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._inbox \
                            and not self.scheduler.has_work:
                        self._wake.wait()
                    if self._stopping:
                        return
                    inbox, self._inbox = self._inbox, []
                self._apply(inbox)
                if self.scheduler.has_work:
                    self._dispatch(self.scheduler.step())
        except Exception:
            logger.exception("the engine loop died")
            self.healthy = False
            with self._wake:
                callbacks, self._callbacks = self._callbacks, {}
            for request_id, callback in callbacks.items():
                callback(Event(request_id, 0, finish_reason="error",
                               error="the engine stopped"))

    def _apply(self, inbox: list[tuple[str, object]]) -> None:
        for kind, item in inbox:
            if kind == "abort":
                self.scheduler.abort(item)
                continue
            try:
                self.scheduler.add(item)
            except (QueueFullError, ValueError) as exc:
                self._dispatch([Event(item.request_id, k, finish_reason="error",
                                      error=str(exc)) for k in range(item.n)])
            else:
                self.prompt_tokens += len(item.prompt_ids)

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            self.generated_tokens += len(event.token_ids)
            with self._wake:
                callback = self._callbacks.get(event.request_id)
            if callback is not None:
                callback(event)
