"""flagopt.train.trainer: the loop learns, schedules, accumulates, clips, autocasts, logs and
refuses what it does not support."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from torch.optim.optimizer import register_optimizer_step_pre_hook

from flagopt.errors import TrainerConfigError
from flagopt.train.schedule import lr_multiplier, warmup_steps
from flagopt import Trainer as PublicTrainer
from flagopt.train.trainer import Trainer, count_targets, micro_batch_indices
from tests.conftest import Env
from tests.train_helpers import counting_dataset, tiny_lm, weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _eval_loss(model, rows) -> float:
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():
        return model.eval()(**batch).loss.item()


def test_loss_goes_down_on_a_learnable_task() -> None:
    model, data = tiny_lm(), counting_dataset(64)
    before = _eval_loss(model, data[:16])
    summary = Trainer(max_steps=40, batch_size=8, lr=1e-2, warm_up=0.1, progress=False).train(
        model, train_dataset=data, valid_dataset=data[:16])
    assert before > 3.0  # ~ln(32): chance
    assert summary["eval_loss"] < 1.0 and summary["step"] == 40
    assert summary["eval_loss"] == pytest.approx(_eval_loss(model, data[:16]), rel=1e-5)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_warms_up_linearly_then_decays_to_zero(kind: str) -> None:
    f = lr_multiplier(kind, warmup=4, total=20)
    assert [f(s) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    decay = [f(s) for s in range(4, 21)]
    assert all(a > b for a, b in zip(decay, decay[1:])) and decay[-1] == pytest.approx(0.0)
    assert f(12) == pytest.approx(0.5)  # half-way: cosine and linear agree at 0.5
    assert f(8) == pytest.approx(0.75 if kind == "linear" else (1 + math.cos(math.pi / 4)) / 2)


def test_warm_up_is_a_fraction_below_one_and_steps_from_one() -> None:
    assert warmup_steps(0.1, 200) == 20 and warmup_steps(0, 200) == 0
    assert warmup_steps(1, 200) == 1 and warmup_steps(30, 200) == 30
    with pytest.raises(TrainerConfigError, match="warm_up=2.5"):
        warmup_steps(2.5, 200)


def test_the_trainer_applies_the_schedule() -> None:
    lrs = []

    def spy(optimizer, args, kwargs):
        lrs.append(optimizer.param_groups[0]["lr"])

    handle = register_optimizer_step_pre_hook(spy)
    try:
        Trainer(max_steps=6, batch_size=2, lr=1.0, warm_up=2, lr_scheduler="linear",
                progress=False).train(tiny_lm(), counting_dataset(8))
    finally:
        handle.remove()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])


def test_accumulating_two_micro_batches_of_b_equals_one_batch_of_2b() -> None:
    data = counting_dataset(16, padded=True)  # uneven target counts per micro-batch
    runs = []
    for batch_size, accumulation in ((2, 2), (4, 1)):
        model = tiny_lm()
        Trainer(max_steps=4, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                lr=1e-2, progress=False).train(model, data)
        runs.append(weights(model))
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        if name.endswith("k_proj.bias"):  # its gradient is 0 (softmax ignores a shift of all
            continue  # keys): Adam normalizes rounding noise there into lr-sized steps
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(runs[0]["model.decoder.embed_tokens.weight"],
                           tiny_lm().model.decoder.embed_tokens.weight)


def test_targets_are_counted_after_the_shift_and_rows_otherwise() -> None:
    labels = torch.tensor([[5, 6, 7, -100], [5, -100, -100, -100]])
    assert count_targets({"labels": labels, "input_ids": labels}) == 2 + 0
    assert count_targets({"input_ids": torch.zeros(3, 4), "labels": torch.tensor([0, 1, 0])}) == 3


def test_data_order_is_seeded_per_epoch_and_split_by_rank() -> None:
    one = list(micro_batch_indices(12, 4, 1, 1, seed=3, epoch=0, rank=0, start_step=0, steps=3))
    two = [list(micro_batch_indices(12, 2, 2, 1, 3, 0, r, 0, 3)) for r in (0, 1)]
    assert [a + b for a, b in zip(*two)] == one  # 2 ranks x 2 == 1 rank x 4, step by step
    assert sorted(sum(one, [])) == list(range(12))
    assert list(micro_batch_indices(12, 4, 1, 1, 3, 0, 0, 1, 3)) == one[1:]  # resume skips
    assert list(micro_batch_indices(12, 4, 1, 1, 3, 1, 0, 0, 3)) != one  # new epoch, new order


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_clip_grad_bounds_the_norm_the_optimizer_sees(clip: float | None) -> None:
    norms = []

    def spy(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
        norms.append(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(spy)
    try:
        Trainer(max_steps=2, batch_size=2, clip_grad=clip, progress=False).train(
            tiny_lm(), counting_dataset(4))
    finally:
        handle.remove()
    assert len(norms) == 2
    if clip is None:
        assert min(norms) > 1e-2
    else:
        assert max(norms) <= clip * (1 + 1e-4)


def test_bf16_autocast_trains_float32_weights() -> None:
    model, before = tiny_lm(), weights(tiny_lm())
    summary = Trainer(max_steps=2, batch_size=2, bf16=True, lr=1e-2, progress=False).train(
        model, counting_dataset(4))
    assert math.isfinite(summary["loss"])
    assert model.lm_head.weight.dtype == torch.float32
    assert not torch.equal(model.lm_head.weight, before["model.decoder.embed_tokens.weight"])


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    batch = {k: torch.stack([r[k] for r in counting_dataset(3, padded=True)])
             for k in ("input_ids", "attention_mask", "labels")}
    grads = []
    for on in (False, True):
        model = tiny_lm(dropout=0.1).train()
        model.model.decoder.gradient_checkpointing = on
        torch.manual_seed(5)  # dropout masks must replay on recompute
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_gradient_checkpointing_recomputes_in_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    import flagopt.model.decoder as decoder

    calls = []
    real = decoder.checkpoint
    monkeypatch.setattr(decoder, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_lm()
    Trainer(max_steps=1, batch_size=2, gradient_checkpointing=True, progress=False).train(
        model, counting_dataset(2))
    assert len(calls) == 2  # one per layer
    model.eval()(**{k: v[None] for k, v in counting_dataset(1)[0].items()})
    assert len(calls) == 2  # never outside training


def test_only_parameters_that_require_grad_are_trained_and_exported(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = tiny_lm()
    model.requires_grad_(False)
    model.model.decoder.layers[0].fc1.requires_grad_(True)
    before = weights(model)
    Trainer(max_steps=2, batch_size=2, lr=1e-2, save_dir=tmp_path, weight_decay=0.1,
            progress=False).train(model, counting_dataset(4))
    after = weights(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"model.decoder.layers.0.fc1.weight", "model.decoder.layers.0.fc1.bias"}
    saved = load_file(tmp_path / "trainable.safetensors")
    assert saved.keys() == changed and torch.equal(saved["model.decoder.layers.0.fc1.weight"],
                                                   after["model.decoder.layers.0.fc1.weight"])


def test_metrics_file_has_a_line_per_log_and_eval(tmp_path: Path) -> None:
    exported = []
    data = counting_dataset(8)
    Trainer(max_steps=4, batch_size=2, save_dir=tmp_path, log_interval=2, eval_interval=2,
            progress=False).train(
        tiny_lm(), data, valid_dataset=data[:3], metric_fn=lambda m, d: {"rows": len(d)},
        export_fn=lambda m, d: exported.append(d))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    eval_lines = [x for x in lines if "eval_loss" in x]
    assert [x["step"] for x in train_lines] == [2, 4] and [x["step"] for x in eval_lines] == [2, 4]
    assert set(train_lines[0]) == {"step", "epoch", "loss", "lr", "tokens_per_s"}
    assert train_lines[0]["tokens_per_s"] > 0 and eval_lines[0]["eval_rows"] == 3
    assert exported == [tmp_path]


@pytest.mark.parametrize("kwargs, match", [
    (dict(env_type="deepspeed"), "'deepspeed' is a FlagAI back-end"),
    (dict(env_type="bmtrain"), "'bmtrain' is a FlagAI back-end"),
    (dict(env_type="tpu"), r"env_type='tpu'; expected one of \('pytorch', 'pytorchDDP'\)"),
    (dict(deepspeed_config="ds.json"), r"\['deepspeed_config'\] are not supported"),
    (dict(batch_size=0), "batch_size=0; expected an integer >= 1"),
    (dict(lr=-1.0), "lr=-1.0; expected a finite number >= 0"),
    (dict(warm_up=2.5), "warm_up=2.5"),
    (dict(lr_scheduler="step"), "lr_scheduler='step'; expected one of"),
    (dict(fp16=True, bf16=True), "choose one"),
    (dict(save_interval=5), "save_interval=5 needs a save_dir"),
])
def test_bad_options_are_refused_by_name(kwargs: dict, match: str) -> None:
    with pytest.raises(TrainerConfigError, match=match):
        Trainer(**kwargs)


def test_unknown_options_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="'epoch'"):
        Trainer(epoch=3)


def test_run_time_refusals() -> None:
    with pytest.raises(TrainerConfigError, match="fp16=True needs a CUDA device, got 'cpu'"):
        Trainer(fp16=True, progress=False).train(tiny_lm(), counting_dataset(2))
    with pytest.raises(TrainerConfigError, match="3 examples, fewer than one optimizer step"):
        Trainer(batch_size=2, gradient_accumulation_steps=2).train(tiny_lm(),
                                                                    counting_dataset(3))
    frozen = tiny_lm().requires_grad_(False)
    with pytest.raises(TrainerConfigError, match="no parameter with requires_grad"):
        Trainer().train(frozen, counting_dataset(2))
    with pytest.raises(TrainerConfigError, match="gradient_checkpointing=True, but Linear"):
        Trainer(gradient_checkpointing=True).train(torch.nn.Linear(2, 2), [])


def test_ddp_needs_the_launcher_environment(env: Env) -> None:
    env.delenv("RANK", raising=False)
    env.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(TrainerConfigError, match="needs RANK in the environment"):
        Trainer(env_type="pytorchDDP").train(tiny_lm(), counting_dataset(2))
    env.setenv("RANK", "zero")
    env.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainerConfigError, match="RANK='zero'"):
        Trainer(env_type="pytorchDDP").train(tiny_lm(), counting_dataset(2))


def test_trainer_is_flagopt_trainer() -> None:
    assert PublicTrainer is Trainer
