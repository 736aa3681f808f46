"""Serving under load: ``flagopt serve`` against one-at-a-time transformers and static batches.

    python benchmarks/serve_bench.py --model opt-125m --requests 200 --rate 8

One fixed, seeded trace (Poisson arrivals at ``--rate`` requests/s; prompt and output lengths
drawn uniformly from ``--prompt-len`` and ``--output-len``; random in-vocabulary prompt ids)
is replayed against three engines, each in its own fresh process, one after another:

* **flagopt serve**: the real ``flagopt serve`` command (continuous batching, ``--batch-size``
  rows), driven by an ``httpx.AsyncClient`` that sends each request at its arrival time,
  streaming, greedy, ``ignore_eos``; TTFT is the first SSE frame with text.
* **transformers**: ``OPTForCausalLM.generate`` serving the trace one request at a time in
  arrival order (a request starts when it has arrived and the previous one is done), greedy,
  ``min_new_tokens = max_new_tokens``; times from a streamer.
* **flagopt static**: fixed groups of ``--batch-size`` consecutive requests through
  ``iter_generate`` (the loop behind ``Predictor``), left-padded, EOS off; a group starts
  when its last member has arrived and the previous group is done, and runs to its longest
  output. A request's first token is the group's first step and it counts as done at the step
  that produced its own last token (the best a static batch can do, had it streamed).

Every engine uses the same dtype and produces exactly each request's output length (checked).
Figures per engine: throughput (generated tokens / (last completion - first arrival)), TTFT
and latency p50/p99 (both from the request's arrival, queueing included). The table is printed
and a JSON file (every request's times, the trace's seed, machine, command) is written to
``--out`` (default ``benchmarks/runs/``). A benchmark, not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):  # flagopt from this checkout; the sibling modules
    if _path not in sys.path:
        sys.path.insert(0, _path)

import bench  # noqa: E402  (worker_env, machine_info, log)
import checkpoints  # noqa: E402

ENGINES = ("flagopt-serve", "transformers", "flagopt-static")
VOCAB = 50265  # ids below this are real tokens of OPT's vocabulary
START_DELAY_S = 0.5  # between "ready" and the first arrival, so the clocks line up


# ---- the trace ---------------------------------------------------------------------------------

def make_trace(n: int, rate: float, prompt_len: tuple[int, int], output_len: tuple[int, int],
               seed: int) -> list[dict]:
    """``n`` requests: arrival (s from the start, Poisson at ``rate``/s), prompt ids, output
    length. The same ``seed`` gives the same trace on every machine."""
    rng = random.Random(seed)
    trace, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        length = rng.randint(*prompt_len)
        prompt = [2] + [rng.randrange(4, VOCAB) for _ in range(length - 1)]  # OPT's </s> first
        trace.append({"id": i, "arrival_s": t, "prompt": prompt,
                      "max_tokens": rng.randint(*output_len)})
    return trace


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated ``q``-th percentile (numpy's default), None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(trace: list[dict], records: list[dict]) -> dict:
    """Throughput and TTFT/latency percentiles from per-request times (relative to t0)."""
    by_id = {r["id"]: r for r in records}
    ttft = [by_id[q["id"]]["first_s"] - q["arrival_s"] for q in trace]
    latency = [by_id[q["id"]]["done_s"] - q["arrival_s"] for q in trace]
    tokens = sum(by_id[q["id"]]["tokens"] for q in trace)
    span = max(r["done_s"] for r in records) - min(q["arrival_s"] for q in trace)
    return {"requests": len(trace), "generated_tokens": tokens, "span_s": span,
            "throughput_tok_s": tokens / span,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "latency_p50_s": percentile(latency, 50), "latency_p99_s": percentile(latency, 99)}


def _check_tokens(engine: str, request: dict, got: int) -> None:
    if got != request["max_tokens"]:
        raise RuntimeError(f"{engine}: request {request['id']} got {got} tokens, expected "
                           f"{request['max_tokens']} (EOS must not stop a benchmark request)")


# ---- engines in worker processes ---------------------------------------------------------------

def _torch_setup(spec: dict):
    import torch

    torch.set_num_threads(spec["threads"])
    return torch, getattr(torch, spec["dtype"])


def _wait_until(t0: float, at: float) -> None:
    delay = t0 + at - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def transformers_worker(spec: dict) -> dict:
    """One request at a time, in arrival order, with ``generate`` and a timing streamer."""
    torch, dtype = _torch_setup(spec)
    from transformers import OPTForCausalLM
    from transformers.generation.streamers import BaseStreamer

    model = OPTForCausalLM.from_pretrained(spec["checkpoint"], dtype=dtype,
                                           attn_implementation="sdpa").eval()

    class Clock(BaseStreamer):
        """generate() puts the prompt first, then each new token."""

        def __init__(self) -> None:
            self.puts, self.first = 0, None

        def put(self, value) -> None:
            self.puts += 1
            if self.puts == 2:
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    def run(prompt: list[int], n: int, streamer=None) -> int:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=1, streamer=streamer)
        return out.shape[1] - ids.shape[1]

    run([2, 100, 200], 2)  # warm-up, not timed
    records, t0 = [], time.perf_counter() + START_DELAY_S
    for request in spec["trace"]:
        _wait_until(t0, request["arrival_s"])
        clock = Clock()
        got = run(request["prompt"], request["max_tokens"], clock)
        done = time.perf_counter()
        _check_tokens("transformers", request, got)
        records.append({"id": request["id"], "first_s": clock.first - t0, "done_s": done - t0,
                        "tokens": got})
    return {"status": "ok", "records": records}


def static_worker(spec: dict) -> dict:
    """Fixed groups of ``batch_size`` in arrival order through ``iter_generate``."""
    torch, dtype = _torch_setup(spec)
    from flagopt.model.loading import load_pretrained
    from flagopt.predictor.generation import iter_generate
    from flagopt.predictor.params import GenerationParams

    model = load_pretrained(spec["checkpoint"], dtype=dtype, device="cpu").eval()
    cache_dtype = spec["cache_dtype"]

    def steps(prompts: list[list[int]], n: int):
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[1] * (width - len(p)) + p for p in prompts])  # left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        params = GenerationParams(max_new_tokens=n, strategy="greedy", eos_token_ids=())
        return iter_generate(model, ids, mask, params, cache_dtype=cache_dtype)

    for _ in steps([[2, 100, 200], [2, 300]], 2):  # warm-up, not timed
        pass
    trace, size = spec["trace"], spec["batch_size"]
    records, t0 = [], time.perf_counter() + START_DELAY_S
    for start in range(0, len(trace), size):
        group = trace[start:start + size]
        _wait_until(t0, max(r["arrival_s"] for r in group))
        longest = max(r["max_tokens"] for r in group)
        times = [time.perf_counter() for _ in steps([r["prompt"] for r in group], longest)]
        if len(times) != longest:
            raise RuntimeError(f"flagopt-static: a group ran {len(times)} steps, expected "
                               f"{longest}")
        for r in group:
            records.append({"id": r["id"], "first_s": times[0] - t0,
                            "done_s": times[r["max_tokens"] - 1] - t0,
                            "tokens": r["max_tokens"]})
    return {"status": "ok", "records": records}


def serve_worker(spec: dict) -> dict:
    """Start ``flagopt serve`` in its own process, replay the trace with an async client."""
    command = [sys.executable, "-m", "flagopt.cli", "serve", spec["checkpoint"], "--port", "0",
               "--served-model-name", "bench", "--max-batch-size", str(spec["batch_size"]),
               "--max-queue", str(len(spec["trace"]) + 1), "--dtype", spec["dtype"],
               "--device", "cpu", "--offline", "--quiet"]
    if spec["cache_dtype"]:
        command += ["--cache-dtype", spec["cache_dtype"]]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=bench.worker_env(spec["threads"]), cwd=ROOT,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()  # one line once it listens (empty if it died)
        if " at http" not in line:
            raise RuntimeError(f"flagopt serve did not start: {proc.stderr.read()[-3000:]}")
        url = line.split(" at ")[1].split("/v1")[0]
        records = asyncio.run(_replay(url, spec["trace"]))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"status": "ok", "records": records, "command": shlex.join(command[1:])}


async def _replay(url: str, trace: list[dict]) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(trace) + 1, max_keepalive_connections=len(trace))
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        await _complete(client, {"id": -1, "arrival_s": 0.0, "prompt": [2, 100, 200],
                                 "max_tokens": 2}, time.perf_counter())  # warm-up
        t0 = time.perf_counter() + START_DELAY_S
        return list(await asyncio.gather(*(_complete(client, r, t0) for r in trace)))


async def _complete(client, request: dict, t0: float) -> dict:
    """One streamed completion sent at its arrival time; its first-text and done times."""
    delay = t0 + request["arrival_s"] - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    body = {"model": "bench", "prompt": request["prompt"], "max_tokens": request["max_tokens"],
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    first, tokens = None, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"request {request['id']}: HTTP {response.status_code} "
                               f"{(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            frame = json.loads(line[6:])
            if "error" in frame:
                raise RuntimeError(f"request {request['id']}: {frame['error']}")
            if first is None and any(c.get("text") for c in frame.get("choices", [])):
                first = time.perf_counter()
            if frame.get("usage"):
                tokens = frame["usage"]["completion_tokens"]
    done = time.perf_counter()
    if request["id"] >= 0:
        _check_tokens("flagopt-serve", request, tokens)
    return {"id": request["id"], "first_s": (first or done) - t0, "done_s": done - t0,
            "tokens": tokens}


WORKERS = {"flagopt-serve": serve_worker, "transformers": transformers_worker,
           "flagopt-static": static_worker}


def run_worker(engine: str, spec: dict, timeout: float) -> dict:
    """``serve_bench.py --worker ENGINE`` in a fresh process (spec on stdin); its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=bench.worker_env(spec["threads"]), start_new_session=True)
    try:
        out, err = proc.communicate(json.dumps(spec), timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s",
                "stderr_tail": err[-3000:]}
    lines = [line for line in out.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        return {"status": "failed", "reason": f"exit code {proc.returncode}",
                "stderr_tail": err[-3000:]}
    result = json.loads(lines[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def worker_main(engine: str) -> int:
    import contextlib
    import traceback

    spec = json.loads(sys.stdin.read())
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = WORKERS[engine](spec)
    except Exception:  # the parent reports the traceback's tail
        traceback.print_exc()
        return 1
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


# ---- the report --------------------------------------------------------------------------------

def ratios(results: dict) -> dict:
    """flagopt serve against each peer: throughput ×, and the TTFT/latency p99 quotients."""
    serve = results.get("flagopt-serve", {}).get("summary")
    out = {}
    for peer in ("transformers", "flagopt-static"):
        other = results.get(peer, {}).get("summary")
        if serve and other:
            out[peer] = {"throughput_x": serve["throughput_tok_s"] / other["throughput_tok_s"],
                         "ttft_p99_x": other["ttft_p99_s"] / serve["ttft_p99_s"],
                         "latency_p99_x": other["latency_p99_s"] / serve["latency_p99_s"]}
    return out


def table(doc: dict) -> str:
    rows = ["| engine | generated tok/s | × transformers | TTFT p50 ms | TTFT p99 ms | "
            "latency p50 s | latency p99 s |", "|---|---|---|---|---|---|---|"]
    base = doc["results"].get("transformers", {}).get("summary")
    for engine in doc["engines"]:
        result = doc["results"][engine]
        s = result.get("summary")
        if not s:
            rows.append(f"| {engine} | {result['status']}: {result.get('reason')} | | | | | |")
            continue
        x = f"{s['throughput_tok_s'] / base['throughput_tok_s']:.2f}×" if base else "-"
        rows.append(f"| {engine} | {s['throughput_tok_s']:.1f} | {x} | "
                    f"{s['ttft_p50_s'] * 1e3:.0f} | {s['ttft_p99_s'] * 1e3:.0f} | "
                    f"{s['latency_p50_s']:.2f} | {s['latency_p99_s']:.2f} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="opt-125m", choices=sorted(checkpoints.MODELS))
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second")
    p.add_argument("--prompt-len", default="16,256", help="MIN,MAX prompt tokens (uniform)")
    p.add_argument("--output-len", default="16,128", help="MIN,MAX output tokens (uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16,
                   help="server rows (--max-batch-size) and the static groups' size")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--cache-dtype", default=None,
                   help="flagopt's KV cache dtype (default: float32 for half precision, as "
                        "bench.py measures on CPU)")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per engine process")
    p.add_argument("--work-dir", default="bench_out")
    p.add_argument("--out", default=str(HERE / "runs"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("prompt_len", "output_len"):
        try:
            low, high = (int(x) for x in getattr(args, name).split(","))
        except ValueError:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)!r}; expected MIN,MAX")
        if not 1 <= low <= high:
            p.error(f"--{name.replace('_', '-')}={low},{high}; expected 1 <= MIN <= MAX")
        setattr(args, name, (low, high))
    args.engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown:
        p.error(f"--engines: unknown {unknown}; expected some of {list(ENGINES)}")
    if args.cache_dtype is None and args.dtype != "float32":
        args.cache_dtype = "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    checkpoint = bench_checkpoint(args)
    trace = make_trace(args.requests, args.rate, args.prompt_len, args.output_len, args.seed)
    doc = {"command": shlex.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "machine": bench.machine_info(args), "settings": {
               k: v for k, v in vars(args).items() if k != "worker"},
           "trace": {"seed": args.seed, "requests": len(trace),
                     "prompt_tokens": sum(len(r["prompt"]) for r in trace),
                     "output_tokens": sum(r["max_tokens"] for r in trace),
                     "last_arrival_s": trace[-1]["arrival_s"]},
           "engines": args.engines, "results": {}}
    spec = {"checkpoint": str(checkpoint), "trace": trace, "dtype": args.dtype,
            "cache_dtype": args.cache_dtype, "batch_size": args.batch_size,
            "threads": args.threads}
    for engine in args.engines:
        bench.log(f"{engine}: replaying {len(trace)} requests")
        result = run_worker(engine, spec, args.timeout)
        if result["status"] == "ok":
            result["summary"] = summarize(trace, result["records"])
        else:
            bench.log(f"{engine} failed: {result['reason']}\n{result.get('stderr_tail', '')}")
        doc["results"][engine] = result
    doc["machine"]["loadavg_end"] = os.getloadavg()[0]
    doc["ratios"] = ratios(doc["results"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serve-bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=1))
    print(table(doc))
    for peer, r in doc["ratios"].items():
        print(f"flagopt-serve vs {peer}: throughput {r['throughput_x']:.2f}×, "
              f"TTFT p99 {r['ttft_p99_x']:.2f}× lower, latency p99 {r['latency_p99_x']:.2f}× "
              f"lower")
    print(f"wrote {path}")
    return 0 if all(r["status"] == "ok" for r in doc["results"].values()) else 1


def bench_checkpoint(args: argparse.Namespace) -> Path:
    """The model's cached random checkpoint (``bench.py``'s, written in a worker if missing)."""
    ns = argparse.Namespace(work_dir=args.work_dir, layout="bin", prepare_timeout=3600,
                            threads=args.threads)
    return bench.prepare_checkpoint(ns, args.model)


if __name__ == "__main__":
    sys.exit(main())
