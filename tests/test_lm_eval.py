"""flagopt's lm-eval model against lm-eval's own ``hf`` model on the same tiny checkpoint.

The checkpoint is saved in the hub layout (transformers' ``save_pretrained`` plus the real OPT
tokenizer files); the tasks are local YAML files over local JSONL (``dataset_path: json``)
covering the four request types. Skipped when lm-eval (the ``eval`` extra) is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flagopt.errors import ScoringError, UnknownEvalTaskError
from tests.lm_eval_fixtures import write_checkpoint, write_tasks

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("lm_eval.models.huggingface")

from lm_eval.tasks import TaskManager  # noqa: E402

from flagopt import cli  # noqa: E402
from flagopt.eval.harness import FlagOptLM, check_tasks  # noqa: E402

WINDOW = 64
LONG = ("The tower is 324 metres tall, about the same height as an 81-storey building, and "
        "the tallest structure in Paris. Its base is square, measuring 125 metres on each "
        "side. During its construction, the Eiffel Tower surpassed the Washington Monument.")

CHOICE_DOCS = [
    {"q": "The capital of France is", "choices": ["Paris", "London", "Rome"], "label": 0},
    {"q": "Two plus two equals", "choices": ["four", "five"], "label": 0},
    {"q": LONG + " " + LONG + " So the tower is", "choices": ["tall", "short"], "label": 1},
    {"q": "The sky is", "choices": ["blue", "green", "very red today"], "label": 2},
]
CLOZE_DOCS = [{"text": "The cat sat on the mat"}, {"text": "Once upon a time there was"},
              {"text": LONG}]
ROLLING_DOCS = [{"page": "Hello world."}, {"page": LONG + " " + LONG}, {"page": "x"}]
GEN_DOCS = [{"q": "Q: What is the capital of France?\nA:", "a": " Paris"},
            {"q": "Q: Say hello.\nA:", "a": " hello"}]

TASKS = {
    "tiny_choice": dict(output_type="multiple_choice", doc_to_text="{{q}}",
                        doc_to_choice="{{choices}}", doc_to_target="{{label}}",
                        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}]),
    "tiny_cloze": dict(output_type="loglikelihood",
                       doc_to_text="{{text.split(' ')[:-1]|join(' ')}}",
                       doc_to_target="{{' ' + text.split(' ')[-1]}}",
                       metric_list=[{"metric": "perplexity"}, {"metric": "acc"}]),
    "tiny_rolling": dict(output_type="loglikelihood_rolling", doc_to_text="",
                         doc_to_target="{{page}}",
                         metric_list=[{"metric": "word_perplexity"},
                                      {"metric": "byte_perplexity"},
                                      {"metric": "bits_per_byte"}]),
    "tiny_gen": dict(output_type="generate_until", doc_to_text="{{q}}", doc_to_target="{{a}}",
                     generation_kwargs={"until": ["\n"], "max_gen_toks": 8,
                                        "do_sample": False},
                     metric_list=[{"metric": "exact_match"}]),
}
DOCS = {"tiny_choice": CHOICE_DOCS, "tiny_cloze": CLOZE_DOCS, "tiny_rolling": ROLLING_DOCS,
        "tiny_gen": GEN_DOCS}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"), TASKS, DOCS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random OPT in the hub layout, with the real tokenizer files."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny-opt"), WINDOW)


@pytest.fixture(scope="module")
def ours(checkpoint: Path) -> FlagOptLM:
    return FlagOptLM.from_pretrained(str(checkpoint), batch_size=3, device="cpu",
                                     dtype="float32")


def _evaluate(model, task_dir: Path) -> dict:
    torch.set_num_threads(1)
    return lm_eval.simple_evaluate(model=model, tasks=sorted(TASKS),
                                   task_manager=TaskManager(include_path=str(task_dir)),
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                   fewshot_random_seed=0)


@pytest.fixture(scope="module")
def both(ours: FlagOptLM, checkpoint: Path, task_dir: Path) -> tuple[dict, dict]:
    from lm_eval.models.huggingface import HFLM

    theirs = HFLM(pretrained=str(checkpoint), device="cpu", dtype="float32", batch_size=2)
    return _evaluate(ours, task_dir), _evaluate(theirs, task_dir)


def _responses(results: dict, task: str) -> list:
    return [s["filtered_resps"] for s in sorted(results["samples"][task],
                                                key=lambda s: s["doc_id"])]


def test_scores_equal_lm_evals_hf_model(both: tuple[dict, dict]) -> None:
    mine, ref = both
    for task in ("tiny_choice", "tiny_cloze"):
        for got, want in zip(_responses(mine, task), _responses(ref, task), strict=True):
            for (lp, greedy), (ref_lp, ref_greedy) in zip(got, want, strict=True):
                assert float(lp) == pytest.approx(float(ref_lp), abs=1e-4, rel=1e-5)
                assert bool(greedy) == bool(ref_greedy)
    for got, want in zip(_responses(mine, "tiny_rolling"), _responses(ref, "tiny_rolling"),
                         strict=True):
        assert float(got[0]) == pytest.approx(float(want[0]), abs=1e-4, rel=1e-5)
    assert _responses(mine, "tiny_gen") == _responses(ref, "tiny_gen")


def test_metrics_equal_lm_evals_hf_model(both: tuple[dict, dict]) -> None:
    mine, ref = both
    for task in TASKS:
        for metric, value in ref["results"][task].items():
            if metric == "alias" or "stderr" in metric:
                continue
            if isinstance(value, str) or metric.startswith(("acc", "exact_match")):
                assert mine["results"][task][metric] == value, (task, metric)
            else:
                assert mine["results"][task][metric] == pytest.approx(value, rel=1e-4), \
                    (task, metric)


def test_registered_under_flagopt_without_hiding_lm_evals_models() -> None:
    from lm_eval.api.registry import get_model

    from flagopt.eval import harness

    assert get_model("flagopt") is FlagOptLM
    harness.register()  # idempotent
    assert get_model("flagopt") is FlagOptLM
    assert get_model("hf").__name__ == "HFLM"


def test_unknown_task_is_a_clear_error(task_dir: Path) -> None:
    manager = TaskManager(include_path=str(task_dir))
    with pytest.raises(UnknownEvalTaskError, match=r"unknown lm-eval task 'tiny_chioce'.*"
                                                   r"did you mean tiny_choice"):
        check_tasks(["tiny_choice", "tiny_chioce"], manager)


def test_empty_continuation_names_the_task(ours: FlagOptLM) -> None:
    from lm_eval.api.instance import Instance

    request = Instance("loglikelihood", {}, ("The end", ""), 0, metadata=("my_task", 7, 1))
    with pytest.raises(ScoringError, match=r"empty continuation.*'my_task', doc 7"):
        ours.loglikelihood([request])


def test_cli_eval_prints_and_writes_results(checkpoint: Path, task_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.json"
    rc = cli.main(["eval", "--model", str(checkpoint), "--tasks", "tiny_choice,tiny_cloze",
                   "--include-path", str(task_dir), "--limit", "2", "--batch-size", "2",
                   "--device", "cpu", "--output", str(out), "--quiet"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {"tiny_choice", "tiny_cloze"}
    assert "acc,none" in printed["tiny_choice"]
    assert json.loads(out.read_text())["results"] == printed


def test_cli_eval_unknown_task(checkpoint: Path, task_dir: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["eval", "--model", str(checkpoint), "--tasks", "no_such_task",
                   "--include-path", str(task_dir), "--quiet"])
    assert rc == 1
    assert "unknown lm-eval task 'no_such_task'" in capsys.readouterr().err
