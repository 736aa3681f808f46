"""Training checkpoints: atomic, pruned, resumable to the same weights (also after SIGKILL);
a full disk or a NaN loss never leaves a bad checkpoint in place."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flagopt.train.checkpoint as ckpt
from flagopt.errors import CheckpointSaveError, NonFiniteLossError, TrainerConfigError
from flagopt.train.trainer import Trainer
from tests.train_helpers import JOB, counting_dataset, run_reference_job, tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_save_points_latest_at_the_newest_and_prunes(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))},
                             {"position": {"step": step}}, keep=2)
    assert _listing(tmp_path) == ["checkpoint-4", "checkpoint-6", "latest"]
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    assert ckpt.resolve_checkpoint(tmp_path / "checkpoint-4") == tmp_path / "checkpoint-4"
    tensors, state = ckpt.load_checkpoint(tmp_path / "checkpoint-6")
    assert torch.equal(tensors["w"], torch.full((2,), 6.0)) and state["position"]["step"] == 6


def test_resolve_names_a_directory_without_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="neither a checkpoint directory"):
        ckpt.resolve_checkpoint(tmp_path)


@pytest.mark.parametrize("fail_at", [1, 2])  # the tensors file, or the state file after it
def test_a_full_disk_leaves_the_previous_checkpoint_and_nothing_half_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    ckpt.save_checkpoint(tmp_path, 2, {"w": torch.ones(3)}, {"position": {"step": 2}})
    real, calls = ckpt._write_bytes, []

    def full_disk(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == fail_at:
            with open(path, "wb") as f:  # a partial write, then the disk is full
                f.write(data[:3])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ckpt, "_write_bytes", full_disk)
    with pytest.raises(CheckpointSaveError, match="checkpoint-4: the disk is full; the "
                                                  "previous checkpoint \\(checkpoint-2\\)") as e:
        ckpt.save_checkpoint(tmp_path, 4, {"w": torch.zeros(3)}, {"position": {"step": 4}})
    assert e.value.errno == errno.ENOSPC
    assert _listing(tmp_path) == ["checkpoint-2", "latest"]
    tensors, state = ckpt.load_checkpoint(ckpt.resolve_checkpoint(tmp_path))
    assert torch.equal(tensors["w"], torch.ones(3)) and state["position"]["step"] == 2


def test_the_trainer_stops_on_a_full_disk_with_the_last_checkpoint_loadable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ckpt._write_bytes

    def full_after_step_2(path: Path, data: bytes) -> None:
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ckpt, "_write_bytes", full_after_step_2)
    with pytest.raises(CheckpointSaveError, match="disk is full"):
        Trainer(max_steps=6, batch_size=2, save_dir=tmp_path, save_interval=2,
                progress=False).train(tiny_lm(), counting_dataset(4))
    assert [n for n in _listing(tmp_path) if "checkpoint" in n] == ["checkpoint-2"]
    assert ckpt.load_checkpoint(ckpt.resolve_checkpoint(tmp_path))[1]["position"]["step"] == 2


class _NaNAt(torch.nn.Module):
    """Its loss turns NaN from forward call ``at`` on (or the run is cut there by an error)."""

    def __init__(self, model: torch.nn.Module, at: int, error: type[Exception] | None = None
                 ) -> None:
        super().__init__()
        self.model, self.at, self.calls, self.error = model, at, 0, error

    def forward(self, **batch):
        self.calls += 1
        out = self.model(**batch)
        if self.calls >= self.at:
            if self.error is not None:
                raise self.error("cut")
            out.loss = out.loss * float("nan")
        return out


def test_a_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    model = _NaNAt(tiny_lm(), at=3)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3") as e:
        Trainer(max_steps=6, batch_size=2, save_dir=tmp_path, save_interval=1,
                progress=False).train(model, counting_dataset(4))
    assert e.value.step == 3
    assert ckpt.resolve_checkpoint(tmp_path).name == "checkpoint-2"
    assert not (tmp_path / "checkpoint-3").exists()
    tensors, _ = ckpt.load_checkpoint(tmp_path / "checkpoint-2")
    assert all(torch.isfinite(t).all() for t in tensors.values())


def _resumable_run(save_dir: Path, load_dir: Path | None = None, cut_at: int | None = None):
    """6 steps over 3 steps per epoch (so the resume crosses an epoch), dropout on."""
    model = tiny_lm(seed=1, dropout=0.1)
    runner = _NaNAt(model, cut_at or 10**9, KeyboardInterrupt)  # same names in every run
    trainer = Trainer(max_steps=6, batch_size=2, lr=1e-2, warm_up=2, save_dir=save_dir,
                      save_interval=2, load_dir=load_dir, progress=False)
    trainer.train(runner, train_dataset=counting_dataset(7, padded=True))
    return load_file(save_dir / "trainable.safetensors")


def test_resume_ends_with_the_weights_of_a_run_that_never_stopped(tmp_path: Path) -> None:
    whole = _resumable_run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _resumable_run(tmp_path / "cut", cut_at=5)  # dies in step 5, after checkpoint-4
    assert ckpt.resolve_checkpoint(tmp_path / "cut").name == "checkpoint-4"
    resumed = _resumable_run(tmp_path / "cut", load_dir=tmp_path / "cut")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_resume_refuses_a_different_data_order(tmp_path: Path) -> None:
    _resumable_run(tmp_path)
    with pytest.raises(TrainerConfigError, match="2 examples per step and seed 1234; this run "
                                                 "has 1 and 1234"):
        Trainer(max_steps=6, batch_size=1, load_dir=tmp_path, progress=False).train(
            tiny_lm(seed=1), counting_dataset(7))


def test_resume_after_sigkill_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    run_reference_job(str(whole))
    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.train_helpers", str(cut)],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (cut / "latest").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        assert proc.poll() is None  # still training when killed
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stderr.close()
    step = int(ckpt.resolve_checkpoint(cut).name.split("-")[1])
    assert step < JOB["max_steps"] and not (cut / "trainable.safetensors").exists()
    run_reference_job(str(cut), load_dir=str(cut))
    expected, got = (load_file(d / "trainable.safetensors") for d in (whole, cut))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
