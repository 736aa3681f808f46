"""Evaluation metrics against hand-made cases, best-span decoding, and ``evaluate`` over each
task's dataset (real tiny heads, and planted outputs whose scores are known)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from flagopt.errors import UnknownTaskError
from flagopt.model.heads import (TASK_CLASSES, QuestionAnsweringOutput,
                                 SequenceClassifierOutput)
from flagopt.tokenizer import OPTTokenizer
from flagopt.train.data import load_task_data
from flagopt.train.metrics import (accuracy, best_span, evaluate, exact_match, f1_score,
                                   normalize_answer, perplexity, span_text, squad_scores)
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def tok() -> OPTTokenizer:
    return OPTTokenizer.default()


def jsonl(path: Path, *records: object) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


# --- the metrics ------------------------------------------------------------------------------


def test_perplexity_is_exp_and_overflow_safe() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(2.0) == pytest.approx(math.e ** 2)
    assert perplexity(1e4) == math.inf


def test_accuracy() -> None:
    assert accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == 0.5
    assert accuracy(torch.tensor([3]), torch.tensor([3])) == 1.0
    with pytest.raises(ValueError, match="shapes"):
        accuracy([1, 2], [1])


def test_normalize_answer_is_squads() -> None:
    assert normalize_answer("The  Denver\tBroncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear & the plum.") == "apple pear plum"
    assert normalize_answer("Theory") == "theory"  # articles only as whole words
    assert normalize_answer("Zürich's café") == "zürichs café"


def test_exact_match_takes_the_best_gold() -> None:
    golds = ["Denver Broncos", "The Denver Broncos"]
    assert exact_match("the denver broncos.", golds) == 1.0
    assert exact_match("Broncos", golds) == 0.0
    assert exact_match("", []) == 1.0 and exact_match("x", []) == 0.0  # unanswerable


def test_f1_by_hand() -> None:
    # pred {broncos}, gold {denver, broncos}: precision 1, recall 1/2, F1 2/3
    assert f1_score("the Broncos", ["Denver Broncos"]) == pytest.approx(2 / 3)
    # pred {santa, clara, california}, gold {santa, clara}: P 2/3, R 1, F1 0.8
    assert f1_score("Santa Clara, California", ["Santa Clara"]) == pytest.approx(0.8)
    assert f1_score("Santa Clara, California", ["Levi's Stadium", "Santa Clara"]) == \
        pytest.approx(0.8)  # max over golds
    assert f1_score("Levi's Stadium", ["Santa Clara"]) == 0.0
    # repeated tokens count by multiplicity: pred {a1, a1}, gold {a1}: P 1/2, R 1
    assert f1_score("x x", ["x"]) == pytest.approx(2 / 3)
    assert f1_score("the", ["a"]) == 1.0  # both normalize to nothing


def test_squad_scores_in_percent() -> None:
    scores = squad_scores(["Denver Broncos", "the Broncos"],
                          [["Denver Broncos"], ["Denver Broncos"]])
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="2 predictions and 1 answer lists"):
        squad_scores(["a", "b"], [["a"]])


def test_best_span_end_not_before_start() -> None:
    start = torch.tensor([0.0, 0.0, 0.0, 9.0, 0.0])
    end = torch.tensor([0.0, 8.0, 0.0, 0.0, 1.0])
    # the best pair (3, 1) ends before it starts; the best valid one is (3, 4)
    assert best_span(start, end, 0, 5) == (3, 4)


def test_best_span_within_the_context_and_max_length() -> None:
    start = torch.tensor([9.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    end = torch.tensor([9.0, 0.0, 0.0, 0.0, 0.0, 5.0])
    assert best_span(start, end, 0, 6) == (0, 0)
    assert best_span(start, end, 1, 6) == (1, 5)  # position 0 is not context
    assert best_span(start, end, 1, 5) == (1, 1)  # position 5 is not either
    # (1, 5) is 5 tokens long: the best of at most 3 ends at 5 and starts at 3 (the first tie)
    assert best_span(start, end, 1, 6, max_answer_tokens=3) == (3, 5)
    with pytest.raises(ValueError, match="first=4, last=2"):
        best_span(start, end, 4, 2)


def test_span_text_uses_character_offsets(tmp_path: Path, tok: OPTTokenizer) -> None:
    context = "会议在東京举行 🎉 然后结束。"
    path = jsonl(tmp_path / "q.jsonl", {"context": context, "question": "哪里?", "answers": {
        "text": ["東京"], "answer_start": [context.index("東京")]}})
    ex = load_task_data("qa", path, tok)[0]
    assert span_text(ex, ex["start_positions"], ex["end_positions"]) == "東京"


# --- evaluate ---------------------------------------------------------------------------------


def test_evaluate_lm_is_the_token_mean_loss(tmp_path: Path, tok: OPTTokenizer,
                                            one_thread) -> None:
    path = tmp_path / "c.txt"
    path.write_text("some words for the model to read " * 12, encoding="utf-8")
    ds = load_task_data("lm", path, tok, block_size=16, max_positions=64)
    torch.manual_seed(0)
    model = TASK_CLASSES["lm"](tiny_config(vocab_size=50272)).train()
    metrics = evaluate("lm", model, ds, ds.collate, batch_size=3)
    assert model.training  # restored
    with torch.no_grad():
        model.eval()
        expected = model(**ds.collate([ds[i] for i in range(len(ds))])).loss.item()
    assert set(metrics) == {"eval_loss", "perplexity"}
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_evaluate_real_classification_and_qa_heads(tmp_path: Path, tok: OPTTokenizer,
                                                   one_thread) -> None:
    cls = load_task_data("classification", jsonl(
        tmp_path / "t.jsonl", *({"text": f"text {i}", "label": i % 2} for i in range(5))), tok)
    qa = load_task_data("qa", jsonl(tmp_path / "q.jsonl", *(
        {"context": f"Answer number {i} is here.", "question": "Which?",
         "answers": {"text": [str(i)], "answer_start": [14]}} for i in range(3))), tok)
    torch.manual_seed(0)
    for task, ds, keys in (("classification", cls, {"eval_loss", "accuracy"}),
                           ("qa", qa, {"eval_loss", "exact_match", "f1"})):
        model = TASK_CLASSES[task](tiny_config(vocab_size=50272)).eval()
        metrics = evaluate(task, model, ds, ds.collate, batch_size=2)
        assert set(metrics) == keys and all(math.isfinite(v) for v in metrics.values())
        assert not model.training


class Planted(nn.Module):
    """A stand-in head whose outputs are known: logits one-hot at the batch's targets, QA
    spans moved by ``shifts[row] = (start shift, end shift)`` tokens."""

    def __init__(self, shifts: dict[int, tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.shifts = shifts or {}
        self.calls: list[bool] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None):
        self.calls.append(torch.is_grad_enabled())
        loss = self.weight.sum() + 1.0
        rows = torch.arange(input_ids.shape[0])
        if labels is not None:
            logits = torch.zeros(len(labels), 3)
            logits[rows, labels] = 1.0
            return SequenceClassifierOutput(logits, loss)
        shift = torch.tensor([self.shifts.get(int(r), (0, 0)) for r in rows])
        start = torch.zeros(input_ids.shape, dtype=torch.float)
        end = torch.zeros(input_ids.shape, dtype=torch.float)
        start[rows, start_positions + shift[:, 0]] = 5.0
        end[rows, end_positions + shift[:, 1]] = 5.0
        return QuestionAnsweringOutput(start, end, loss)


def test_evaluate_classification_accuracy(tmp_path: Path, tok: OPTTokenizer) -> None:
    ds = load_task_data("classification", jsonl(
        tmp_path / "t.jsonl", *({"text": f"t {i}", "label": "abc"[i % 3]} for i in range(7))),
        tok)
    model = Planted()
    metrics = evaluate("classification", model, ds, ds.collate, batch_size=3)
    assert metrics == {"eval_loss": 1.0, "accuracy": 1.0}
    assert model.calls == [False, False, False]  # no gradients, 3 batches


def test_evaluate_qa_decodes_planted_spans(tmp_path: Path, tok: OPTTokenizer) -> None:
    records = [{"id": "1", "context": "The Denver Broncos won in Santa Clara.",
                "question": "Who?", "answers": {"text": ["Denver Broncos"],
                                                "answer_start": [4]}},
               {"id": "2", "context": "Le café de Zürich est près de la gare.",
                "question": "Où?", "answers": {"text": ["Zürich", "de Zürich"],
                                               "answer_start": [11, 8]}}]
    ds = load_task_data("qa", jsonl(tmp_path / "q.jsonl", *records), tok)
    assert evaluate("qa", Planted(), ds, ds.collate, batch_size=2) == \
        {"eval_loss": 1.0, "exact_match": 100.0, "f1": 100.0}
    # one token earlier: "The Denver Broncos" normalizes to the gold, "de Zürich" is a gold
    assert evaluate("qa", Planted({0: (-1, 0), 1: (-1, 0)}), ds, ds.collate, batch_size=2)[
        "exact_match"] == 100.0
    # "Denver Broncos won": not exact; F1 0.8 (P 2/3, R 1); the other row exact
    scores = evaluate("qa", Planted({0: (0, 1)}), ds, ds.collate, batch_size=2)
    assert scores["exact_match"] == 50.0
    assert scores["f1"] == pytest.approx(100 * (0.8 + 1) / 2)


def test_evaluate_refuses_bad_arguments(tmp_path: Path, tok: OPTTokenizer) -> None:
    ds = load_task_data("classification", jsonl(tmp_path / "t.jsonl",
                                                {"text": "a", "label": 0}), tok)
    with pytest.raises(UnknownTaskError, match="task='ner'"):
        evaluate("ner", Planted(), ds, ds.collate, 2)
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluate("classification", Planted(), ds, ds.collate, 0)
