"""The prepared-weights cache: bit-identical to a normal load, used, never stale, repaired when
damaged, one build under concurrent first loads, and a normal load where it cannot write."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flagopt import settings
from flagopt.auto_model import AutoLoader
from flagopt.model import loading, prepared
from flagopt.model.heads import OPTForSequenceClassification
from flagopt.model.loading import load_pretrained
from flagopt.model.prepared import MANIFEST_NAME, PREPARED_DIRNAME, WEIGHTS_NAME, load_prepared
from flagopt.model.synthetic import write_random_checkpoint
from tests.conftest import Env, tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[2, 17, 5, 99, 42, 7], [2, 3, 64, 1, 8, 120]])
CONFIGS = {
    "tied": {},
    "350m_style": dict(do_layer_norm_before=False, word_embed_proj_dim=16),
    "untied": dict(extra={"tie_word_embeddings": False}),
}
KINDS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
         "int8": (torch.bfloat16, "int8"), "w8a8": (torch.bfloat16, "w8a8")}


def _checkpoint(directory: Path, layout: str = "safetensors", seed: int = 0, **overrides
                ) -> Path:
    return write_random_checkpoint(directory, tiny_config(**overrides), layout=layout,
                                   tokenizer=False, std=0.05, seed=seed)


def _entries(directory: Path) -> list[str]:
    root = directory / PREPARED_DIRNAME
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _assert_same(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, ref = model.state_dict(), reference.state_dict()
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].dtype == ref[name].dtype, name
        assert torch.equal(ours[name], ref[name]), name
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)


def _no_normal_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was read again instead of the prepared weights")
    monkeypatch.setattr(loading, "load_pretrained", refuse)


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_prepared_load_is_bit_identical_and_skips_the_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        kind: str, config: str, layout: str) -> None:
    dtype, quantize = KINDS[kind]
    directory = _checkpoint(tmp_path, layout, **CONFIGS[config])
    reference = load_pretrained(directory, dtype=dtype, quantize=quantize)
    first = load_prepared(directory, dtype=dtype, quantize=quantize)  # builds the entry
    _assert_same(first, reference)
    assert len(_entries(directory)) == 1
    _no_normal_load(monkeypatch)
    with caplog.at_level(logging.INFO, logger=prepared.__name__):
        warm = load_prepared(directory, dtype=dtype, quantize=quantize)
    assert "loaded prepared weights" in caplog.text
    _assert_same(warm, reference)
    embed = warm.model.decoder.embed_tokens
    assert (warm.lm_head.weight is embed.weight) == (config != "untied")
    if quantize:
        assert warm.lm_head.weight.dtype == torch.int8
        assert (warm.lm_head.scale is embed.scale) == (config != "untied")
    assert not any(p.requires_grad for p in warm.parameters()) and not warm.training


def test_warm_load_maps_the_file_without_copying(tmp_path: Path) -> None:
    directory = _checkpoint(tmp_path)
    load_prepared(directory, dtype=torch.bfloat16)
    model = load_prepared(directory, dtype=torch.bfloat16)
    (entry,) = _entries(directory)
    size = (directory / PREPARED_DIRNAME / entry / WEIGHTS_NAME).stat().st_size
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}.values()
    start = min(t.data_ptr() for t in tensors)
    end = max(t.data_ptr() + t.numel() * t.element_size() for t in tensors)
    assert end - start <= size  # every tensor lies inside one mapping of the file


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_tensor_is_aligned_and_the_file_is_plain_safetensors(tmp_path: Path,
                                                                    kind: str) -> None:
    # torch's fused int8 kernel crashed (SIGSEGV, AVX-512) on int8 weights 8 bytes off a
    # 16-byte boundary, where the first writer's 8-byte alignment could put them.
    from safetensors import safe_open
    dtype, quantize = KINDS[kind]
    directory = _checkpoint(tmp_path, **CONFIGS["350m_style"])
    load_prepared(directory, dtype=dtype, quantize=quantize)
    warm = load_prepared(directory, dtype=dtype, quantize=quantize)
    for name, t in [*warm.named_parameters(), *warm.named_buffers()]:
        assert t.data_ptr() % prepared.ALIGN == 0, name
    (entry,) = _entries(directory)
    path = directory / PREPARED_DIRNAME / entry / WEIGHTS_NAME
    manifest = json.loads((path.parent / MANIFEST_NAME).read_text())
    with safe_open(str(path), "pt") as fh:  # the reference reader refuses holes and overlaps
        names = {n for n in fh.keys() if not n.startswith(prepared.PAD_PREFIX)}
        pads = [fh.get_tensor(n) for n in fh.keys() if n.startswith(prepared.PAD_PREFIX)]
    assert names == {n for n, _, _ in manifest["tensors"]}
    assert all(p.dtype == torch.uint8 and not p.any() and p.numel() < prepared.ALIGN
               for p in pads)


def test_other_options_get_their_own_entries(tmp_path: Path) -> None:
    directory = _checkpoint(tmp_path)
    for kwargs in ({}, {"dtype": torch.bfloat16}, {"dtype": torch.bfloat16, "quantize": "int8"},
                   {"attn_implementation": "eager"}):
        load_prepared(directory, **kwargs)
    assert len(_entries(directory)) == 4


def test_a_changed_checkpoint_of_the_same_size_is_rebuilt(tmp_path: Path) -> None:
    directory = _checkpoint(tmp_path, seed=0)
    weights = directory / "model.safetensors"
    old = load_prepared(directory)
    (old_entry,) = _entries(directory)
    before = weights.stat()
    _checkpoint(tmp_path / "other", seed=1)
    shutil.copyfile(tmp_path / "other" / "model.safetensors", weights)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # even the mtime put back
    assert weights.stat().st_size == before.st_size
    model = load_prepared(directory)
    _assert_same(model, load_pretrained(directory))
    assert not torch.equal(model.lm_head.weight, old.lm_head.weight)
    (new_entry,) = _entries(directory)  # the stale entry was removed
    assert new_entry != old_entry


def _flip(path: Path) -> None:
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(st.st_size // 2)
        byte = fh.read(1)
        fh.seek(st.st_size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 3)


def _garble_manifest(path: Path) -> None:
    (path.parent / MANIFEST_NAME).write_text("{not json")


def _remove_weights(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("damage", [_flip, _truncate, _garble_manifest, _remove_weights])
def test_a_damaged_entry_is_discarded_and_rebuilt(tmp_path: Path, damage,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    directory = _checkpoint(tmp_path)
    reference = load_pretrained(directory, dtype=torch.bfloat16, quantize="int8")
    load_prepared(directory, dtype=torch.bfloat16, quantize="int8")
    (entry,) = _entries(directory)
    damage(directory / PREPARED_DIRNAME / entry / WEIGHTS_NAME)
    with caplog.at_level(logging.INFO, logger=prepared.__name__):
        model = load_prepared(directory, dtype=torch.bfloat16, quantize="int8")
    assert "rebuilding" in caplog.text and "prepared " in caplog.text
    _assert_same(model, reference)
    assert _entries(directory) == [entry]
    _assert_same(load_prepared(directory, dtype=torch.bfloat16, quantize="int8"), reference)


CHILD = """
import hashlib, json, logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from flagopt.model.prepared import load_prepared
model = load_prepared(sys.argv[1], dtype=torch.bfloat16, quantize="int8")
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode() + tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
print(json.dumps(digest.hexdigest()))
"""


def _digest(model: torch.nn.Module) -> str:
    import hashlib
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode()
                      + tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_two_processes_loading_at_once_build_once(tmp_path: Path) -> None:
    directory = _checkpoint(tmp_path, hidden_size=64, ffn_dim=256, vocab_size=512,
                            num_hidden_layers=4)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(directory)], cwd=REPO_ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    expected = _digest(load_pretrained(directory, dtype=torch.bfloat16, quantize="int8"))
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
        assert json.loads(out) == expected
    assert sum(err.count(f"prepared {directory} weights in") for _, err in results) == 1
    (entry,) = _entries(directory)  # no temporary or lock file left
    assert not entry.startswith(".")


def _refuse_mkdir(monkeypatch: pytest.MonkeyPatch, under: Path) -> None:
    original = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(under)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", mkdir)


def test_a_read_only_directory_loads_normally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    directory = _checkpoint(tmp_path)
    _refuse_mkdir(monkeypatch, directory)
    with caplog.at_level(logging.INFO, logger=prepared.__name__):
        model = load_prepared(directory)
    assert "cannot be written" in caplog.text
    _assert_same(model, load_pretrained(directory))
    assert not (directory / PREPARED_DIRNAME).exists()


def test_a_read_only_directory_still_uses_an_entry_built_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _checkpoint(tmp_path)
    load_prepared(directory)
    _refuse_mkdir(monkeypatch, directory)
    _no_normal_load(monkeypatch)
    load_prepared(directory)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_a_directory_without_write_permission_loads_normally(tmp_path: Path) -> None:
    directory = _checkpoint(tmp_path)
    directory.chmod(0o555)
    try:
        _assert_same(load_prepared(directory), load_pretrained(directory))
        assert not (directory / PREPARED_DIRNAME).exists()
    finally:
        directory.chmod(0o755)


def test_a_full_disk_leaves_nothing_half_written(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _checkpoint(tmp_path)
    original = prepared._write_json

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(prepared, "_write_json", disk_full)  # after the weights file is written
    _assert_same(load_prepared(directory), load_pretrained(directory))
    assert _entries(directory) == []
    monkeypatch.setattr(prepared, "_write_json", original)
    load_prepared(directory)
    assert len(_entries(directory)) == 1


def test_too_little_free_space_skips_the_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               env: Env) -> None:
    directory = _checkpoint(tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(prepared.shutil, "disk_usage",
                        lambda path: usage._replace(free=1000))
    _assert_same(load_prepared(directory), load_pretrained(directory))
    assert _entries(directory) == []
    env.setenv("FLAGOPT_SKIP_DISK_CHECK", "1")
    load_prepared(directory)
    assert len(_entries(directory)) == 1


def test_fresh_task_heads_are_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _checkpoint(tmp_path)
    first = load_prepared(directory, OPTForSequenceClassification)
    _no_normal_load(monkeypatch)
    second = load_prepared(directory, OPTForSequenceClassification)
    assert not torch.equal(first.score.weight, second.score.weight)  # fresh each time
    for name, tensor in first.state_dict().items():
        if not name.startswith("score."):
            assert torch.equal(tensor, second.state_dict()[name]), name


def test_auto_loader_switch(tmp_path: Path, env: Env) -> None:
    directory = _checkpoint(tmp_path)
    AutoLoader("lm", str(directory), device="cpu", prepared_cache=False)
    assert _entries(directory) == []
    env.setenv("FLAGOPT_PREPARED_CACHE", "0")
    AutoLoader("lm", str(directory), device="cpu")
    assert _entries(directory) == []
    AutoLoader("lm", str(directory), device="cpu", prepared_cache=True)  # the argument wins
    assert len(_entries(directory)) == 1
    env.delenv("FLAGOPT_PREPARED_CACHE")
    AutoLoader("lm", str(directory), device="cpu", dtype="bfloat16")  # on by default
    assert len(_entries(directory)) == 2
    with pytest.raises(TypeError, match="prepared_cache='yes'"):
        AutoLoader("lm", str(directory), device="cpu", prepared_cache="yes")


def test_the_setting_is_parsed() -> None:
    assert settings.Settings.from_environ({}).prepared_cache
    for off in ("0", "false", " OFF ", "no"):
        assert not settings.Settings.from_environ({"FLAGOPT_PREPARED_CACHE": off}).prepared_cache
    assert settings.Settings.from_environ({"FLAGOPT_PREPARED_CACHE": "1"}).prepared_cache
