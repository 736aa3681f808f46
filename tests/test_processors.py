"""Logits processors and stopping criteria, checked against transformers (a test-only oracle)."""

from __future__ import annotations

import itertools
import random
import types
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation import logits_process as hf
from transformers.generation.utils import GenerationMixin

from flagopt.predictor.processors import (
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    apply_processors,
    build_logits_processors,
    sample,
)
from flagopt.predictor.generation import generate
from flagopt.predictor.params import GenerationParams
from flagopt.predictor.stopping import EosCriterion, StopStrings, cut_at_stop, \
    max_new_tokens_allowed

VOCAB = 1000
SEEDS = (0, 1, 2)
BATCHES = (1, 4)
# The real OPT tokenizer files, shipped with the package (a clone has no ../shared).
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "flagopt" / "data" / "opt-tokenizer"


def _scores(seed: int, batch: int, vocab: int = VOCAB) -> torch.Tensor:
    """fp32 [batch, vocab] logits with many ties (rounded rows) and some -inf entries."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, vocab, generator=gen) * 3
    scores[::2] = torch.round(scores[::2] * 2) / 2  # every other row: heavy ties
    scores[:, :3] = scores[:, 3:4]  # a tie at every row's first entries
    ninf = torch.rand(batch, vocab, generator=gen) < 0.05
    return scores.masked_fill(ninf, float("-inf"))


def _ids(seed: int, batch: int, length: int, high: int = 30) -> torch.Tensor:
    """Token ids from a small range so that tokens and n-grams repeat."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, high, (batch, length), generator=gen)


def _mask(scores: torch.Tensor) -> torch.Tensor:
    return torch.isneginf(scores)


def _assert_same_filter(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(_mask(ours), _mask(theirs))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# --- processors vs transformers -------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("penalty", [1.3, 0.6, 2])
def test_repetition_penalty_matches_hf(seed: int, batch: int, penalty: float) -> None:
    ids, scores = _ids(seed, batch, 17, high=VOCAB // 4), _scores(seed, batch)
    theirs = hf.RepetitionPenaltyLogitsProcessor(float(penalty))(ids, scores.clone())
    ours = RepetitionPenalty(penalty)(ids, scores.clone())
    assert not torch.equal(ours, scores)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_hf(seed: int, batch: int, n: int) -> None:
    high = {1: 200, 2: 10, 3: 3, 4: 2}[n]  # small alphabets so long n-grams repeat
    ids, scores = _ids(seed, batch, 100, high=high), _scores(seed, batch)
    theirs = hf.NoRepeatNGramLogitsProcessor(n)(ids, scores.clone())
    ours = NoRepeatNGram(n)(ids, scores.clone())
    assert torch.isneginf(NoRepeatNGram(n)(ids, torch.zeros(batch, VOCAB))).any(dim=-1).all()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("length", [1, 2, 3])
def test_no_repeat_ngram_shorter_than_n_is_identity(length: int) -> None:
    ids, scores = _ids(0, 2, length), _scores(0, 2)
    assert torch.equal(NoRepeatNGram(4)(ids, scores.clone()), scores)


@pytest.mark.parametrize("eos", [[2], [2, 7, 999]])
@pytest.mark.parametrize("seed", SEEDS)
def test_min_new_tokens_matches_hf(eos: list[int], seed: int) -> None:
    prompt_len, min_new = 5, 3
    ours_proc = MinNewTokens(prompt_len, min_new, eos)
    theirs_proc = hf.MinNewTokensLengthLogitsProcessor(prompt_len, min_new, eos)
    for length in range(prompt_len, prompt_len + min_new + 3):
        ids, scores = _ids(seed, 3, length), _scores(seed + length, 3)
        scores[:, eos] = 0.5
        ours, theirs = ours_proc(ids, scores.clone()), theirs_proc(ids, scores.clone())
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        banned = length - prompt_len < min_new
        assert torch.isneginf(ours[:, eos]).all().item() is banned


def test_min_new_tokens_bans_exactly_while_short() -> None:
    proc = MinNewTokens(prompt_len=4, min_new_tokens=2, eos_token_ids=[2, 5])
    scores = torch.zeros(2, 8)
    for length, banned in [(4, True), (5, True), (6, False), (7, False)]:
        out = proc(torch.zeros(2, length, dtype=torch.long), scores.clone())
        assert torch.isneginf(out[:, [2, 5]]).all().item() is banned
        assert torch.equal(torch.isneginf(out).sum(), torch.tensor(4 if banned else 0))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("t", [0.3, 0.7, 1.5, 2])
def test_temperature_matches_hf(seed: int, batch: int, t: float) -> None:
    scores = _scores(seed, batch)
    ours = Temperature(t)(None, scores.clone())
    theirs = hf.TemperatureLogitsWarper(float(t))(None, scores.clone())
    _assert_same_filter(ours, theirs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(
    "k, keep", [(1, 1), (5, 1), (5, 8), (50, 1), (VOCAB - 1, 1), (VOCAB + 5, 1)]
)
def test_top_k_matches_hf(seed: int, batch: int, k: int, keep: int) -> None:
    scores = _scores(seed, batch)
    ours = TopK(k, min_tokens_to_keep=keep)(None, scores.clone())
    theirs = hf.TopKLogitsWarper(k, min_tokens_to_keep=keep)(None, scores.clone())
    _assert_same_filter(ours, theirs)
    if k < 50:
        assert _mask(ours).sum() > _mask(scores).sum()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("p, keep", [(0.0, 1), (0.1, 1), (0.5, 1), (0.9, 1), (0.99, 3), (0.2, 20)])
def test_top_p_matches_hf(seed: int, batch: int, p: float, keep: int) -> None:
    scores = _scores(seed, batch)
    ours = TopP(p, min_tokens_to_keep=keep)(None, scores.clone())
    theirs = hf.TopPLogitsWarper(p, min_tokens_to_keep=keep)(None, scores.clone())
    _assert_same_filter(ours, theirs)
    assert _mask(ours).sum() > _mask(scores).sum()


def test_top_p_with_a_tie_at_the_cut() -> None:
    scores = torch.log(torch.tensor([[0.4, 0.3, 0.3], [0.5, 0.25, 0.25]]))
    for p in (0.5, 0.6, 0.7, 0.75):
        ours = TopP(p)(None, scores.clone())
        _assert_same_filter(ours, hf.TopPLogitsWarper(p)(None, scores.clone()))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("p, keep", [(0.01, 1), (0.1, 1), (0.5, 1), (1.0, 1), (0.9, 4)])
def test_min_p_matches_hf(seed: int, batch: int, p: float, keep: int) -> None:
    scores = _scores(seed, batch)
    ours = MinP(p, min_tokens_to_keep=keep)(None, scores.clone())
    theirs = hf.MinPLogitsWarper(p, min_tokens_to_keep=keep)(None, scores.clone())
    _assert_same_filter(ours, theirs)
    assert _mask(ours).sum() > _mask(scores).sum()


# --- the order of build_logits_processors ----------------------------------------------------


class _ModelStub(GenerationMixin):
    """Just enough of a model for transformers' own `_get_logits_processor`."""

    def __init__(self) -> None:
        self.config = types.SimpleNamespace(is_encoder_decoder=False)


def _hf_processors(
    ids: torch.Tensor, prompt_len: int, eos: list[int], sampling: bool, num_beams: int, **params
):
    params = {k: v for k, v in params.items() if not (k == "min_p" and v == 0.0)}
    config = GenerationConfig(
        do_sample=sampling, num_beams=num_beams, eos_token_id=eos or None, **params
    )
    config._eos_token_tensor = torch.tensor(eos) if eos else None  # normally set by generate()
    return _ModelStub()._get_logits_processor(
        config,
        input_ids_seq_length=prompt_len,
        device="cpu",
        model_kwargs={"attention_mask": torch.ones_like(ids)},
    )


_HF_NAMES = {
    "RepetitionPenaltyLogitsProcessor": "RepetitionPenalty",
    "NoRepeatNGramLogitsProcessor": "NoRepeatNGram",
    "MinNewTokensLengthLogitsProcessor": "MinNewTokens",
    "TemperatureLogitsWarper": "Temperature",
    "TopKLogitsWarper": "TopK",
    "TopPLogitsWarper": "TopP",
    "MinPLogitsWarper": "MinP",
}

_PARAMS = [
    dict(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=4, temperature=0.7,
         top_k=40, top_p=0.9, min_p=0.05),
    dict(repetition_penalty=0.8, temperature=1.6, top_p=0.6, min_p=0.2),
    dict(no_repeat_ngram_size=3, top_k=7, top_p=0.5),
    dict(temperature=0.5, top_k=300, min_p=0.1),
    dict(min_new_tokens=10, temperature=2.0, top_p=0.95),
    dict(top_k=50),
]


@pytest.mark.parametrize("params", _PARAMS)
@pytest.mark.parametrize("sampling", [True, False])
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("eos", [[2], [2, 11]])
def test_build_matches_hf_pipeline(params: dict, sampling: bool, num_beams: int, eos: list[int]):
    ids = _ids(3, 4, 12, high=VOCAB // 20)
    prompt_len = ids.shape[1] - 1  # one token generated so far
    theirs = _hf_processors(ids, prompt_len, eos, sampling, num_beams, **params)
    ours = build_logits_processors(
        prompt_len=prompt_len, eos_token_ids=eos, sampling=sampling, num_beams=num_beams, **params
    )
    assert [type(p).__name__ for p in ours] == [_HF_NAMES[type(p).__name__] for p in theirs]
    for mine, ref in zip(ours, theirs):
        if hasattr(ref, "min_tokens_to_keep"):
            assert mine.min_tokens_to_keep == ref.min_tokens_to_keep
    for seed in SEEDS:
        scores = _scores(seed, 4)
        got = apply_processors(ours, ids, scores.clone())
        want = theirs(ids, scores.clone())
        _assert_same_filter(got, want)
        # The order matters (reversed gives other scores), so the order check above has teeth.
        if sampling and len(ours) > 1:
            shuffled = apply_processors(ours[::-1], ids, scores.clone())
            assert not torch.equal(shuffled, got)


def test_prompt_len_matters_to_min_new_tokens_in_pipeline() -> None:
    ids = _ids(0, 2, 6)
    params = dict(min_new_tokens=1, eos_token_ids=[2], sampling=False)
    procs = build_logits_processors(prompt_len=6, **params)
    assert torch.isneginf(apply_processors(procs, ids, torch.zeros(2, 10))[:, 2]).all()
    procs = build_logits_processors(prompt_len=5, **params)
    assert not torch.isneginf(apply_processors(procs, ids, torch.zeros(2, 10))).any()


# --- padding, neutral values, dtypes ----------------------------------------------------------


def _every_processor(prompt_len: int) -> list:
    return build_logits_processors(
        prompt_len=prompt_len, repetition_penalty=1.4, no_repeat_ngram_size=2, min_new_tokens=8,
        eos_token_ids=[2, 5], temperature=0.8, top_k=200, top_p=0.95, min_p=0.02, sampling=True,
    )


_PADDING_CASES = {
    "rep1.5": lambda prompt_len: [RepetitionPenalty(1.5)],
    "rep0.5": lambda prompt_len: [RepetitionPenalty(0.5)],
    "ngram1": lambda prompt_len: [NoRepeatNGram(1)],
    "ngram2": lambda prompt_len: [NoRepeatNGram(2)],
    "ngram3": lambda prompt_len: [NoRepeatNGram(3)],
    "min_new": lambda prompt_len: [MinNewTokens(prompt_len, 8, [2, 5])],
    "pipeline": _every_processor,
}


@pytest.mark.parametrize("case", sorted(_PADDING_CASES))
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("extra", [0, 4])
def test_left_padding_is_ignored(case: str, seed: int, extra: int) -> None:
    """A batch whose rows carry different amounts of -1 padding = each row processed alone."""
    build = _PADDING_CASES[case]
    length, generated, pads = 20, 3, [0, 3, 9]
    ids = _ids(seed, 3, length, high=6)
    padded = torch.cat([torch.full((3, extra), -1), ids], dim=1)  # (3, extra + length)
    for row, pad in enumerate(pads):
        padded[row, extra : extra + pad] = -1
    scores = _scores(seed, 3)
    got = apply_processors(build(extra + length - generated), padded, scores.clone())
    for row, pad in enumerate(pads):
        alone = ids[row : row + 1, pad:]  # (1, length - pad): the row's real tokens only
        alone_procs = build(length - pad - generated)
        want = apply_processors(alone_procs, alone, scores[row : row + 1].clone())
        _assert_same_filter(got[row : row + 1], want)
    assert not torch.equal(got, scores)


@pytest.mark.parametrize("seed", SEEDS)
def test_repetition_penalty_padding_matches_hf_generate(seed: int) -> None:
    """HF's generate keeps left padding out of the penalty via the attention mask; -1 does here."""
    ids = _ids(seed, 3, 15, high=VOCAB // 4)
    attention = torch.ones_like(ids)
    for row, pad in enumerate([0, 4, 11]):
        attention[row, :pad] = 0
    pad_id = 1  # OPT's <pad>: a real vocabulary entry that HF must not penalise
    hf_ids = ids.masked_fill(attention == 0, pad_id)
    ours_ids = ids.masked_fill(attention == 0, -1)
    scores = _scores(seed, 3)
    ignore = (attention != 0).int().argmax(dim=1)  # what generate passes as prompt_ignore_length
    theirs = hf.RepetitionPenaltyLogitsProcessor(1.7, prompt_ignore_length=ignore)
    want = theirs(hf_ids, scores.clone())
    got = RepetitionPenalty(1.7)(ours_ids, scores.clone())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_padding_never_counts_as_token_or_ngram() -> None:
    # Only padding and a single token: no bigram exists, nothing seen but token 4.
    ids = torch.tensor([[-1, -1, -1, -1, 4]])
    scores = torch.ones(1, 8)
    assert torch.equal(NoRepeatNGram(2)(ids, scores.clone()), scores)
    out = RepetitionPenalty(2.0)(ids, scores.clone())
    assert torch.equal(out, torch.tensor([[1, 1, 1, 1, 0.5, 1, 1, 1]]))
    for n in (1, 2, 3):  # a row of padding only
        assert torch.equal(NoRepeatNGram(n)(torch.full((1, 4), -1), scores.clone()), scores)
    assert torch.equal(RepetitionPenalty(2.0)(torch.full((1, 4), -1), scores.clone()), scores)
    # (-1, -1) repeated must not ban -1 -> index V-1 by wraparound or anything else.
    ids = torch.tensor([[-1, -1, -1, 7, 7]])
    out = NoRepeatNGram(2)(ids, scores.clone())
    assert torch.equal(torch.isneginf(out), torch.arange(8)[None] == 7)


def test_ids_outside_the_vocab_are_ignored() -> None:
    ids = torch.tensor([[3, 12, 3, 12]])  # 12 >= V = 8, as with an embedding larger than lm_head
    scores = torch.ones(1, 8)
    assert torch.equal(RepetitionPenalty(2.0)(ids, scores.clone())[0, 7], torch.tensor(1.0))
    assert torch.equal(NoRepeatNGram(2)(torch.tensor([[3, 12, 3]]), scores.clone()), scores)


@pytest.mark.parametrize(
    "proc",
    [RepetitionPenalty(1.0), NoRepeatNGram(0), MinNewTokens(4, 0, [2]), MinNewTokens(4, 9, []),
     Temperature(1.0), TopK(0), TopK(0, min_tokens_to_keep=5), TopP(1.0), TopP(1.0, 4), MinP(0.0),
     MinP(0.0, 3)],
)
def test_neutral_values_are_identities(proc) -> None:
    ids, scores = _ids(0, 4, 9), _scores(0, 4)
    assert torch.equal(proc(ids, scores.clone()), scores)


def test_neutral_parameters_build_nothing() -> None:
    assert build_logits_processors(prompt_len=5, sampling=True) == []
    assert build_logits_processors(prompt_len=5, sampling=False) == []
    assert build_logits_processors(prompt_len=5, min_new_tokens=3, sampling=True) == []  # no EOS
    warpers = dict(temperature=0.5, top_k=3, top_p=0.5, min_p=0.1)
    assert build_logits_processors(prompt_len=5, sampling=False, **warpers) == []
    assert len(build_logits_processors(prompt_len=5, sampling=True, **warpers)) == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scores(dtype: torch.dtype) -> None:
    ids = _ids(1, 4, 16, high=VOCAB // 10)
    scores = _scores(1, 4)
    procs = _every_processor(10)
    out = apply_processors(procs, ids, scores.to(dtype))
    assert out.dtype == dtype and out.shape == scores.shape
    assert not torch.isnan(out).any() and (~_mask(out)).sum(dim=-1).min() >= 1
    # The processors that do not rank keep the same mask as in fp32.
    for proc in procs[:3]:
        half = proc(ids, scores.to(dtype))
        assert torch.equal(_mask(half), _mask(proc(ids, scores.clone())))
        torch.testing.assert_close(half.float(), proc(ids, scores.clone()), atol=0.02, rtol=0.01)
    tokens = sample(out, torch.Generator().manual_seed(0))
    assert tokens.dtype == torch.long and not _mask(out).gather(1, tokens[:, None]).any()


# --- sampling ---------------------------------------------------------------------------------


def test_sample_is_reproducible_and_seed_dependent() -> None:
    scores = torch.zeros(64, VOCAB)
    first = sample(scores, torch.Generator().manual_seed(7))
    again = sample(scores, torch.Generator().manual_seed(7))
    other = sample(scores, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.shape == (64,) and first.dtype == torch.long


def test_sample_matches_hf_multinomial_with_same_seed() -> None:
    scores = TopP(0.9)(None, _scores(2, 8))
    torch.manual_seed(123)
    want = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    assert torch.equal(sample(scores, torch.Generator().manual_seed(123)), want)


def test_sample_never_draws_filtered_tokens() -> None:
    base = _scores(4, 1)
    kept = TopK(5)(None, base.clone())
    draws = sample(kept.expand(4000, -1).contiguous(), torch.Generator().manual_seed(0))
    allowed = torch.nonzero(~_mask(kept[0])).squeeze(1)
    assert torch.isin(draws, allowed).all()
    assert len(torch.unique(draws)) > 1  # really sampling, not argmax


# --- bad values: checked once, by GenerationParams (the processors trust it) -----------------
# These were the processors' own constructor checks; each bad value is now aimed at the
# boundary that the processors' parameters come from.


@pytest.mark.parametrize(
    "params, error",
    [
        (dict(repetition_penalty=0.0), ValueError), (dict(repetition_penalty=-1.0), ValueError),
        (dict(no_repeat_ngram_size=-1), ValueError),
        (dict(no_repeat_ngram_size=1.5), TypeError),  # not an integer: a TypeError there
        (dict(min_new_tokens=-2), ValueError), (dict(eos_token_ids=[-1]), ValueError),
        (dict(strategy="sample", temperature=-0.5), ValueError),
        (dict(strategy="sample", temperature=float("inf")), ValueError),
        (dict(strategy="sample", top_k=-1), ValueError),
        (dict(strategy="sample", top_k=2.5), TypeError),  # not an integer
        (dict(strategy="sample", top_k=-3), ValueError),
        (dict(strategy="sample", top_p=1.1), ValueError),
        (dict(strategy="sample", top_p=-0.1), ValueError),
        (dict(strategy="sample", min_p=1.5), ValueError),
        (dict(strategy="sample", min_p=-0.2), ValueError),
        (dict(strategy="beam", num_beams=0), ValueError),
    ],
)
def test_bad_values_raise(params: dict, error: type) -> None:
    with pytest.raises(error):
        GenerationParams(**params)


def test_temperature_zero_builds_no_temperature_processor() -> None:
    """``Temperature(0)`` used to raise; at the boundary ``temperature=0`` means greedy."""
    params = GenerationParams(strategy="sample", temperature=0.0, top_k=3)
    assert not params.sampling
    procs = build_logits_processors(prompt_len=3, temperature=params.temperature,
                                    top_k=params.top_k, sampling=params.sampling)
    assert procs == []


def test_min_tokens_to_keep_is_at_least_one_by_construction() -> None:
    """``min_tokens_to_keep`` is no user parameter: the builder only ever makes 1 or more."""
    for num_beams, eos in [(1, []), (3, []), (3, [2, 5, 7])]:
        procs = build_logits_processors(prompt_len=3, top_k=5, top_p=0.5, min_p=0.1,
                                        eos_token_ids=eos, sampling=True, num_beams=num_beams)
        assert min(p.min_tokens_to_keep for p in procs) >= 1


def test_prompt_length_comes_from_a_checked_prompt() -> None:
    """``MinNewTokens(prompt_len=-1)`` used to raise; the prompt length is a tensor's width,
    and ``generate`` rejects an empty prompt."""
    model = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=10))
    with pytest.raises(ValueError, match="at least one"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))


@pytest.mark.parametrize("top_p", [0, 0.0, -0.5, 1.01])
def test_top_p_range_is_checked_once_with_one_message(top_p: float) -> None:
    """top_p's range is (0, 1] at the boundary; the processor accepts what it is given."""
    with pytest.raises(ValueError) as info:
        GenerationParams(strategy="sample", top_p=top_p)
    assert str(info.value) == f"top_p={float(top_p)!r} is out of range; expected 0 < top_p <= 1"
    assert TopP(top_p)  # no second check, with another range, in the processor


# --- stopping ---------------------------------------------------------------------------------


def test_eos_criterion() -> None:
    tokens = torch.tensor([2, 5, 7, 2, 0])
    one, two = EosCriterion([2], "cpu")(tokens), EosCriterion([2, 7], "cpu")(tokens)
    assert one.dtype == torch.bool and one.shape == (5,)
    assert one.tolist() == [True, False, False, True, False]
    assert two.tolist() == [True, False, True, True, False]
    assert not EosCriterion([], "cpu")(tokens).any()
    assert EosCriterion([2], "cpu")(tokens.view(1, 5)).tolist() == [one.tolist()]  # any shape
    with pytest.raises(ValueError):  # a negative id: rejected at the boundary
        GenerationParams(eos_token_ids=[-2])


_TABLE = {0: "Hel", 1: "lo", 2: " wor", 3: "ld", 4: "\n", 5: "##", 6: "#", 7: "x" * 40,
          8: "", 9: "END", 10: "E", 11: "ND", 12: "Q"}


def _fake_decode(ids: list[int]) -> str:
    return "".join(_TABLE[i] for i in ids)


def test_stop_strings_span_tokens_and_sit_inside_long_tokens() -> None:
    stops = StopStrings(["lo wo", "###", "xxx"], _fake_decode)
    rows = [[0, 1, 2], [0, 1, 3], [5, 6], [12, 7], [5, 12, 6], [8, 8, 1, 8, 8, 2]]
    assert stops.check(rows) == [True, False, True, True, False, True]
    assert stops.check(torch.tensor([[0, 1, 2], [0, 1, 3]])) == [True, False]
    assert stops.check(rows, active_rows=[False, True, True, False, True, True]) == [
        False, False, True, False, False, True]
    assert stops.check(rows[:2], active_rows=torch.tensor([True, False])) == [True, False]
    assert stops.check([[-1, -1, 5, 6]]) == [True]  # padding skipped
    assert StopStrings([], _fake_decode).check(rows) == [False] * len(rows)


@pytest.mark.parametrize("seed", range(6))
def test_stop_strings_stepwise_equals_full_decode(seed: int) -> None:
    """Checked after every step, the tail window finds the stop exactly when a full decode does."""
    rng = random.Random(seed)
    stops = StopStrings(["END\n", "x#", "##Q", "lo wor"], _fake_decode)
    for _ in range(40):
        row: list[int] = []
        for _ in range(60):
            row.append(rng.choice([8, 8, 8, 8, 9, 10, 11, 4, 5, 6, 12, 7, 0, 1, 2, 3]))
            full = _fake_decode(row)
            want = any(s in full for s in stops.stops)
            assert stops.check([row]) == [want], (row, full)
            if want:
                break


def test_stop_strings_with_real_opt_tokenizer() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.ByteLevelBPETokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt")
    )
    decode = tok.decode
    text = "Hello world! 🙂 日本語 stop🙂here ###END### done and more words after"
    ids = tok.encode(text).ids
    for stop in ["🙂here", "日本", "END#", "d! ", "p🙂h", " done and more"]:
        finder = StopStrings([stop], decode)
        first = next(n for n in range(1, len(ids) + 1) if stop in decode(ids[:n]))
        for n in range(1, first + 1):  # stepwise: False until the stop's last token
            assert finder.check([ids[:n]]) == [n == first], (stop, n)
        assert cut_at_stop(decode(ids), finder.stops) == text[: text.index(stop)]
    # Several new tokens at once.
    finder = StopStrings(["日本語"], decode)
    where = next(n for n in range(1, len(ids) + 1) if "日本語" in decode(ids[:n]))
    assert finder.check([ids[: where + 3]], new_tokens=4) == [True]


def test_cut_at_stop() -> None:
    stops = ["\n\n", "###", "Q:"]
    assert cut_at_stop("answer\n\nQ: next", stops) == "answer"
    assert cut_at_stop("a Q: b ### c\n\n", stops) == "a "
    assert cut_at_stop("nothing here", stops) == "nothing here"
    assert cut_at_stop("###", stops) == ""
    assert cut_at_stop("", stops) == ""


@pytest.mark.parametrize("bad, error", [([""], ValueError), (["ok", ""], ValueError),
                                        ([3], TypeError)])
def test_bad_stop_strings_rejected(bad, error: type) -> None:
    """Checked where stop strings come in (StopStrings trusts them); [3] is a TypeError there."""
    with pytest.raises(error):
        GenerationParams(stop=bad)


def test_one_stop_string_is_not_split_into_characters() -> None:
    """``StopStrings("stop")`` used to raise; at the boundary one string is one stop string."""
    assert GenerationParams(stop="stop").stop == ("stop",)


@pytest.mark.parametrize(
    "prompt_len, requested, max_positions, allowed",
    [(0, 10, 2048, 10), (10, 20, 2048, 20), (2040, 20, 2048, 8), (2047, 5, 2048, 1),
     (2048, 5, 2048, 0), (3000, 5, 2048, 0), (7, 0, 2048, 0), (1, 2048, 2048, 2047)],
)
def test_max_new_tokens_allowed(prompt_len: int, requested: int, max_positions: int, allowed: int):
    assert max_new_tokens_allowed(prompt_len, requested, max_positions) == allowed


@pytest.mark.parametrize("args", [(-1, 5, 2048), (5, -1, 2048), (5, 5, 0), (5, 2.0, 2048)])
def test_max_new_tokens_allowed_rejects_bad_values(args) -> None:
    with pytest.raises(ValueError):
        max_new_tokens_allowed(*args)


def test_every_stop_step_combination_small() -> None:
    """Exhaustive over short rows from a tiny table that includes empty and long tokens."""
    stops = StopStrings(["ENDE", "#Q"], _fake_decode)
    for row in itertools.product([8, 9, 10, 11, 6, 12], repeat=4):
        row = list(row)
        prev = any(s in _fake_decode(row[:-1]) for s in stops.stops)
        if prev:
            continue  # a stepwise caller would have stopped already
        want = any(s in _fake_decode(row) for s in stops.stops)
        assert stops.check([row]) == [want]


# --- extreme parameters stay finite ---------------------------------------------------------


@pytest.mark.parametrize("t", [1e-30, 1e-40, 1e-46, 1e-300])
def test_tiny_temperatures_sample_like_greedy(t: float) -> None:
    """Scores divided by a tiny temperature overflow float32; the limit is greedy (ties kept)."""
    scores = _scores(0, 4)
    scores[0, :3] = scores[0].max() + 1  # a three-way tie for the best token
    scores[1] = -scores[1].abs() - 1  # every score negative: all would overflow to -inf
    scores[2, 5:] = float("-inf")  # banned tokens stay banned
    out = Temperature(t)(None, scores.clone())
    assert not torch.isnan(out).any() and not torch.isposinf(out).any()
    assert torch.isfinite(out.amax(-1)).all()
    best = scores.argmax(-1)
    for _ in range(5):
        drawn = sample(out, torch.Generator().manual_seed(_))
        assert torch.equal(drawn[1:], best[1:]) and int(drawn[0]) in (0, 1, 2)


def test_ordinary_temperatures_are_computed_as_the_reference_does() -> None:
    scores = _scores(1, 4)
    assert torch.equal(Temperature(0.01)(None, scores.clone()), scores / 0.01)


@pytest.mark.parametrize("penalty", [1e-50, 1e-40, 1e-300, 1e40, 1e300])
def test_extreme_repetition_penalties_stay_finite(penalty: float) -> None:
    scores = _scores(2, 2)
    scores[0, 7] = 0.0  # 0 / (a penalty that is 0 in float32) must not become NaN
    scores[1, 6] = float("-inf")  # banned stays banned
    ids = torch.tensor([[3, 7, 9, 11], [-1, 6, 4, 5]])
    out = RepetitionPenalty(penalty)(ids, scores.clone())
    assert torch.equal(torch.isfinite(out), torch.isfinite(scores))
    assert out[0, 7] == 0.0 and torch.isneginf(out[1, 6])
    for t in (1e-40, 0.5, 1.0):
        for seed in range(3):  # no "probability tensor contains inf/nan"
            sample(Temperature(t)(None, out), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("params", [dict(temperature=1e-40), dict(repetition_penalty=1e-50),
                                    dict(temperature=1e-40, repetition_penalty=1e-50)])
def test_extreme_sampling_parameters_generate(params: dict) -> None:
    from tests.conftest import reference_pair, tiny_config

    _, model = reference_pair(tiny_config())
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    out = generate(model, ids, None, GenerationParams(max_new_tokens=4, strategy="sample",
                                                      seed=0, **params))
    assert out.sequences.shape == (2, 9) and torch.isfinite(out.sequence_scores).all()
