"""The server through the official ``openai`` client (and raw HTTP where the client cannot
say it), against a tiny random OPT on a free 127.0.0.1 port."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from flagopt.predictor import Predictor
from flagopt.serve import create_app
from flagopt.serve.server import serve_in_thread
from flagopt.tokenizer import OPTTokenizer
from tests.serve_helpers import POSITIONS, prompts, tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "tiny-opt"


@pytest.fixture(scope="module")
def tok() -> OPTTokenizer:
    return OPTTokenizer.default()


@pytest.fixture(scope="module")
def model():
    return tiny_lm()


def _serve(model, tok, **options):
    return serve_in_thread(create_app(model, tok, served_model_name=NAME, **options))


@pytest.fixture(scope="module")
def server(model, tok):
    url, stop = _serve(model, tok, max_batch_size=8)
    yield url
    stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _wait_for(check, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


# --- completions ------------------------------------------------------------------------------


def test_greedy_completion_equals_predictor(client, model, tok) -> None:
    r = client.completions.create(model=NAME, prompt="the cat sat", max_tokens=12,
                                  temperature=0, user="someone")
    expected = Predictor(model, tok).predict_generate_greedy("the cat sat", out_max_length=12)
    (choice,) = r.choices
    assert choice.text == str(expected) and choice.index == 0
    assert choice.finish_reason == ("stop" if expected.finish_reason == "eos" else "length")
    assert r.object == "text_completion" and r.model == NAME
    assert r.usage.prompt_tokens == len(tok.encode_prompt("the cat sat"))
    assert r.usage.completion_tokens == expected.num_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_tokens_default_and_clamp(client, tok) -> None:
    r = client.completions.create(model=NAME, prompt="rain", temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16  # --max-tokens-default
    long = " ".join(["rain"] * (POSITIONS - 6))
    n = len(tok.encode_prompt(long))
    r = client.completions.create(model=NAME, prompt=long, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == POSITIONS - n  # what the position table leaves


def test_token_id_prompts_equal_string_prompts(client, tok) -> None:
    texts = ["the cat sat", "old town hills"]
    ids = [tok.encode_prompt(t) for t in texts]
    by_text = client.completions.create(model=NAME, prompt=texts, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0)
    one = client.completions.create(model=NAME, prompt=ids[1], max_tokens=8, temperature=0)
    assert [c.text for c in by_text.choices] == [c.text for c in by_ids.choices]
    assert [c.index for c in by_ids.choices] == [0, 1]
    assert one.choices[0].text == by_text.choices[1].text


def test_n_with_a_seed_is_reproducible(client) -> None:
    kw = dict(model=NAME, prompt=["the cat", "rain"], max_tokens=10, n=3, seed=11,
              temperature=1.0, top_p=0.9)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    texts = [c.text for c in first.choices]
    assert len(texts) == 6 and [c.index for c in first.choices] == list(range(6))
    assert texts == [c.text for c in again.choices]
    assert len(set(texts[:3])) > 1
    other = client.completions.create(**{**kw, "seed": 12})
    assert [c.text for c in other.choices] != texts


def test_stop_strings_and_stop_token_ids(client, tok) -> None:
    base = client.completions.create(model=NAME, prompt="the cat", max_tokens=30,
                                     temperature=0, extra_body={"ignore_eos": True})
    full = base.choices[0].text
    stop = full[8:11]
    r = client.completions.create(model=NAME, prompt="the cat", max_tokens=30, temperature=0,
                                  stop=[stop, "never-there"], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    ids = tok.encode(full)
    r = client.completions.create(model=NAME, prompt="the cat", max_tokens=30, temperature=0,
                                  extra_body={"ignore_eos": True, "stop_token_ids": [ids[3]]})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == tok.decode(ids[:ids.index(ids[3])])


def test_vllm_extras_and_penalties_change_the_output(client) -> None:
    kw = dict(model=NAME, prompt="the cat sat", max_tokens=16, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw, frequency_penalty=2.0).choices[0].text != plain
    assert client.completions.create(**kw, presence_penalty=2.0).choices[0].text != plain
    assert client.completions.create(**kw, extra_body={"repetition_penalty": 1.8}) \
        .choices[0].text != plain
    sampled = dict(kw, temperature=1.0, seed=3)
    assert client.completions.create(**sampled, extra_body={"top_k": 1}).choices[0].text \
        == plain  # top_k=1 is greedy
    assert client.completions.create(**sampled, extra_body={"min_p": 1.0}).choices[0].text \
        == plain
    short = client.completions.create(**dict(kw, max_tokens=40))
    forced = client.completions.create(**dict(kw, max_tokens=40),
                                       extra_body={"min_tokens": 40})
    if short.choices[0].finish_reason == "stop":
        assert short.usage.completion_tokens < 40
    assert forced.usage.completion_tokens == 40


def test_streaming_pieces_join_to_the_text(client) -> None:
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=5, n=2)):
        whole = client.completions.create(model=NAME, prompt="naïve café 日本", max_tokens=20,
                                          **kw)
        pieces: dict[int, list[str]] = {}
        reasons, usage = {}, None
        for chunk in client.completions.create(model=NAME, prompt="naïve café 日本",
                                               max_tokens=20, stream=True,
                                               stream_options={"include_usage": True}, **kw):
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                assert "\ufffd" not in c.text
                pieces.setdefault(c.index, []).append(c.text)
                if c.finish_reason:
                    reasons[c.index] = c.finish_reason
        assert ["".join(pieces[c.index]) for c in whole.choices] == \
            [c.text for c in whole.choices]
        assert reasons == {c.index: c.finish_reason for c in whole.choices}
        assert usage == whole.usage


def test_echo_with_logprobs_are_the_models_own(client, model, tok) -> None:
    text = "the cat sat on"
    r = client.completions.create(model=NAME, prompt=text, max_tokens=5, temperature=0,
                                  echo=True, logprobs=3)
    choice = r.choices[0]
    assert choice.text.startswith(text)
    lp = choice.logprobs
    ids = tok.encode_prompt(text)
    completion = Predictor(model, tok).generate(text, max_new_tokens=5).result.new_tokens[0]
    n = len(ids) + r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert r.usage.completion_tokens == len(completion)
    full = torch.tensor([ids + completion])
    with torch.inference_mode():
        logp = model(full).logits[0].float().log_softmax(-1)
    for t in range(1, n):
        assert lp.token_logprobs[t] == pytest.approx(float(logp[t - 1, full[0, t]]), abs=1e-4)
        assert len(lp.top_logprobs[t]) >= 3
        assert max(lp.top_logprobs[t].values()) == pytest.approx(float(logp[t - 1].max()),
                                                                 abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[len(ids)] == len(text)  # the first completion token
    scored = client.completions.create(model=NAME, prompt=text, max_tokens=0, echo=True,
                                       logprobs=0)
    assert scored.choices[0].text == text and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs == lp.token_logprobs[:len(ids)]


def test_32_concurrent_greedy_requests_equal_predictor(client, model, tok) -> None:
    texts = prompts(32, seed=3)
    budgets = [4 + (5 * i) % 20 for i in range(32)]

    def ask(i: int) -> str:
        return client.completions.create(model=NAME, prompt=texts[i], max_tokens=budgets[i],
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, range(32)))
    predictor = Predictor(model, tok)
    expected = [str(predictor.predict_generate_greedy(t, out_max_length=m))
                for t, m in zip(texts, budgets)]
    assert got == expected


# --- the other endpoints --------------------------------------------------------------------


def test_models_health_metrics_tokenize(server, client, tok) -> None:
    (m,) = client.models.list().data
    assert (m.id, m.object, m.owned_by) == (NAME, "model", "flagopt")
    assert m.model_extra["max_model_len"] == POSITIONS
    assert httpx.get(f"{server}/health").status_code == 200
    r = httpx.post(f"{server}/tokenize", json={"model": NAME, "prompt": "Hello world"})
    assert r.json() == {"count": 3, "max_model_len": POSITIONS, "tokens": [2, 31414, 232]}
    r = httpx.post(f"{server}/detokenize", json={"tokens": [2, 31414, 232]})
    assert r.json() == {"prompt": "Hello world"}
    before = _metric(server, "flagopt:generation_tokens_total")
    client.completions.create(model=NAME, prompt="x", max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    text = httpx.get(f"{server}/metrics").text
    assert _metric(server, "flagopt:generation_tokens_total") == before + 3
    for name in ("flagopt:num_requests_running", "flagopt:num_requests_waiting",
                 "flagopt:prompt_tokens_total", "flagopt:time_to_first_token_seconds_bucket",
                 "flagopt:e2e_request_latency_seconds_count"):
        assert name in text


def test_chat_without_a_template_points_to_completions(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in info.value.message and "chat template" in info.value.message


def test_chat_with_a_template(model, tok) -> None:
    template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    url, stop = _serve(model, tok, chat_template=template)
    try:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=6, temperature=0)
        direct = c.completions.create(model=NAME, prompt="user: hi\nassistant:", max_tokens=6,
                                      temperature=0)
        assert r.choices[0].message.content == direct.choices[0].text
        assert r.choices[0].message.role == "assistant"
    finally:
        stop()


# --- errors -----------------------------------------------------------------------------------


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("field,value,param", [
    ("temperature", -1, "temperature"), ("temperature", "hot", "temperature"),
    ("top_p", 0, "top_p"), ("n", 0, "n"), ("n", 99, "n"), ("logprobs", 21, "logprobs"),
    ("presence_penalty", 3, "presence_penalty"), ("max_tokens", -1, "max_tokens"),
    ("suffix", "x", "suffix"), ("best_of", 3, "best_of"), ("min_tokens", -1, "min_tokens"),
    ("stop", [""], "stop"), ("prompt", [], "prompt"), ("prompt", [[2, 99999]], "prompt"),
    ("max_tokens", 0, "max_tokens"),
])
def test_bad_fields_are_400_naming_the_field(server, field, value, param) -> None:
    body = {"model": NAME, "prompt": "hi", "max_tokens": 2, field: value}
    r = httpx.post(f"{server}/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = _error(r)
    assert err["param"] == param and err["code"] == 400 and param in err["message"]


def test_error_codes(server, client, model, tok) -> None:
    with pytest.raises(openai.BadRequestError, match="You passed .* input tokens and requested "
                                                      "500 output tokens. However, the model's "
                                                      f"context length is only {POSITIONS}"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=500)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    r = httpx.post(f"{server}/v1/completions", content=b"{not json")
    assert r.status_code == 400 and "JSON" in _error(r)["message"]
    r = httpx.post(f"{server}/v1/completions", json={"model": NAME})
    assert r.status_code == 400 and _error(r)["param"] == "prompt"
    big = json.dumps({"model": NAME, "prompt": "x" * (3 * 2 ** 20)})
    r = httpx.post(f"{server}/v1/completions", content=big)
    assert r.status_code == 413
    _error(r)


def test_api_key_is_required_when_set(model, tok) -> None:
    url, stop = _serve(model, tok, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) \
                .completions.create(model=NAME, prompt="hi", max_tokens=2)
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "hi"})
        assert r.status_code == 401 and _error(r)["code"] == 401
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model=NAME, prompt="hi", max_tokens=2).choices
        assert httpx.get(f"{url}/health").status_code == 200  # no key needed
    finally:
        stop()


@pytest.fixture
def gated(model, tok):
    """A server with one row whose decoding steps wait for ``gate`` (each step needs a set)."""
    app = create_app(model, tok, served_model_name=NAME, max_batch_size=1, max_queue=1)
    scheduler = app.state.service.scheduler
    gate = threading.Event()
    decode = scheduler._decode

    def slow_decode():
        gate.wait(10)
        return decode()

    scheduler._decode = slow_decode
    url, stop = serve_in_thread(app)
    yield url, gate, scheduler
    gate.set()
    stop()


def test_full_queue_is_429_with_retry_after(gated) -> None:
    url, gate, scheduler = gated
    body = {"model": NAME, "prompt": "hi", "max_tokens": 3, "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=30)
        _wait_for(lambda: scheduler.num_running == 1)
        second = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=30)
        _wait_for(lambda: _metric(url, "flagopt:num_requests_waiting") == 1)
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert _error(r)["code"] == 429
        gate.set()
        assert first.result().status_code == second.result().status_code == 200


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_row(gated, stream) -> None:
    url, gate, scheduler = gated
    body = {"model": NAME, "prompt": "hi", "max_tokens": 50, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            _wait_for(lambda: _metric(url, "flagopt:num_requests_running") == 1)
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=1.0)
    assert _metric(url, "flagopt:num_requests_running") == 1
    gate.set()  # let steps run: the abort lands between two of them
    _wait_for(lambda: _metric(url, "flagopt:num_requests_running") == 0)
    assert scheduler.cache.free_rows() == [0]
    assert scheduler.cache.lengths.tolist() == [0]


def test_an_engine_failure_is_500_and_the_server_goes_on(model, tok) -> None:
    app = create_app(model, tok, served_model_name=NAME)
    scheduler = app.state.service.scheduler
    decode, calls = scheduler.model.model.decoder.forward, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device fell over")
        return decode(*args, **kwargs)

    url, stop = serve_in_thread(app)
    try:
        scheduler.model.model.decoder.forward = flaky
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError, match="device fell over"):
            c.completions.create(model=NAME, prompt="hi", max_tokens=5, temperature=0,
                                 extra_body={"ignore_eos": True})
        assert c.completions.create(model=NAME, prompt="hi", max_tokens=5).choices
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        del scheduler.model.model.decoder.forward
        stop()
