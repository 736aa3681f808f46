"""benchmarks/bench.py end to end on a tiny model: every metric reported, files written.

No timing is asserted anywhere: the numbers only have to exist (timings belong to the
benchmark's own side-by-side run, never to unit tests).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench.py"

METRICS = ("load_s", "weights_bytes", "bytes_per_token", "peak_rss_after_load_bytes",
           "peak_rss_end_bytes", "vmrss_after_load_bytes", "vmrss_end_bytes", "ttft_s",
           "decode_tok_s", "batch2_tok_s", "batch4_tok_s", "prefill_tok_s", "ceiling_tok_s",
           "fraction_of_ceiling")


def run_bench(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "out"
    cmd = [sys.executable, str(BENCH), "--quick", "--repeats", "1", "--threads", "1",
           "--out", str(out), "--work-dir", str(tmp_path / "work"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [json_file] = out.glob("*.json")
    [md_file] = out.glob("*.md")
    return json.loads(json_file.read_text()), md_file.read_text()


def test_quick_run_reports_every_metric_for_flagopt_and_transformers(tmp_path):
    pytest.importorskip("transformers")
    doc, md = run_bench(tmp_path, "--peers", "transformers", "--dtypes", "float32")
    configs = {c["engine"]: c for c in doc["configs"]}
    assert set(configs) == {"flagopt", "transformers"}
    for engine, config in configs.items():
        assert config["status"] == "ok", (engine, config["reason"], config["failures"])
        assert len(config["samples"]) == 1
        missing = [m for m in METRICS if config["median"].get(m) is None]
        assert not missing, (engine, missing)
        assert config["median"]["weights_bytes"] > 0
    assert doc["membw"]["median"]["read_gb_s"] > 0
    assert doc["membw"]["median"]["copy_gb_s"] > 0
    assert doc["machine"]["cpu"] and doc["machine"]["versions"]["torch"]
    [ratios] = doc["ratios"].values()
    assert {r["metric"] for r in ratios} >= {"decode_tok_s", "prefill_tok_s", "ttft_s"}
    assert all(r["flagopt_vs_transformers"] is not None for r in ratios)
    assert "## tiny" in md
    assert "| flagopt | float32 |" in md and "| transformers | float32 |" in md
    assert "× transformers best" in md and "% of ceiling" in md


def test_sharded_int8_only_flagopt_path(tmp_path):
    """The opt-13b path (sharded decoder.* checkpoint, int8, no peers) at a tiny size."""
    doc, md = run_bench(tmp_path, "--models", "tiny-sharded", "--quantize", "int8,w8a8",
                        "--only-flagopt", "--dtypes", "float32")
    shards = list((tmp_path / "work" / "checkpoints" / "tiny-sharded-bin").glob("*-of-*.bin"))
    assert len(shards) == 3
    configs = {c["variant"]: c for c in doc["configs"]}
    assert set(configs) == {"float32", "int8", "w8a8"}
    assert all(c["engine"] == "flagopt" for c in configs.values())
    for variant in ("float32", "int8", "w8a8"):
        assert configs[variant]["status"] == "ok", configs[variant].get("reason")
    for config in configs.values():
        if config["status"] == "ok":
            assert config["median"]["peak_rss_end_bytes"] > 0
            assert config["median"]["decode_tok_s"] > 0
    assert "int8" in md and "w8a8" in md


def test_speculative_mode_with_its_assisted_generation_peer(tmp_path):
    """--draft int8: flagopt's self-draft, transformers' assisted generation with the
    --hf-assistant model as its peer, the acceptance and the "same tokens" column."""
    pytest.importorskip("transformers")
    doc, md = run_bench(tmp_path, "--peers", "transformers", "--dtypes", "float32",
                        "--draft", "int8", "--hf-assistant", "tiny", "--metrics", "decode")
    configs = {(c["engine"], c["variant"]): c for c in doc["configs"]}
    assert set(configs) == {("flagopt", "float32"), ("transformers", "float32"),
                            ("flagopt", "float32+draft-int8"),
                            ("transformers", "float32+assistant-tiny")}
    for key, config in configs.items():
        assert config["status"] == "ok", (key, config["reason"], config["failures"])
        assert config["median"]["decode_tok_s"] > 0
        # Greedy with or without a draft: transformers' float32 tokens.
        assert config["same_tokens"] == {"same": True, "first_difference": None}, key
    assert 0 <= configs["flagopt", "float32+draft-int8"]["median"]["acceptance_rate"] <= 1
    assert "acceptance_rate" not in configs["transformers", "float32+assistant-tiny"]["median"]
    assert "| flagopt | float32 + draft int8 (bfloat16 act.) |" in md
    assert "| transformers | float32 + assistant tiny |" in md
    assert "same tokens" in md and "draft accepted" in md


def test_failing_worker_is_reported_with_its_stderr(tmp_path):
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run_worker({"task": "no-such-task"}, timeout=120, threads=1)
    assert result["status"] == "failed"
    assert "no-such-task" in result["reason"] and "no-such-task" in result["stderr_tail"]


def _engines_module():
    path = ROOT / "benchmarks" / "engines.py"
    spec = importlib.util.spec_from_file_location("bench_engines", path)
    engines = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(engines)
    return engines


@pytest.mark.parametrize("dtype, cache", [("bfloat16", "float32"), ("float16", "float32"),
                                          ("float32", None)])
def test_flagopt_engine_keeps_a_float32_cache_for_half_precision_on_cpu(dtype, cache):
    """The RESULTS.md figures used a float32 cache for bf16/fp16 on CPU (once implicit, now
    the explicit ``cache_dtype``); the benchmark asks for it so they stay comparable."""
    import torch

    engine = _engines_module().FlagoptEngine(dict(device="cpu", compute_dtype=dtype))
    assert engine.gen_kwargs.get("cache_dtype") == (None if cache is None else
                                                    getattr(torch, cache))


# ---- benchmarks/serve_bench.py ----------------------------------------------------------------

SERVE_BENCH = ROOT / "benchmarks" / "serve_bench.py"
SUMMARY = ("requests", "generated_tokens", "span_s", "throughput_tok_s", "ttft_p50_s",
           "ttft_p99_s", "latency_p50_s", "latency_p99_s")


def _serve_bench_module():
    spec = importlib.util.spec_from_file_location("serve_bench", SERVE_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_bench_trace_is_seeded_and_within_its_bounds():
    sb = _serve_bench_module()
    trace = sb.make_trace(50, 4.0, (3, 9), (2, 7), seed=1)
    assert trace == sb.make_trace(50, 4.0, (3, 9), (2, 7), seed=1)
    assert trace != sb.make_trace(50, 4.0, (3, 9), (2, 7), seed=2)
    arrivals = [r["arrival_s"] for r in trace]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    assert all(3 <= len(r["prompt"]) <= 9 and r["prompt"][0] == 2 for r in trace)
    assert all(2 <= r["max_tokens"] <= 7 for r in trace)
    assert sb.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert sb.percentile([5.0], 99) == 5.0


def test_serve_bench_reports_all_three_engines_on_a_tiny_model(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    out = tmp_path / "out"
    cmd = [sys.executable, str(SERVE_BENCH), "--model", "tiny", "--requests", "5",
           "--rate", "50", "--prompt-len", "3,12", "--output-len", "2,6", "--batch-size", "2",
           "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [json_file] = out.glob("serve-bench-*.json")
    doc = json.loads(json_file.read_text())
    sb = _serve_bench_module()
    trace = sb.make_trace(5, 50.0, (3, 12), (2, 6), seed=0)
    assert doc["trace"]["requests"] == 5
    assert doc["trace"]["output_tokens"] == sum(r["max_tokens"] for r in trace)
    assert set(doc["results"]) == {"flagopt-serve", "transformers", "flagopt-static"}
    for engine, result in doc["results"].items():
        assert result["status"] == "ok", (engine, result)
        assert sorted(r["id"] for r in result["records"]) == list(range(5))
        assert all(v is not None for v in (result["summary"][k] for k in SUMMARY)), engine
        assert result["summary"]["generated_tokens"] == doc["trace"]["output_tokens"]
        for r, q in zip(sorted(result["records"], key=lambda r: r["id"]), trace):
            assert q["arrival_s"] <= r["first_s"] <= r["done_s"], (engine, r, q)
    # A static group starts only once its last member has arrived.
    static = sorted(doc["results"]["flagopt-static"]["records"], key=lambda r: r["id"])
    for start in range(0, 5, 2):
        group = trace[start:start + 2]
        assert all(static[q["id"]]["first_s"] >= group[-1]["arrival_s"] for q in group)
    assert set(doc["ratios"]) == {"transformers", "flagopt-static"}
    assert doc["machine"]["cpu"] and doc["command"]
    assert "| flagopt-serve |" in proc.stdout and "| flagopt-static |" in proc.stdout
    assert "TTFT p99 ms" in proc.stdout


# ---- benchmarks/finetune_bench.py -------------------------------------------------------------

FINETUNE_BENCH = ROOT / "benchmarks" / "finetune_bench.py"


def test_finetune_bench_trains_both_engines_on_the_same_curve(tmp_path):
    """The tiny shape for 3 steps: both engines report, and their loss curves agree (same
    blocks, order and initial adapter, dropout 0)."""
    import math

    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path / "finetune.json"
    cmd = [sys.executable, str(FINETUNE_BENCH), "--quick", "--threads", "1",
           "--work-dir", str(tmp_path / "work"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    [run] = doc["runs"]
    assert run["shape"] == "tiny" and set(run["engines"]) == {"flagopt", "transformers"}
    curves = {}
    for engine, result in run["engines"].items():
        assert result["status"] == "ok", (engine, result["failures"])
        curve = result["loss_curve"]
        assert len(curve) == 3 and all(math.isfinite(x) for x in curve), (engine, curve)
        assert result["tokens_per_s"] > 0 and result["peak_rss_gb"] > 0
        curves[engine] = curve
    # Step 1 runs at lr 0 (warm-up): the same start, and the same update after it.
    lrs = run["engines"]["flagopt"]["lr_curve"]
    assert lrs == pytest.approx(run["engines"]["transformers"]["lr_curve"]) and lrs[1] > 0
    assert run["max_abs_loss_diff"] < 1e-3, curves
    assert run["ratios"]["tokens_per_s"] > 0 and run["ratios"]["peak_rss"] > 0
    assert run["target"]["met"] in (True, False)
    assert "| flagopt |" in proc.stdout and "| transformers |" in proc.stdout


@pytest.mark.parametrize("extra", [["--steps", "2"], ["--prefill", "--quantize", "w8a8"]])
def test_profile_step_splits_a_step_into_products_attention_and_the_rest(tmp_path, extra):
    from flagopt.model.synthetic import write_random_checkpoint
    from tests.conftest import tiny_config

    directory = write_random_checkpoint(tmp_path / "tiny", tiny_config())
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--checkpoint",
           str(directory), "--dtype", "bfloat16", "--batch", "2", "--prompt-len", "8",
           "--threads", "1", "--membw-mib", "16", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shares = dict(part.rsplit(" ", 1) for part in
                  proc.stdout.split("per unit: ", 1)[1].splitlines()[0].split(", "))
    assert set(shares) == {"weight products", "attention", "everything else"}
    assert abs(sum(float(v.rstrip("%")) for v in shares.values()) - 100) <= 2
    assert float(shares["weight products"].rstrip("%")) > 0
    product = "aten::_int_mm" if "w8a8" in extra else "aten::addmm"
    assert product in proc.stdout and "GB/s streamed" in proc.stdout
