"""``RowCache``: rows of different lengths, admitted and retired at any step, each giving the
logits of its own tokens run alone."""

from __future__ import annotations

import pytest
import torch

from flagopt.model.cache import KVCache, RowCache
from flagopt.model.heads import OPTForCausalLM
from tests.conftest import VARIANTS, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**overrides) -> OPTForCausalLM:
    torch.manual_seed(0)
    return OPTForCausalLM(tiny_config(**overrides)).eval()


def _solo_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of every position of ``ids`` run alone, no cache: (T, V)."""
    return model(torch.tensor([ids])).logits[0]


def _prefill(model, ids: list[int], rows: RowCache) -> torch.Tensor:
    small = KVCache.for_model(model.config, 1, len(ids), dtype=rows.dtype, device="cpu")
    return model(torch.tensor([ids]), cache=small).logits[0], small


def _row_step(model, rows: RowCache, tokens: torch.Tensor) -> torch.Tensor:
    positions, mask = rows.step_inputs(tokens.shape[1])
    hidden = model.model.decoder(tokens[:positions.shape[0]], positions, mask, rows)
    return model.logits(hidden[:, -1])


@pytest.mark.parametrize("name", ["pre_ln", "350m_style"])
@torch.inference_mode()
def test_each_row_matches_its_solo_forward(name) -> None:
    model = _model(**VARIANTS[name])
    g = torch.Generator().manual_seed(1)
    seqs = {0: torch.randint(3, 128, (5,), generator=g).tolist(),
            2: torch.randint(3, 128, (9,), generator=g).tolist()}
    rows = RowCache.for_model(model.config, 4, 32, dtype=torch.float32, device="cpu")
    for row, ids in seqs.items():
        _, small = _prefill(model, ids, rows)
        rows.admit(row, small)
    assert rows.free_rows() == [1, 3]
    assert rows.lengths.tolist() == [5, 0, 9, 0]
    for step in range(6):
        if step == 2:  # a row joins mid-way, into a free row below the last active one
            seqs[1] = torch.randint(3, 128, (3,), generator=g).tolist()
            _, small = _prefill(model, seqs[1], rows)
            rows.admit(1, small)
        if step == 4:  # and one leaves
            rows.retire(0)
            del seqs[0]
        nxt = torch.randint(3, 128, (4, 1), generator=g)
        logits = _row_step(model, rows, nxt)
        for row, ids in seqs.items():
            ids.append(int(nxt[row, 0]))
            torch.testing.assert_close(logits[row], _solo_logits(model, ids)[-1])
    assert rows.lengths.tolist() == [0, 3 + 4, 9 + 6, 0]


@torch.inference_mode()
def test_free_rows_past_the_last_active_one_are_not_computed() -> None:
    model = _model()
    rows = RowCache.for_model(model.config, 8, 16, dtype=torch.float32, device="cpu")
    _, small = _prefill(model, [2, 5, 7], rows)
    rows.admit(1, small)
    positions, mask = rows.step_inputs(1)
    assert positions.tolist() == [[0], [3]]
    assert mask.shape == (2, 1, 1, 4)  # rows 0..1, positions 0..3
    assert mask[1, 0, 0].tolist() == [True] * 4 and mask[0, 0, 0].tolist() == [True] + [False] * 3


def test_admit_refuses_a_busy_row_and_a_prompt_too_long() -> None:
    model = _model()
    rows = RowCache.for_model(model.config, 2, 4, dtype=torch.float32, device="cpu")
    small = KVCache.for_model(model.config, 1, 5, dtype=torch.float32, device="cpu")
    small.length = 5
    with pytest.raises(ValueError, match="does not fit a capacity of 4"):
        rows.admit(0, small)
    small.length = 2
    rows.admit(0, small)
    with pytest.raises(ValueError, match="row 0 is in use"):
        rows.admit(0, small)
    rows.retire(0)
    rows.admit(0, small)


@torch.inference_mode()
def test_truncate_row_rolls_one_row_back_and_the_next_write_lands_there() -> None:
    """Speculative rollback: each row drops its own rejected positions; a multi-token step
    after it gives every row the logits of its kept tokens plus the new ones run alone."""
    model = _model()
    g = torch.Generator().manual_seed(2)
    seqs = {0: torch.randint(3, 128, (4,), generator=g).tolist(),
            1: torch.randint(3, 128, (6,), generator=g).tolist()}
    rows = RowCache.for_model(model.config, 2, 32, dtype=torch.float32, device="cpu")
    for row, ids in seqs.items():
        rows.admit(row, _prefill(model, ids, rows)[1])
    wrong = torch.randint(3, 128, (2, 3), generator=g)  # three proposals per row
    positions, mask = rows.step_inputs(3)
    model.model.decoder(wrong, positions, mask, rows)
    assert rows.lengths.tolist() == [7, 9]
    keep = {0: 1, 1: 3}  # row 0 keeps one proposal, row 1 all three
    for row, n in keep.items():
        rows.truncate_row(row, len(seqs[row]) + n)
        seqs[row] += wrong[row, :n].tolist()
    assert rows.lengths.tolist() == [5, 9]
    nxt = torch.randint(3, 128, (2, 2), generator=g)
    positions, mask = rows.step_inputs(2)
    logits = model.logits(model.model.decoder(nxt, positions, mask, rows))  # (2, 2, V)
    for row, ids in seqs.items():
        ids += nxt[row].tolist()
        torch.testing.assert_close(logits[row], _solo_logits(model, ids)[-2:])


def test_truncate_row_errors() -> None:
    model = _model()
    rows = RowCache.for_model(model.config, 3, 8, dtype=torch.float32, device="cpu")
    small = KVCache.for_model(model.config, 1, 4, dtype=torch.float32, device="cpu")
    small.length = 4
    rows.admit(1, small)
    for bad in (-1, 5):
        with pytest.raises(ValueError, match=f"row 1 of 4 positions to {bad}; expected 0 <= "
                                             f"length <= 4"):
            rows.truncate_row(1, bad)
    for row in (0, 3):  # a free row, a row past the cache
        with pytest.raises(ValueError, match=rf"row={row} is not an active row; expected one "
                                             rf"of \[1\]"):
            rows.truncate_row(row, 0)
    rows.truncate_row(1, 0)
    assert rows.lengths.tolist() == [0, 0, 0]
