"""Speculative decoding in the server's scheduler: with a draft (a smaller OPT, the model's own
int8 weights, or the model itself: always agreeing), every request gives the tokens it gives
without one, seeded sampling is reproducible and keeps the target's distribution; the HTTP
app and ``flagopt serve`` take ``--draft``."""

from __future__ import annotations

import httpx
import pytest
import torch

from flagopt.model.heads import OPTForCausalLM
from flagopt.predictor import GenerationParams, Predictor
from flagopt.serve import create_app
from flagopt.serve.scheduler import Event, Request, Scheduler
from flagopt.serve.server import serve_in_thread
from flagopt.tokenizer import OPTTokenizer
from tests.conftest import tiny_config
from tests.serve_helpers import POSITIONS, prompts, tiny_lm
from tests.test_cli import _no_loading, _one_error_line
from tests.test_serve_scheduler import _request, _run, _text
from tests.test_speculative import _exact_joint, _model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> OPTTokenizer:
    return OPTTokenizer.default()


@pytest.fixture(scope="module")
def model() -> OPTForCausalLM:
    return tiny_lm()


def _small_opt(seed: int = 3) -> OPTForCausalLM:
    """A one-layer random OPT with the target's vocabulary and position table."""
    torch.manual_seed(seed)
    return OPTForCausalLM(tiny_config(vocab_size=50272, max_position_embeddings=POSITIONS,
                                      num_hidden_layers=1, init_std=0.3)).eval()


def _draft(kind: str, model):
    return {"opt": _small_opt, "int8": lambda: "int8", "self": lambda: model}[kind]()


def _tokens(events: list[Event]) -> list[int]:
    return sum((e.token_ids for e in events), [])


def _mixed_requests(tok) -> list[Request]:
    """Requests of different lengths and budgets, with processors, stop strings and EOS
    (with ``tiny_lm(eos_scale=3.5)``, r0 ends on EOS after 8 tokens, r2 after 17)."""
    kinds = [dict(), dict(repetition_penalty=1.4, stop=(" battled",)), dict(),
             dict(no_repeat_ngram_size=2), dict(eos_token_ids=()),
             dict(presence_penalty=0.5, frequency_penalty=0.3), dict(min_new_tokens=4),
             dict(stop=(" Corpse",)), dict(), dict(eos_token_ids=())]
    budgets = [25, 25, 25, 9, 25, 7, 18, 25, 2, 14]
    return [_request(tok, f"r{i}", text, budget, **kind)
            for i, (text, budget, kind) in enumerate(zip(prompts(10, seed=3), budgets, kinds))]


@pytest.mark.parametrize("kind", ["opt", "int8", "self"])
def test_greedy_with_a_draft_gives_the_tokens_without_one(tok, kind) -> None:
    model = tiny_lm(eos_scale=3.5)
    requests = _mixed_requests(tok)
    plain = _run(Scheduler(model, tok, max_batch_size=4), requests, arrive_every=2)
    scheduler = Scheduler(model, tok, max_batch_size=4, draft=_draft(kind, model))
    spec = _run(scheduler, _mixed_requests(tok), arrive_every=2)
    assert spec.keys() == plain.keys()
    reasons = set()
    for key, events in plain.items():
        assert _tokens(spec[key]) == _tokens(events), key
        assert _text(spec[key]) == _text(events), key
        assert spec[key][-1].finish_reason == events[-1].finish_reason, key
        assert all(e.finish_reason is None for e in spec[key][:-1])
        reasons.add((events[-1].finish_reason, len(_tokens(events)) < 25))
    assert reasons == {("stop", True), ("length", True), ("length", False)}
    assert _text(plain[("r7", 0)]) == " S S S S S S"  # cut before its stop string
    stats = scheduler.speculative
    assert stats.rounds > 0 and stats.proposed > 0 and stats.kept <= stats.accepted
    if kind == "self":  # always agrees: several tokens per step, fewer steps
        assert stats.accepted == stats.proposed
        assert max(len(e.token_ids) for events in spec.values() for e in events) > 3
    assert scheduler.cache.free_rows() == scheduler.draft_cache.free_rows() == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", ["opt", "int8"])
def test_greedy_with_a_draft_equals_predictor(model, tok, kind) -> None:
    texts = prompts(6, seed=8)
    budgets = [3, 17, 9, 1, 12, 6]
    requests = [_request(tok, f"r{i}", t, m) for i, (t, m) in enumerate(zip(texts, budgets))]
    out = _run(Scheduler(model, tok, max_batch_size=3, draft=_draft(kind, model)), requests,
               arrive_every=1)
    predictor = Predictor(model, tok)
    for i, (text, budget) in enumerate(zip(texts, budgets)):
        expected = predictor.predict_generate_greedy(text, out_max_length=budget)
        assert _text(out[(f"r{i}", 0)]) == str(expected), i
        assert len(_tokens(out[(f"r{i}", 0)])) == expected.num_tokens


def test_stop_strings_cut_inside_a_run_of_accepted_tokens(model, tok) -> None:
    """The model as its own draft accepts everything: the stop string falls inside a step's
    tokens, which are cut there as plain decoding cuts them."""
    free = _run(Scheduler(model, tok), [_request(tok, "a", "the cat", 30, eos_token_ids=())])
    full = _text(free[("a", 0)])
    for start in (3, 10, 17):
        stop = full[start:start + 3]
        request = lambda: _request(tok, "a", "the cat", 30, eos_token_ids=(),  # noqa: E731
                                   stop=(stop,))
        plain = _run(Scheduler(model, tok), [request()])[("a", 0)]
        spec = _run(Scheduler(model, tok, draft=model), [request()])[("a", 0)]
        assert _text(spec) == _text(plain) == full[:full.find(stop)]
        assert _tokens(spec) == _tokens(plain)
        assert spec[-1].finish_reason == "stop"


def test_rows_filling_the_position_table_end_as_without_a_draft(model, tok) -> None:
    """Prompt + max_tokens = the position table: proposals never run past it, and padding
    of the shorter rows past it (clamped) changes nothing."""
    ids = tok.encode_prompt("the cat sat on a mat")
    budget = POSITIONS - len(ids)

    def requests():
        return [Request("full", ids, GenerationParams(max_new_tokens=budget, eos_token_ids=()),
                        budget),
                Request("short", ids[:3], GenerationParams(max_new_tokens=20), 20)]

    plain = _run(Scheduler(model, tok, max_batch_size=2), requests())
    spec = _run(Scheduler(model, tok, max_batch_size=2, draft=model), requests())
    for key in plain:
        assert _tokens(spec[key]) == _tokens(plain[key])
    assert len(_tokens(spec[("full", 0)])) == budget


def test_logprobs_and_their_offsets_are_those_without_a_draft(model, tok) -> None:
    def request():
        return _request(tok, "a", "rain fell over", 14, logprobs=2, eos_token_ids=(),
                        stop=("zzz",))  # a stop string: text is held back, offsets lag

    plain = _run(Scheduler(model, tok), [request()])[("a", 0)]
    spec = _run(Scheduler(model, tok, draft=model), [request()])[("a", 0)]
    assert len(spec) < len(plain)  # several tokens per event
    flat = lambda events: [(e.token_id, e.logprob, list(e.top))  # noqa: E731
                           for ev in events for e in ev.logprobs]
    for (t1, p1, top1), (t2, p2, top2) in zip(flat(plain), flat(spec), strict=True):
        assert t1 == t2 and top1 == top2
        torch.testing.assert_close(p2, p1, atol=1e-4, rtol=0)

    def offsets(events):
        out, at = [], 0
        for e in events:
            out += [at + o for o in e.text_offsets]
            at += len(e.text)
        return out

    assert offsets(spec) == offsets(plain)
    assert len(offsets(spec)) == 14


# --- sampling ------------------------------------------------------------------------------


def test_seeded_sampling_with_a_draft_is_reproducible_alone_or_among_others(model, tok) -> None:
    params = dict(temperature=0.9, top_k=40, seed=1234, repetition_penalty=1.2)
    draft = _small_opt()
    alone = _run(Scheduler(model, tok, max_batch_size=4, draft=draft),
                 [_request(tok, "me", "the cat sat", 20, **params)])
    crowd = [_request(tok, f"o{i}", t, 8 + i, temperature=1.0, seed=i)
             for i, t in enumerate(prompts(8, seed=5))]
    crowd.insert(3, _request(tok, "me", "the cat sat", 20, **params))
    among = _run(Scheduler(model, tok, max_batch_size=3, draft=draft), crowd, arrive_every=2)
    assert _tokens(alone[("me", 0)]) == _tokens(among[("me", 0)])
    other = _run(Scheduler(model, tok, max_batch_size=4, draft=draft),
                 [_request(tok, "me", "the cat sat", 20, **{**params, "seed": 99})])
    assert _tokens(other[("me", 0)]) != _tokens(alone[("me", 0)])


def test_speculative_sampling_through_the_scheduler_keeps_the_target_distribution(tok) -> None:
    """Three tokens on a 4-token vocabulary, 1200 seeds run 100 at a time: the first from the
    prompt, then one proposal and the target's token after it. The (t2, t3) frequencies match
    the target's exact joint, not the draft's."""
    vocab, temperature, top_k, n = 4, 0.9, 3, 1200
    config = tiny_config(vocab_size=vocab, init_std=0.1, num_hidden_layers=1)
    target, draft = _model(config, seed=0), _model(config, seed=5)
    prompt = [2, 3, 0]
    want = _exact_joint(target, torch.tensor(prompt), temperature, top_k, vocab).sum(0)
    scheduler = Scheduler(target, tok, max_batch_size=100, max_queue=n, draft=draft)
    requests = [Request(f"s{seed}", prompt, GenerationParams(
        strategy="sample", temperature=temperature, top_k=top_k, max_new_tokens=3,
        eos_token_ids=(), seed=seed), 3) for seed in range(n)]
    out = _run(scheduler, requests)
    counts = torch.zeros(vocab, vocab)
    for seed in range(n):
        tokens = _tokens(out[(f"s{seed}", 0)])
        assert len(tokens) == 3
        counts[tokens[1], tokens[2]] += 1
    stats = scheduler.speculative
    assert 0.2 < stats.rate < 0.9  # both branches of the rule ran often
    tv = 0.5 * (counts / n - want).abs().sum()
    assert tv < 0.08, f"total variation {tv:.3f}"
    draft_joint = _exact_joint(draft, torch.tensor(prompt), temperature, top_k, vocab).sum(0)
    assert 0.5 * (draft_joint - want).abs().sum() > 0.25


def test_draft_errors(model, tok) -> None:
    with pytest.raises(ValueError, match="draft='opt-125m-en'; expected 'int8' or a model"):
        Scheduler(model, tok, draft="opt-125m-en")
    other = OPTForCausalLM(tiny_config(vocab_size=96, max_position_embeddings=POSITIONS))
    with pytest.raises(ValueError, match="vocab_size=96 differs from the target's 50272"):
        Scheduler(model, tok, draft=other)


# --- HTTP and the command -----------------------------------------------------------------


def test_http_completions_with_a_draft_equal_predictor_and_report_acceptance(model,
                                                                             tok) -> None:
    from concurrent.futures import ThreadPoolExecutor

    url, stop = serve_in_thread(create_app(model, tok, served_model_name="tiny",
                                           max_batch_size=4, draft="int8"))
    try:
        texts = prompts(5, seed=11)

        def complete(i: int) -> str:
            body = {"model": "tiny", "prompt": texts[i], "max_tokens": 4 + 3 * i,
                    "temperature": 0}
            reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["text"]

        with ThreadPoolExecutor(5) as pool:
            got = list(pool.map(complete, range(5)))
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        stop()
    predictor = Predictor(model, tok)
    for i, text in enumerate(texts):
        assert got[i] == str(predictor.predict_generate_greedy(text, out_max_length=4 + 3 * i))
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1])
              for line in metrics.splitlines() if line.startswith("flagopt:spec_decode")}
    proposed = values["flagopt:spec_decode_num_draft_tokens_total"]
    assert proposed > 0 and 0 < values["flagopt:spec_decode_num_accepted_tokens_total"] <= proposed


def test_cli_serve_draft_int8_with_quantize_is_refused(monkeypatch, capsys) -> None:
    from flagopt import cli

    _no_loading(monkeypatch)
    assert cli.main(["serve", "some-model", "--draft", "int8", "--quantize", "int8"]) != 0
    assert "drop --quantize" in _one_error_line(capsys.readouterr().err)


def test_cli_serve_loads_a_named_draft_with_the_models_options(monkeypatch, model,
                                                               tok) -> None:
    import flagopt.auto_model
    import flagopt.serve
    from flagopt import cli

    loads, served = [], []

    class Loader:
        def __init__(self, task, name, **options):
            loads.append((task, name, options))
            self.name = name

        def get_model(self):
            return model if self.name == "big" else _small_opt()

        def get_tokenizer(self):
            return tok

    monkeypatch.setattr(flagopt.auto_model, "AutoLoader", Loader)
    monkeypatch.setattr(flagopt.serve, "run", lambda app, *a, **kw: served.append(app))
    assert cli.main(["serve", "big", "--draft", "small", "--dtype", "float32", "--offline",
                     "--quiet"]) == 0
    (big, small) = loads
    assert (big[1], small[1]) == ("big", "small") and big[2] == small[2]
    scheduler = served[0].state.service.scheduler
    assert scheduler.draft is not None and scheduler.draft is not model
