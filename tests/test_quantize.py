"""int8 quantization (weight-only "int8" and "w8a8"): the kernels, load-time quantization and
its quality cost."""

from __future__ import annotations

import pytest
import torch

from flagopt.model.loading import load_pretrained
from flagopt.model.quantize import Int8Embedding, Int8Linear, int8_linear, quantize_rows
from flagopt.model.synthetic import write_random_checkpoint
from flagopt.predictor.generation import generate
from flagopt.predictor.params import GenerationParams
from tests.conftest import tiny_config


def test_quantize_rows_is_symmetric_per_row_and_bounded() -> None:
    w = torch.randn(37, 50) * torch.linspace(0.01, 3, 37)[:, None]
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (37,)
    assert int(q.abs().max()) == 127
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())  # rounding, never clipping


@pytest.mark.parametrize("rows", [1, 16, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_the_dequantized_matmul(rows: int, dtype: torch.dtype) -> None:
    w, b = torch.randn(96, 64), torch.randn(96)
    q, scale = quantize_rows(w)
    x = torch.randn(rows, 64)
    reference = torch.nn.functional.linear(x, q.float() * scale[:, None], b)
    y = int8_linear(x.to(dtype), q, scale, b.to(dtype))
    assert y.dtype == dtype and y.shape == (rows, 96)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(y.float(), reference, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_linear_batched_rows_equal_each_row_alone(dtype: torch.dtype) -> None:
    # The int8 path is the fused int8 kernel at every row count (batches and prefill too),
    # so a row's output does not depend on what else is in the batch.
    w, b = torch.randn(96, 64), torch.randn(96)
    q, scale = quantize_rows(w)
    x = torch.randn(4, 16, 64).to(dtype)  # (B, T, in): 64 rows
    batched = int8_linear(x, q, scale, b.to(dtype))
    alone = torch.stack([torch.cat([int8_linear(x[i, t][None], q, scale, b.to(dtype))
                                    for t in range(16)]) for i in range(4)])
    assert batched.shape == (4, 16, 96)
    assert torch.equal(batched, alone)


def test_int8_model_batch_and_prefill_equal_single_row_decoding(tmp_path) -> None:
    directory, _ = _checkpoint(tmp_path)
    model = load_pretrained(directory, dtype=torch.bfloat16, quantize="int8")
    ids = torch.randint(3, 256, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batched = model(ids).logits  # one 48-row prefill
        alone = torch.cat([model(ids[i:i + 1]).logits for i in range(4)])
    assert torch.equal(batched, alone)
    params = GenerationParams(max_new_tokens=8, eos_token_ids=())
    together = generate(model, ids, None, params).sequences
    each = torch.cat([generate(model, ids[i:i + 1], None, params).sequences for i in range(4)])
    assert torch.equal(together, each)


def _checkpoint(tmp_path, **overrides):
    config = tiny_config(vocab_size=256, hidden_size=64, ffn_dim=128, **overrides)
    return write_random_checkpoint(tmp_path, config, layout="safetensors", tokenizer=False,
                                   std=0.05, seed=3), config


@pytest.mark.parametrize("overrides", [{}, {"word_embed_proj_dim": 32,
                                            "do_layer_norm_before": False}])
def test_load_with_int8_quantizes_every_linear_and_ties_the_head(tmp_path, overrides) -> None:
    directory, config = _checkpoint(tmp_path, **overrides)
    model = load_pretrained(directory, dtype=torch.bfloat16, quantize="int8")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == []  # every projection, fc1/fc2, project_in/out and the head
    embed = model.model.decoder.embed_tokens
    assert isinstance(embed, Int8Embedding) and isinstance(model.lm_head, Int8Linear)
    assert model.lm_head.weight is embed.weight and model.lm_head.scale is embed.scale
    assert all(p.device.type == "cpu" for p in model.parameters())
    int8_bytes = sum(p.numel() for p in model.parameters() if p.dtype == torch.int8)
    assert int8_bytes > 0.9 * sum(p.numel() for p in model.parameters())


def test_int8_logits_stay_close_and_greedy_tokens_mostly_agree(tmp_path) -> None:
    directory, _ = _checkpoint(tmp_path)
    full = load_pretrained(directory, dtype=torch.float32)
    int8 = load_pretrained(directory, dtype=torch.float32, quantize="int8")
    ids = torch.randint(3, 256, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = full(ids).logits, int8(ids).logits
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 0.05, rel  # quantized (not identical) but close
    params = GenerationParams(max_new_tokens=16, eos_token_ids=())
    same = generate(full, ids, None, params).sequences == generate(int8, ids, None,
                                                                     params).sequences
    assert float(same.float().mean()) > 0.8


def test_int8_rejects_unknown_modes(tmp_path) -> None:
    directory, _ = _checkpoint(tmp_path)
    with pytest.raises(ValueError, match="quantize='int4'"):
        load_pretrained(directory, quantize="int4")


def test_autoloader_int8(tmp_path) -> None:
    from flagopt.auto_model import AutoLoader

    directory, _ = _checkpoint(tmp_path / "m")
    model = AutoLoader("lm", str(directory), quantize="int8").get_model()
    assert isinstance(model.lm_head, Int8Linear)
    assert model.lm_head.scale.dtype == torch.bfloat16  # the fused CPU kernel's dtype
    model = AutoLoader("lm", str(directory), quantize="int8", dtype="float32").get_model()
    assert model.lm_head.scale.dtype == torch.float32
    with pytest.raises(ValueError, match="quantize"):
        AutoLoader("lm", str(directory), quantize="fp4")


def test_fused_int8_kernel_passes_gradients_to_its_input():
    """LoRA over an int8 base trains through the fused kernel: dL/dx equals the dequantized
    matmul's, and the frozen weight gets none."""
    from flagopt.model.quantize import int8_linear, quantize_rows

    torch.manual_seed(0)
    q, scale = quantize_rows(torch.randn(24, 16))
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3, 5, 24)  # a linear loss: its gradient does not depend on rounding of y
    (int8_linear(x, q, scale, None).float() * w).sum().backward()
    want = (w * scale) @ q.float()  # exact dL/dx for the dequantized weight
    torch.testing.assert_close(x.grad.float(), want, rtol=0.02, atol=0.05)
    assert x.grad.abs().sum() > 0


# --- "w8a8": int8 activations in products of 2+ rows ---------------------------------------


def _exact(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x.double(), q.double() * scale.double()[:, None])


@pytest.mark.parametrize("rows", [2, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_linear_is_close_to_the_weight_only_product(rows: int, dtype) -> None:
    torch.manual_seed(rows)
    q, scale = quantize_rows(torch.randn(96, 64))
    x = torch.randn(rows, 64).to(dtype)
    y = int8_linear(x, q, scale.to(dtype), None, int8_activations=True)
    assert y.dtype == dtype and y.shape == (rows, 96)
    exact = _exact(x, q, scale)
    rel = float((y.double() - exact).norm() / exact.norm())
    assert 0 < rel < 0.02, rel  # activation rounding: close, not the weight-only bits
    weight_only = int8_linear(x, q, scale.to(dtype), None)
    assert not torch.equal(y, weight_only)


def test_w8a8_keeps_one_row_on_the_weight_only_kernel() -> None:
    q, scale = quantize_rows(torch.randn(96, 64))
    x = torch.randn(1, 1, 64).bfloat16()
    assert torch.equal(int8_linear(x, q, scale.bfloat16(), None, int8_activations=True),
                       int8_linear(x, q, scale.bfloat16(), None))


def test_w8a8_outlier_features_stay_out_of_int8(monkeypatch) -> None:
    # OPT's large-model activations have a few feature dimensions far above the rest; in
    # int8 they would coarsen every other entry of their row (LLM.int8()).
    from flagopt.model import quantize

    torch.manual_seed(0)
    q, scale = quantize_rows(torch.randn(128, 256))
    x = torch.randn(16, 256)
    x[:, [3, 77]] *= 40.0  # two outlier dimensions, |x| up to ~150
    exact = _exact(x, q, scale)
    error = lambda y: float((y.double() - exact).norm() / exact.norm())  # noqa: E731
    mixed = error(quantize.w8a8_linear(x, q, scale))
    monkeypatch.setattr(quantize, "OUTLIER_THRESHOLD", float("inf"))
    naive = error(quantize.w8a8_linear(x, q, scale))
    assert mixed < 0.02 and naive > 3 * mixed, (mixed, naive)


def test_w8a8_rows_of_a_batch_agree_with_each_row_alone() -> None:
    torch.manual_seed(1)
    q, scale = quantize_rows(torch.randn(96, 64))
    x = torch.randn(8, 2, 64)
    x[3, 1, 5] = 30.0  # an outlier in one row only: the others' products must not change
    batched = int8_linear(x, q, scale, None, int8_activations=True)
    alone = torch.stack([int8_linear(x[i], q, scale, None, int8_activations=True)
                         for i in range(8)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_w8a8_projections_of_one_input_share_its_quantization(monkeypatch) -> None:
    from flagopt.model import quantize

    torch.manual_seed(2)
    layers = []
    for bias in (True, False, True):
        layer = Int8Linear(64, 48, bias=bias, dtype=torch.bfloat16, int8_activations=True)
        layer.set_weight(torch.randn(48, 64), "cpu")
        if bias:
            layer.bias.data = torch.randn(48).bfloat16()
        layers.append(layer)
    x = torch.randn(3, 5, 64).bfloat16()
    x[1, 2, 7] = 25.0  # an outlier column too
    calls = []
    quantize_once = quantize.quantize_activations
    monkeypatch.setattr(quantize, "quantize_activations",
                        lambda x: calls.append(x.shape) or quantize_once(x))
    with torch.no_grad():
        shared = quantize.shared_w8a8(x, layers)
        assert len(calls) == 1
        for layer, y in zip(layers, shared):  # what each layer gives alone, bit for bit
            assert torch.equal(y, layer(x))
        assert quantize.shared_w8a8(x[:1, :1], layers) is None  # one row: weight-only kernel
        plain = Int8Linear(64, 48, bias=False, dtype=torch.bfloat16)
        assert quantize.shared_w8a8(x, [layers[0], plain]) is None


def test_w8a8_rows_match_a_direct_quantization() -> None:
    # the outlier split, per-row scale and rescale are the plain recipe's numbers
    torch.manual_seed(3)
    q, scale = quantize_rows(torch.randn(40, 32))
    x = torch.randn(6, 32)
    x[2, 4] = -9.0  # an outlier
    big = x.abs() > 6.0
    inner = x.masked_fill(big, 0.0)
    xs = inner.abs().amax(1, keepdim=True) / 127.0
    xq = (inner / xs).round()
    expected = ((xq @ q.float().t()) * xs + x.masked_fill(~big, 0.0) @ q.float().t()) * scale
    torch.testing.assert_close(int8_linear(x, q, scale, None, int8_activations=True), expected,
                               rtol=1e-6, atol=1e-5)


def test_w8a8_model_loads_and_stays_close_to_int8(tmp_path, monkeypatch) -> None:
    from flagopt.model import quantize
    from flagopt.model.prepared import load_prepared

    directory, _ = _checkpoint(tmp_path)
    int8 = load_pretrained(directory, dtype=torch.bfloat16, quantize="int8")
    w8a8 = load_pretrained(directory, dtype=torch.bfloat16, quantize="w8a8")
    layers = [m for m in w8a8.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.int8_activations for m in layers)
    assert not any(m.int8_activations for m in int8.modules() if isinstance(m, Int8Linear))
    for (name, a), (_, b) in zip(int8.state_dict().items(), w8a8.state_dict().items()):
        assert torch.equal(a, b), name  # the same int8 weights and scales
    ids = torch.randint(3, 256, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = int8(ids).logits.float(), w8a8(ids).logits.float()
    assert 0 < float((a - b).norm() / a.norm()) < 0.05
    calls = []
    quantize_once = quantize.quantize_activations
    monkeypatch.setattr(quantize, "quantize_activations",
                        lambda x: calls.append(1) or quantize_once(x))
    with torch.no_grad():  # q/k/v quantize their shared input once per layer
        assert torch.equal(w8a8(ids).logits.float(), b)
    assert len(calls) == len(layers) - 2 * w8a8.config.num_hidden_layers
    warm = [load_prepared(directory, dtype=torch.bfloat16, quantize="w8a8") for _ in range(2)]
    with torch.no_grad():  # the prepared cache keeps the mode
        assert torch.equal(warm[1](ids).logits, w8a8(ids).logits)
    params = GenerationParams(max_new_tokens=12, eos_token_ids=())
    same = generate(int8, ids, None, params).sequences == generate(w8a8, ids, None,
                                                                     params).sequences
    assert float(same.float().mean()) > 0.8


def test_w8a8_from_the_autoloader_and_the_cli_choices(tmp_path) -> None:
    from flagopt import cli
    from flagopt.auto_model import AutoLoader
    from flagopt.auto_model.auto_loader import QUANTIZE_MODES
    from flagopt.model.quantize import QUANTIZE_MODES as MODES

    assert cli.QUANTIZE_CHOICES == MODES and QUANTIZE_MODES == (None, *MODES)
    directory, _ = _checkpoint(tmp_path / "m")
    model = AutoLoader("lm", str(directory), quantize="w8a8").get_model()
    assert model.lm_head.int8_activations and model.lm_head.scale.dtype == torch.bfloat16
