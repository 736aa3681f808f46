"""``flagopt finetune``: each task trains to do its job, and what it writes loads back here
and in transformers / PEFT."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flagopt.auto_model import AutoLoader
from flagopt.cli import main
from flagopt.model.config import OPTConfig
from flagopt.model.synthetic import write_random_checkpoint
from flagopt.train.commands import finetune

ROOT = Path(__file__).resolve().parent.parent
# A tiny OPT with the real vocabulary (the data goes through the real tokenizer); no dropout,
# so runs are deterministic.
CONFIG = OPTConfig(vocab_size=50272, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                   num_attention_heads=4, max_position_embeddings=128, dropout=0.0)
WORDS = "apple river stone cloud music paper garden window silver forest".split()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ft") / "tiny-opt"
    # std 0.3: far from uniform logits, so a few steps show learning
    return write_random_checkpoint(directory, CONFIG, layout="safetensors", dtype=torch.float32,
                                   std=0.3)


def _lines(path: Path, rows: list) -> Path:
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n"
                            for r in rows), encoding="utf-8")
    return path


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _run(argv: list[str], capsys) -> dict:
    assert main(["finetune", *argv, "--quiet"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_lora_lm_learns_and_the_adapter_loads_everywhere(tmp_path, base, capsys, one_thread):
    text = " ".join(["one two three four five six seven eight"] * 40)
    train = _lines(tmp_path / "train.txt", [text] * 4)
    out = tmp_path / "run"
    summary = _run(["--model", str(base), "--task", "lm", "--train", str(train), "--valid",
                    str(train), "--lora-r", "8", "--lora-alpha", "16", "--max-steps", "30",
                    "--batch-size", "4", "--lr", "5e-2", "--block-size", "32",
                    "--eval-interval", "30", "--log-interval", "1", "--output", str(out)], capsys)
    assert summary["mode"] == "lora" and summary["step"] == 30
    # r=8 on q,v: 2 layers x 2 modules x 8 x (32 + 32)
    assert summary["trainable_parameters"] == 2 * 2 * 8 * 64
    first, last = _metrics(out)[0], summary
    assert last["eval_loss"] < first["loss"] - 3, (first, last)
    assert summary["eval_perplexity"] == pytest.approx(torch.tensor(last["eval_loss"]).exp()
                                                       .item(), rel=1e-5)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16

    ids = torch.tensor([[2, 65, 80, 130, 237, 292]])
    merged = AutoLoader("lm", base, lora_dir=out, prepared_cache=False).get_model()
    separate = AutoLoader("lm", base, adapter_dir=out, merge=False,
                          prepared_cache=False).get_model()
    import transformers
    from peft import PeftModel

    theirs = PeftModel.from_pretrained(transformers.OPTForCausalLM.from_pretrained(base),
                                       out).eval()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        plain = AutoLoader("lm", base, prepared_cache=False).get_model()(input_ids=ids).logits
        for model in (merged, separate):
            torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter changed the model

    from flagopt.predictor import Predictor

    tokenizer = AutoLoader("lm", base, prepared_cache=False).get_tokenizer()
    want = Predictor(merged, tokenizer).predict_generate_greedy("one two three four",
                                                               out_max_length=4)
    assert main(["generate", "--model", str(base), "--lora", str(out), "--max-new-tokens", "4",
                 "--quiet", "one two three four"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == want


def test_full_classification_reaches_high_accuracy(tmp_path, base, capsys, one_thread):
    import transformers

    rng = random.Random(0)
    rows = []
    for i in range(280):
        label = "pos" if i % 2 else "neg"
        marker = "wonderful" if label == "pos" else "terrible"
        words = [rng.choice(WORDS) for _ in range(6)]
        words.insert(rng.randrange(7), marker)
        rows.append({"text": " ".join(words), "label": label})
    train, valid = _lines(tmp_path / "train.jsonl", rows[:240]), \
        _lines(tmp_path / "valid.jsonl", rows[240:])
    out = tmp_path / "clf"
    summary = _run(["--model", str(base), "--task", "classification", "--train", str(train),
                    "--valid", str(valid), "--max-steps", "100", "--batch-size", "8",
                    "--lr", "3e-3", "--eval-interval", "100", "--output", str(out)], capsys)
    assert summary["mode"] == "full"
    assert summary["eval_accuracy"] >= 0.9, summary
    saved = json.loads((out / "config.json").read_text())
    assert saved["id2label"] == {"0": "neg", "1": "pos"} and saved["num_labels"] == 2
    ours = AutoLoader("classification", out, prepared_cache=False).get_model()
    theirs = transformers.OPTForSequenceClassification.from_pretrained(out).eval()
    assert theirs.config.id2label == {0: "neg", 1: "pos"}
    ids = torch.tensor([[2, 65, 80, 130]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)


def test_qa_finds_planted_spans(tmp_path, base, capsys, one_thread):
    rng = random.Random(1)

    def example(i: int) -> dict:
        words = [rng.choice(WORDS) for _ in range(8)]
        at = rng.randrange(len(words) + 1)
        context = " ".join(words[:at] + ["zebra"] + words[at:])
        return {"id": str(i), "question": "Where is the animal?", "context": context,
                "answers": {"text": ["zebra"], "answer_start": [context.index("zebra")]}}

    rows = [example(i) for i in range(100)]
    train, valid = _lines(tmp_path / "train.jsonl", rows[:80]), \
        _lines(tmp_path / "valid.jsonl", rows[80:])
    out = tmp_path / "qa"
    summary = _run(["--model", str(base), "--task", "qa", "--train", str(train), "--valid",
                    str(valid), "--max-steps", "80", "--batch-size", "8", "--lr", "3e-3",
                    "--eval-interval", "80", "--output", str(out)], capsys)
    assert summary["eval_exact_match"] >= 80.0 and summary["eval_f1"] >= 80.0, summary


def test_int8_base_with_lora_trains(tmp_path, base, capsys, one_thread):
    text = " ".join(["red green blue"] * 60)
    train = _lines(tmp_path / "train.txt", [text] * 2)
    out = tmp_path / "int8"
    summary = _run(["--model", str(base), "--task", "lm", "--train", str(train),
                    "--lora-r", "4", "--quantize", "int8", "--max-steps", "12",
                    "--batch-size", "4", "--lr", "2e-2", "--block-size", "32",
                    "--log-interval", "1", "--output", str(out)], capsys)
    losses = [m["loss"] for m in _metrics(out) if "loss" in m]
    assert summary["step"] == 12 and losses[-1] < losses[0], losses
    assert (out / "adapter_model.safetensors").is_file()


def test_resume_continues_to_the_same_adapter(tmp_path, base, one_thread):
    text = " ".join(["alpha beta gamma delta"] * 50)
    train = _lines(tmp_path / "train.txt", [text] * 3)
    common = dict(model=str(base), task="lm", train=str(train),
                  lora=dict(r=4, lora_alpha=8), block_size=32,
                  loader=dict(progress=False, prepared_cache=False))
    options = dict(batch_size=4, lr=1e-2, save_interval=3, progress=False)
    straight = finetune(output=str(tmp_path / "a"), trainer=dict(options, max_steps=6), **common)
    # the same run stopped after step 3 (its checkpoint), then resumed to step 6
    finetune(output=str(tmp_path / "b"), trainer=dict(options, max_steps=6), **common)
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoint-6")
    (tmp_path / "b" / "latest").write_text("checkpoint-3\n")
    resumed = finetune(output=str(tmp_path / "b"), resume=True,
                       trainer=dict(options, max_steps=6), **common)
    assert resumed["step"] == straight["step"] == 6
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes(tmp_path, base):
    text = " ".join(["north south east west"] * 50)
    train = _lines(tmp_path / "train.txt", [text] * 4)
    out = tmp_path / "ddp"
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous, on loopback only
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "flagopt.finetune",
           "--model", str(base), "--task", "lm", "--train", str(train), "--lora-r", "4",
           "--max-steps", "3", "--batch-size", "2", "--block-size", "32", "--quiet",
           "--output", str(out)]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "FLAGOPT_PREPARED_CACHE": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # the launcher and its workers, all of them
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in 300 s: {stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    summaries = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["step"] == 3, stdout  # rank 0 reports
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--quantize", "int8"], "--quantize needs --lora-r"),
    (["--lora-alpha", "8"], "--lora-alpha needs --lora-r"),
    (["--train", "missing.txt"], "--train file not found: missing.txt"),
    (["--lora-r", "0"], "LoRA r=0; expected a positive integer"),
])
def test_bad_options_are_one_line_errors(tmp_path, base, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    _lines(tmp_path / "train.txt", ["some text"])
    args = ["finetune", "--model", str(base), "--train", "train.txt", "--output", "out", *argv]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_data_errors_name_the_file_and_line(tmp_path, base, capsys):
    bad = _lines(tmp_path / "train.jsonl", [{"text": "fine", "label": "a"}, {"label": "b"}])
    assert main(["finetune", "--model", str(base), "--task", "classification", "--train",
                 str(bad), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "train.jsonl" in err and "line 2" in err and "'text'" in err, err


def test_an_existing_run_is_not_overwritten(tmp_path, base, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "latest").write_text("checkpoint-3\n")
    _lines(tmp_path / "train.txt", ["some text"])
    assert main(["finetune", "--model", str(base), "--train", str(tmp_path / "train.txt"),
                 "--output", str(tmp_path / "out")]) == 1
    assert "--resume" in capsys.readouterr().err
