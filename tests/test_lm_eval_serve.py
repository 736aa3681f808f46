"""lm-eval's ``local-completions`` model against ``flagopt serve``, on a tiny checkpoint saved
in the hub layout: the scores lm-eval gets over HTTP equal the in-process ``FlagOptLM``'s.

The server runs on a free 127.0.0.1 port; lm-eval loads the tokenizer from the checkpoint's
directory (offline). lm-eval's API models keep one position for a generated token (pairs are
cut to ``max_length - 1`` tokens, rolling windows to ``max_length - 2``), so the documents
compared with the in-process model fit in that; ``tiny_long`` checks a pair lm-eval cuts.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from flagopt.predictor import scoring
from tests.lm_eval_fixtures import write_checkpoint, write_tasks

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("lm_eval.models.openai_completions")
for _needed in ("aiohttp", "tenacity", "requests"):  # lm-eval's api extra
    pytest.importorskip(_needed)

from lm_eval.tasks import TaskManager  # noqa: E402

from flagopt.eval.harness import FlagOptLM  # noqa: E402
from flagopt.serve import create_app  # noqa: E402
from flagopt.serve.scheduler import TokenLogprob  # noqa: E402
from flagopt.serve.server import serve_in_thread  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 128
NAME = "tiny-opt"
LONG = ("The tower is 324 metres tall, about the same height as an 81-storey building, and "
        "the tallest structure in Paris. Its base is square, measuring 125 metres on each "
        "side. During its construction, the Eiffel Tower surpassed the Washington Monument.")

DOCS = {
    "tiny_choice": [
        {"q": "The capital of France is", "choices": ["Paris", "London", "Rome"], "label": 0},
        {"q": "Two plus two equals", "choices": ["four", "five"], "label": 0},
        {"q": LONG + " So the tower is", "choices": ["tall", "short"], "label": 1},
        {"q": "The sky is", "choices": ["blue", "green", "very red today"], "label": 2},
        {"q": "Water boils at", "choices": [" 100 degrees", "zero"], "label": 1},
    ],
    "tiny_cloze": [{"text": "The cat sat on the mat"}, {"text": "Once upon a time there was"},
                   {"text": LONG}, {"text": "naïve café owners in 日本"}],
    "tiny_rolling": [{"page": "Hello world."}, {"page": LONG}, {"page": "x"}],
    "tiny_long": [{"text": LONG + " " + LONG + " " + LONG}],
}
CLOZE = dict(output_type="loglikelihood", doc_to_text="{{text.split(' ')[:-1]|join(' ')}}",
             doc_to_target="{{' ' + text.split(' ')[-1]}}",
             metric_list=[{"metric": "perplexity"}, {"metric": "acc"}])
TASKS = {
    "tiny_choice": dict(output_type="multiple_choice", doc_to_text="{{q}}",
                        doc_to_choice="{{choices}}", doc_to_target="{{label}}",
                        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}]),
    "tiny_cloze": CLOZE,
    "tiny_rolling": dict(output_type="loglikelihood_rolling", doc_to_text="",
                         doc_to_target="{{page}}",
                         metric_list=[{"metric": "word_perplexity"},
                                      {"metric": "byte_perplexity"},
                                      {"metric": "bits_per_byte"}]),
    "tiny_long": CLOZE,
}
COMPARED = ("tiny_choice", "tiny_cloze", "tiny_rolling")


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


@pytest.fixture(scope="module")
def server(ours: FlagOptLM):
    """``flagopt serve``'s app over the same checkpoint, on a free 127.0.0.1 port."""
    predictor = ours.predictor
    url, stop = serve_in_thread(create_app(predictor.model.eval(), predictor.tokenizer,
                                           served_model_name=NAME, max_batch_size=4))
    yield url
    stop()


@pytest.fixture(scope="module")
def offline():
    """lm-eval loads the tokenizer from a local directory; nothing may reach the network."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def model_args(url: str, checkpoint: Path) -> str:
    """What a user passes to lm-eval (README): the served name, the tokenizer, the window,
    ``</s>`` in front as lm-eval's hf model (and flagopt) put it."""
    return (f"base_url={url}/v1/completions,model={NAME},tokenizer_backend=huggingface,"
            f"tokenizer={checkpoint},max_length={WINDOW},add_bos_token=True,batch_size=3,"
            f"max_retries=1")


def _evaluate(model, task_dir: Path, **kwargs) -> dict:
    return lm_eval.simple_evaluate(model=model, tasks=sorted(TASKS),
                                   task_manager=TaskManager(include_path=str(task_dir)),
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                   fewshot_random_seed=0, **kwargs)


@pytest.fixture(scope="module")
def both(ours: FlagOptLM, server: str, checkpoint: Path, task_dir: Path, offline
         ) -> tuple[dict, dict]:
    served = _evaluate("local-completions", task_dir, model_args=model_args(server, checkpoint))
    return served, _evaluate(ours, task_dir)


def _responses(results: dict, task: str) -> list:
    return [s["filtered_resps"] for s in sorted(results["samples"][task],
                                                key=lambda s: s["doc_id"])]


def test_served_scores_equal_in_process(both: tuple[dict, dict]) -> None:
    served, local = both
    for task in ("tiny_choice", "tiny_cloze"):
        got, want = _responses(served, task), _responses(local, task)
        assert len(got) == len(DOCS[task])
        for doc_got, doc_want in zip(got, want, strict=True):
            for (lp, greedy), (ref_lp, ref_greedy) in zip(doc_got, doc_want, strict=True):
                assert float(lp) == pytest.approx(float(ref_lp), abs=1e-4, rel=1e-5)
                assert bool(greedy) == bool(ref_greedy)
    for got, want in zip(_responses(served, "tiny_rolling"), _responses(local, "tiny_rolling"),
                         strict=True):
        assert float(got[0]) == pytest.approx(float(want[0]), abs=1e-4, rel=1e-5)


def test_served_metrics_equal_in_process(both: tuple[dict, dict]) -> None:
    served, local = both
    for task in COMPARED:
        for metric, value in local["results"][task].items():
            if metric == "alias" or "stderr" in metric:
                continue
            if isinstance(value, str) or metric.startswith("acc"):
                assert served["results"][task][metric] == value, (task, metric)
            else:
                assert served["results"][task][metric] == pytest.approx(value, rel=1e-4), \
                    (task, metric)


def test_a_pair_lm_eval_cuts_is_scored_as_cut(both: tuple[dict, dict], ours: FlagOptLM
                                              ) -> None:
    """lm-eval keeps the last ``max_length - 1`` tokens of a long pair; the server scores
    exactly that window."""
    served, _ = both
    text = DOCS["tiny_long"][0]["text"]
    context, word = text.rsplit(" ", 1)
    tok, model = ours.predictor.tokenizer, ours.predictor.model
    ctx, cont = scoring.encode_pair(tok, context, " " + word)
    kept = (ctx + cont)[-(WINDOW - 1):]
    assert len(ctx + cont) > len(kept)
    want = scoring.score_windows(model, [scoring.Window(tuple(kept), len(cont))])[0]
    (lp, greedy), = _responses(served, "tiny_long")[0]
    assert float(lp) == pytest.approx(want.logprob, abs=1e-4, rel=1e-5)
    assert bool(greedy) == want.is_greedy


def test_the_request_lm_eval_sends(server: str, ours: FlagOptLM) -> None:
    """Token-id prompts, echo, logprobs=1, max_tokens=1, temperature=0, seed and model null:
    ``token_logprobs`` null first then the scoring core's values, ``top_logprobs`` dicts that
    hold the token itself, one generated token after the prompt."""
    tok, model = ours.predictor.tokenizer, ours.predictor.model
    prompts = [tok.encode("The cat sat on the mat", add_bos=True),
               tok.encode("Hello", add_bos=True)]
    body = {"model": None, "prompt": prompts, "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 2
    for ids, choice in zip(prompts, choices):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = scoring.score_windows(model, [scoring.Window(tuple(ids), len(ids) - 1)])[0]
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want.logprobs.tolist(),
                                                                 abs=1e-6)
        for t in range(1, len(ids)):
            top = lp["top_logprobs"][t]
            assert tok.decode([ids[t]], skip_special_tokens=False) in top
            assert (lp["token_logprobs"][t] == max(top.values())) == bool(want.greedy[t - 1])


def test_top_logprobs_keep_the_larger_value_on_a_text_collision(ours: FlagOptLM) -> None:
    """Two byte tokens that both decode to U+FFFD: the token (not the argmax) must not hide
    the argmax's larger value, or lm-eval would call it greedy."""
    predictor = ours.predictor
    service = create_app(predictor.model, predictor.tokenizer,
                         served_model_name=NAME).state.service
    same = [i for i in range(300) if service.token_text(i) == "\ufffd"][:2]
    assert len(same) == 2
    entry = TokenLogprob(same[1], -3.0, {same[0]: -0.5})
    top = service.top_json(entry)
    assert top == {"\ufffd": -0.5}
    assert entry.logprob != max(top.values())
