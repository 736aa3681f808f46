"""The decoder's Linear: float32 CPU products of a CPU-dependent window of row counts
computed as W @ x^T, one float32 row split over the threads and one bfloat16 row as addmv
where the CPU favours them, the same numbers to rounding, everything else plain F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flagopt.model import linear as linear_module
from flagopt.model.linear import MAX_ROWS, MIN_ROWS, Linear


def _layer(bias: bool, dtype=torch.float32, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    return Linear(96, 200, bias=bias).to(dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 5, 32, 33, 64])
def test_agrees_with_f_linear(rows: int, bias: bool) -> None:
    layer = _layer(bias)
    x = torch.randn(rows, 3, 96)[:, 0]  # not contiguous
    want = F.linear(x, layer.weight, layer.bias)
    got = layer(x)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    split = rows == 1 and linear_module.ONE_ROW_SPLIT and torch.get_num_threads() > 1
    if not MIN_ROWS <= rows <= MAX_ROWS and not split:
        assert torch.equal(got, want)  # plain F.linear


def test_the_rows_in_range_run_as_w_times_x_transposed(monkeypatch) -> None:
    monkeypatch.setattr(linear_module, "MIN_ROWS", 2)  # whatever this CPU's window is
    monkeypatch.setattr(linear_module, "MAX_ROWS", 32)
    layer = _layer(bias=True)
    x = torch.randn(2, 4, 96)  # 8 rows, batch and sequence dimensions kept
    want = torch.addmm(layer.bias[:, None], layer.weight, x.reshape(8, 96).t()).t()
    assert torch.equal(layer(x), want.reshape(2, 4, 200))


def test_other_dtypes_and_the_switch_are_plain_f_linear(monkeypatch) -> None:
    layer = _layer(bias=True, dtype=torch.bfloat16)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    monkeypatch.setattr(linear_module, "MAX_ROWS", 0)
    layer = _layer(bias=True)
    x = torch.randn(4, 96)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("rows, split", [(6, False), (1, True)])  # W @ x^T; the split row
def test_gradients_match_f_linear(monkeypatch, rows: int, split: bool) -> None:
    monkeypatch.setattr(linear_module, "ONE_ROW_SPLIT", split)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    layer = _layer(bias=True)
    x = torch.randn(rows, 96, requires_grad=True)
    layer(x).square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.weight, layer.bias)]
    for t in (x, layer.weight, layer.bias):
        t.grad = None
    F.linear(x, layer.weight, layer.bias).square().sum().backward()
    for got, t in zip(grads, (x, layer.weight, layer.bias)):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-5)


def test_is_an_nn_linear_with_its_state_dict() -> None:
    layer = _layer(bias=True)
    assert isinstance(layer, nn.Linear)
    plain = nn.Linear(96, 200)
    plain.load_state_dict(layer.state_dict())
    assert list(plain.state_dict()) == list(layer.state_dict())


def test_the_window_comes_from_the_cpu_capability() -> None:
    key = linear_module.cpu_key()
    assert key.startswith(torch.backends.cpu.get_cpu_capability())
    assert (MIN_ROWS, MAX_ROWS) == linear_module.ROW_WINDOWS.get(key, (0, -1))
    assert linear_module.ONE_ROW_MV == (key in linear_module.MV_CAPABILITIES)
    assert linear_module.ONE_ROW_SPLIT == (key in linear_module.SPLIT_CAPABILITIES)
    for low, high in linear_module.ROW_WINDOWS.values():
        assert 2 <= low <= high  # one row is always F.linear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (96,)])
def test_one_bf16_row_agrees_with_f_linear(monkeypatch, shape, bias: bool) -> None:
    monkeypatch.setattr(linear_module, "ONE_ROW_MV", True)  # whatever this CPU is
    layer = _layer(bias, dtype=torch.bfloat16)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    got = layer(x)
    assert got.shape == (*shape[:-1], 200) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-2, atol=1e-2)


def test_one_bf16_row_is_as_accurate_as_f_linear(monkeypatch) -> None:
    monkeypatch.setattr(linear_module, "ONE_ROW_MV", True)
    torch.manual_seed(1)
    layer = Linear(512, 64).to(torch.bfloat16)
    x = torch.relu(torch.randn(40, 1, 512)).to(torch.bfloat16)  # 40 one-row products
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    ours = torch.stack([layer(row) for row in x]).double()
    plain = F.linear(x, layer.weight, layer.bias).double()
    assert (ours - exact).abs().mean() <= 1.05 * (plain - exact).abs().mean() + 1e-6


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (96,)])
def test_one_fp32_row_split_over_threads_agrees_with_f_linear(monkeypatch, shape, parts: int,
                                                              bias: bool) -> None:
    monkeypatch.setattr(linear_module, "ONE_ROW_SPLIT", True)  # whatever this CPU is
    monkeypatch.setattr(torch, "get_num_threads", lambda: parts)
    layer = _layer(bias)
    x = torch.randn(*shape)
    got = layer(x)
    want = F.linear(x, layer.weight, layer.bias)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    slices = [F.linear(x, w, None if b is None else b) for w, b in zip(
        layer.weight.chunk(parts), layer.bias.chunk(parts) if bias else [None] * parts)]
    torch.testing.assert_close(got, torch.cat(slices, -1), rtol=1e-6, atol=1e-6)


def test_one_fp32_row_split_falls_back_where_it_cannot_split(monkeypatch) -> None:
    monkeypatch.setattr(linear_module, "ONE_ROW_SPLIT", True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # 200 rows do not split in 3
    layer = _layer(bias=True)
    x = torch.randn(1, 96)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # one thread: nothing to split
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    transposed = layer.weight.detach().t().contiguous().t()  # not contiguous: no view
    assert torch.equal(linear_module.linear(x, transposed, None), F.linear(x, transposed))
