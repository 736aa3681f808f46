"""Evaluation metrics of the fine-tuning tasks, and ``evaluate`` that computes them for a model.

- ``lm``: ``eval_loss`` (mean next-token cross entropy over the tokens) and
  ``perplexity = exp(eval_loss)``.
- ``classification``: ``eval_loss`` and ``accuracy`` (a fraction in 0..1).
- ``qa``: ``eval_loss``, ``exact_match`` and ``f1`` in percent (0..100), as the official SQuAD
  script reports them: answers normalized (lower case, no punctuation, no articles, single
  spaces), the best over the gold answers, the predicted span decoded from the start/end logits.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from flagopt.errors import UnknownTaskError

TASKS = ("lm", "classification", "qa")
MAX_ANSWER_TOKENS = 30  # run_qa.py's max_answer_length
Collate = Callable[[list[Any]], dict[str, torch.Tensor]]
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


# --- the metrics ------------------------------------------------------------------------------


def perplexity(mean_loss: float) -> float:
    """``exp(mean_loss)``, ``inf`` where that overflows (as ``run_clm.py``)."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def accuracy(predictions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor
             ) -> float:
    """Fraction of ``predictions`` equal to ``labels``.

    Raises:
        ValueError: the two differ in length, or are empty.
    """
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    if predictions.shape != labels.shape or predictions.numel() == 0:
        raise ValueError(f"accuracy needs equal, non-empty predictions and labels; got shapes "
                         f"{tuple(predictions.shape)} and {tuple(labels.shape)}")
    return (predictions == labels).float().mean().item()


def normalize_answer(text: str) -> str:
    """The official SQuAD normalization: lower case, punctuation removed, the articles
    a/an/the removed, whitespace collapsed to single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if ``prediction`` normalizes to one of ``answers``, else 0.0 (no answers: the
    prediction must be empty, as SQuAD v2 scores an unanswerable question)."""
    golds = list(answers) or [""]
    return float(max(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """The best token-overlap F1 (0..1) of ``prediction`` against ``answers`` after
    normalization; an empty side scores 1 only against another empty side."""
    golds = list(answers) or [""]
    return max(_f1(normalize_answer(prediction).split(), normalize_answer(g).split())
               for g in golds)


def _f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:
        return float(predicted == gold)
    same = sum((Counter(predicted) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]
                 ) -> dict[str, float]:
    """``{"exact_match", "f1"}`` in percent, averaged over the questions.

    Raises:
        ValueError: the two differ in length, or are empty.
    """
    if len(predictions) != len(answers) or not predictions:
        raise ValueError(f"squad_scores needs one prediction per question; got "
                         f"{len(predictions)} predictions and {len(answers)} answer lists")
    n = len(predictions)
    return {"exact_match": 100 * sum(map(exact_match, predictions, answers)) / n,
            "f1": 100 * sum(map(f1_score, predictions, answers)) / n}


def best_span(start_logits: torch.Tensor, end_logits: torch.Tensor, first: int, last: int,
              max_answer_tokens: int = MAX_ANSWER_TOKENS) -> tuple[int, int]:
    """The span ``(start, end)`` (inclusive positions) with the highest
    ``start_logits[start] + end_logits[end]`` such that ``first <= start <= end < last`` and
    ``end - start < max_answer_tokens``.

    Args:
        start_logits, end_logits: (T,) one sequence's logits.
        first, last: the context's positions, ``first`` included and ``last`` excluded.

    Raises:
        ValueError: the range is empty or outside the logits, or ``max_answer_tokens < 1``.
    """
    t = start_logits.shape[-1]
    if not 0 <= first < last <= t or max_answer_tokens < 1:
        raise ValueError(f"best_span needs 0 <= first < last <= {t} and max_answer_tokens >= 1; "
                         f"got first={first}, last={last}, "
                         f"max_answer_tokens={max_answer_tokens}")
    start = start_logits[first:last].float()
    end = end_logits[first:last].float()
    scores = start[:, None] + end[None, :]  # (S, E): start s, end e
    n = last - first
    offset = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # e - s
    scores = scores.masked_fill((offset < 0) | (offset >= max_answer_tokens), -math.inf)
    flat = int(scores.argmax())
    return first + flat // n, first + flat % n


def span_text(example: Mapping[str, Any], start: int, end: int) -> str:
    """The context text of sequence positions ``start..end`` (inclusive) of a QA example, by
    its tokens' character offsets."""
    offsets = example["offsets"]
    base = example["context_start"]
    return example["context"][offsets[start - base][0]:offsets[end - base][1]]


# --- evaluating a model -----------------------------------------------------------------------


def evaluate(task: str, model: nn.Module, dataset: Any,
             collate: Collate, batch_size: int,
             max_answer_tokens: int = MAX_ANSWER_TOKENS) -> dict[str, float]:
    """The task's metrics of ``model`` over ``dataset``, in order, without gradients.

    Args:
        task: ``"lm"``, ``"classification"`` or ``"qa"``.
        model: the task's head (or a module wrapping it with the same forward).
        dataset: the task's dataset (``flagopt.train.data``), indexable in order.
        collate: turns a list of examples into the forward's keyword arguments.
        batch_size: examples per forward.
        max_answer_tokens: ``qa`` only: the longest span the decoding considers.

    Returns:
        ``{"eval_loss", "perplexity"}``, ``{"eval_loss", "accuracy"}`` or
        ``{"eval_loss", "exact_match", "f1"}``; the model's train/eval mode is as before.

    Raises:
        UnknownTaskError: ``task`` is not one of ``TASKS``.
        ValueError: ``batch_size`` is not an int >= 1, or ``dataset`` is empty.
    """
    if task not in TASKS:
        raise UnknownTaskError(f"task={task!r}; expected one of {', '.join(TASKS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; expected an int >= 1")
    if len(dataset) == 0:
        raise ValueError("evaluate needs a non-empty dataset")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _EVALUATORS[task](model, dataset, collate, batch_size, device,
                                     max_answer_tokens)
    finally:
        model.train(was_training)


def _batches(dataset: Any, collate: Collate, batch_size: int, device: torch.device
             ) -> Iterator[tuple[list[Any], dict[str, torch.Tensor]]]:
    """``(examples, batch on device)`` for consecutive slices of ``dataset``."""
    for i in range(0, len(dataset), batch_size):
        examples = [dataset[j] for j in range(i, min(i + batch_size, len(dataset)))]
        yield examples, {k: v.to(device) for k, v in collate(examples).items()}


def _evaluate_lm(model: nn.Module, dataset: Any, collate: Collate, batch_size: int,
                 device: torch.device, _: int) -> dict[str, float]:
    total, tokens = 0.0, 0
    for _, batch in _batches(dataset, collate, batch_size, device):
        n = int((batch["labels"][:, 1:] != -100).sum())  # the tokens the loss averages over
        total += model(**batch).loss.item() * n
        tokens += n
    loss = total / tokens
    return {"eval_loss": loss, "perplexity": perplexity(loss)}


def _evaluate_classification(model: nn.Module, dataset: Any, collate: Collate,
                             batch_size: int, device: torch.device, _: int) -> dict[str, float]:
    total, predictions, labels = 0.0, [], []
    for examples, batch in _batches(dataset, collate, batch_size, device):
        out = model(**batch)
        total += out.loss.item() * len(examples)
        predictions.append(out.logits.argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
    return {"eval_loss": total / len(dataset),
            "accuracy": accuracy(torch.cat(predictions), torch.cat(labels))}


def _evaluate_qa(model: nn.Module, dataset: Any, collate: Collate, batch_size: int,
                 device: torch.device, max_answer_tokens: int) -> dict[str, float]:
    total, predicted, answers = 0.0, [], []
    for examples, batch in _batches(dataset, collate, batch_size, device):
        out = model(**batch)
        total += out.loss.item() * len(examples)
        for row, example in enumerate(examples):
            first = example["context_start"]
            span = best_span(out.start_logits[row], out.end_logits[row], first,
                             first + len(example["offsets"]), max_answer_tokens)
            predicted.append(span_text(example, *span))
            answers.append(example["answers"])
    return {"eval_loss": total / len(dataset), **squad_scores(predicted, answers)}


_EVALUATORS = {"lm": _evaluate_lm, "classification": _evaluate_classification,
               "qa": _evaluate_qa}
