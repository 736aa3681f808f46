"""AutoLoader, the registry and flagopt-download against a real loopback hub + CDN
(tests/hub_server.py) serving tiny random-weight checkpoints in the hub's published layouts.

No mocks of requests and no real network: every download crosses HTTP on 127.0.0.1, and the
server's request log shows what went over the wire.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from flagopt import hub as hub_module
from flagopt.auto_model import (AutoLoader, config_for, download_model, flagopt_home,
                                get_model_spec, list_models, load_registry, resolve_model)
from flagopt.auto_model.registry import ModelSpec
from flagopt.download import main as download_main
from flagopt.errors import (ChecksumError, OfflineError, RegistryError, UnknownModelError,
                            UnknownTaskError)
from flagopt.model.checkpoint import WEIGHT_FILES
from flagopt.model.config import OPTConfig
from flagopt.model.heads import (OPTForCausalLM, OPTForQuestionAnswering,
                                 OPTForSequenceClassification)
from flagopt.model.loading import load_pretrained
from flagopt.model.prepared import PREPARED_DIRNAME
from flagopt.model.synthetic import write_random_checkpoint
from tests.conftest import Env
from tests.hub_server import HubServer

REPO_ROOT = Path(__file__).resolve().parents[1]
SIX = ["opt-125m-en", "opt-350m-en", "opt-1.3b-en", "opt-2.7b-en", "opt-6.7b-en", "opt-13b-en"]
ZOO = [*SIX, "opt-30b-en", "opt-66b-en"]  # the six, then the two FlagAI also has
SMALL_FILES = ["config.json", "generation_config.json", "vocab.json", "merges.txt",
               "special_tokens_map.json", "tokenizer_config.json"]
TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
            num_attention_heads=4, max_position_embeddings=64)
IDS = torch.tensor([[2, 5, 17, 33, 64, 9], [2, 100, 7, 7, 1, 120]])

# Our registry names pointed at fake repos in the hub's real layouts.
LAYOUTS = {
    # name: (repo, config overrides, write_random_checkpoint options)
    "opt-125m-en": ("test-org/opt-125m", {}, dict(layout="bin", prefix=True, lm_head=True)),
    "opt-350m-en": ("test-org/opt-350m", dict(do_layer_norm_before=False, word_embed_proj_dim=16),
                    dict(layout="bin", prefix=False, lm_head=False)),
    "opt-1.3b-en": ("test-org/opt-1.3b", {}, dict(layout="safetensors", prefix=True)),
    "opt-6.7b-en": ("test-org/opt-6.7b", {}, dict(layout="bin", num_shards=2, prefix=False,
                                                  lm_head=False)),
}
# Hub-repo-id form only (not in the registry): sharded safetensors and no tokenizer files.
BARE_REPO = "test-org/bare-st"
SHARD_2 = "pytorch_model-00002-of-00002.bin"


@dataclass
class Zoo:
    root: Path  # the fake hub's files: root/<repo>/<file>
    registry: dict
    registry_file: Path

    def source(self, repo: str) -> Path:
        return self.root / repo


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _registry_entry(repo_dir: Path, repo: str, config: OPTConfig, checksums: bool) -> dict:
    files = SMALL_FILES + sorted(p.name for p in repo_dir.iterdir() if p.name not in SMALL_FILES)
    arch = {k: getattr(config, k) for k in ("num_hidden_layers", "hidden_size", "ffn_dim",
                                            "num_attention_heads", "word_embed_proj_dim",
                                            "do_layer_norm_before", "vocab_size",
                                            "max_position_embeddings")}
    entry = {"repo": repo, "revision": "main", "files": files, "architecture": arch}
    if checksums:
        entry["sizes"] = {f: (repo_dir / f).stat().st_size for f in files}
        entry["sha256"] = {f: _sha((repo_dir / f).read_bytes()) for f in files}
    return entry


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    root = tmp_path_factory.mktemp("zoo-hub")
    models = {}
    for i, (name, (repo, overrides, options)) in enumerate(LAYOUTS.items()):
        config = OPTConfig(**{**TINY, **overrides})
        write_random_checkpoint(root / repo, config, seed=i, **options)
        models[name] = _registry_entry(root / repo, repo, config, checksums=name == "opt-125m-en")
    write_random_checkpoint(root / BARE_REPO, OPTConfig(**TINY), layout="safetensors",
                            num_shards=2, seed=9, tokenizer=False)
    registry = {"format_version": 1, "models": models}
    registry_file = root / "test-registry.json"
    registry_file.write_text(json.dumps(registry))
    return Zoo(root, registry, registry_file)


@pytest.fixture
def hub(zoo: Zoo) -> Iterator[HubServer]:
    with HubServer(zoo.root) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean_env(env: Env, tmp_path: Path) -> None:
    for name in ("FLAGOPT_ENDPOINT", "FLAGOPT_OFFLINE", "FLAGOPT_REGISTRY", "HF_TOKEN"):
        env.delenv(name, raising=False)
    env.setenv("FLAGOPT_HOME", str(tmp_path / "home"))
    env.setenv("FLAGOPT_DISABLE_PROGRESS", "1")


def _load(zoo: Zoo, hub: HubServer, name: str, model_dir: Path | None, **kwargs) -> AutoLoader:
    kwargs = {"registry": zoo.registry, "endpoint": hub.endpoint, "progress": False,
              "device": "cpu", **kwargs}
    return AutoLoader(kwargs.pop("task_name", "lm"), model_name=name, model_dir=model_dir,
                      **kwargs)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, attention_mask=torch.ones_like(IDS)).logits


def _reference(directory: Path) -> torch.Tensor:
    return _logits(load_pretrained(directory, OPTForCausalLM))


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith((".incomplete", ".lock")))


def _is_weights_request(path: str) -> bool:
    return path.split("?")[0].endswith((".bin", ".safetensors", ".index.json"))


def _weight_heads(hub: HubServer) -> list[str]:
    """Names from WEIGHT_FILES that were asked for with HEAD, in order."""
    names = [r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "HEAD"]
    return [n for n in names if n in WEIGHT_FILES]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAGOPT_")}
    return {**env, "PYTHONPATH": str(REPO_ROOT), "FLAGOPT_DISABLE_PROGRESS": "1", **extra}


# --- the packaged registry --------------------------------------------------------------------


def test_packaged_registry_describes_the_six_models() -> None:
    specs = load_registry()
    assert list(specs) == ZOO
    assert [s.repo for s in specs.values()] == [f"facebook/{n[:-3]}" for n in ZOO]
    for spec in specs.values():
        assert spec.revision == "main" and spec.config_files == tuple(SMALL_FILES)
        assert spec.sha256 == {}  # none is known for certain, so none is stated
    assert specs["opt-125m-en"].weight_files == ("pytorch_model.bin",)
    assert specs["opt-125m-en"].weights_size == 250_540_281
    assert specs["opt-350m-en"].sizes == {} and specs["opt-350m-en"].weights_size is None
    assert specs["opt-6.7b-en"].weight_files == (
        "pytorch_model-00001-of-00002.bin", SHARD_2, "pytorch_model.bin.index.json")
    assert len(specs["opt-13b-en"].weight_files) == 4
    assert specs["opt-125m-en"].parameters == 125_239_296
    assert specs["opt-350m-en"].parameters == 331_196_416
    assert specs["opt-350m-en"].architecture["word_embed_proj_dim"] == 512
    assert specs["opt-350m-en"].architecture["do_layer_norm_before"] is False
    assert specs["opt-13b-en"].architecture["num_attention_heads"] == 40


def test_registry_resolution_never_touches_the_network(hub: HubServer) -> None:
    spec = resolve_model("Opt-6.7B-EN")
    assert isinstance(spec, ModelSpec) and spec.name == "opt-6.7b-en"
    assert get_model_spec("OPT-125M-en").repo == "facebook/opt-125m"
    assert hub.requests == []


# --- download and load ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_download_load_then_reload_with_the_server_stopped(zoo: Zoo, hub: HubServer,
                                                           tmp_path: Path, name: str) -> None:
    repo = LAYOUTS[name][0]
    loader = _load(zoo, hub, name, tmp_path / "models")
    assert loader.local_dir == tmp_path / "models" / name == loader.model_dir
    torch.testing.assert_close(_logits(loader.get_model()), _reference(zoo.source(repo)),
                               rtol=0, atol=0)
    for file in zoo.registry["models"][name]["files"]:
        assert (loader.local_dir / file).read_bytes() == (zoo.source(repo) / file).read_bytes()
    assert _leftovers(tmp_path) == []
    assert hub.requests_for(f"*{repo}*", method="GET")

    hub.stop()
    hub.clear_requests()
    again = _load(zoo, hub, name, tmp_path / "models")
    torch.testing.assert_close(_logits(again.get_model()), _logits(loader.get_model()),
                               rtol=0, atol=0)
    assert hub.requests == []


def test_registry_checksums_are_used(zoo: Zoo, hub: HubServer, tmp_path: Path) -> None:
    # opt-125m-en's test entry states sizes and sha256 of every file: no HEAD is needed.
    _load(zoo, hub, "opt-125m-en", tmp_path)
    assert hub.requests and all(r.method == "GET" for r in hub.requests)
    _load(zoo, hub, "opt-350m-en", tmp_path)
    assert hub.requests_for("*/opt-350m/*/pytorch_model.bin", method="HEAD", server="hub")


@pytest.mark.parametrize("via_env", [False, True])
def test_offline_with_a_missing_shard_names_it(zoo: Zoo, hub: HubServer, tmp_path: Path,
                                               env: Env,
                                               via_env: bool) -> None:
    loader = _load(zoo, hub, "opt-6.7b-en", tmp_path)
    (loader.local_dir / SHARD_2).unlink()
    hub.clear_requests()
    if via_env:
        env.setenv("FLAGOPT_OFFLINE", "1")
    with pytest.raises(OfflineError, match=SHARD_2) as info:
        _load(zoo, hub, "opt-6.7b-en", tmp_path, offline=not via_env)
    assert "pytorch_model-00001" not in str(info.value).replace(str(tmp_path), "")
    assert hub.requests == []


def test_unknown_model_lists_names_and_suggests_the_nearest(zoo: Zoo, hub: HubServer,
                                                            tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError) as info:
        _load(zoo, hub, "opt-125-en", tmp_path)
    message = str(info.value)
    assert "did you mean 'opt-125m-en'" in message
    assert all(name in message for name in SIX)
    assert "owner/name[@revision]" in message
    assert hub.requests == []
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("task, nearest", [("lmm", "lm"), ("clasification", "classification")])
def test_unknown_task_lists_tasks_and_suggests(zoo: Zoo, hub: HubServer, tmp_path: Path,
                                               task: str, nearest: str) -> None:
    with pytest.raises(UnknownTaskError) as info:
        _load(zoo, hub, "opt-125m-en", tmp_path, task_name=task)
    message = str(info.value)
    assert f"did you mean '{nearest}'" in message
    assert all(t in message for t in ("lm", "classification", "qa", "seq_cls"))
    assert hub.requests == [] and not (tmp_path / "opt-125m-en").exists()


def test_names_are_case_insensitive(zoo: Zoo, hub: HubServer, tmp_path: Path) -> None:
    loader = _load(zoo, hub, "OPT-125M-En", tmp_path)
    assert loader.model_name == "opt-125m-en"
    assert loader.local_dir == tmp_path / "opt-125m-en"
    hub.clear_requests()
    _load(zoo, hub, "opt-125m-en", tmp_path)  # the same directory: nothing to fetch
    assert hub.requests == []


# --- the other name forms ---------------------------------------------------------------------


def test_hub_repo_id_finds_sharded_safetensors_by_probing(zoo: Zoo, hub: HubServer,
                                                          tmp_path: Path) -> None:
    loader = _load(zoo, hub, f"{BARE_REPO}@main", tmp_path)
    assert loader.local_dir == tmp_path / "test-org--bare-st"
    # The first preference exists, so nothing else is asked for. (The index is a small file:
    # its download HEADs it once more for its size and git hash.)
    assert set(_weight_heads(hub)) == {"model.safetensors.index.json"}
    assert sorted(p.name for p in loader.local_dir.glob("model*")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"]
    torch.testing.assert_close(_logits(loader.get_model()), _reference(zoo.source(BARE_REPO)),
                               rtol=0, atol=0)
    # The repo has no tokenizer files (404s are fine): OPT's standard tokenizer is used.
    assert loader.get_tokenizer().encode_prompt("Hello world") == [2, 31414, 232]

    hub.stop()
    hub.clear_requests()
    again = _load(zoo, hub, f"{BARE_REPO}@main", tmp_path)
    assert again.local_dir == loader.local_dir and hub.requests == []


def test_hub_repo_id_with_bin_only(zoo: Zoo, hub: HubServer, tmp_path: Path) -> None:
    repo = LAYOUTS["opt-125m-en"][0]
    loader = _load(zoo, hub, repo, tmp_path)
    # Asked in order of preference: three 404s, then one HEAD whose sha256 and size the
    # download reuses.
    assert _weight_heads(hub) == list(WEIGHT_FILES)
    assert loader.local_dir == tmp_path / "test-org--opt-125m"
    assert not list(loader.local_dir.glob("*.safetensors*"))
    torch.testing.assert_close(_logits(loader.get_model()), _reference(zoo.source(repo)),
                               rtol=0, atol=0)
    assert loader.get_tokenizer().encode_prompt("A photo of a cat") == [2, 250, 1345, 9, 10, 4758]


def test_local_directory_is_used_in_place(zoo: Zoo, hub: HubServer) -> None:
    source = zoo.source(LAYOUTS["opt-350m-en"][0])
    for form in (str(source), source):
        loader = AutoLoader("lm", model_name=form, device="cpu", endpoint=hub.endpoint)
        assert loader.local_dir == source.resolve() and loader.spec is None
        torch.testing.assert_close(_logits(loader.get_model()), _reference(source),
                                   rtol=0, atol=0)
    assert hub.requests == []


def test_unusable_local_directory_and_bad_forms(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    for name in ("../no-such-dir", "owner/name@..", "/no/such/dir", "a/b/c", ""):
        with pytest.raises(UnknownModelError):
            resolve_model(name)


# --- only_download_config -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["opt-125m-en", BARE_REPO])
def test_only_download_config_fetches_no_weights(zoo: Zoo, hub: HubServer, tmp_path: Path,
                                                 name: str) -> None:
    loader = _load(zoo, hub, name, tmp_path, only_download_config=True)
    assert hub.requests and not [r.path for r in hub.requests if _is_weights_request(r.path)]
    assert (loader.local_dir / "config.json").is_file()
    assert not [p for p in loader.local_dir.iterdir() if _is_weights_request(p.name)]
    model = loader.get_model()
    assert not model.training and model.model.decoder.embed_tokens.weight.dtype == torch.float32
    logits = _logits(model)
    assert logits.shape == (2, 6, TINY["vocab_size"]) and torch.isfinite(logits).all()
    ln = model.model.decoder.layers[0].self_attn_layer_norm
    assert torch.equal(ln.weight, torch.ones_like(ln.weight))
    assert torch.equal(ln.bias, torch.zeros_like(ln.bias))
    assert torch.equal(model.model.decoder.layers[0].fc1.bias, torch.zeros(TINY["ffn_dim"]))
    std = model.model.decoder.layers[0].fc1.weight.std().item()
    assert 0.015 < std < 0.025  # normal(0, init_std=0.02)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight

    # Loading for real afterwards fetches just the weights.
    hub.clear_requests()
    full = _load(zoo, hub, name, tmp_path)
    assert all(_is_weights_request(r.path) or r.status == 404 for r in hub.requests)
    torch.testing.assert_close(_logits(full.get_model()),
                               _reference(zoo.source(full.spec.repo)), rtol=0, atol=0)


# --- where files go ---------------------------------------------------------------------------


def test_model_dir_layout_and_flagopt_home(zoo: Zoo, hub: HubServer, tmp_path: Path,
                                           env: Env) -> None:
    flagai = _load(zoo, hub, "opt-350m-en", tmp_path / "checkpoints")
    assert flagai.local_dir == tmp_path / "checkpoints" / "opt-350m-en"
    assert (flagai.local_dir / "pytorch_model.bin").is_file()
    assert not (tmp_path / "home").exists()

    home = _load(zoo, hub, "opt-350m-en", None)
    assert home.local_dir == tmp_path / "home" / "opt-350m-en" == flagopt_home() / "opt-350m-en"
    assert (home.local_dir / "pytorch_model.bin").is_file()

    env.delenv("FLAGOPT_HOME")
    env.setenv("HOME", str(tmp_path / "user"))
    assert flagopt_home() == tmp_path / "user" / ".cache" / "flagopt"


def test_flagopt_registry_env_adds_and_overrides(zoo: Zoo, hub: HubServer, tmp_path: Path,
                                                 env: Env) -> None:
    models = zoo.registry["models"]
    first = tmp_path / "first.json"
    first.write_text(json.dumps({"format_version": 1, "models": {
        "tiny-extra-en": models["opt-350m-en"], "opt-125m-en": models["opt-6.7b-en"]}}))
    second = tmp_path / "second.json"
    second.write_text(json.dumps({"format_version": 1, "_comment": "later files win",
                                  "models": {"TINY-EXTRA-EN": models["opt-1.3b-en"]}}))
    env.setenv("FLAGOPT_REGISTRY", str(first))
    assert get_model_spec("opt-125m-en").repo == "test-org/opt-6.7b"  # overridden
    assert get_model_spec("opt-350m-en").repo == "facebook/opt-350m"  # untouched
    assert list_models()[:6] == SIX and list_models()[-1] == "tiny-extra-en"

    loader = AutoLoader("lm", model_name="tiny-extra-en", device="cpu", endpoint=hub.endpoint)
    assert loader.local_dir == tmp_path / "home" / "tiny-extra-en"
    torch.testing.assert_close(_logits(loader.get_model()),
                               _reference(zoo.source("test-org/opt-350m")), rtol=0, atol=0)

    env.setenv("FLAGOPT_REGISTRY", os.pathsep.join([str(first), str(second)]))
    assert get_model_spec("tiny-extra-en").repo == "test-org/opt-1.3b"
    # A registry= argument comes last of all.
    override = {"format_version": 1, "models": {"tiny-extra-en": models["opt-125m-en"]}}
    assert get_model_spec("tiny-extra-en", registry=override).repo == "test-org/opt-125m"

    env.setenv("FLAGOPT_REGISTRY", str(tmp_path / "missing.json"))
    with pytest.raises(RegistryError, match="missing.json"):
        list_models()


GOOD_ENTRY = {"repo": "org/tiny", "files": ["config.json", "pytorch_model.bin"]}


@pytest.mark.parametrize("entry, field", [
    ({"files": ["config.json"]}, "'repo'"),
    ({**GOOD_ENTRY, "repo": "../etc/passwd"}, "'repo'"),
    ({**GOOD_ENTRY, "fles": []}, "did you mean 'files'"),
    ({**GOOD_ENTRY, "files": []}, "'files'"),
    ({**GOOD_ENTRY, "files": ["config.json", "../escape.bin"]}, "'files'"),
    ({**GOOD_ENTRY, "files": ["pytorch_model.bin"]}, "config.json"),
    ({**GOOD_ENTRY, "sizes": {"model.bin": 3}}, "'sizes'"),
    ({**GOOD_ENTRY, "sizes": {"pytorch_model.bin": -1}}, "'sizes'"),
    ({**GOOD_ENTRY, "sha256": {"pytorch_model.bin": "abc"}}, "'sha256'"),
    ({**GOOD_ENTRY, "architecture": {"hidden_size": 30, "num_attention_heads": 4}},
     "'architecture'"),
    ({**GOOD_ENTRY, "architecture": {"hiden_size": 32}}, "did you mean 'hidden_size'"),
    ({**GOOD_ENTRY, "architecture": {"hidden_size": 32, "num_attention_heads": 4,
                                     "parameters": 5}}, "'parameters'"),
])
def test_registry_schema_errors_name_entry_and_field(entry: dict, field: str) -> None:
    with pytest.raises(RegistryError) as info:
        load_registry({"format_version": 1, "models": {"my-model": entry}})
    assert "'my-model'" in str(info.value) and field in str(info.value)


def test_registry_format_errors() -> None:
    with pytest.raises(RegistryError, match="format_version"):
        load_registry({"format_version": 2, "models": {}})
    with pytest.raises(RegistryError, match="'models'"):
        load_registry({"format_version": 1, "models": []})
    with pytest.raises(RegistryError, match="twice"):
        load_registry({"format_version": 1, "models": {"a": GOOD_ENTRY, "A": GOOD_ENTRY}})
    with pytest.raises(RegistryError, match="model name"):
        load_registry({"format_version": 1, "models": {"a/b": GOOD_ENTRY}})
    assert load_registry({"format_version": 1, "models": {"a": GOOD_ENTRY}})["a"].parameters \
        is None


# --- concurrency ------------------------------------------------------------------------------

CHILD = """
import json, sys, torch
from flagopt.auto_model import AutoLoader
loader = AutoLoader("lm", model_name=sys.argv[1], model_dir=sys.argv[2], device="cpu",
                    progress=False)
ids = torch.tensor(json.loads(sys.argv[3]))
with torch.no_grad():
    logits = loader.get_model()(ids, attention_mask=torch.ones_like(ids)).logits
print(json.dumps(logits.tolist()))
"""


def test_two_processes_loading_at_once_end_with_one_copy(zoo: Zoo, hub: HubServer,
                                                         tmp_path: Path) -> None:
    name, repo = "opt-6.7b-en", LAYOUTS["opt-6.7b-en"][0]
    # Slow the first shard down so the two processes overlap on it.
    size = (zoo.source(repo) / "pytorch_model-00001-of-00002.bin").stat().st_size
    hub.faults.add("pytorch_model-00001-of-00002.bin", "drip", count=1, server="cdn",
                   after=size - 64, step=16, interval=0.1)
    env = _env(FLAGOPT_REGISTRY=str(zoo.registry_file), FLAGOPT_ENDPOINT=hub.endpoint,
               FLAGOPT_HOME=str(tmp_path / "home"))
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, name, str(tmp_path / "models"),
                               json.dumps(IDS.tolist())], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
        torch.testing.assert_close(torch.tensor(json.loads(out)), _reference(zoo.source(repo)),
                                   rtol=0, atol=0)
    local = tmp_path / "models" / name
    assert sorted(p.name for p in local.iterdir() if p.name != PREPARED_DIRNAME) == \
        sorted(zoo.registry["models"][name]["files"])
    # ... and one prepared entry beside them, no temporary or lock file left
    (entry,) = (local / PREPARED_DIRNAME).iterdir()
    assert entry.is_dir() and not entry.name.startswith(".")
    for file in zoo.registry["models"][name]["files"]:
        assert (local / file).read_bytes() == (zoo.source(repo) / file).read_bytes()
        assert len(hub.requests_for(f"*/{file}", method="GET", server="cdn" if
                                    file.endswith(".bin") else "hub")) == 1, file


# --- device, dtype, tasks, options ------------------------------------------------------------


def test_cpu_defaults_float32_eval(zoo: Zoo, hub: HubServer, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loader = AutoLoader("lm", model_name="opt-125m-en", model_dir=tmp_path,
                        registry=zoo.registry, endpoint=hub.endpoint)
    model = loader.get_model()
    assert loader.device == torch.device("cpu") and loader.dtype == torch.float32
    assert not model.training and all(not m.training for m in model.modules())
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.float32)}


@pytest.mark.parametrize("kwargs, dtype", [
    ({"dtype": "bfloat16"}, torch.bfloat16),
    ({"dtype": "bf16"}, torch.bfloat16),
    ({"fp16": True}, torch.float16),
    ({"torch_dtype": torch.float16}, torch.float16),
    ({"torch_dtype": "float32", "fp16": False}, torch.float32),
    ({"dtype": torch.bfloat16, "torch_dtype": "bf16"}, torch.bfloat16),
])
def test_dtype_options(zoo: Zoo, hub: HubServer, tmp_path: Path, kwargs: dict,
                       dtype: torch.dtype, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flagopt"):
        loader = _load(zoo, hub, "opt-350m-en", tmp_path, **kwargs)
    assert loader.dtype == dtype
    assert {p.dtype for p in loader.get_model().parameters()} == {dtype}
    assert ("float16 on CPU" in caplog.text) == (dtype == torch.float16)
    expected = load_pretrained(zoo.source("test-org/opt-350m"), OPTForCausalLM, dtype=dtype)
    torch.testing.assert_close(_logits(loader.get_model()), _logits(expected), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "float8"}, "'float16'.*'bfloat16'"),
    ({"dtype": torch.int8}, "dtype=torch.int8"),
    ({"torch_dtype": "fp16", "dtype": "bf16"}, "conflicting"),
    ({"fp16": True, "dtype": "float32"}, "conflicting"),
    ({"quantize": "int4"}, "supported: None"),
    ({"attn_implementation": "flash"}, "sdpa"),
    ({"class_num": 3}, "classification"),
    ({"device": "tpu-ish"}, "device='tpu-ish'"),
    ({"endpoint": "file:///etc"}, "file:///etc"),
])
def test_bad_options_are_value_errors_before_any_request(zoo: Zoo, hub: HubServer,
                                                         tmp_path: Path, kwargs: dict,
                                                         match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _load(zoo, hub, "opt-125m-en", tmp_path, **kwargs)
    assert hub.requests == [] and not (tmp_path / "opt-125m-en").exists()


def test_unknown_kwargs_are_type_errors_and_flagai_extras_are_accepted(
        zoo: Zoo, hub: HubServer, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"'fp61' \(did you mean 'fp16'\?\)"):
        _load(zoo, hub, "opt-125m-en", tmp_path, fp61=True)
    with pytest.raises(TypeError, match="load_pretrain_params.*only_download_config"):
        _load(zoo, hub, "opt-125m-en", tmp_path, load_pretrain_params=True)
    assert hub.requests == []
    loader = _load(zoo, hub, "opt-125m-en", tmp_path, use_cache=True,
                   checkpoint_activations=False)
    assert isinstance(loader.get_model(), OPTForCausalLM)


@pytest.mark.parametrize("task, labels", [("classification", {"class_num": 3}),
                                          ("seq_cls", {"num_labels": 3}),
                                          ("CLASSIFICATION", {"num_labels": 3, "class_num": 3})])
def test_classification_gets_a_fresh_score_head(zoo: Zoo, hub: HubServer, tmp_path: Path,
                                                task: str, labels: dict,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flagopt"):
        loader = _load(zoo, hub, "opt-125m-en", tmp_path, task_name=task, **labels)
    model = loader.get_model()
    assert isinstance(model, OPTForSequenceClassification) and loader.task_name == "classification"
    assert model.config.num_labels == 3 and model.score.weight.shape == (3, TINY["hidden_size"])
    assert "score.weight" in caplog.text  # load_pretrained says the head starts fresh
    with torch.no_grad():
        assert model(IDS).logits.shape == (2, 3)
    source = load_pretrained(zoo.source("test-org/opt-125m"), OPTForCausalLM)
    assert torch.equal(model.model.decoder.embed_tokens.weight,
                       source.model.decoder.embed_tokens.weight)


def test_qa_task(zoo: Zoo, hub: HubServer, tmp_path: Path) -> None:
    loader = _load(zoo, hub, "opt-350m-en", tmp_path, task_name="qa")
    model = loader.get_model()
    assert isinstance(model, OPTForQuestionAnswering)
    with torch.no_grad():
        out = model(IDS)
    assert out.start_logits.shape == out.end_logits.shape == IDS.shape


def test_tokenizer_comes_from_the_download(zoo: Zoo, hub: HubServer, tmp_path: Path) -> None:
    loader = _load(zoo, hub, "opt-125m-en", tmp_path)
    tokenizer = loader.get_tokenizer()
    assert tokenizer is loader.tokenizer
    assert tokenizer.encode_prompt("Hello world") == [2, 31414, 232]


# --- corrupt files --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["server_file", "on_the_wire"])
def test_corrupt_weights_raise_checksum_error(zoo: Zoo, tmp_path: Path, where: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    repo = LAYOUTS["opt-125m-en"][0]
    shutil.copytree(zoo.source(repo), tmp_path / "hub" / repo)
    weights = tmp_path / "hub" / repo / "pytorch_model.bin"
    monkeypatch.setattr(hub_module, "_sleep", lambda s: None)  # no back-off waits
    with HubServer(tmp_path / "hub") as server:
        if where == "server_file":  # the registry's sha256 no longer matches the repo
            data = bytearray(weights.read_bytes())
            data[len(data) // 2] ^= 0xFF
            weights.write_bytes(bytes(data))
        else:  # every transfer flips a byte
            server.faults.add("pytorch_model.bin", "corrupt_byte", count=None, server="cdn")
        with pytest.raises(ChecksumError, match="pytorch_model.bin"):
            _load(zoo, server, "opt-125m-en", tmp_path / "models")
    local = tmp_path / "models" / "opt-125m-en"
    assert not (local / "pytorch_model.bin").exists() and _leftovers(local) == []


# --- the download command ---------------------------------------------------------------------


def test_cli_list_shows_the_zoo(capsys: pytest.CaptureFixture[str]) -> None:
    assert download_main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SIX)
    assert "facebook/opt-125m" in out and "125M" in out and "251 MB" in out
    assert "~662 MB" in out  # 350m's size is not in the registry: estimated from parameters


def test_cli_downloads_in_process(zoo: Zoo, hub: HubServer, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["opt-350m-en", BARE_REPO, "--model-dir", str(tmp_path / "ckpt"), "--endpoint",
            hub.endpoint, "--registry", str(zoo.registry_file), "--quiet"]
    assert download_main(argv) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "ckpt" / "opt-350m-en") in out
    assert (tmp_path / "ckpt" / "opt-350m-en" / "pytorch_model.bin").is_file()
    assert (tmp_path / "ckpt" / "test-org--bare-st" / "model.safetensors.index.json").is_file()
    hub.clear_requests()
    assert download_main([*argv, "--offline"]) == 0 and hub.requests == []

    assert download_main(["opt-350m-en", "opt-125-en", "--registry",
                          str(zoo.registry_file)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "did you mean 'opt-125m-en'" in err
    assert download_main(["opt-6.7b-en", "--offline", "--registry", str(zoo.registry_file),
                          "--model-dir", str(tmp_path / "none")]) == 1
    assert "OfflineError" in capsys.readouterr().err
    assert download_main(["--no-such-flag"]) == 2


def test_cli_as_a_subprocess(zoo: Zoo, hub: HubServer, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flagopt.download", "opt-6.7b-en", "--model-dir",
         str(tmp_path / "ckpt"), "--endpoint", hub.endpoint, "--quiet"],
        cwd=REPO_ROOT, env=_env(FLAGOPT_REGISTRY=str(zoo.registry_file)),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    local = tmp_path / "ckpt" / "opt-6.7b-en"
    assert f"opt-6.7b-en: {local}" in result.stdout
    torch.testing.assert_close(_reference(local), _reference(zoo.source("test-org/opt-6.7b")),
                               rtol=0, atol=0)


def test_download_model_only_config(zoo: Zoo, hub: HubServer, tmp_path: Path) -> None:
    path = download_model("opt-6.7b-en", tmp_path, only_config=True, registry=zoo.registry,
                          endpoint=hub.endpoint, progress=False)
    assert sorted(p.name for p in path.iterdir()) == sorted(SMALL_FILES)


def test_config_for_reads_the_registry_architecture(zoo: Zoo) -> None:
    config = config_for("opt-350m-en", registry=zoo.registry)
    assert config == OPTConfig(**{**TINY, **LAYOUTS["opt-350m-en"][1]})
    with pytest.raises(RegistryError, match="'bare' has no 'architecture'"):
        config_for("bare", registry={"format_version": 1, "models": {"bare": GOOD_ENTRY}})
    with pytest.raises(UnknownModelError, match="opt-350m-en"):
        config_for("opt-350-en")
