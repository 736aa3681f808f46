"""What one fresh benchmark process does, given a JSON spec: one task, one JSON result.

Tasks: ``prepare`` (write a random checkpoint), ``convert`` (CTranslate2 conversion),
``flagopt_prepare`` (fill flagopt's prepared-weights cache), ``membw`` (the machine's memory
bandwidth) and ``measure`` (load one engine/model/dtype and
time everything once). ``bench.py --worker SPEC`` calls ``run`` and prints its result as the
last line of stdout; anything the libraries print goes to stderr meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import sys
import time
from pathlib import Path

MEASURE_METRICS = ("ttft", "decode", "batch", "prefill")


def run(spec: dict) -> dict:
    task = spec["task"]
    with contextlib.redirect_stdout(sys.stderr):
        if task == "prepare":
            from checkpoints import write_checkpoint
            start = time.perf_counter()
            write_checkpoint(spec["model"], Path(spec["directory"]), spec["layout"])
            return {"status": "ok", "seconds": time.perf_counter() - start}
        if task == "convert":
            from checkpoints import convert_ct2
            start = time.perf_counter()
            convert_ct2(Path(spec["checkpoint"]), Path(spec["directory"]),
                        spec["quantization"])
            return {"status": "ok", "seconds": time.perf_counter() - start}
        if task == "flagopt_prepare":  # one load fills the prepared cache (not measured)
            from engines import FlagoptEngine
            start = time.perf_counter()
            FlagoptEngine(spec).load()
            return {"status": "ok", "seconds": time.perf_counter() - start}
        if task == "membw":
            return memory_bandwidth(spec)
        if task == "measure":
            return measure(spec)
    raise ValueError(f"unknown worker task {task!r}")


# ---- memory -----------------------------------------------------------------------------------

def proc_status() -> dict[str, int]:
    """Current VmRSS / RssAnon / RssFile of this process in bytes (Linux), else {}."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def memory_snapshot(tag: str, device: str) -> dict[str, int]:
    """Peak RSS so far (ru_maxrss, KiB on Linux) and current RSS; GPU peak via torch."""
    snap = {f"peak_rss_{tag}_bytes": _peak_rss()}
    status = proc_status()
    snap.update({f"{k.lower()}_{tag}_bytes": v for k, v in status.items()})
    if device.startswith("cuda") and "torch" in sys.modules:
        import torch
        snap[f"gpu_max_allocated_{tag}_bytes"] = torch.cuda.max_memory_allocated(device)
    return snap


def memory_bandwidth(spec: dict) -> dict:
    """Best-of-N copy (read + write) and read-only (sum) bandwidth of a large tensor, GB/s."""
    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    n = spec["bytes"] // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def best(fn, runs: int) -> float:
        fn()
        sync()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return min(times)

    copy_s = best(lambda: dst.copy_(src), spec["runs"])
    read_s = best(lambda: src.sum(), spec["runs"])
    size = n * 4
    result = {"status": "ok", "bytes": size, "copy_gb_s": 2 * size / copy_s / 1e9,
              "read_gb_s": size / read_s / 1e9, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(device)
    return result


# ---- measurement -------------------------------------------------------------------------------

def prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    """Random in-vocabulary ids with OPT's leading ``</s>`` (2); the same for every engine."""
    rng = random.Random(seed * 1000003 + batch * 1009 + length)
    return [[2] + [rng.randrange(4, 50265) for _ in range(length - 1)] for _ in range(batch)]


def measure(spec: dict) -> dict:
    from engines import ENGINES, Unavailable

    if spec["engine"] != "ctranslate2":  # CTranslate2 does not need torch: keep its RSS clean
        import torch
        torch.set_num_threads(spec["threads"])
    engine = ENGINES[spec["engine"]](spec)
    reason = engine.unavailable()
    if reason:
        return {"status": "unavailable", "reason": reason}
    result: dict = {"threads": spec["threads"], "loadavg_start": os.getloadavg()[0]}
    result.update(memory_snapshot("baseline", spec["device"]))  # libraries imported, no model
    start = time.perf_counter()
    try:
        engine.load()
    except Unavailable as exc:
        return {"status": "unavailable", "reason": str(exc)}
    if hasattr(engine, "sync"):
        engine.sync()
    result["load_s"] = time.perf_counter() - start
    result.update(memory_snapshot("after_load", spec["device"]))
    result["weights_bytes"] = engine.weights_bytes()
    result["bytes_per_token"] = result["weights_bytes"] - engine.position_bytes()
    result.update(_timings(engine, spec))
    result.update(memory_snapshot("end", spec["device"]))
    result["loadavg_end"] = os.getloadavg()[0]
    result["status"] = "ok"
    return result


def _timings(engine, spec: dict) -> dict:
    metrics, seed = spec["metrics"], spec["seed"]
    prompt_len, n = spec["prompt_len"], spec["new_tokens"]
    out: dict = {}
    start = time.perf_counter()
    # Warm-up at the measured length, not reported: a compiled flagopt step is specialised
    # to its shapes, and every engine gets the same treatment.
    engine.generate(prompts(1, prompt_len, seed), n)
    out["warmup_s"] = time.perf_counter() - start
    if "ttft" in metrics or "decode" in metrics:
        ttft, decode = engine.stream(prompts(1, prompt_len, seed)[0], n)
        out["ttft_s"] = ttft
        out["tokens"] = list(engine.last_tokens)  # compared with transformers' float32 ones
        if engine.acceptance is not None:
            out["acceptance_rate"] = engine.acceptance
        if n > 1:
            out["decode_s"] = decode
            out["decode_tok_s"] = (n - 1) / decode
        out["peak_rss_after_decode_bytes"] = _peak_rss()
    if "batch" in metrics:
        bn = spec["batch_new_tokens"]
        for batch in spec["batch_sizes"]:
            start = time.perf_counter()
            engine.generate(prompts(batch, prompt_len, seed), bn)
            seconds = time.perf_counter() - start
            out[f"batch{batch}_s"] = seconds
            out[f"batch{batch}_tok_s"] = batch * bn / seconds
            out[f"peak_rss_after_batch{batch}_bytes"] = _peak_rss()
    if "prefill" in metrics:
        prompt = prompts(1, spec["prefill_len"], seed)[0]
        runs = []
        for _ in range(2):  # the first run at this length warms it; the second is reported
            start = time.perf_counter()
            engine.prefill(prompt)
            runs.append(time.perf_counter() - start)
        out["prefill_runs_s"] = runs
        out["prefill_tok_s"] = spec["prefill_len"] / runs[-1]
        out["peak_rss_after_prefill_bytes"] = _peak_rss()
    return out


def _peak_rss() -> int:
    """Peak RSS so far; recorded after each phase to show which one set the peak."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
