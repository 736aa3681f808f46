"""flagopt's LoRA module: init, forward, merge, targets, trainable counts, training steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flagopt.auto_model.registry import config_for
from flagopt.errors import AdapterError
from flagopt.model.heads import TASK_CLASSES, OPTForCausalLM
from flagopt.model.lora import (LoraConfig, LoRALinear, apply_lora, lora_modules,
                                lora_state_dict, merge_lora, target_names,
                                trainable_parameters)
from flagopt.model.quantize import Int8Linear
from tests.conftest import reference_pair, tiny_config


def _randomize_lora(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=g) * 0.1)


def test_init_is_peft_s_and_starts_as_the_base() -> None:
    torch.manual_seed(0)
    base = nn.Linear(48, 20)
    lora = LoRALinear(base, r=4, lora_alpha=8)
    bound = 1 / math.sqrt(48)  # kaiming_uniform(a=sqrt(5)) over fan_in 48
    assert lora.lora_A.weight.shape == (4, 48) and lora.lora_B.weight.shape == (20, 4)
    largest = float(lora.lora_A.weight.detach().abs().max())
    assert 0.8 * bound < largest <= bound
    assert torch.equal(lora.lora_B.weight, torch.zeros(20, 4))
    x = torch.randn(3, 48)
    assert torch.equal(lora(x), base(x))
    assert lora.lora_A.weight.dtype == torch.float32


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_adds_the_scaled_update(use_rslora: bool) -> None:
    base = nn.Linear(16, 12)
    lora = LoRALinear(base, r=4, lora_alpha=6, use_rslora=use_rslora)
    nn.init.normal_(lora.lora_B.weight)
    scaling = 6 / (2 if use_rslora else 4)
    assert lora.scaling == scaling
    assert LoraConfig(r=4, lora_alpha=6, use_rslora=use_rslora).scaling == scaling
    x = torch.randn(2, 5, 16)
    expected = base(x) + scaling * (x @ lora.lora_A.weight.T @ lora.lora_B.weight.T)
    torch.testing.assert_close(lora(x), expected)



class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_update_is_added_by_one_addmm_with_the_reference_gradients() -> None:
    """The float path adds ``scaling * h @ B^T`` inside one addmm (no separate scale and add
    passes over the output), with the gradients of the plain formula."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    lora = LoRALinear(base, r=4, lora_alpha=6)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(2, 5, 16, requires_grad=True)
    with _OpCounter() as counter:
        out = lora(x)
    assert "mul" not in counter.ops and counter.ops.count("addmm") == 2, counter.ops
    a, b = (w.detach().clone().requires_grad_() for w in (lora.lora_A.weight,
                                                           lora.lora_B.weight))
    x_ref = x.detach().clone().requires_grad_()
    expected = base(x_ref) + 1.5 * (x_ref @ a.T @ b.T)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(lora.lora_A.weight.grad, a.grad)
    torch.testing.assert_close(lora.lora_B.weight.grad, b.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert base.weight.grad is not None  # a plain nn.Linear base still trains if asked

def test_merge_and_unmerge_keep_the_output() -> None:
    base = nn.Linear(16, 12)
    before = base.weight.detach().clone()
    lora = LoRALinear(base, r=2, lora_alpha=4)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(4, 16)
    unmerged = lora(x)
    lora.merge()
    assert lora.merged
    torch.testing.assert_close(lora(x), unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base.weight, before + lora.delta_weight(), atol=1e-6, rtol=0)
    lora.merge()  # idempotent
    lora.unmerge()
    torch.testing.assert_close(base.weight, before, atol=1e-6, rtol=0)
    torch.testing.assert_close(lora(x), unmerged, atol=1e-5, rtol=1e-5)


def test_dropout_applies_in_training_only() -> None:
    lora = LoRALinear(nn.Linear(16, 16), r=4, lora_alpha=4, lora_dropout=0.5)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(8, 16)
    lora.eval()
    assert torch.equal(lora(x), lora(x))
    lora.train()
    torch.manual_seed(0)
    assert not torch.allclose(lora(x), lora.eval()(x))
    assert isinstance(LoRALinear(nn.Linear(4, 4), 2, 2).lora_dropout, nn.Identity)  # default 0


def test_int8_base_computes_in_float_and_refuses_to_merge() -> None:
    w = torch.randn(12, 16)
    base = Int8Linear(16, 12, bias=False)
    base.set_weight(w, "cpu")
    lora = LoRALinear(base, r=2, lora_alpha=4)
    nn.init.normal_(lora.lora_B.weight)
    assert lora.lora_A.weight.dtype == torch.float32
    x = torch.randn(3, 16)
    expected = base(x) + lora.scaling * (x @ lora.lora_A.weight.T @ lora.lora_B.weight.T)
    torch.testing.assert_close(lora(x), expected)
    with pytest.raises(AdapterError, match="int8"):
        lora.merge()


def test_config_is_validated() -> None:
    assert LoraConfig().target_modules == ("q_proj", "v_proj")  # PEFT's default for OPT
    assert LoraConfig().lora_dropout == 0
    for bad in (dict(r=0), dict(r=2.0), dict(lora_alpha=float("nan")),
                dict(lora_dropout=1.0), dict(target_modules=[]),
                dict(task_type="TOKEN_CLS")):
        with pytest.raises(AdapterError, match=next(iter(bad))):
            LoraConfig(**bad)


def test_targets_match_as_peft_does() -> None:
    model = OPTForCausalLM(tiny_config())
    layers = ["model.decoder.layers.0", "model.decoder.layers.1"]
    assert target_names(model, LoraConfig()) == [
        f"{layer}.self_attn.{p}" for layer in layers for p in ("q_proj", "v_proj")]
    assert target_names(model, LoraConfig(target_modules=["self_attn.k_proj", "fc2"])) == [
        f"{layer}.{p}" for layer in layers for p in ("self_attn.k_proj", "fc2")]
    only_first = LoraConfig(target_modules=["layers.0.self_attn.q_proj"])
    assert target_names(model, only_first) == ["model.decoder.layers.0.self_attn.q_proj"]
    regex = LoraConfig(target_modules=r".*\.1\.self_attn\.(q|k)_proj")
    assert target_names(model, regex) == ["model.decoder.layers.1.self_attn.q_proj",
                                          "model.decoder.layers.1.self_attn.k_proj"]


@pytest.mark.parametrize("targets", [["q_proj", "query"], ["q"], r"nothing.*"])
def test_a_target_that_matches_nothing_is_named(targets) -> None:
    model = OPTForCausalLM(tiny_config())
    with pytest.raises(AdapterError, match="match no linear layer") as err:
        apply_lora(model, LoraConfig(target_modules=targets))
    missing = targets if isinstance(targets, str) else targets[-1]
    assert repr(missing)[1:-1] in str(err.value) and "q_proj" in str(err.value)


@pytest.mark.parametrize("name,expected", [("opt-125m-en", 589_824),
                                           ("opt-6.7b-en", 8_388_608)])
def test_trainable_counts_equal_peft_s(name: str, expected: int) -> None:
    with torch.device("meta"):  # no weights: the registry's config only
        model = OPTForCausalLM(config_for(name))
    apply_lora(model, LoraConfig(r=16, lora_alpha=32))
    assert trainable_parameters(model) == expected


@pytest.mark.parametrize("task,peft_task", [("lm", "CAUSAL_LM"), ("classification", "SEQ_CLS"),
                                            ("qa", "QUESTION_ANS")])
def test_trainable_counts_equal_peft_on_each_head(task: str, peft_task: str) -> None:
    peft = pytest.importorskip("peft")
    hf, ours = reference_pair(tiny_config(), task=task)
    options = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"])
    theirs = peft.get_peft_model(hf, peft.LoraConfig(task_type=peft_task, **options))
    config = apply_lora(ours, LoraConfig(**options))
    assert trainable_parameters(ours) == theirs.get_nb_trainable_parameters()[0]
    assert config.task_type == peft_task
    assert set(config.modules_to_save or ()) == set(theirs.peft_config["default"].modules_to_save
                                                    or ())


def test_apply_twice_is_refused() -> None:
    model = OPTForCausalLM(tiny_config())
    apply_lora(model, LoraConfig())
    with pytest.raises(AdapterError, match="already has LoRA"):
        apply_lora(model, LoraConfig())


def test_merge_lora_puts_the_bases_back_with_the_same_logits() -> None:
    _, model = reference_pair(tiny_config())
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                     "out_proj", "fc1"]))
    _randomize_lora(model)
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        unmerged = model(ids).logits
        merge_lora(model)
        merged = model(ids).logits
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert isinstance(model.model.decoder.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task", sorted(TASK_CLASSES))
def test_a_training_step_updates_only_the_adapter(task: str) -> None:
    torch.manual_seed(0)
    model = TASK_CLASSES[task](tiny_config())
    config = apply_lora(model, LoraConfig(r=4, lora_alpha=8))
    _randomize_lora(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 128, (2, 6))
    batch = {"lm": dict(labels=ids), "classification": dict(labels=torch.tensor([0, 1])),
             "qa": dict(start_positions=torch.tensor([1, 2]),
                        end_positions=torch.tensor([3, 4]))}[task]
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(ids, **batch).loss.backward()
    opt.step()
    trained = set(lora_state_dict(model, config))
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        if name in trained:  # a bias on QA's logits has zero gradient (softmax is shift-free)
            assert p.grad is not None and (changed or name == "qa_outputs.bias"), name
        else:
            assert p.grad is None and not changed, name
    head = {"lm": set(), "classification": {"score.weight"},
            "qa": {"qa_outputs.weight", "qa_outputs.bias"}}[task]
    assert {n for n in trained if ".lora_" not in n} == head


def test_int8_base_with_lora_trains(tmp_path) -> None:
    from flagopt.model.loading import load_pretrained
    from flagopt.model.synthetic import write_random_checkpoint
    write_random_checkpoint(tmp_path, tiny_config(), layout="safetensors", tokenizer=False)
    model = load_pretrained(tmp_path, dtype=torch.float32, quantize="int8")
    config = apply_lora(model, LoraConfig(r=4, lora_alpha=8))
    assert isinstance(model.model.decoder.layers[0].self_attn.q_proj.base_layer, Int8Linear)
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 6))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        losses.append(float(loss))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    assert trainable_parameters(model) == sum(t.numel() for t in
                                              lora_state_dict(model, config).values())
