"""Issue 10, items 1-9: hostile hubs, planted files, odd configs and lying checkpoints.

Each test here failed before the fix it covers. Downloads run against the real loopback hub of
``tests/hub_server.py``; checkpoints are written in their real formats.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flagopt import hub
from flagopt.auto_model.registry import ModelSpec, parse_repo_id
from flagopt.errors import (
    ConfigError,
    CorruptCheckpointError,
    DownloadError,
    RegistryError,
    ShapeMismatchError,
    TokenizerError,
    UnsafePathError,
)
from flagopt.model import checkpoint
from flagopt.model.config import OPTConfig
from flagopt.model.loading import load_pretrained
from flagopt.model.synthetic import write_random_checkpoint
from flagopt.paths import safe_join
from tests.hub_server import HubServer, hub_server_fixture  # noqa: F401 - the fixture

REPO = "org/tiny-opt"
WEIGHTS = "pytorch_model.bin"
CONFIG = "config.json"
FAST = dict(progress=False, max_retries=2, retry_base_delay=0.001, retry_max_delay=0.01)
TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
            num_attention_heads=4, max_position_embeddings=64)


def _bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLAGOPT_ENDPOINT", "FLAGOPT_OFFLINE", "FLAGOPT_DISABLE_PROGRESS",
                 "FLAGOPT_SKIP_DISK_CHECK", "HF_TOKEN", "FLAGOPT_REGISTRY"):
        monkeypatch.delenv(name, raising=False)


def _gets(server: HubServer, name: str) -> list:
    return [r for r in server.requests if r.method == "GET" and r.path.endswith(name)]


# --- 1. symlinks: the user's are followed, planted ones never written through ---------------


def test_planted_incomplete_symlink_is_not_written_through(hub_server: HubServer,
                                                           tmp_path: Path) -> None:
    data = _bytes(64 * 1024)
    hub_server.add_file(REPO, WEIGHTS, data)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    dest = tmp_path / "cache" / WEIGHTS
    dest.parent.mkdir()
    (dest.parent / (WEIGHTS + ".incomplete")).symlink_to(victim)
    with pytest.raises(UnsafePathError, match="incomplete.*symbolic link"):
        hub.download_file(hub_server.url(REPO, WEIGHTS), dest, **FAST)
    assert victim.read_bytes() == b"precious"
    assert not dest.exists()


def test_planted_lock_symlink_is_not_followed(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.add_file(REPO, CONFIG, b"{}")
    victim = tmp_path / "victim.txt"
    dest = tmp_path / "cache" / CONFIG
    dest.parent.mkdir()
    (dest.parent / (CONFIG + ".lock")).symlink_to(victim)
    with pytest.raises(UnsafePathError, match="lock"):
        hub.download_file(hub_server.url(REPO, CONFIG), dest, **FAST)
    assert not victim.exists()  # O_CREAT through the link would have made it


def _hf_cache_snapshot(tmp_path: Path) -> Path:
    """huggingface_hub's cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    source = write_random_checkpoint(tmp_path / "src", OPTConfig(**TINY), layout="safetensors",
                                     num_shards=2, tokenizer=False)
    repo = tmp_path / "hf-cache" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, file in enumerate(sorted(source.iterdir())):
        shutil.move(file, blobs / f"blob{i}")
        (snap / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    return snap


def test_hf_cache_snapshot_with_symlinked_shards_loads(tmp_path: Path) -> None:
    snap = _hf_cache_snapshot(tmp_path)
    model = load_pretrained(snap)
    assert model.config.num_hidden_layers == 2


def test_model_dir_that_is_a_symlink_is_used(tmp_path: Path, hub_server: HubServer) -> None:
    other_disk = tmp_path / "other-disk" / "org--tiny-opt"
    other_disk.mkdir(parents=True)
    (other_disk / CONFIG).write_text("{}")
    models = tmp_path / "models"
    models.mkdir()
    (models / "org--tiny-opt").symlink_to(other_disk)
    assert safe_join(models, "org--tiny-opt") == models / "org--tiny-opt"
    paths = hub.download_repo_files(REPO, [CONFIG], models / "org--tiny-opt",
                                    endpoint=hub_server.endpoint, progress=False)
    assert paths[0].read_text() == "{}" and hub_server.requests == []


@pytest.mark.parametrize("name", ["../x.bin", "/etc/passwd", "a/../../x.bin", "a\\..\\x"])
def test_untrusted_names_still_may_not_escape(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_join(tmp_path, name)


# --- 2. one cache directory per (repo, revision) ---------------------------------------------


def test_dirname_is_injective() -> None:
    specs = [ModelSpec(name="a", repo="x/y", revision="foo--bar"),
             ModelSpec(name="b", repo="x/y", revision="foo/bar"),
             ModelSpec(name="c", repo="x/y", revision="main"),
             ModelSpec(name="d", repo="x-/y", revision="main")]
    names = [s.dirname for s in specs]
    assert len(set(names)) == len(names), names
    assert specs[2].dirname == "x--y"  # the existing layout of plain repos is kept


@pytest.mark.parametrize("value", ["x/y--z", "x--y/z", "x-/y", "x/y.", "x/-y"])
def test_double_dash_and_edge_punctuation_refused_in_repo_ids(value: str) -> None:
    assert parse_repo_id(value) is None
    assert parse_repo_id("x/y-z.v1_2") == ("x/y-z.v1_2", "main")


def test_registry_names_with_a_double_dash_are_refused() -> None:
    """A registry name 'org--x' would share the directory of the hub repo 'org/x'."""
    from flagopt.auto_model.registry import load_registry
    from flagopt.errors import RegistryError

    entry = {"repo": "org/x", "files": ["config.json"]}
    with pytest.raises(RegistryError, match="'--'"):
        load_registry({"format_version": 1, "models": {"org--x": entry}})
    assert "org-x" in load_registry({"format_version": 1, "models": {"org-x": entry}})


# --- 3. a resume never stitches two versions --------------------------------------------------


def _cut_then_change(server: HubServer, tmp_path: Path, name: str) -> tuple[Path, bytes]:
    old, new = (json.dumps({"blob": _bytes(99_994, seed=seed).hex()}).encode()
                for seed in (1, 2))
    assert len(old) == len(new) == 200_000
    server.add_file(REPO, name, old)
    server.faults.add(name, "cut_after", nbytes=50_000)
    dest = tmp_path / name
    with pytest.raises(DownloadError):
        hub.download_file(server.url(REPO, name), dest, **{**FAST, "max_retries": 0})
    assert (tmp_path / (name + ".incomplete")).stat().st_size == 50_000
    os.utime(server.add_file(REPO, name, new), ns=(1, 10 ** 18))  # a new mtime for sure
    return dest, new


@pytest.mark.parametrize("name", ["weights.dat", CONFIG])
def test_resume_after_the_file_changed_starts_over(tmp_path: Path, name: str) -> None:
    with HubServer(tmp_path / "mirror", mirror=True) as mirror:
        dest, new = _cut_then_change(mirror, tmp_path, name)
        hub.download_file(mirror.url(REPO, name), dest, **FAST)
        assert dest.read_bytes() == new
        resumed = _gets(mirror, name)[-1]
        assert resumed.header("If-Range") is not None and resumed.header("Range")
        assert resumed.status == 200


def test_resume_with_unchanged_validator_continues(tmp_path: Path) -> None:
    with HubServer(tmp_path / "mirror", mirror=True) as mirror:
        data = _bytes(200_000, seed=1)
        mirror.add_file(REPO, "weights.dat", data)
        mirror.faults.add("weights.dat", "cut_after", nbytes=50_000)
        dest = tmp_path / "weights.dat"
        hub.download_file(mirror.url(REPO, "weights.dat"), dest, **FAST)
        assert dest.read_bytes() == data
        last = _gets(mirror, "weights.dat")[-1]
        assert last.status == 206 and last.header("If-Range")
        assert not list(tmp_path.glob("weights.dat.*"))  # validator removed with the partial


# --- 4. only a 200/206 of the file is the file ------------------------------------------------


def test_302_without_location_is_not_the_file(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.add_file(REPO, CONFIG, b'{"a": 1}')
    hub_server.faults.add(CONFIG, "no_location", count=None)
    with pytest.raises(DownloadError, match="302.*no Location"):
        hub.download_file(hub_server.url(REPO, CONFIG), tmp_path / CONFIG, **FAST)
    assert not (tmp_path / CONFIG).exists()


@pytest.mark.parametrize("name", [CONFIG, WEIGHTS])
def test_html_page_is_refused_before_caching(hub_server: HubServer, tmp_path: Path,
                                             name: str) -> None:
    hub_server.add_file(REPO, name, b'{"a": 1}' if name == CONFIG else _bytes(4096))
    hub_server.faults.add(name, "html_page", count=None, method="GET")
    with pytest.raises(DownloadError, match="HTML"):
        hub.download_file(hub_server.url(REPO, name), tmp_path / name,
                          **{**FAST, "expected_size": None})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_gzip_body_is_refused(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.add_file(REPO, CONFIG, b'{"a": 1}')
    hub_server.faults.add(CONFIG, "gzip", count=None, method="GET")
    with pytest.raises(DownloadError, match="Content-Encoding 'gzip'"):
        hub.download_file(hub_server.url(REPO, CONFIG), tmp_path / CONFIG, **FAST)
    assert not (tmp_path / CONFIG).exists()
    assert all(r.header("Accept-Encoding") == "identity" for r in hub_server.requests)


def test_small_json_that_does_not_parse_is_moved_aside(tmp_path: Path) -> None:
    with HubServer(tmp_path / "mirror", mirror=True) as mirror:  # no checksum to catch it
        mirror.add_file(REPO, CONFIG, b'{"vocab_size": 5')
        dest = tmp_path / "m" / CONFIG
        with pytest.raises(DownloadError, match="not valid JSON.*moved to"):
            hub.download_file(mirror.url(REPO, CONFIG), dest, **FAST)
        assert not dest.exists()
        assert (tmp_path / "m" / "config.json.invalid").read_bytes() == b'{"vocab_size": 5'
        mirror.add_file(REPO, CONFIG, b'{"vocab_size": 5}')
        hub.download_file(mirror.url(REPO, CONFIG), dest, **FAST)  # fetched again, not kept
        assert dest.read_bytes() == b'{"vocab_size": 5}'


# --- 5. no secrets in messages ------------------------------------------------------------------


def test_credentials_redacted_from_errors_and_logs(hub_server: HubServer, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    endpoint = hub_server.endpoint.replace("http://", "http://alice:s3cret@")
    hub_server.faults.add(CONFIG, "status", count=1, code=500)
    caplog.set_level(logging.DEBUG, logger="flagopt")
    with pytest.raises(DownloadError) as info:
        hub.download_repo_files(REPO, [CONFIG], tmp_path, endpoint=endpoint, **FAST)
    text = str(info.value) + " ".join(r.getMessage() for r in caplog.records)
    assert "127.0.0.1" in str(info.value) and "s3cret" not in text
    assert "s3cret" not in getattr(info.value, "url", "")
    with pytest.raises(ValueError) as bad:
        hub.get_endpoint("ftp://alice:s3cret@host")
    assert "s3cret" not in str(bad.value)


# --- 6. read-only caches ----------------------------------------------------------------------


def test_read_only_cache_names_the_directory(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.add_file(REPO, CONFIG, b"{}")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a read-only tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        for dest in (mnt / CONFIG, mnt / "sub" / CONFIG):
            with pytest.raises(DownloadError, match=f"cannot write.*{mnt}.*FLAGOPT_HOME"):
                hub.download_file(hub_server.url(REPO, CONFIG), dest, **FAST)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# --- 7. every config field validated -----------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("pad_token_id", 10 ** 9), ("pad_token_id", "1"), ("pad_token_id", None),
    ("pad_token_id", 1.5), ("pad_token_id", True), ("bos_token_id", -1),
    ("eos_token_id", 128), ("init_std", -1), ("init_std", "0.02"), ("init_std", 0),
    ("init_std", float("inf")), ("init_std", float("nan")), ("dropout", True),
    ("vocab_size", 2.0), ("num_hidden_layers", "2"), ("do_layer_norm_before", 1),
    ("enable_bias", "yes"), ("use_cache", None), ("torch_dtype", 16),
    ("torch_dtype", "float17"), ("activation_function", ["relu"]), ("id2label", [1, 2]),
    ("layerdrop", -0.5), ("num_labels", 0), ("vocab_size", 10 ** 12),
])
def test_config_field_validated_with_file_field_value(tmp_path: Path, field: str,
                                                      value: object) -> None:
    data = {**OPTConfig(**TINY).to_dict(), field: value}
    path = tmp_path / CONFIG
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        OPTConfig.from_json(path)
    message = str(info.value)
    assert str(path) in message and field.removeprefix("id2") in message
    assert repr(value)[:6] in message or field == "id2label"


def test_valid_configs_still_load(tmp_path: Path) -> None:
    for extra in ({}, {"torch_dtype": "float16"}, {"init_std": 1}, {"dropout": 0}):
        config = OPTConfig(**TINY, **extra)
        assert OPTConfig.from_dict(config.to_dict()) == config


def test_absurd_layer_count_caught_before_building(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    directory = write_random_checkpoint(tmp_path / "m", OPTConfig(**TINY), layout="safetensors",
                                        tokenizer=False)
    config = json.loads((directory / CONFIG).read_text())
    (directory / CONFIG).write_text(json.dumps({**config, "num_hidden_layers": 20000}))
    built = []
    monkeypatch.setattr("flagopt.model.heads.OPTForCausalLM.__init__",
                        lambda *a, **k: built.append(1))
    with pytest.raises(ShapeMismatchError, match="num_hidden_layers.*20000.*2 layers"):
        load_pretrained(directory)
    assert built == []


def test_absurd_vocab_caught_before_building(tmp_path: Path) -> None:
    directory = write_random_checkpoint(tmp_path / "m", OPTConfig(**TINY), layout="bin",
                                        tokenizer=False)
    config = json.loads((directory / CONFIG).read_text())
    (directory / CONFIG).write_text(json.dumps({**config, "vocab_size": 10 ** 9}))
    with pytest.raises(ShapeMismatchError, match="embed_tokens.*vocab_size"):
        load_pretrained(directory)


# --- 8. JSON that is not the JSON we want ------------------------------------------------------


DEEP = "[" * 200_000 + "]" * 200_000


def test_deep_or_non_utf8_config(tmp_path: Path) -> None:
    path = tmp_path / CONFIG
    for text in (DEEP.encode(), b'{"vocab_size": "\xff\xfe"}'):
        path.write_bytes(text)
        with pytest.raises(ConfigError, match=str(path)):
            OPTConfig.from_json(path)


def test_deep_index(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": ' + DEEP + "}")
    with pytest.raises(CorruptCheckpointError, match=str(index)):
        checkpoint.find_weight_files(tmp_path)


def test_deep_tokenizer_config(tmp_path: Path) -> None:
    from flagopt.tokenizer import _read_json
    path = tmp_path / "tokenizer_config.json"
    path.write_text(DEEP)
    with pytest.raises(TokenizerError, match=str(path)):
        _read_json(path)


def test_deep_registry(tmp_path: Path) -> None:
    from flagopt.auto_model.registry import load_registry
    path = tmp_path / "registry.json"
    path.write_text(DEEP)
    with pytest.raises(RegistryError, match=str(path)):
        load_registry(path)


# --- 9. tensors that lie ------------------------------------------------------------------------


def _relabel_dtype(path: Path, tensor: str, dtype: str) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header[tensor]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n:])


def test_float_weight_relabelled_int_is_refused(tmp_path: Path) -> None:
    directory = write_random_checkpoint(tmp_path / "m", OPTConfig(**TINY), layout="safetensors",
                                        dtype=torch.float32, tokenizer=False)
    _relabel_dtype(directory / "model.safetensors", "model.decoder.layers.0.fc1.weight", "I32")
    with pytest.raises(CorruptCheckpointError, match="fc1.weight.*int32.*floating"):
        load_pretrained(directory)


def test_tensor_in_two_shards_is_refused(tmp_path: Path) -> None:
    directory = write_random_checkpoint(tmp_path / "m", OPTConfig(**TINY), layout="safetensors",
                                        num_shards=2, tokenizer=False)
    from safetensors.torch import load_file
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    name = "model.decoder.final_layer_norm.bias"
    other = next(s for s in set(index["weight_map"].values()) if s != index["weight_map"][name])
    tensors = load_file(directory / other)
    save_file({**tensors, name: torch.full((32,), 7.0, dtype=torch.float16)}, directory / other)
    with pytest.raises(CorruptCheckpointError, match="final_layer_norm.bias.*both"):
        load_pretrained(directory)
