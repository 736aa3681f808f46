"""LoRA adapters in PEFT's format, both ways, and loading them with AutoLoader / the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flagopt.auto_model import AutoLoader
from flagopt.errors import AdapterError, AdapterMismatchError, UnsupportedAdapterOptionError
from flagopt.model.adapters import (ADAPTER_CONFIG, attach_adapter, read_adapter,
                                    save_adapter)
from flagopt.model.heads import TASK_CLASSES
from flagopt.model.loading import load_pretrained
from flagopt.model.lora import LoraConfig, LoRALinear, apply_lora, lora_modules
from flagopt.model.quantize import Int8Linear, quantize_rows
from flagopt.model.synthetic import write_random_checkpoint
from tests.conftest import tiny_config

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
PEFT_TASKS = {"lm": "CAUSAL_LM", "classification": "SEQ_CLS", "qa": "QUESTION_ANS"}
HF_CLASSES = {"lm": "OPTForCausalLM", "classification": "OPTForSequenceClassification",
              "qa": "OPTForQuestionAnswering"}
OPTIONS = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc2"])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("base")
    return write_random_checkpoint(directory, tiny_config(), layout="safetensors",
                                   dtype=torch.float32, std=0.1, seed=1)


def _hf(base_dir: Path, task: str):
    cls = getattr(transformers, HF_CLASSES[task])
    return cls.from_pretrained(base_dir, torch_dtype=torch.float32).eval()


def _randomize(model: torch.nn.Module, seed: int, *, names=("lora_",)) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (any(n in name for n in names) or "lora_" not in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _peft_adapter(base_dir: Path, task: str, directory: Path, **overrides):
    """A PEFT model on transformers' OPT with non-zero adapters, saved to ``directory``."""
    torch.manual_seed(0)
    model = peft.get_peft_model(_hf(base_dir, task), peft.LoraConfig(
        task_type=PEFT_TASKS[task], **{**OPTIONS, **overrides}))
    _randomize(model, seed=2)
    model.save_pretrained(directory)
    return model.eval()


def _outputs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    if hasattr(out, "start_logits"):
        return torch.stack([out.start_logits, out.end_logits])
    return out.logits


IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("task", sorted(PEFT_TASKS))
def test_a_peft_adapter_gives_peft_s_outputs(base_dir, tmp_path, task: str, merge: bool) -> None:
    theirs = _peft_adapter(base_dir, task, tmp_path / "adapter")
    loader = AutoLoader(task, base_dir, device="cpu", dtype="float32",
                        lora_dir=tmp_path / "adapter", merge=merge)
    model = loader.get_model()
    has_lora = any(isinstance(m, LoRALinear) for m in model.modules())
    assert has_lora == (not merge)
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(_outputs(model, IDS), _outputs(theirs, IDS), atol=ATOL, rtol=0)
    plain = AutoLoader(task, base_dir, device="cpu", dtype="float32").get_model()
    assert not torch.allclose(_outputs(plain, IDS), _outputs(theirs, IDS), atol=1e-3)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("task", sorted(PEFT_TASKS))
def test_an_adapter_saved_here_loads_in_peft(base_dir, tmp_path, task: str,
                                             use_rslora: bool) -> None:
    ours = load_pretrained(base_dir, TASK_CLASSES[task])
    config = apply_lora(ours, LoraConfig(**OPTIONS, use_rslora=use_rslora,
                                         base_model_name_or_path=str(base_dir)))
    _randomize(ours, seed=3)
    save_adapter(tmp_path / "ours", ours, config)
    theirs = peft.PeftModel.from_pretrained(_hf(base_dir, task), tmp_path / "ours").eval()
    torch.testing.assert_close(_outputs(ours.eval(), IDS), _outputs(theirs, IDS), atol=ATOL,
                               rtol=0)
    # and the same file names and keys as PEFT's own save
    _peft_adapter(base_dir, task, tmp_path / "peft", use_rslora=use_rslora)
    from safetensors.torch import load_file
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    saved = json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == PEFT_TASKS[task]
    assert saved["use_rslora"] is use_rslora and saved["bias"] == "none"


def test_int8_merges_in_float_before_quantizing(base_dir, tmp_path) -> None:
    _peft_adapter(base_dir, "lm", tmp_path / "adapter")
    adapter = read_adapter(tmp_path / "adapter")
    model = AutoLoader("lm", base_dir, device="cpu", dtype="float32", quantize="int8",
                       lora_dir=tmp_path / "adapter").get_model()
    merged_float = load_pretrained(base_dir)
    attach_adapter(merged_float, adapter, merge=True)
    for i in range(2):
        for proj in ("q_proj", "v_proj", "k_proj"):
            module = getattr(model.model.decoder.layers[i].self_attn, proj)
            assert isinstance(module, Int8Linear)
            w = getattr(merged_float.model.decoder.layers[i].self_attn, proj).weight
            q, scale = quantize_rows(w)
            assert torch.equal(module.weight, q), (i, proj)
            torch.testing.assert_close(module.scale, scale, atol=0, rtol=0)


def test_int8_base_keeps_float_adapters_unmerged(base_dir, tmp_path) -> None:
    theirs = _peft_adapter(base_dir, "lm", tmp_path / "adapter")
    model = AutoLoader("lm", base_dir, device="cpu", dtype="float32", quantize="int8",
                       lora_dir=tmp_path / "adapter", merge=False).get_model()
    layers = dict(lora_modules(model))
    assert len(layers) == 6
    assert all(isinstance(m.base_layer, Int8Linear) and m.lora_A.weight.dtype == torch.float32
               for m in layers.values())
    # int8 rounding costs a little; the adapter's effect is kept
    torch.testing.assert_close(_outputs(model, IDS), _outputs(theirs, IDS), atol=0.05, rtol=0)


def test_a_bin_adapter_is_read_safely(base_dir, tmp_path) -> None:
    theirs = _peft_adapter(base_dir, "lm", tmp_path / "adapter")
    from safetensors.torch import load_file
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    torch.save(load_file(path), tmp_path / "adapter" / "adapter_model.bin")
    path.unlink()
    model = AutoLoader("lm", base_dir, device="cpu", dtype="float32",
                       adapter_dir=tmp_path / "adapter").get_model()
    torch.testing.assert_close(_outputs(model, IDS), _outputs(theirs, IDS), atol=ATOL, rtol=0)


def _edit_config(directory: Path, **changes) -> None:
    path = directory / ADAPTER_CONFIG
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("option", [
    dict(use_dora=True), dict(rank_pattern={"q_proj": 2}), dict(alpha_pattern={"q_proj": 2}),
    dict(bias="all"), dict(fan_in_fan_out=True), dict(layers_to_transform=[0]),
    dict(layers_pattern="layers"), dict(lora_bias=True), dict(exclude_modules=["fc2"]),
    dict(init_lora_weights="pissa"), dict(peft_type="IA3"), dict(some_future_option=3),
])
def test_unimplemented_options_are_refused_by_name(base_dir, tmp_path, option) -> None:
    _peft_adapter(base_dir, "lm", tmp_path / "adapter")
    _edit_config(tmp_path / "adapter", **option)
    with pytest.raises(UnsupportedAdapterOptionError, match=next(iter(option))):
        AutoLoader("lm", base_dir, device="cpu", lora_dir=tmp_path / "adapter")


def test_training_only_and_neutral_options_are_accepted(base_dir, tmp_path) -> None:
    _peft_adapter(base_dir, "lm", tmp_path / "adapter")
    _edit_config(tmp_path / "adapter", init_lora_weights="gaussian", some_future_option=None,
                 inference_mode=False)
    AutoLoader("lm", base_dir, device="cpu", lora_dir=tmp_path / "adapter")


def test_an_adapter_for_another_size_names_the_key(base_dir, tmp_path) -> None:
    other = write_random_checkpoint(tmp_path / "wide", tiny_config(hidden_size=64),
                                    layout="safetensors", dtype=torch.float32)
    _peft_adapter(other, "lm", tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError, match=r"tensor 'base_model\.model\.model\.decoder"
                                                   r"\.layers\.0\..*lora_[AB]\.weight' has "
                                                   r"shape .*hidden_size=32"):
        AutoLoader("lm", base_dir, device="cpu", lora_dir=tmp_path / "adapter")


def test_an_adapter_for_more_layers_names_the_unknown_keys(base_dir, tmp_path) -> None:
    deeper = write_random_checkpoint(tmp_path / "deep", tiny_config(num_hidden_layers=3),
                                     layout="safetensors", dtype=torch.float32)
    _peft_adapter(deeper, "lm", tmp_path / "adapter")
    for merge in (True, False):
        with pytest.raises(AdapterMismatchError, match=r"num_hidden_layers=2: unknown "
                                                       r"tensor.*layers\.2\."):
            AutoLoader("lm", base_dir, device="cpu", lora_dir=tmp_path / "adapter",
                       merge=merge)


def test_unknown_and_missing_keys_are_errors(base_dir, tmp_path) -> None:
    from safetensors.torch import load_file, save_file
    _peft_adapter(base_dir, "lm", tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    state = load_file(path)
    state["base_model.model.model.decoder.layers.0.fc1.lora_A.weight"] = torch.zeros(4, 32)
    save_file(state, path)
    with pytest.raises(AdapterMismatchError, match=r"unknown.*layers\.0\.fc1\.lora_A"):
        AutoLoader("lm", base_dir, device="cpu", lora_dir=tmp_path / "adapter")
    del state["base_model.model.model.decoder.layers.0.fc1.lora_A.weight"]
    del state["base_model.model.model.decoder.layers.1.fc2.lora_B.weight"]
    save_file(state, path)
    with pytest.raises(AdapterMismatchError, match=r"missing.*layers\.1\.fc2\.lora_B"):
        AutoLoader("lm", base_dir, device="cpu", lora_dir=tmp_path / "adapter")
    save_file({"lora.weight": torch.zeros(2)}, path)
    with pytest.raises(AdapterMismatchError, match="base_model.model."):
        AutoLoader("lm", base_dir, device="cpu", lora_dir=tmp_path / "adapter")


def test_a_task_mismatch_is_an_error(base_dir, tmp_path) -> None:
    _peft_adapter(base_dir, "classification", tmp_path / "adapter")
    with pytest.raises(AdapterError, match="SEQ_CLS.*OPTForCausalLM"):
        AutoLoader("lm", base_dir, device="cpu", lora_dir=tmp_path / "adapter")


def test_loader_options(base_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="lora_dir.*adapter_dir.*pass one"):
        AutoLoader("lm", base_dir, device="cpu", lora_dir=tmp_path, adapter_dir=tmp_path)
    with pytest.raises(ValueError, match="merge=False applies to a LoRA adapter"):
        AutoLoader("lm", base_dir, device="cpu", merge=False)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        AutoLoader("lm", base_dir, device="cpu", lora_dir=tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(AdapterError, match="no weights"):
        AutoLoader("lm", base_dir, device="cpu", lora_dir=tmp_path)


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_the_cli_passes_lora_to_the_loader(monkeypatch, command: str) -> None:
    from flagopt import auto_model, cli

    seen = {}

    class Stop(Exception):
        pass

    def fake_loader(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(auto_model, "AutoLoader", fake_loader)
    argv = ["generate", "--lora", "runs/notes", "hi"] if command == "generate" else \
        ["serve", "opt-125m-en", "--lora", "runs/notes"]
    assert cli.main(argv) == 1  # the fake loader's error, reported as one line
    assert seen["lora_dir"] == "runs/notes"
