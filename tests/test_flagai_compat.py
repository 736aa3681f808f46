"""FlagAI drop-in behaviour outside the loader: results that behave like ``str``, outputs
read by key, FlagAI's contrastive-search signature, the zoo's 30b/66b entries."""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flagopt.model.heads import (CausalLMOutput, OPTForCausalLM,
                                 OPTForQuestionAnswering, OPTForSequenceClassification)
from flagopt.model.prepared import PREPARED_DIRNAME
from flagopt.predictor import GeneratedText, Predictor
from flagopt.tokenizer import OPTTokenizer
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


# --- GeneratedText: pickle / copy / deepcopy -----------------------------------------------------

def _text() -> GeneratedText:
    return GeneratedText("a continuation", truncated=True, finish_reason="eos", num_tokens=3)


@pytest.mark.parametrize("round_trip", [
    *[pytest.param(lambda t, p=p: pickle.loads(pickle.dumps(t, protocol=p)), id=f"pickle{p}")
      for p in range(pickle.HIGHEST_PROTOCOL + 1)],
    pytest.param(copy.copy, id="copy"),
    pytest.param(copy.deepcopy, id="deepcopy"),
])
def test_generated_text_round_trips_with_its_attributes(round_trip) -> None:
    text = _text()
    text.extra = [1, 2]  # an attribute a user added survives too
    back = round_trip(text)
    assert type(back) is GeneratedText and back == "a continuation"
    assert (back.truncated, back.finish_reason, back.num_tokens) == (True, "eos", 3)
    assert back.extra == [1, 2]


def test_generated_text_in_a_container_deep_copies() -> None:
    results = {"out": [_text()]}
    back = copy.deepcopy(results)
    assert back == results and back["out"][0].finish_reason == "eos"


# --- model outputs by key and by attribute -------------------------------------------------------

@pytest.fixture(scope="module")
def lm() -> OPTForCausalLM:
    torch.manual_seed(0)
    return OPTForCausalLM(tiny_config()).eval()


IDS = torch.tensor([[2, 5, 9, 14, 3]])


def test_causal_lm_output_by_key_as_flagai_code_reads_it(lm: OPTForCausalLM) -> None:
    data = {"input_ids": IDS, "labels": IDS}
    with torch.no_grad():
        out = lm(**data)
    assert out["logits"] is out.logits and out["loss"] is out.loss
    assert out.loss is not None and out["loss"].dim() == 0
    assert out[0] is out.logits and out[1] is out.loss  # HF's index form: set fields only
    assert "logits" in out and out.get("logits") is out.logits


def test_unset_fields_are_not_keys(lm: OPTForCausalLM) -> None:
    with torch.no_grad():
        out = lm(IDS)
    assert out.loss is None and "loss" not in out and out.get("loss") is None
    with pytest.raises(KeyError, match="loss"):
        out["loss"]
    assert list(out.keys()) == [k for k in ("logits", "loss", "cache", "hidden_states",
                                            "attentions") if getattr(out, k) is not None]
    assert dict(out.items())["logits"] is out.logits
    assert dict(**out).keys() == set(out.keys())  # ** unpacking works as for a dict
    assert list(out) == list(out.keys()) and len(out) == len(out.keys())
    assert out.to_tuple() == tuple(out.values())


def test_hidden_states_appear_as_keys_when_asked(lm: OPTForCausalLM) -> None:
    with torch.no_grad():
        out = lm(IDS, output_hidden_states=True)
    assert out["hidden_states"] is out.hidden_states and "hidden_states" in out.keys()


def test_every_output_class_reads_by_key() -> None:
    torch.manual_seed(0)
    config = tiny_config()
    with torch.no_grad():
        cls_out = OPTForSequenceClassification(tiny_config(num_labels=3)).eval()(IDS)
        qa_out = OPTForQuestionAnswering(config).eval()(IDS)
        dec_out = OPTForCausalLM(config).eval().model(IDS)
    assert cls_out["logits"].shape == (1, 3)
    assert qa_out["start_logits"] is qa_out.start_logits
    assert qa_out["end_logits"] is qa_out.end_logits
    assert dec_out["last_hidden_state"] is dec_out.last_hidden_state
    assert isinstance(CausalLMOutput(logits=torch.zeros(1)), CausalLMOutput)


# --- contrastive search: FlagAI's beam_size --------------------------------------------------

@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    model = OPTForCausalLM(tiny_config(vocab_size=50272)).eval()
    return Predictor(model, OPTTokenizer.default())


PROMPT = "DeepMind Company is"


def test_contrastive_beam_size_is_top_k_positionally_and_by_name(predictor) -> None:
    by_top_k = predictor.predict_generate_contrastive_search(PROMPT, 32, 6, top_k=3)
    flagai_positional = predictor.predict_generate_contrastive_search(PROMPT, 32, 6, 3)
    by_beam_size = predictor.predict_generate_contrastive_search(
        PROMPT, input_max_length=32, out_max_length=6, beam_size=3)
    both_equal = predictor.predict_generate_contrastive_search(PROMPT, 32, 6, beam_size=3,
                                                               top_k=3)
    assert by_top_k == flagai_positional == by_beam_size == both_equal
    other = predictor.predict_generate_contrastive_search(PROMPT, 32, 6, top_k=1)
    greedy = predictor.predict_generate_greedy(PROMPT, 32, 6)
    assert other == greedy  # one candidate is greedy: the count reaches the engine


def test_contrastive_default_candidate_count_is_four(predictor) -> None:
    assert predictor.predict_generate_contrastive_search(PROMPT, 32, 6) == \
        predictor.predict_generate_contrastive_search(PROMPT, 32, 6, top_k=4)


def test_contrastive_beam_size_and_top_k_that_differ_raise(predictor) -> None:
    with pytest.raises(ValueError, match=r"beam_size=2 and top_k=5"):
        predictor.predict_generate_contrastive_search(PROMPT, 32, 6, 2, top_k=5)
    with pytest.raises(ValueError, match="beam_size"):
        predictor.predict_generate_contrastive_search(PROMPT, 32, 6, beam_size=0)


# --- the zoo: opt-30b-en and opt-66b-en ------------------------------------------------------

BIG = {  # name: (layers, hidden, heads, ffn, shards), from the hub's config.json and file list
    "opt-30b-en": (48, 7168, 56, 28672, 7),
    "opt-66b-en": (64, 9216, 72, 36864, 14),
}


@pytest.mark.parametrize("name", sorted(BIG))
def test_big_zoo_entries_parse_with_their_architecture(name: str) -> None:
    from flagopt.auto_model.registry import get_model_spec
    from flagopt.model.config import OPTConfig

    layers, hidden, heads, ffn, shards = BIG[name]
    spec = get_model_spec(name)
    assert spec.repo == f"facebook/{name[:-3]}" and spec.revision == "main"
    arch = dict(spec.architecture)
    assert (arch["num_hidden_layers"], arch["hidden_size"], arch["num_attention_heads"],
            arch["ffn_dim"], arch["word_embed_proj_dim"]) == (layers, hidden, heads, ffn, hidden)
    config = OPTConfig(**arch)
    assert (config.vocab_size, config.max_position_embeddings) == (50272, 2048)
    assert config.do_layer_norm_before and config.head_dim == 128
    # parameters: embeddings (tied head) + positions + layers + final norm, counted by hand
    per_layer = 4 * (hidden * hidden + hidden) + 2 * hidden * ffn + ffn + hidden + 4 * hidden
    by_hand = 50272 * hidden + 2050 * hidden + layers * per_layer + 2 * hidden
    assert spec.parameters == config.num_parameters == by_hand
    assert spec.weight_files == (*[f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
                                   for i in range(1, shards + 1)],
                                 "pytorch_model.bin.index.json")
    assert set(spec.config_files) == {"config.json", "generation_config.json", "vocab.json",
                                      "merges.txt", "special_tokens_map.json",
                                      "tokenizer_config.json"}
    assert spec.sizes == {} and spec.sha256 == {}  # not known for certain, so not stated


def test_download_list_shows_the_big_models_with_an_estimated_size(
        capsys: pytest.CaptureFixture[str]) -> None:
    from flagopt.download import main

    assert main(["--list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert "facebook/opt-30b" in lines["opt-30b-en"] and "30.0B" in lines["opt-30b-en"]
    assert "~59.9 GB" in lines["opt-30b-en"]  # parameters x 2 bytes, marked as an estimate
    assert "facebook/opt-66b" in lines["opt-66b-en"] and "65.7B" in lines["opt-66b-en"]
    assert "~131.4 GB" in lines["opt-66b-en"]


# --- the loader: FlagAI's ./checkpoints, its four files, "seq2seq", an unreachable hub ----------
#
# A FlagAI user's models are in ./checkpoints/<model_name as typed>/ with four files:
# config.json, the weights (the sharded sizes merged into one pytorch_model.bin), vocab.json and
# merges.txt. The registry name below is a sharded zoo name pointed at a fake repo on a loopback
# hub (tests/hub_server.py) whose log shows every request.

FLAGAI_FILES = ["config.json", "merges.txt", "pytorch_model.bin", "vocab.json"]
OPTIONAL = ["generation_config.json", "special_tokens_map.json", "tokenizer_config.json"]
SHARDED = "opt-6.7b-en"
FAKE_REPO = "test-org/opt-6.7b"
# The real tokenizer's vocabulary (the example scripts tokenize real text), 2048 positions (they
# ask for 100 + 300 tokens), otherwise as small as a model gets.
FLAGAI_TINY = dict(vocab_size=50272, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                   num_attention_heads=2, max_position_embeddings=2048)


def _flagai_files(directory: Path) -> list[str]:
    """The directory's files, the prepared-weights cache (``.flagopt-prepared``) aside."""
    return sorted(p.name for p in directory.iterdir() if p.name != PREPARED_DIRNAME)


def write_flagai_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A tiny random model in FlagAI's layout: the four files, one merged ``.bin``."""
    from flagopt.model.config import OPTConfig
    from flagopt.model.synthetic import write_random_checkpoint

    write_random_checkpoint(directory, OPTConfig(**FLAGAI_TINY), layout="bin", num_shards=1,
                            prefix=False, lm_head=False, seed=seed)
    for name in OPTIONAL:
        (directory / name).unlink()
    assert sorted(p.name for p in directory.iterdir()) == FLAGAI_FILES
    return directory


@pytest.fixture(scope="module")
def fake_hub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hub's layout of SHARDED: two shards, an index and every small file."""
    from flagopt.model.config import OPTConfig
    from flagopt.model.synthetic import write_random_checkpoint

    root = tmp_path_factory.mktemp("flagai-hub")
    write_random_checkpoint(root / FAKE_REPO, OPTConfig(**FLAGAI_TINY), layout="bin",
                            num_shards=2, prefix=False, lm_head=False, seed=7)
    return root


def _registry(root: Path) -> dict:
    files = sorted(p.name for p in (root / FAKE_REPO).iterdir())
    return {"format_version": 1, "models": {SHARDED: {"repo": FAKE_REPO, "files": files}}}


@pytest.fixture
def fake_hub(fake_hub_root: Path, tmp_path: Path, env, monkeypatch: pytest.MonkeyPatch):
    """The loopback hub as the default endpoint; cwd and FLAGOPT_HOME in tmp_path."""
    from tests.hub_server import HubServer

    monkeypatch.chdir(tmp_path)
    for name in ("FLAGOPT_OFFLINE", "FLAGOPT_REGISTRY", "HF_TOKEN"):
        env.delenv(name, raising=False)
    env.setenv("FLAGOPT_HOME", str(tmp_path / "home"))
    env.setenv("FLAGOPT_DISABLE_PROGRESS", "1")
    with HubServer(fake_hub_root) as server:
        env.setenv("FLAGOPT_ENDPOINT", server.endpoint)
        yield server


def _flagai_loader(root: Path, *args, **kwargs):
    from flagopt import AutoLoader

    return AutoLoader(*args, registry=_registry(root), device="cpu", **kwargs)


def _same_weights(model: torch.nn.Module, directory: Path) -> None:
    from flagopt.model.loading import load_pretrained

    reference = load_pretrained(directory, OPTForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("offline", [False, True])
@pytest.mark.parametrize("typed, model_dir", [
    (SHARDED, None),  # FlagAI's defaults: ./checkpoints/<name>
    ("OPT-6.7b-EN", None),  # the directory is the name as typed
    (SHARDED, "./checkpoints/"),  # FlagAI's explicit form
    (SHARDED, "elsewhere"),
])
def test_flagai_four_files_are_complete_and_found_with_no_request(
        fake_hub, fake_hub_root: Path, tmp_path: Path, typed: str, model_dir: str | None,
        offline: bool) -> None:
    directory = write_flagai_checkpoint(tmp_path / (model_dir or "checkpoints") / typed)
    loader = _flagai_loader(fake_hub_root, "lm", model_name=typed, model_dir=model_dir,
                            offline=offline)
    assert fake_hub.requests == []
    assert loader.local_dir == directory.absolute()
    _same_weights(loader.get_model(), directory)
    assert loader.get_tokenizer().encode("day") == [1208]
    assert _flagai_files(directory) == FLAGAI_FILES  # nothing added (but the prepared cache)
    assert not (tmp_path / "home").exists()


def test_incomplete_checkpoints_dir_is_passed_over_for_flagopt_home(
        fake_hub, fake_hub_root: Path, tmp_path: Path) -> None:
    directory = write_flagai_checkpoint(tmp_path / "checkpoints" / SHARDED)
    (directory / "merges.txt").unlink()
    loader = _flagai_loader(fake_hub_root, "lm", model_name=SHARDED)
    assert loader.local_dir == tmp_path / "home" / SHARDED
    assert fake_hub.requests_for(f"/{FAKE_REPO}/resolve/main/*.bin", method="GET")
    _same_weights(loader.get_model(), fake_hub_root / FAKE_REPO)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "pytorch_model.bin",
                                                           "vocab.json"]  # left as it was


def test_a_needed_download_fetches_only_the_missing_and_tolerates_absent_optional_files(
        fake_hub_root: Path, tmp_path: Path, env, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.hub_server import HubServer

    # The server's copy lacks the optional files (404) although the registry lists them.
    root = tmp_path / "hub"
    shutil.copytree(fake_hub_root, root)
    for name in OPTIONAL:
        (root / FAKE_REPO / name).unlink()
    directory = write_flagai_checkpoint(tmp_path / "models" / SHARDED)
    (directory / "vocab.json").unlink()
    env.setenv("FLAGOPT_DISABLE_PROGRESS", "1")
    with HubServer(root) as server:
        loader = _flagai_loader(fake_hub_root, "lm", model_name=SHARDED,
                                model_dir=tmp_path / "models", endpoint=server.endpoint)
        asked = {r.path.rsplit("/", 1)[-1] for r in server.requests}
        assert asked == {"vocab.json", *OPTIONAL}  # no weights: the merged .bin is there
        assert loader.local_dir == directory and (directory / "vocab.json").is_file()
        assert not any((directory / name).exists() for name in OPTIONAL)
        server.clear_requests()
        _flagai_loader(fake_hub_root, "lm", model_name=SHARDED,
                       model_dir=tmp_path / "models", endpoint=server.endpoint)
        assert server.requests == []  # absent optional files are never a reason to ask


def test_offline_names_only_the_required_files_missing(fake_hub, fake_hub_root: Path,
                                                       tmp_path: Path) -> None:
    from flagopt.errors import OfflineError

    directory = write_flagai_checkpoint(tmp_path / "models" / SHARDED)
    (directory / "vocab.json").unlink()
    with pytest.raises(OfflineError, match="vocab.json") as info:
        _flagai_loader(fake_hub_root, "lm", model_name=SHARDED, model_dir=tmp_path / "models",
                       offline=True)
    message = str(info.value)
    assert not any(name in message for name in (*OPTIONAL, "pytorch_model-0", "merges.txt"))
    assert fake_hub.requests == []


def test_seq2seq_is_the_causal_lm(tmp_path: Path) -> None:
    from flagopt import AutoLoader
    from flagopt.auto_model.auto_loader import resolve_task

    assert resolve_task("seq2seq") == resolve_task("SEQ2SEQ") == "lm"
    directory = write_flagai_checkpoint(tmp_path / "m")
    lm = AutoLoader("seq2seq", model_name=str(directory), device="cpu")
    assert type(lm.get_model()) is OPTForCausalLM and lm.task_name == "lm"
    _same_weights(lm.get_model(), directory)


def test_unreachable_hub_through_the_loader_is_two_attempts_and_one_line(
        fake_hub_root: Path, tmp_path: Path, env, monkeypatch: pytest.MonkeyPatch) -> None:
    from flagopt import hub
    from flagopt.errors import HubUnreachableError

    calls = []

    def unresolvable(*args, **kwargs):
        calls.append(args[0])
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    monkeypatch.setattr(hub, "_sleep", lambda delay: None)
    env.setenv("FLAGOPT_HOME", str(tmp_path / "home"))
    with pytest.raises(HubUnreachableError) as info:
        _flagai_loader(fake_hub_root, "lm", model_name=SHARDED,
                       endpoint="https://hub.example.invalid", progress=False)
    assert calls == ["hub.example.invalid"] * 2
    message = str(info.value)
    assert message.startswith("cannot reach hub.example.invalid (its name does not resolve")
    assert "\n" not in message and "FLAGOPT_ENDPOINT" in message
    assert f"FLAGOPT_OFFLINE=1 with the model's files in {tmp_path / 'home' / SHARDED}" in message


# --- a FlagAI example script, its two import lines changed, in a fresh process, no network ------

NETWORK_GUARD = """
import socket, sys
log = open(sys.argv[1], "a")

def refuse(what, *args, **kwargs):
    log.write(f"{what} {args[:2]!r}\\n")
    log.flush()
    raise OSError(f"network guard: {what} {args[:2]!r}")

_connect = socket.socket.connect
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        refuse("connect", address)
    return _connect(self, address)

socket.socket.connect = connect
socket.socket.connect_ex = connect
socket.create_connection = lambda *a, **k: refuse("create_connection", *a)
socket.getaddrinfo = lambda *a, **k: refuse("getaddrinfo", *a)
"""

# FlagAI-Open/FlagAI examples/opt/generate_opt_{125m,13b}.py and (its GPT-2 examples' positional
# "seq2seq" with model_dir="./checkpoints/") generate_opt_30b.py, each with only the two import
# lines changed.
FLAGAI_SCRIPTS = {
    "opt-125m-en": '''
from flagopt import AutoLoader, Predictor
import torch
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

loader = AutoLoader(task_name="lm",
                    model_name="opt-125m-en")

model = loader.get_model()
tokenizer = loader.get_tokenizer()
model.eval()
model.to(device)

text = "The trophy doesn’t fit in the suitcase because "
predictor = Predictor(model, tokenizer)
out = predictor.predict_generate_randomsample(text,
                                              input_max_length=100,
                                              out_max_length=300,
                                              top_k=30,
                                              top_p=0.9,
                                              repetition_penalty=3.0)

print(f"input is {text} \\n out is {out}")
''',
    "opt-13b-en": '''
from flagopt import AutoLoader, Predictor
import torch

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

loader = AutoLoader(task_name="lm",
                    model_name="opt-13b-en")

model = loader.get_model()
tokenizer = loader.get_tokenizer()
model.eval()
model.half()
model.to(device)

text = """How about the book The Old Man and the Sea?
        Thanks for your question, let me share my thoughts:"""

predictor = Predictor(model, tokenizer)
out = predictor.predict_generate_randomsample(text,
                                              input_max_length=100,
                                              out_max_length=300,
                                              top_k=50,
                                              top_p=0.9,
                                              repetition_penalty=5.0)

print(f"input is {text} \\n out is {out}")
''',
    "opt-30b-en": '''
from flagopt import AutoLoader, Predictor
import torch

loader = AutoLoader("seq2seq",
                    "opt-30b-en",
                    model_dir="./checkpoints/")

model = loader.get_model()
tokenizer = loader.get_tokenizer()
model.eval()

text = "The trophy doesn’t fit in the suitcase because "
predictor = Predictor(model, tokenizer)
out = predictor.predict_generate_randomsample(text,
                                              input_max_length=100,
                                              out_max_length=300,
                                              top_k=30,
                                              top_p=0.9,
                                              repetition_penalty=3.0)

print(f"input is {text} \\n out is {out}")
''',
}


def _run_guarded(script: str, cwd: Path) -> tuple[subprocess.CompletedProcess, str]:
    """``script`` in a fresh Python behind NETWORK_GUARD; returns the process and the log of
    connection attempts the guard refused."""
    repo_root = Path(__file__).resolve().parents[1]
    with socket.socket() as sock:  # second guard: the endpoint is a closed local port
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    attempts = cwd / "network-attempts.log"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLAGOPT_", "HF_")) and k not in ("PYTHONPATH", "HOME")}
    env.update(PYTHONPATH=str(repo_root), HOME=str(cwd / "user"), OMP_NUM_THREADS="1",
               FLAGOPT_HOME=str(cwd / "home"), FLAGOPT_ENDPOINT=closed,
               FLAGOPT_DISABLE_PROGRESS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", NETWORK_GUARD + script, str(attempts)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return proc, attempts.read_text() if attempts.exists() else ""


@pytest.mark.parametrize("name", sorted(FLAGAI_SCRIPTS))
def test_flagai_example_script_runs_from_checkpoints_with_no_network(name: str,
                                                                     tmp_path: Path) -> None:
    directory = write_flagai_checkpoint(tmp_path / "checkpoints" / name)
    proc, attempts = _run_guarded(FLAGAI_SCRIPTS[name], tmp_path)
    assert attempts == ""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("input is ") and " out is " in proc.stdout
    assert proc.stdout.split(" out is ", 1)[1].strip()
    assert _flagai_files(directory) == FLAGAI_FILES
    assert not (tmp_path / "home").exists()


def test_the_network_guard_catches_a_download(tmp_path: Path) -> None:
    # The control: without ./checkpoints/opt-125m-en the script must go to the hub, and the
    # guard sees it and stops it.
    proc, attempts = _run_guarded(FLAGAI_SCRIPTS["opt-125m-en"], tmp_path)
    assert "getaddrinfo ('127.0.0.1'" in attempts
    assert proc.returncode != 0 and "HubUnreachableError" in proc.stderr
