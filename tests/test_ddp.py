"""env_type="pytorchDDP": two gloo processes on CPU take the steps one process takes with the
same global batch (padding and -100 labels included)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from flagopt import settings
from flagopt.train.trainer import Trainer
from tests.train_helpers import counting_dataset, tiny_lm

STEPS = dict(max_steps=3, lr=1e-2, warm_up=1, seed=11, progress=False)


def _data() -> tuple[list, list]:
    return counting_dataset(16, padded=True), counting_dataset(5, padded=True, seed=1)


def _worker(rank: int, port: int, save_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    settings.reload()
    torch.set_num_threads(1)
    train, valid = _data()
    Trainer(env_type="pytorchDDP", batch_size=2, save_dir=save_dir, save_interval=3,
            eval_interval=3, **STEPS).train(tiny_lm(), train, valid_dataset=valid)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_with_the_same_global_batch(tmp_path: Path,
                                                                 one_thread) -> None:
    ddp_dir = tmp_path / "ddp"
    context = mp.start_processes(_worker, args=(_free_port(), str(ddp_dir)), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the DDP run did not finish within 180 s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    train, valid = _data()
    model = tiny_lm()
    summary = Trainer(batch_size=4, save_dir=tmp_path / "one", **STEPS).train(
        model, train, valid_dataset=valid)
    ddp = load_file(ddp_dir / "trainable.safetensors")
    one = load_file(tmp_path / "one" / "trainable.safetensors")
    assert ddp.keys() == one.keys()
    for name in one:
        if name.endswith("k_proj.bias"):  # zero gradient: Adam amplifies rounding noise
            continue
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-5, atol=1e-6)
    lines = [json.loads(x) for x in (ddp_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == []  # log_interval 10 > 3 steps
    ddp_eval = [x["eval_loss"] for x in lines if "eval_loss" in x]
    assert ddp_eval == [pytest.approx(summary["eval_loss"], rel=1e-5)]
    assert (ddp_dir / "checkpoint-3" / "trainer_state.pt").is_file()  # rank 0 saved
