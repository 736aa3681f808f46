"""The scheduler without HTTP: rows join and leave a running batch, and each request's output
is what it would be alone (greedy: ``Predictor``'s)."""

from __future__ import annotations

import pytest
import torch

from flagopt.predictor import GenerationParams, Predictor
from flagopt.serve.scheduler import Event, QueueFullError, Request, Scheduler
from flagopt.tokenizer import OPTTokenizer
from tests.serve_helpers import prompts, tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> OPTTokenizer:
    return OPTTokenizer.default()


@pytest.fixture(scope="module")
def model():
    return tiny_lm()


def _request(tok, rid: str, text: str, max_tokens: int, **params) -> Request:
    logprobs = params.pop("logprobs", None)
    echo = params.pop("prompt_logprobs", False)
    gen = GenerationParams(strategy="sample", max_new_tokens=max(max_tokens, 1),
                           **{"temperature": 0.0, **params})
    return Request(rid, tok.encode_prompt(text), gen, max_tokens, logprobs, echo)


def _run(scheduler: Scheduler, requests: list[Request], arrive_every: int = 0,
         max_steps: int = 2000) -> dict[tuple[str, int], list[Event]]:
    """Feed the requests (all at once, or one per ``arrive_every`` steps) and step to the end."""
    out: dict[tuple[str, int], list[Event]] = {}
    pending = list(requests)
    for step in range(max_steps):
        if pending and (arrive_every == 0 or step % arrive_every == 0):
            batch = pending if arrive_every == 0 else pending[:1]
            for r in batch:
                scheduler.add(r)
            pending = pending[len(batch):]
        for e in scheduler.step():
            out.setdefault((e.request_id, e.index), []).append(e)
        if not pending and not scheduler.has_work:
            return out
    raise AssertionError("the scheduler did not finish")


def _text(events: list[Event]) -> str:
    return "".join(e.text for e in events)


@pytest.mark.parametrize("arrive_every", [0, 3])
def test_32_mixed_greedy_requests_equal_predictors(model, tok, arrive_every) -> None:
    texts = prompts(32)
    budgets = [3 + (7 * i) % 17 for i in range(32)]
    scheduler = Scheduler(model, tok, max_batch_size=8, max_queue=64)
    requests = [_request(tok, f"r{i}", t, m) for i, (t, m) in enumerate(zip(texts, budgets))]
    out = _run(scheduler, requests, arrive_every)
    predictor = Predictor(model, tok)
    reasons = set()
    for i, (text, budget) in enumerate(zip(texts, budgets)):
        events = out[(f"r{i}", 0)]
        expected = predictor.predict_generate_greedy(text, out_max_length=budget)
        assert _text(events) == str(expected), i
        assert sum(len(e.token_ids) for e in events) == expected.num_tokens
        reasons.add(events[-1].finish_reason)
        assert all(e.finish_reason is None for e in events[:-1])
    assert reasons == {"stop", "length"}  # some ended on EOS, some ran out of tokens
    assert scheduler.cache.free_rows() == list(range(8))


def test_seeded_sample_is_the_same_alone_or_among_others(model, tok) -> None:
    params = dict(temperature=0.9, top_p=0.95, top_k=50, seed=1234, frequency_penalty=0.5)
    alone = _run(Scheduler(model, tok, max_batch_size=4),
                 [_request(tok, "me", "the cat sat", 20, **params)])
    crowd = [_request(tok, f"o{i}", t, 10 + i, temperature=1.0, seed=i)
             for i, t in enumerate(prompts(30, seed=5))]
    crowd.insert(17, _request(tok, "me", "the cat sat", 20, **params))
    among = _run(Scheduler(model, tok, max_batch_size=6, max_queue=64), crowd, arrive_every=2)
    assert [e.token_ids for e in alone[("me", 0)]] == [e.token_ids for e in among[("me", 0)]]
    # and the same tokens as Predictor's sampling with that seed
    pred = Predictor(model, tok).generate("the cat sat", strategy="sample", max_new_tokens=20,
                                          **params)
    assert sum((e.token_ids for e in alone[("me", 0)]), []) == pred.result.new_tokens[0]


def test_n_choices_differ_and_choice_0_is_the_n1_answer(model, tok) -> None:
    out = _run(Scheduler(model, tok, max_batch_size=4),
               [_request(tok, "n3", "old town", 12, temperature=1.0, seed=7,
                         num_return_sequences=3),
                _request(tok, "n1", "old town", 12, temperature=1.0, seed=7)])
    choices = [sum((e.token_ids for e in out[("n3", k)]), []) for k in range(3)]
    assert len({tuple(c) for c in choices}) == 3
    assert choices[0] == sum((e.token_ids for e in out[("n1", 0)]), [])


def test_a_request_waits_until_n_rows_are_free(model, tok) -> None:
    scheduler = Scheduler(model, tok, max_batch_size=2)
    scheduler.add(_request(tok, "a", "rain", 5))
    scheduler.add(_request(tok, "b", "rain", 5, num_return_sequences=2, temperature=1.0))
    scheduler.step()
    assert (scheduler.num_running, scheduler.num_waiting) == (1, 1)
    out = _run(scheduler, [])
    assert {k for k in out} >= {("b", 0), ("b", 1)}
    with pytest.raises(ValueError, match="n=3 is more than max_batch_size=2"):
        scheduler.add(_request(tok, "c", "x", 2, num_return_sequences=3, temperature=1.0))


def test_stop_strings_end_the_row_and_are_cut(model, tok) -> None:
    base = _run(Scheduler(model, tok), [_request(tok, "a", "the cat", 30, eos_token_ids=())])
    full = _text(base[("a", 0)])
    stop = full[10:13]
    assert stop and full.find(stop) >= 0
    out = _run(Scheduler(model, tok),
               [_request(tok, "a", "the cat", 30, eos_token_ids=(), stop=(stop,))])
    assert _text(out[("a", 0)]) == full[:full.find(stop)]
    assert out[("a", 0)][-1].finish_reason == "stop"


def test_abort_frees_the_rows_at_once(model, tok) -> None:
    scheduler = Scheduler(model, tok, max_batch_size=2)
    scheduler.add(_request(tok, "long", "the cat", 40, eos_token_ids=()))
    scheduler.add(_request(tok, "wait", "the cat", 40))
    scheduler.add(_request(tok, "wait2", "the cat", 40))
    scheduler.step()
    assert scheduler.cache.free_rows() == [] and scheduler.num_waiting == 1
    assert scheduler.abort("long") and scheduler.abort("wait2")
    assert scheduler.cache.free_rows() == [0] and scheduler.num_waiting == 0
    assert not scheduler.abort("nobody")


def test_queue_limit_and_length_limit(model, tok) -> None:
    scheduler = Scheduler(model, tok, max_batch_size=1, max_queue=2, max_model_len=20)
    for i in range(2):
        scheduler.add(_request(tok, f"q{i}", "rain", 3))
    with pytest.raises(QueueFullError, match="max_queue=2"):
        scheduler.add(_request(tok, "q3", "rain", 3))
    with pytest.raises(ValueError, match="exceed max_model_len=20"):
        Scheduler(model, tok, max_model_len=20).add(_request(tok, "big", "rain", 19))
    with pytest.raises(ValueError, match="max_model_len=999"):
        Scheduler(model, tok, max_model_len=999)


def test_logprobs_are_the_models_own(model, tok) -> None:
    text = "the cat sat on"
    out = _run(Scheduler(model, tok),
               [_request(tok, "a", text, 4, logprobs=3, prompt_logprobs=True)])
    events = out[("a", 0)]
    ids = tok.encode_prompt(text) + sum((e.token_ids for e in events), [])
    with torch.inference_mode():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    scored = events[0].prompt_logprobs
    assert scored[0].logprob is None and [s.token_id for s in scored] == ids[:len(scored)]
    generated = sum((e.logprobs for e in events), [])
    for t, entry in enumerate(scored[1:] + generated, start=1):
        assert entry.token_id == ids[t]
        torch.testing.assert_close(entry.logprob, float(logp[t - 1, ids[t]]), atol=1e-4, rtol=0)
        assert len(entry.top) == 3
        best = max(entry.top.values())
        torch.testing.assert_close(best, float(logp[t - 1].max()), atol=1e-4, rtol=0)


def test_max_tokens_0_scores_the_prompt_only(model, tok) -> None:
    scheduler = Scheduler(model, tok)
    out = _run(scheduler, [_request(tok, "s", "rain fell", 0, logprobs=0,
                                    prompt_logprobs=True)])
    (event,) = out[("s", 0)]
    assert event.finish_reason == "length" and event.token_ids == []
    assert len(event.prompt_logprobs) == len(tok.encode_prompt("rain fell"))
    assert scheduler.cache.free_rows() == list(range(16))


def test_prompt_logprobs_come_from_the_scoring_core(model, tok, monkeypatch) -> None:
    """echo + logprobs is scored by ``scoring.score_windows`` (the function Predictor and the
    lm-eval model use), one window over the prompt, with the top alternatives asked for."""
    from flagopt.predictor import scoring
    from flagopt.serve import scheduler as module

    calls = []

    def spy(model_, windows, *args, **kwargs):
        calls.append((list(windows), kwargs.get("top")))
        return scoring.score_windows(model_, windows, *args, **kwargs)

    monkeypatch.setattr(module, "score_windows", spy)
    ids = tok.encode_prompt("the cat sat on")
    out = _run(Scheduler(model, tok), [_request(tok, "a", "the cat sat on", 2, logprobs=2,
                                                prompt_logprobs=True)])
    assert calls == [([scoring.Window(tuple(ids), len(ids) - 1)], 2)]
    want = scoring.score_windows(model, [scoring.Window(tuple(ids), len(ids) - 1)], top=2)[0]
    scored = out[("a", 0)][0].prompt_logprobs
    assert [e.logprob for e in scored[1:]] == want.logprobs.tolist()
    assert [list(e.top) for e in scored[1:]] == want.top_ids.tolist()


def test_a_failing_prefill_fails_its_request_only(model, tok, monkeypatch) -> None:
    scheduler = Scheduler(model, tok, max_batch_size=4)
    scheduler.add(_request(tok, "ok", "the cat", 5))
    scheduler.step()
    real = scheduler._prefill

    def broken(request, rows):
        if request.request_id == "bad":
            raise RuntimeError("boom")
        return real(request, rows)

    monkeypatch.setattr(scheduler, "_prefill", broken)
    scheduler.add(_request(tok, "bad", "rain", 5))
    events = scheduler.step()
    bad = [e for e in events if e.request_id == "bad"]
    assert bad[0].finish_reason == "error" and "boom" in bad[0].error
    out = _run(scheduler, [])
    assert ("bad", 0) not in out
