"""``flagopt serve`` as a process: the ready line, and SIGTERM with requests in flight (all of
them finish, the process exits 0)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import save_file

from tests.serve_helpers import tiny_lm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-serve")
    model = tiny_lm()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    return directory


def test_sigterm_lets_requests_in_flight_finish_and_exits_0(model_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flagopt.cli", "serve", str(model_dir), "--port", "0",
         "--served-model-name", "tiny", "--max-batch-size", "2", "--offline", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = proc.stdout.readline()  # blocks until ready (or the process dies)
        assert "serving tiny at http://127.0.0.1:" in line, proc.stderr.read()
        url = line.split(" at ")[1].split("/v1")[0]
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 60, "ignore_eos": True,
                "temperature": 0}
        results: list[httpx.Response] = []
        workers = [threading.Thread(target=lambda: results.append(
            httpx.post(f"{url}/v1/completions", json=body, timeout=60))) for _ in range(4)]
        for w in workers:
            w.start()
        accepted = 'prompt_tokens_total{model_name="tiny"} 8'  # 4 prompts of 2 tokens
        deadline = time.monotonic() + 60
        while accepted not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, "the requests never reached the engine"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # all four accepted: 2 running, 2 waiting for a row
        for w in workers:
            w.join(60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [r.status_code for r in results] == [200] * 4
    assert all(r.json()["usage"]["completion_tokens"] == 60 for r in results)
