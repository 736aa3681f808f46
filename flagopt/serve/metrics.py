"""Prometheus text exposition for /metrics, written by hand (no client library needed).

Gauges of requests running and waiting, counters of prompt and generated tokens and of
finished requests, histograms of time to first token and end-to-end latency and, with a
draft model, its proposed and accepted tokens, named as vLLM names them (``vllm:`` becomes
``flagopt:``).
"""

from __future__ import annotations

import bisect
import threading

from flagopt.predictor.engine import SpeculativeStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Cumulative buckets, a sum and a count; ``observe`` is thread-safe."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        out, running = [], 0
        for bound, count in zip((*map(repr, self.buckets), "+Inf"), counts):
            running += count
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {running}')
        out += [f"{name}_sum{{{labels}}} {total!r}", f"{name}_count{{{labels}}} {running}"]
        return out


class Metrics:
    """What the server counts besides the engine's own token counters."""

    def __init__(self) -> None:
        self.ttft = Histogram()
        self.latency = Histogram()
        self.finished: dict[str, int] = {}
        self._lock = threading.Lock()

    def request_done(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def render(self, model: str, running: int, waiting: int, prompt_tokens: int,
               generated_tokens: int, speculative: SpeculativeStats | None = None) -> str:
        """The exposition text (``text/plain; version=0.0.4``); ``speculative``: the draft's
        counters, when the server has one."""
        labels = f'model_name="{_escape(model)}"'
        lines = [
            "# HELP flagopt:num_requests_running Requests decoding in the batch.",
            "# TYPE flagopt:num_requests_running gauge",
            f"flagopt:num_requests_running{{{labels}}} {running}",
            "# HELP flagopt:num_requests_waiting Requests waiting for a row.",
            "# TYPE flagopt:num_requests_waiting gauge",
            f"flagopt:num_requests_waiting{{{labels}}} {waiting}",
            "# HELP flagopt:prompt_tokens_total Prompt tokens admitted.",
            "# TYPE flagopt:prompt_tokens_total counter",
            f"flagopt:prompt_tokens_total{{{labels}}} {prompt_tokens}",
            "# HELP flagopt:generation_tokens_total Tokens generated.",
            "# TYPE flagopt:generation_tokens_total counter",
            f"flagopt:generation_tokens_total{{{labels}}} {generated_tokens}",
            "# HELP flagopt:request_success_total Requests finished, by finish reason.",
            "# TYPE flagopt:request_success_total counter",
        ]
        with self._lock:
            finished = dict(self.finished)
        for reason, count in sorted(finished.items()):
            lines.append(f'flagopt:request_success_total{{{labels},finished_reason='
                         f'"{_escape(reason)}"}} {count}')
        for name, hist, what in (("time_to_first_token_seconds", self.ttft,
                                  "Time to first token."),
                                 ("e2e_request_latency_seconds", self.latency,
                                  "End-to-end request latency.")):
            lines += [f"# HELP flagopt:{name} {what}", f"# TYPE flagopt:{name} histogram"]
            lines += hist.lines(f"flagopt:{name}", labels)
        if speculative is not None:
            for name, value, what in (
                    ("num_draft_tokens", speculative.proposed, "Draft tokens proposed."),
                    ("num_accepted_tokens", speculative.accepted,
                     "Draft tokens the target accepted.")):
                lines += [f"# HELP flagopt:spec_decode_{name}_total {what}",
                          f"# TYPE flagopt:spec_decode_{name}_total counter",
                          f"flagopt:spec_decode_{name}_total{{{labels}}} {value}"]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
