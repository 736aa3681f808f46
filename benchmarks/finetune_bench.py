"""LoRA fine-tuning throughput: flagopt's ``Trainer`` against transformers' ``Trainer`` + PEFT.

    python benchmarks/finetune_bench.py --shapes opt-125m opt-350m --steps 30 \\
        --batch-size 8 --block-size 256 --repeats 2

For each shape (``benchmarks/checkpoints.py``'s: opt-350m is post-LN with a 512-wide embedding
and ``project_in/out``), a random-weight checkpoint is written once under ``--work-dir`` in the
hub layout, with ``dropout`` and ``attention_dropout`` set to 0 in its ``config.json`` (both
engines read that file, so neither drops anything and their loss curves can be compared). Both
engines then train LoRA (r 16, alpha 32, ``q_proj`` + ``v_proj``, LoRA dropout 0) in float32
on the CPU with the same hyper-parameters: AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0),
``--lr``, ``--warm-up`` steps of linear warm-up then ``--schedule`` decay, gradient clipping at
1.0, ``--batch-size`` blocks of ``--block-size`` tokens per step, ``--steps`` steps.

Same data, same order, same start:

* the corpus is fixed (seeded random words), tokenized once by flagopt's ``lm`` data path
  (``load_task_data``: concatenated, cut into blocks) and saved; both engines train on those
  blocks. flagopt's Trainer visits them in its own seeded permutation
  (``micro_batch_indices``, seed ``--seed``); transformers gets the blocks already in that
  order and a ``Trainer`` subclass whose sampler is sequential;
* the starting adapter is PEFT's: ``get_peft_model`` (seeded) then ``save_pretrained``, once
  per shape; transformers loads it with ``PeftModel.from_pretrained(..., is_trainable=True)``,
  flagopt with ``attach_adapter(..., is_trainable=True)``.

Each engine trains in its own fresh process (``--worker``), the two back to back, in
alternating order, ``--repeats`` times. A process reports its loss at every step, the time of
every step, and its peak RSS (``getrusage`` ``ru_maxrss``: load and training together).
Training tokens/s counts the steps after the first ``--warm-up-steps`` (not timed: one-off
allocation and kernel selection). transformers keeps its own defaults where these settings do
not name one (its default optimizer here is ``adamw_torch_fused``). The run prints one JSON
object (also written to ``--json``) and a Markdown table; a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):  # flagopt from this checkout; the sibling modules
    if _path not in sys.path:
        sys.path.insert(0, _path)

import checkpoints  # noqa: E402

SHAPES = ("tiny", "opt-125m", "opt-350m")
ENGINES = ("flagopt", "transformers")
TARGET_SPEED = 1.3  # issue 13: >= 1.3x transformers' tokens/s ...
TARGET_MEMORY = 1.0  # ... at <= its peak memory
LORA = dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
WORDS = ("the of and to in is was for on that with as by at from his her an it which were "
         "city river music season film team war school world king house church game north "
         "century station album league water history record family number village").split()
_TAIL_CHARS = 3000


# --- what both engines train on (written once per shape, in a setup process) ------------------


def corpus_text(n_tokens: int, seed: int) -> str:
    """Lines of 20-200 seeded random words, at least ``n_tokens`` words in all (a word is at
    least one token, so the corpus has at least that many tokens)."""
    rng = random.Random(seed)
    lines, words = [], 0
    while words < n_tokens:
        n = rng.randint(20, 200)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".\n")
        words += n
    return "".join(lines)


def setup_description(shape: str, args: argparse.Namespace) -> dict:
    return {"shape": shape, "spec": checkpoints.model_spec(shape).config, "dropout": 0.0,
            "lora": LORA, "steps": args.steps, "batch_size": args.batch_size,
            "block_size": args.block_size, "seed": args.seed, "layout": "safetensors"}


def setup_dir(work: Path, shape: str, args: argparse.Namespace) -> Path:
    return work / f"finetune-{shape}-b{args.batch_size}-t{args.block_size}-s{args.steps}" \
        f"-seed{args.seed}"


def write_setup(directory: Path, description: dict) -> None:
    """The checkpoint (dropout 0), the blocks in flagopt's order and PEFT's initial adapter
    (in a setup process: it imports torch, transformers and peft)."""
    import peft
    import torch
    import transformers

    from flagopt.model.config import OPTConfig
    from flagopt.model.synthetic import write_random_checkpoint
    from flagopt.tokenizer import OPTTokenizer
    from flagopt.train.data import load_task_data
    from flagopt.train.trainer import micro_batch_indices

    spec = checkpoints.model_spec(description["shape"])
    tmp = directory.with_name(directory.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    config = OPTConfig(**spec.config).replace(dropout=0.0, attention_dropout=0.0)
    write_random_checkpoint(tmp / "model", config, layout=description["layout"],
                            prefix=spec.prefix, lm_head=spec.lm_head, dtype=torch.float16,
                            seed=0, std=0.02, tokenizer=True)
    steps, batch, block = (description[k] for k in ("steps", "batch_size", "block_size"))
    n_blocks = steps * batch  # exactly one epoch: neither engine wraps around
    (tmp / "corpus.txt").write_text(corpus_text(n_blocks * block, description["seed"]))
    tokenizer = OPTTokenizer.from_dir(tmp / "model")
    data = load_task_data("lm", tmp / "corpus.txt", tokenizer, block_size=block,
                          max_positions=config.max_position_embeddings)
    blocks = data.blocks[:n_blocks].clone()  # (steps * batch, block)
    order = [i for b in micro_batch_indices(n_blocks, batch, 1, 1, description["seed"], 0, 0,
                                            0, steps) for i in b]
    torch.save({"blocks": blocks, "order": order}, tmp / "blocks.pt")
    base = transformers.OPTForCausalLM.from_pretrained(tmp / "model", dtype=torch.float32)
    torch.manual_seed(description["seed"])
    lora = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
    lora.save_pretrained(tmp / "adapter-init")
    checkpoints._finish(tmp, directory, description)


def prepare(shape: str, work: Path, args: argparse.Namespace) -> Path:
    """The setup directory of ``shape`` (written by a subprocess unless already complete)."""
    directory = setup_dir(work, shape, args)
    description = setup_description(shape, args)
    if checkpoints.is_complete(directory, description):
        return directory
    spec = checkpoints.model_spec(shape)
    checkpoints.check_free_disk(work, 2 * checkpoints.checkpoint_bytes(spec),
                                f"the {shape} checkpoint")
    result = run_subprocess(["--setup", json.dumps({"directory": str(directory),
                                                    "description": description})],
                            args.timeout, args.threads)
    if result["status"] != "ok":
        raise SystemExit(f"setup of {shape} failed: {result['reason']}\n"
                         f"{result.get('stderr_tail', '')}")
    return directory


# --- the two engines (each in its own process) --------------------------------------------------


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def _load_blocks(directory: Path):
    import torch

    return torch.load(directory / "blocks.pt", weights_only=True)


def train_flagopt(job: dict) -> dict:
    """flagopt: AutoLoader -> attach PEFT's initial adapter -> Trainer (its seeded order)."""
    import torch

    from flagopt import AutoLoader
    from flagopt.model.adapters import attach_adapter, read_adapter
    from flagopt.train.data import LMDataset
    from flagopt.train.trainer import Trainer

    directory = Path(job["directory"])
    data = LMDataset(_load_blocks(directory)["blocks"])
    start = time.perf_counter()
    model = AutoLoader("lm", str(directory / "model"), device="cpu", dtype="float32",
                       prepared_cache=False).get_model()
    attach_adapter(model, read_adapter(directory / "adapter-init"), is_trainable=True)
    load_s = time.perf_counter() - start
    rss_load = _peak_rss_gb()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(max_steps=job["steps"], batch_size=job["batch_size"], lr=job["lr"],
                          weight_decay=0.0, warm_up=job["warm_up"],
                          lr_scheduler=job["schedule"], clip_grad=1.0, log_interval=1,
                          save_dir=out, seed=job["seed"], progress=False)
        trainer.train(model, train_dataset=data, collate_fn=data.collate)
        records = [json.loads(line) for line in Path(out, "metrics.jsonl").open()]
    tokens = job["batch_size"] * job["block_size"]
    steps = [r for r in records if "loss" in r and "tokens_per_s" in r]
    return {"losses": [r["loss"] for r in steps], "lrs": [r["lr"] for r in steps],
            "step_s": [tokens / r["tokens_per_s"] for r in steps], "load_s": load_s,
            "peak_rss_after_load_gb": rss_load, "threads": torch.get_num_threads()}


def train_transformers(job: dict) -> dict:
    """transformers: from_pretrained -> PeftModel.from_pretrained -> Trainer, sequential."""
    import peft
    import torch
    import transformers
    from torch.utils.data import SequentialSampler

    class OrderedTrainer(transformers.Trainer):
        """Visits the (pre-ordered) dataset sequentially and records each step's loss."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.losses: list[float] = []

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None
                                     else self.train_dataset)

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.losses.append(loss.item())
            return loss

    class StepTimer(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []
            self.lrs: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.marks:
                self.marks.append(time.perf_counter())
            self.lrs.append(kwargs["lr_scheduler"].get_last_lr()[0])

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    directory = Path(job["directory"])
    saved = _load_blocks(directory)
    blocks = saved["blocks"][saved["order"]]  # flagopt's order, visited in sequence

    def collate(rows: list[dict]) -> dict:
        ids = torch.stack([r["input_ids"] for r in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    start = time.perf_counter()
    base = transformers.OPTForCausalLM.from_pretrained(directory / "model", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, directory / "adapter-init", is_trainable=True)
    load_s = time.perf_counter() - start
    rss_load = _peak_rss_gb()
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=job["steps"], per_device_train_batch_size=job["batch_size"],
            learning_rate=job["lr"], weight_decay=0.0, warmup_steps=job["warm_up"],
            lr_scheduler_type=job["schedule"], max_grad_norm=1.0, adam_beta1=0.9,
            adam_beta2=0.999, adam_epsilon=1e-8, logging_steps=job["steps"], save_strategy="no",
            report_to=[], use_cpu=True, seed=job["seed"], dataloader_num_workers=0,
            remove_unused_columns=False, disable_tqdm=True, dataloader_pin_memory=False)
        trainer = OrderedTrainer(model=model, args=args, data_collator=collate,
                                 train_dataset=[{"input_ids": b} for b in blocks],
                                 callbacks=[timer])
        trainer.train()
    marks = timer.marks
    return {"losses": list(trainer.losses), "lrs": timer.lrs,
            "step_s": [b - a for a, b in zip(marks, marks[1:])], "load_s": load_s,
            "peak_rss_after_load_gb": rss_load, "threads": torch.get_num_threads(),
            "optim": getattr(args.optim, "value", str(args.optim))}


def worker(job: dict) -> dict:
    """Train one engine on one shape; its measurements plus this process's peak RSS."""
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    result = (train_flagopt if job["engine"] == "flagopt" else train_transformers)(job)
    result["peak_rss_gb"] = _peak_rss_gb()
    return result


# --- the driver ---------------------------------------------------------------------------------


def run_subprocess(argv: list[str], timeout: float, threads: int) -> dict:
    """Run this script with ``argv`` in a fresh process; its last stdout line is JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        return {"status": "failed", "reason": f"timed out after {timeout:g} s",
                "stderr_tail": (e.stderr or "")[-_TAIL_CHARS:] if isinstance(e.stderr, str)
                else ""}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"status": "failed", "reason": f"exit status {proc.returncode}",
                "stderr_tail": proc.stderr[-_TAIL_CHARS:]}
    return {"status": "ok", **json.loads(lines[-1])}


def tokens_per_s(step_s: list[float], tokens_per_step: int, warm_up: int) -> float | None:
    timed = step_s[warm_up:]
    return tokens_per_step * len(timed) / sum(timed) if timed and sum(timed) > 0 else None


def bench_shape(shape: str, work: Path, args: argparse.Namespace) -> dict:
    directory = prepare(shape, work, args)
    job = dict(directory=str(directory), steps=args.steps, batch_size=args.batch_size,
               block_size=args.block_size, lr=args.lr, warm_up=args.warm_up,
               schedule=args.schedule, seed=args.seed, threads=args.threads)
    samples: dict[str, list[dict]] = {e: [] for e in ENGINES}
    for repeat in range(args.repeats):
        order = ENGINES if repeat % 2 == 0 else ENGINES[::-1]
        for engine in order:
            result = run_subprocess(["--worker", json.dumps({**job, "engine": engine})],
                                    args.timeout, args.threads)
            if result["status"] == "ok":
                result["tokens_per_s"] = tokens_per_s(result["step_s"],
                                                      args.batch_size * args.block_size,
                                                      args.warm_up_steps)
            samples[engine].append(result)
            print(f"[{shape}] repeat {repeat + 1}/{args.repeats} {engine}: "
                  f"{_sample_line(result)}", file=sys.stderr, flush=True)
    return summarize(shape, samples, args)


def _sample_line(result: dict) -> str:
    if result["status"] != "ok":
        return f"FAILED ({result['reason']})\n{result.get('stderr_tail', '')}"
    speed = result["tokens_per_s"]
    return (f"{speed:.1f} tok/s, " if speed else "") + \
        f"peak RSS {result['peak_rss_gb']:.2f} GB, last loss {result['losses'][-1]:.4f}"


def summarize(shape: str, samples: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    """Medians over the repeats, the loss curves and the ratios flagopt / transformers."""
    engines: dict[str, dict] = {}
    for engine, runs in samples.items():
        ok = [r for r in runs if r["status"] == "ok"]
        speeds = [r["tokens_per_s"] for r in ok if r["tokens_per_s"]]
        engines[engine] = {
            "status": "ok" if ok else "failed",
            "failures": [r for r in runs if r["status"] != "ok"],
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "tokens_per_s_samples": speeds,
            "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in ok) if ok else None,
            "peak_rss_gb_samples": [r["peak_rss_gb"] for r in ok],
            "peak_rss_after_load_gb": statistics.median(r["peak_rss_after_load_gb"]
                                                        for r in ok) if ok else None,
            "load_s": statistics.median(r["load_s"] for r in ok) if ok else None,
            "loss_curve": ok[0]["losses"] if ok else None,
            "lr_curve": ok[0]["lrs"] if ok else None,
            "step_s_samples": [r["step_s"] for r in ok],
            "threads": ok[0]["threads"] if ok else None,
            **({"optim": ok[0]["optim"]} if ok and "optim" in ok[0] else {}),
        }
    ours, theirs = engines["flagopt"], engines["transformers"]
    curves = [r["losses"] for e in ENGINES for r in samples[e] if r["status"] == "ok"]
    diff = None
    if ours["loss_curve"] and theirs["loss_curve"] and all(len(c) == args.steps for c in curves):
        # every repeat of either engine against transformers' first
        diff = max(abs(a - b) for c in curves for a, b in zip(c, theirs["loss_curve"]))
    speed = _ratio(ours["tokens_per_s"], theirs["tokens_per_s"])
    memory = _ratio(ours["peak_rss_gb"], theirs["peak_rss_gb"])
    met = None if speed is None or memory is None else \
        bool(speed >= TARGET_SPEED and memory <= TARGET_MEMORY)
    return {"shape": shape, "engines": engines, "max_abs_loss_diff": diff,
            "ratios": {"tokens_per_s": speed, "peak_rss": memory},
            "target": {"tokens_per_s_at_least": TARGET_SPEED, "peak_rss_at_most": TARGET_MEMORY,
                       "met": met}}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                         capture_output=True).stdout.strip() or None
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "loadavg": os.getloadavg(), "versions": versions, "git": git}


def markdown(doc: dict) -> str:
    lines = []
    for run in doc["runs"]:
        e = run["engines"]
        lines += [f"## {run['shape']}", "",
                  "| engine | train tokens/s | peak RSS GB | RSS after load GB | final loss |",
                  "|---|---|---|---|---|"]
        for name in ENGINES:
            r = e[name]
            if r["status"] != "ok":
                lines.append(f"| {name} | failed | | | |")
                continue
            lines.append(f"| {name} | {_fmt(r['tokens_per_s'], '.1f')} | "
                         f"{_fmt(r['peak_rss_gb'], '.2f')} | "
                         f"{_fmt(r['peak_rss_after_load_gb'], '.2f')} | "
                         f"{r['loss_curve'][-1]:.4f} |")
        ratios, target = run["ratios"], run["target"]
        lines += ["", f"flagopt/transformers: tokens/s {_fmt(ratios['tokens_per_s'], '.2f')}x, "
                      f"peak RSS {_fmt(ratios['peak_rss'], '.2f')}x; max |loss diff| "
                      f"{_fmt(run['max_abs_loss_diff'], '.2e')}; target (>= "
                      f"{TARGET_SPEED}x tokens/s at <= {TARGET_MEMORY}x RSS): "
                      f"{'met' if target['met'] else 'NOT met' if target['met'] is False else 'n/a'}",
                  ""]
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["opt-125m", "opt-350m"], choices=SHAPES)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warm-up", type=int, default=2, help="LR warm-up steps (both)")
    parser.add_argument("--schedule", choices=("linear", "cosine"), default="linear")
    parser.add_argument("--warm-up-steps", type=int, default=2,
                        help="first steps left out of tokens/s")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    parser.add_argument("--work-dir", default="bench_out/finetune")
    parser.add_argument("--json", help="also write the JSON object here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: the tiny shape, 3 steps of 2 x 32 tokens, 1 repeat")
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.steps, args.batch_size, args.block_size = ["tiny"], 3, 2, 32
        args.repeats, args.warm_up, args.warm_up_steps = 1, 1, 1
    for name in ("steps", "batch_size", "block_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}; expected >= 1")
    if not 0 <= args.warm_up_steps < args.steps:
        parser.error(f"--warm-up-steps={args.warm_up_steps}; expected 0..{args.steps - 1} "
                     f"(fewer than --steps, or nothing is timed)")
    if not 0 <= args.warm_up < args.steps:
        parser.error(f"--warm-up={args.warm_up}; expected 0..{args.steps - 1}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.setup:
        job = json.loads(args.setup)
        write_setup(Path(job["directory"]), job["description"])
        print(json.dumps({"directory": job["directory"]}))
        return
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    doc = {"command": " ".join(["python", "benchmarks/finetune_bench.py", *(argv or sys.argv[1:])]),
           "machine": machine(),
           "settings": {k: getattr(args, k) for k in ("shapes", "steps", "batch_size",
                                                      "block_size", "repeats", "lr", "warm_up",
                                                      "schedule", "warm_up_steps", "seed",
                                                      "threads")} | {"lora": LORA},
           "runs": [bench_shape(s, work, args) for s in args.shapes]}
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["wall_s"] = time.time() - start
    text = json.dumps(doc, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    print(markdown(doc))
    failed = any(e["status"] != "ok" for run in doc["runs"] for e in run["engines"].values())
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
