"""OpenAI's presence and frequency penalties, against their definition (OpenAI's API docs):
``mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty``, c[j] counting token j
in the generated text so far (not the prompt)."""

from __future__ import annotations

import pytest
import torch

from flagopt.predictor import GenerationParams, Predictor
from flagopt.predictor.processors import FrequencyPenalty, PresencePenalty, \
    build_logits_processors
from flagopt.tokenizer import OPTTokenizer
from tests.conftest import tiny_config

PROMPT_LEN = 3
IDS = torch.tensor([[-1, 5, 7, 5, 5, 9, 7],  # left padding -1; prompt is the first 3 columns
                    [4, 4, 4, 6, 3, 6, 6]])


def _by_definition(ids: torch.Tensor, scores: torch.Tensor, presence: float,
                   frequency: float) -> torch.Tensor:
    out = scores.clone()
    for b, row in enumerate(ids[:, PROMPT_LEN:].tolist()):
        for j in set(row):
            if j < 0:
                continue
            c = row.count(j)
            out[b, j] -= c * frequency + (c > 0) * presence
    return out


@pytest.mark.parametrize("presence,frequency", [(0.5, 0.0), (0.0, 0.7), (1.5, -0.3),
                                                (-2.0, 2.0)])
def test_penalties_follow_openais_definition(presence, frequency) -> None:
    scores = torch.randn(2, 12, generator=torch.Generator().manual_seed(0))
    processors = build_logits_processors(prompt_len=PROMPT_LEN, presence_penalty=presence,
                                         frequency_penalty=frequency, sampling=False)
    got = scores
    for p in processors:
        got = p(IDS, got)
    torch.testing.assert_close(got, _by_definition(IDS, scores, presence, frequency))
    # prompt tokens that never recur are untouched: row 1's token 4
    assert got[1, 4] == scores[1, 4]


def test_penalties_are_neutral_at_zero_and_built_only_when_set() -> None:
    assert build_logits_processors(prompt_len=1, sampling=False) == []
    kinds = [type(p) for p in build_logits_processors(
        prompt_len=1, presence_penalty=0.1, frequency_penalty=0.2, repetition_penalty=1.1,
        sampling=False)]
    assert kinds[1:] == [PresencePenalty, FrequencyPenalty]
    scores = torch.randn(2, 12)
    assert torch.equal(PresencePenalty(PROMPT_LEN, 0.0)(IDS, scores), scores)
    assert torch.equal(FrequencyPenalty(PROMPT_LEN, 0.0)(IDS, scores), scores)


def test_ids_outside_the_scores_are_ignored() -> None:
    scores = torch.zeros(1, 4)
    got = FrequencyPenalty(0, 1.0)(torch.tensor([[1, 9, 1]]), scores)
    assert got.tolist() == [[0.0, -2.0, 0.0, 0.0]]


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_params_check_the_range(name) -> None:
    assert getattr(GenerationParams(**{name: 2}), name) == 2.0
    with pytest.raises(ValueError, match=rf"{name}=2.5 is out of range; expected -2 <= {name}"):
        GenerationParams(**{name: 2.5})
    with pytest.raises(TypeError, match=name):
        GenerationParams(**{name: "1"})


def test_predictor_takes_the_penalties_as_extras() -> None:
    from flagopt.model.heads import OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(tiny_config(vocab_size=50272)).eval()
    predictor = Predictor(model, OPTTokenizer.default())
    plain = predictor.predict_generate_greedy("Hello there", out_max_length=12)
    assert len(set(predictor.tokenizer.encode(plain))) < 12  # the tiny model repeats itself
    penalised = predictor.predict_generate_greedy("Hello there", out_max_length=12,
                                                  frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised != plain
    with pytest.raises(ValueError, match="presence_penalty=-3.0"):
        predictor.predict_generate_greedy("Hi", presence_penalty=-3)
