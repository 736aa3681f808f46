"""flagopt against its peers (transformers, CTranslate2) on random-weight OPT checkpoints.

    python benchmarks/bench.py [--models opt-125m,opt-1.3b] [--device cpu] [--dtypes ...]
        [--quantize int8,w8a8] [--draft int8,opt-125m] [--peers transformers,ctranslate2]
        [--out benchmarks/results] [--repeats 3] [--quick]

Every measurement runs in a fresh process (``bench.py --worker SPEC`` prints one JSON line),
configurations are interleaved round-robin across engines and repeated, and the report gives
medians and ratios: the machines this runs on are shared, so only side-by-side ratios from one
run mean anything. See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):  # flagopt from this checkout; the sibling modules
    if _path not in sys.path:
        sys.path.insert(0, _path)

import checkpoints  # noqa: E402
import report  # noqa: E402
from worker import MEASURE_METRICS  # noqa: E402

ENGINES = ("flagopt", "transformers", "ctranslate2")
_TAIL_CHARS = 3000


# ---- command line ----------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help=f"comma-separated, from {list(checkpoints.MODELS)} "
                   f"(default {','.join(checkpoints.DEFAULT_MODELS)}; 'tiny' with --quick)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtypes", help="float32,bfloat16,float16 (default float32,bfloat16 on "
                   "cpu, float16 on cuda)")
    p.add_argument("--quantize", default="",
                   help="also run flagopt quantized: int8 (weight-only) and/or w8a8 (int8 "
                        "activations in products of 2+ rows), comma-separated")
    p.add_argument("--int8-compute-dtype", help="activation dtype of flagopt's int8 runs "
                   "(default bfloat16 on cpu, float16 on cuda)")
    p.add_argument("--draft", help="speculative decoding, batch-1 greedy: 'int8' (the "
                   "target's own int8 weights) and/or draft models from the --models list, "
                   "comma-separated; transformers' assisted generation (assistant_model=) "
                   "with the same draft is the peer")
    p.add_argument("--hf-assistant", help="the assistant model of transformers' peer of "
                   "--draft int8, which it cannot use (default opt-125m; tiny with --quick)")
    p.add_argument("--peers", default="transformers,ctranslate2",
                   help="comma-separated peers; '' or 'none' for none")
    p.add_argument("--only-flagopt", action="store_true", help="no peers")
    p.add_argument("--out", default=str(HERE / "results"), help="where the .json/.md go")
    p.add_argument("--work-dir", default=str(ROOT / "bench_out"),
                   help="cache of generated checkpoints and conversions")
    p.add_argument("--layout", default="bin", choices=("bin", "safetensors"))
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per config")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny model, a few tokens, small batches")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="intra-op threads of every engine (default: the CPUs this may use)")
    p.add_argument("--prompt-len", type=int, help="batch-1 and batch prompt length (32)")
    p.add_argument("--new-tokens", type=int,
                   help="batch-1 new tokens (128; 16 for opt-6.7b/13b)")
    p.add_argument("--batch-sizes", help="batched throughput sizes (8,32)")
    p.add_argument("--batch-new-tokens", type=int, help="new tokens per row when batched (128)")
    p.add_argument("--prefill-len", type=int, help="prefill prompt length (512)")
    p.add_argument("--metrics", help=f"subset of {','.join(MEASURE_METRICS)} (default all; "
                   f"ttft,decode for opt-6.7b/13b); load and memory are always measured")
    p.add_argument("--flagopt-options", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to load_pretrained / iter_generate, whichever accepts it "
                   "(repeatable; values parsed as JSON when they parse, e.g. compile=true)")
    p.add_argument("--timeout", type=float, help="seconds per measurement worker (1800)")
    p.add_argument("--prepare-timeout", type=float, default=7200,
                   help="seconds per checkpoint generation or conversion worker")
    p.add_argument("--membw-mib", type=int, help="tensor size of the bandwidth test (1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        _defaults(args, p)
    return args


def _defaults(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    quick = args.quick
    cuda = args.device.startswith("cuda")
    args.models = _csv(args.models) or (["tiny"] if quick else list(checkpoints.DEFAULT_MODELS))
    for name in args.models:
        checkpoints.model_spec(name)
    args.dtypes = _csv(args.dtypes) or (["float16"] if cuda else ["float32", "bfloat16"])
    bad = [d for d in args.dtypes if d not in ("float32", "float16", "bfloat16")]
    if bad:
        p.error(f"--dtypes {bad}: expected float32, float16 or bfloat16")
    args.quantize = _csv(args.quantize)
    bad = [m for m in args.quantize if m not in ("int8", "w8a8")]
    if bad:
        p.error(f"--quantize {bad}: expected int8 and/or w8a8")
    args.int8_compute_dtype = args.int8_compute_dtype or ("float16" if cuda else "bfloat16")
    args.draft = _csv(args.draft)
    for name in args.draft:
        if name != "int8":
            checkpoints.model_spec(name)
    args.hf_assistant = args.hf_assistant or ("tiny" if quick else "opt-125m")
    checkpoints.model_spec(args.hf_assistant)
    peers = [] if args.only_flagopt else \
        [x for x in _csv(args.peers) if x.lower() != "none"]
    if any(x not in ENGINES[1:] for x in peers):
        p.error(f"--peers {peers}: expected some of {list(ENGINES[1:])}")
    args.peers = peers
    args.explicit_new_tokens = args.new_tokens is not None
    args.explicit_metrics = args.metrics is not None
    small = dict(prompt_len=8, new_tokens=8, batch_sizes="2,4", batch_new_tokens=4,
                 prefill_len=32, timeout=300.0, membw_mib=64)
    full = dict(prompt_len=32, new_tokens=128, batch_sizes="8,32", batch_new_tokens=128,
                prefill_len=512, timeout=1800.0, membw_mib=1024)
    for key, value in (small if quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.batch_sizes = [int(x) for x in _csv(args.batch_sizes)]
    args.metrics = _csv(args.metrics) or list(MEASURE_METRICS)
    if any(m not in MEASURE_METRICS for m in args.metrics):
        p.error(f"--metrics {args.metrics}: expected some of {list(MEASURE_METRICS)}")
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: expected >= 1")
    args.flagopt_options = _options(args.flagopt_options, p)


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _options(items: list[str], p: argparse.ArgumentParser) -> dict:
    out = {}
    for item in itertools.chain.from_iterable(_csv(i) for i in items):
        key, eq, value = item.partition("=")
        if not eq or not key:
            p.error(f"--flagopt-options {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# ---- fresh worker processes ------------------------------------------------------------------

def worker_env(threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="false")
    return env


def run_worker(spec: dict, timeout: float, threads: int) -> dict:
    """Run ``bench.py --worker SPEC`` in a fresh process; its result, or why it failed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=worker_env(threads), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return _failure(f"timed out after {timeout:.0f} s (--timeout)", err, start)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode != 0:
        return _failure(f"exit code {proc.returncode}: {_last_line(err)}", err, start)
    lines = [line for line in out.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return _failure("the worker printed no JSON result line", err, start)
    result["wall_s"] = time.perf_counter() - start
    return result


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "(no stderr)"


def _failure(reason: str, stderr: str, start: float) -> dict:
    return {"status": "failed", "reason": reason, "stderr_tail": stderr[-_TAIL_CHARS:],
            "wall_s": time.perf_counter() - start}


def worker_main(spec_text: str) -> int:
    import traceback

    import worker
    spec = json.loads(spec_text)
    try:
        result = worker.run(spec)
    except Exception:  # the parent reports the traceback's tail
        traceback.print_exc()
        return 1
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# ---- planning: checkpoints, conversions, configurations ---------------------------------------

def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_checkpoint(args: argparse.Namespace, name: str) -> Path:
    """The model's cached checkpoint, generated shard by shard (in a worker) when missing."""
    spec = checkpoints.model_spec(name)
    directory = checkpoints.checkpoint_dir(Path(args.work_dir), name, args.layout)
    if checkpoints.is_complete(directory,
                               checkpoints.checkpoint_description(name, spec, args.layout)):
        return directory
    needed = checkpoints.checkpoint_bytes(spec)
    checkpoints.check_free_disk(directory.parent, needed, f"the fp16 {name} checkpoint")
    log(f"writing a random {name} checkpoint ({needed / 1e9:.1f} GB, {spec.num_shards} "
        f"shard(s)) to {directory}")
    result = run_worker({"task": "prepare", "model": name, "directory": str(directory),
                         "layout": args.layout}, args.prepare_timeout, args.threads)
    if result["status"] != "ok":
        raise RuntimeError(f"checkpoint generation failed: {result['reason']}\n"
                           f"{result.get('stderr_tail', '')}")
    return directory


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_guard(args: argparse.Namespace, name: str, dtype: str) -> str | None:
    """Why a configuration would not fit in RAM (CPU runs), or None."""
    if args.device != "cpu":
        return None
    needed = checkpoints.model_spec(name).num_parameters() * checkpoints.DTYPE_BYTES[dtype]
    available = mem_available()
    if available is not None and needed > 0.9 * available:
        return (f"needs about {needed / 1e9:.1f} GB of weights in {dtype}, only "
                f"{available / 1e9:.1f} GB of RAM available")
    return None


def ct2_compute_type(variant: str, device: str) -> str:
    if variant == "int8":
        return "int8_float16" if device.startswith("cuda") else "int8"
    return variant


def ct2_unavailable(args: argparse.Namespace, variant: str) -> str | None:
    try:
        import ctranslate2
    except ImportError as exc:
        return f"ctranslate2 is not importable ({exc})"
    from engines import ct2_device
    device, _ = ct2_device(args.device)
    supported = ctranslate2.get_supported_compute_types(device)
    compute = ct2_compute_type(variant, device)
    if compute not in supported:
        return f"compute type {compute} is not supported on this {device} " \
               f"(supported: {', '.join(sorted(supported))})"
    return None


def prepare_ct2(args: argparse.Namespace, name: str, checkpoint: Path, variant: str
                ) -> tuple[Path | None, str | None, float | None]:
    """The converted model (converted once, then cached), or why there is none."""
    directory = checkpoints.ct2_dir(Path(args.work_dir), name, args.layout, variant)
    if checkpoints.is_complete(directory, checkpoints.ct2_description(checkpoint, variant)):
        return directory, None, None
    spec = checkpoints.model_spec(name)
    try:
        checkpoints.check_free_disk(directory.parent, spec.num_parameters() *
                                    checkpoints.DTYPE_BYTES[variant], f"the {variant} "
                                    f"CTranslate2 conversion of {name}")
    except OSError as exc:
        return None, str(exc), None
    log(f"converting {name} for CTranslate2 ({variant})")
    result = run_worker({"task": "convert", "checkpoint": str(checkpoint),
                         "directory": str(directory), "quantization": variant},
                        args.prepare_timeout, args.threads)
    if result["status"] != "ok":
        return None, f"conversion failed: {result['reason']}", None
    return directory, None, result["seconds"]


def model_settings(args: argparse.Namespace, name: str) -> dict:
    big = checkpoints.model_spec(name).big
    return {
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens if args.explicit_new_tokens or not big
        else min(args.new_tokens, 16),
        "batch_sizes": args.batch_sizes, "batch_new_tokens": args.batch_new_tokens,
        "prefill_len": args.prefill_len,
        "metrics": args.metrics if args.explicit_metrics or not big else ["ttft", "decode"],
    }


def draft_models(args: argparse.Namespace) -> list[str]:
    """The checkpoints speculative runs need as drafts (flagopt's and transformers')."""
    names = [d for d in args.draft if d != "int8"]
    if "int8" in args.draft and "transformers" in args.peers:
        names.append(args.hf_assistant)
    return list(dict.fromkeys(names))


def speculative_configs(args: argparse.Namespace, drafts: dict[str, Path]
                        ) -> dict[str, list[dict]]:
    """flagopt with each ``--draft`` and transformers' assisted generation with the same
    draft model (with ``--hf-assistant`` for the int8 self-draft), per dtype; batch-1 only
    (assisted generation takes one sequence)."""
    metrics = [m for m in ("ttft", "decode") if m in args.metrics] or ["ttft", "decode"]
    flag, peer = [], []
    for d in args.dtypes:
        for draft in args.draft:
            if draft == "int8":
                spec = {"kind": "int8", "compute_dtype": args.int8_compute_dtype}
                label = f"{d} + draft int8 ({args.int8_compute_dtype} act.)"
                assistant = args.hf_assistant
            else:
                spec = {"kind": "model", "name": draft, "checkpoint": _path(drafts, draft)}
                label, assistant = f"{d} + draft {draft}", draft
            flag.append(dict(variant=f"{d}+draft-{draft}", label=label, compute_dtype=d,
                             draft=spec, metrics=metrics))
            hf = dict(engine="transformers", variant=f"{d}+assistant-{assistant}",
                      label=f"{d} + assistant {assistant}", compute_dtype=d, metrics=metrics,
                      draft={"kind": "model", "name": assistant,
                             "checkpoint": _path(drafts, assistant)})
            if "transformers" in args.peers and hf not in peer:
                peer.append(hf)
    return {"flagopt": flag, "transformers": peer}


def _path(drafts: dict[str, Path], name: str) -> str | None:
    return str(drafts[name]) if name in drafts else None


def plan_model(args: argparse.Namespace, name: str, checkpoint: Path,
               drafts: dict[str, Path] | None = None) -> list[dict]:
    """Every (engine, variant) configuration of one model, interleaved across engines."""
    spec = checkpoints.model_spec(name)
    settings = model_settings(args, name)
    base = dict(task="measure", model=name, checkpoint=str(checkpoint), device=args.device,
                threads=args.threads, seed=args.seed, **settings)
    per_engine: dict[str, list[dict]] = {}
    flag = [dict(variant=d, label=d, compute_dtype=d) for d in args.dtypes]
    for mode in args.quantize:
        flag.append(dict(variant=mode, label=f"{mode} ({args.int8_compute_dtype} act.)",
                         compute_dtype=args.int8_compute_dtype, quantize=mode))
    speculative = speculative_configs(args, drafts or {})
    flag += speculative["flagopt"]
    per_engine["flagopt"] = [dict(c, engine="flagopt", options=args.flagopt_options)
                             for c in flag]
    if "transformers" in args.peers:
        per_engine["transformers"] = [dict(engine="transformers", variant=d, label=d,
                                           compute_dtype=d) for d in args.dtypes]
        per_engine["transformers"] += speculative["transformers"]
    if "ctranslate2" in args.peers:
        variants = list(dict.fromkeys([*args.dtypes, "int8"]))
        per_engine["ctranslate2"] = [dict(engine="ctranslate2", variant=v, label=v,
                                          ct2_compute_type=ct2_compute_type(v, args.device))
                                     for v in variants]
    configs = []
    for row in itertools.zip_longest(*per_engine.values()):
        for c in filter(None, row):
            configs.append(_config(args, name, spec, dict(base, **c)))
    return configs


def _config(args: argparse.Namespace, name: str, spec: checkpoints.ModelSpec,
            worker_spec: dict) -> dict:
    engine, variant = worker_spec["engine"], worker_spec["variant"]
    config = {"engine": engine, "model": name, "variant": variant,
              "label": worker_spec["label"], "spec": worker_spec, "status": "pending",
              "reason": None, "samples": [], "failures": [], "median": {}}
    reason = memory_guard(args, name, variant.split("+")[0])  # "float32+draft-int8" too
    draft = worker_spec.get("draft") or {}
    if reason is None and draft.get("kind") == "model" and not draft.get("checkpoint"):
        reason = f"the draft checkpoint {draft['name']} could not be prepared"
    if reason is None and engine == "ctranslate2":
        reason = ct2_unavailable(args, variant)
        if reason is None:
            path, reason, seconds = prepare_ct2(args, name, Path(worker_spec["checkpoint"]),
                                                variant)
            worker_spec["ct2_model"] = str(path) if path else None
            worker_spec["position_fraction"] = spec.position_parameters() / \
                spec.num_parameters()
            config["conversion_s"] = seconds
    if reason is None and engine == "flagopt":  # its CT2-like conversion: the prepared cache
        result = run_worker(dict(worker_spec, task="flagopt_prepare"), args.timeout,
                            args.threads)
        config["conversion_s"] = result.get("seconds")
    if reason:
        config.update(status="unavailable", reason=reason)
    return config


# ---- the run ---------------------------------------------------------------------------------

def run_round(args: argparse.Namespace, configs: list[dict], repeat: int, doc: dict) -> None:
    membw = run_worker({"task": "membw", "device": args.device, "threads": args.threads,
                        "bytes": args.membw_mib * 2 ** 20, "runs": 5}, args.timeout,
                       args.threads)
    (doc["membw"]["samples"] if membw["status"] == "ok" else
     doc["membw"]["failures"]).append(membw)
    for model in args.models:
        todo = [c for c in configs if c["model"] == model]
        shift = repeat % len(todo) if todo else 0
        for c in todo[shift:] + todo[:shift]:  # a different engine goes first each round
            if c["status"] in ("unavailable", "failed"):
                continue
            log(f"[repeat {repeat + 1}/{args.repeats}] {c['engine']} {model} {c['label']} ...")
            result = run_worker(c["spec"], args.timeout, args.threads)
            if result["status"] == "ok":
                c["samples"].append(result)
                c["status"] = "ok"
                log(f"    ok in {result['wall_s']:.1f} s")
            else:  # not retried: reported, and this configuration is not run again
                c["failures"].append(result)
                c.update(status=result["status"], reason=result["reason"], samples=[])
                log(f"    {result['status']}: {result['reason']}")


def machine_info(args: argparse.Namespace) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            mem = int(next(line for line in fh if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "ctranslate2"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    scope: dict = {}
    exec((ROOT / "flagopt" / "version.py").read_text(), scope)
    versions["flagopt"] = scope.get("__version__")
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "mem_gib": mem / 2 ** 30, "loadavg_start": os.getloadavg()[0],
            "platform": platform.platform(), "versions": versions, "git": _git_state()}


def _git_state() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, text=True,
                               capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{' (with uncommitted changes)' if dirty else ''}" if head else None


def finish(args: argparse.Namespace, doc: dict, configs: list[dict]) -> dict:
    doc["machine"]["loadavg_end"] = os.getloadavg()[0]
    doc["membw"]["median"] = report.medians(doc["membw"]["samples"])
    gpu = next((s.get("device_name") for s in doc["membw"]["samples"]
                if s.get("device_name")), None)
    if gpu:
        doc["machine"]["gpu"] = gpu
    for c in configs:
        c["median"] = report.medians(c["samples"])
        c["spread"] = report.spreads(c["samples"])
        top, frac = report.ceiling(c, doc["membw"]["median"].get("read_gb_s"))
        c["median"]["ceiling_tok_s"], c["median"]["fraction_of_ceiling"] = top, frac
    for model in args.models:
        reference = doc.get("reference_tokens", {}).get(model)
        for c in (c for c in configs if c["model"] == model):
            c["same_tokens"] = same_tokens(c, reference)
    keys = {"b0": args.batch_sizes[0], "b1": args.batch_sizes[-1], "p": args.prefill_len}
    doc["configs"] = configs
    doc["ratios"] = {m: report.ratios([c for c in configs if c["model"] == m], keys)
                     for m in args.models}
    return doc


def _tokens(config: dict) -> list[int] | None:
    return next((s["tokens"] for s in config["samples"] if "tokens" in s), None)


def reference_tokens(args: argparse.Namespace, configs: list[dict], model: str
                     ) -> list[int] | None:
    """transformers' float32 greedy tokens of the batch-1 prompt: from its configuration in
    this run, else from a worker of its own (None when transformers cannot run)."""
    for c in configs:
        if (c["model"], c["engine"], c["variant"]) == (model, "transformers", "float32"):
            tokens = _tokens(c)
            if tokens is not None:
                return tokens
    base = next((c["spec"] for c in configs if c["model"] == model), None)
    if base is None:
        return None
    spec = dict(base, engine="transformers", variant="float32", label="float32",
                compute_dtype="float32", metrics=["ttft", "decode"])
    for key in ("draft", "options", "quantize", "ct2_model", "ct2_compute_type"):
        spec.pop(key, None)
    log(f"transformers float32 greedy tokens of {model} for the 'same tokens' column ...")
    result = run_worker(spec, args.timeout, args.threads)
    return result.get("tokens") if result["status"] == "ok" else None


def same_tokens(config: dict, reference: list[int] | None) -> dict | None:
    """Whether a configuration's batch-1 greedy tokens are transformers' float32 ones, and
    the first position where they differ."""
    tokens = _tokens(config)
    if tokens is None or reference is None:
        return None
    first = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)
    if first is None and len(tokens) != len(reference):
        first = min(len(tokens), len(reference))
    return {"same": first is None, "first_difference": first}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "command": shlex.join([Path(sys.executable).name, *sys.argv]),
           "machine": machine_info(args),
           "settings": {k: v for k, v in vars(args).items() if k != "worker"},
           "model_settings": {}, "model_errors": {},
           "membw": {"samples": [], "failures": []}}
    configs: list[dict] = []
    drafts: dict[str, Path] = {}
    for name in draft_models(args):
        try:
            drafts[name] = prepare_checkpoint(args, name)
        except (OSError, RuntimeError) as exc:
            log(f"draft {name}: not prepared: {exc}")
    for name in args.models:
        doc["model_settings"][name] = model_settings(args, name)
        try:
            checkpoint = prepare_checkpoint(args, name)
        except (OSError, RuntimeError) as exc:
            doc["model_errors"][name] = str(exc)
            log(f"{name}: not run: {exc}")
            continue
        configs += plan_model(args, name, checkpoint, drafts)
    for repeat in range(args.repeats):
        run_round(args, configs, repeat, doc)
    doc["reference_tokens"] = {name: reference_tokens(args, configs, name)
                               for name in args.models if name not in doc["model_errors"]
                               and "transformers" in args.peers}
    finish(args, doc, configs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    text = report.markdown(doc)
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)
    log(f"wrote {out / stem}.json and .md")
    return 0 if all(c["status"] != "failed" for c in configs) else 1


if __name__ == "__main__":
    sys.exit(main())
