"""The Predictor's text-in, text-out methods, with the real OPT tokenizer and tiny random OPTs.

The models have OPT's real vocabulary size (50272) so that real token ids work; their EOS row
is scaled up (in the transformers twin too) so that some prompts end on ``</s>``.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flagopt.predictor import GeneratedText, GenerationParams, Predictor, generate
from flagopt.tokenizer import OPTTokenizer
from tests.conftest import reference_pair, tiny_config

EOS, PAD = 2, 1
VOCAB = 50272
PROMPTS = ["Hello, my name is", "The capital of France", "Once upon a time there was a little",
           "I like"]
MAX_NEW = 12
# The text the scripted model writes: accents, emoji, CJK and Cyrillic, many tokens of which
# hold only part of a character's UTF-8 bytes.
MULTIBYTE = "Caf\u00e9 na\u00efve \u00fcber \U0001F600 \u65e5\u672c\u8a9e " \
            "\u043f\u0440\u0438\u0432\u0435\u0442 \U0001F389 end"
METHODS = {
    "randomsample": dict(seed=0),
    "beamsearch": dict(beam_size=2),
    "greedy": {},
    "contrastive_search": dict(top_k=3),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> OPTTokenizer:
    return OPTTokenizer.default()


@pytest.fixture(scope="module")
def pair():
    """(transformers model, flagopt model), equal weights, EOS made likelier in both."""
    hf, ours = reference_pair(tiny_config(vocab_size=VOCAB))
    with torch.no_grad():
        for model in (hf, ours):
            model.model.decoder.embed_tokens.weight[EOS] *= 2.0  # tied: the EOS logit too
    cfg = hf.generation_config
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = PAD, EOS, EOS
    return hf, ours


@pytest.fixture(scope="module")
def predictor(pair, tok) -> Predictor:
    return Predictor(pair[1], tok)


def _call(predictor: Predictor, method: str, text, **kwargs):
    kwargs = {**METHODS[method], "out_max_length": MAX_NEW, **kwargs}
    return getattr(predictor, f"predict_generate_{method}")(text, **kwargs)


def _hf_texts(hf, tok: OPTTokenizer, prompts: list[str], **kwargs) -> list[str]:
    enc = tok(prompts, padding_side="left")
    with torch.no_grad():
        out = hf.generate(enc.input_ids, attention_mask=enc.attention_mask, do_sample=False,
                          max_new_tokens=MAX_NEW, **kwargs)
    return tok.batch_decode(out[:, enc.input_ids.shape[1]:])


class ScriptedLM(nn.Module):
    """A stand-in causal LM that writes ``script`` then EOS, whatever the prompt.

    It speaks the engine's interface (``config``, a parameter for device/dtype, a KV cache to
    advance, ``logits`` out); its logits are one-hot enough that sampling follows the script.
    """

    def __init__(self, script: list[int]) -> None:
        super().__init__()
        self.config = tiny_config(vocab_size=VOCAB)
        self.lm_head = nn.Identity()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.script = [*script, EOS]
        self.prompt_len = 0

    def forward(self, input_ids, attention_mask=None, cache=None, logits_to_keep=0, **_):
        bsz, t = input_ids.shape
        if cache.length == 0:
            self.prompt_len = t
        step = cache.length + t - self.prompt_len  # tokens generated before the next one
        cache.advance(t)
        logits = torch.full((bsz, 1, VOCAB), -1.0e4)
        logits[:, :, self.script[min(step, len(self.script) - 1)]] = 1.0e4
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def scripted(tok) -> Predictor:
    script = tok.encode(MULTIBYTE, add_bos=False)
    assert sum("\ufffd" in tok.decode([t]) for t in script) >= 5  # split characters
    return Predictor(ScriptedLM(script), tok)


# --- shapes of what comes back -------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_prompt_gives_a_string_and_a_list_gives_a_list(predictor, method: str) -> None:
    one = _call(predictor, method, PROMPTS[0])
    many = _call(predictor, method, PROMPTS)
    assert isinstance(one, GeneratedText) and isinstance(one, str)
    assert isinstance(many, list) and len(many) == len(PROMPTS)
    assert all(isinstance(t, GeneratedText) for t in many)
    if method != "randomsample":  # sampling draws for the whole batch at once
        assert many[0] == one  # a row does not depend on its batch
    for text in many:
        assert not text.truncated
        assert text.finish_reason in ("eos", "length")
        assert 1 <= text.num_tokens <= MAX_NEW
        assert (text.finish_reason == "length") == (text.num_tokens == MAX_NEW)
        assert "</s>" not in text and "<pad>" not in text


@pytest.mark.parametrize("method", ["randomsample", "beamsearch"])
def test_num_return_sequences_gives_lists(predictor, method: str) -> None:
    kw = dict(num_return_sequences=2) if method == "beamsearch" else \
        dict(num_return_sequences=3, top_k=0)
    one = _call(predictor, method, PROMPTS[0], **kw)
    many = _call(predictor, method, PROMPTS[:2], **kw)
    n = kw["num_return_sequences"]
    assert isinstance(one, list) and len(one) == n and all(isinstance(t, str) for t in one)
    assert isinstance(many, list) and len(many) == 2
    assert all(isinstance(r, list) and len(r) == n for r in many)
    if method == "beamsearch":
        assert many[0] == one
    assert len(set(one)) > 1  # different beams / different samples


def test_texts_are_the_continuation_decoded_without_special_tokens(predictor, tok) -> None:
    out = predictor.generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert "eos" in [t.finish_reason for t in out.texts]  # some row decodes a final </s>
    t = out.result.prompt_length
    for text, row, n in zip(out.texts, out.result.sequences, out.result.num_generated):
        assert text == tok.decode(row[t:t + n].tolist())
        assert text.num_tokens == n
    enc = tok(PROMPTS, padding_side="left")
    assert torch.equal(out.result.sequences[:, :t], enc.input_ids)


# --- parity with transformers --------------------------------------------------------------


def test_greedy_equals_reference_decoded(pair, predictor, tok) -> None:
    hf, _ = pair
    ours = predictor.predict_generate_greedy(PROMPTS, out_max_length=MAX_NEW)
    reasons = [t.finish_reason for t in ours]
    assert "eos" in reasons and "length" in reasons
    assert ours == _hf_texts(hf, tok, PROMPTS)


@pytest.mark.parametrize("beam_size, length_penalty, early_stopping",
                         [(2, 1.0, False), (3, 0.0, True), (4, 2.0, "never")])
def test_beam_search_equals_reference_decoded(pair, predictor, tok, beam_size: int,
                                              length_penalty: float, early_stopping) -> None:
    hf, _ = pair
    ours = predictor.predict_generate_beamsearch(
        PROMPTS, out_max_length=MAX_NEW, beam_size=beam_size, length_penalty=length_penalty,
        early_stopping=early_stopping, num_return_sequences=2)
    theirs = _hf_texts(hf, tok, PROMPTS, num_beams=beam_size, length_penalty=length_penalty,
                       early_stopping=early_stopping, num_return_sequences=2)
    assert [t for row in ours for t in row] == theirs


def test_temperature_zero_equals_greedy(predictor) -> None:
    greedy = predictor.predict_generate_greedy(PROMPTS, out_max_length=MAX_NEW)
    cold = predictor.predict_generate_randomsample(PROMPTS, out_max_length=MAX_NEW,
                                                   temperature=0, top_k=5, seed=1)
    assert cold == greedy


# --- prompts --------------------------------------------------------------------------------


def _fed_prompt(predictor: Predictor, call) -> torch.Tensor:
    """The ids of the first forward pass (the prompt) while ``call()`` runs."""
    seen = []
    hook = predictor.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0].clone()), with_kwargs=True)
    try:
        call()
    finally:
        hook.remove()
    return seen[0]


def test_long_prompt_keeps_its_last_tokens_and_the_leading_eos(predictor, tok,
                                                               caplog) -> None:
    text = " ".join(f"word{i}" for i in range(40))
    full = tok.encode_prompt(text)
    limit = 9
    assert len(full) > limit
    manual = [EOS, *full[len(full) - (limit - 1):]]
    with caplog.at_level(logging.WARNING, logger="flagopt.predictor.predictor"):
        fed = _fed_prompt(predictor, lambda: predictor.predict_generate_greedy(
            text, input_max_length=limit, out_max_length=3))
    assert fed.tolist() == [manual]
    assert "input_max_length" in caplog.text
    out = predictor.predict_generate_greedy(text, input_max_length=limit, out_max_length=3)
    assert out.truncated
    expected = generate(predictor.model, torch.tensor([manual]), None,
                        GenerationParams(max_new_tokens=3))
    assert out == tok.decode(expected.new_tokens[0])
    # Longer than ``limit`` but within the (tiny) model's 64 positions: the default keeps it.
    fits = " ".join(f"word{i}" for i in range(12))
    assert limit < len(tok.encode_prompt(fits)) < predictor.model.config.max_position_embeddings
    assert not predictor.predict_generate_greedy(fits, out_max_length=3).truncated


def test_only_the_long_prompt_of_a_batch_is_truncated(predictor) -> None:
    texts = ["short", " ".join(["many words"] * 20)]
    out = predictor.predict_generate_greedy(texts, input_max_length=6, out_max_length=2)
    assert [t.truncated for t in out] == [False, True]


def test_empty_prompt_generates_from_eos(predictor, tok) -> None:
    fed = _fed_prompt(predictor, lambda: predictor.predict_generate_greedy(
        "", out_max_length=MAX_NEW))
    assert fed.tolist() == [[EOS]]
    for eos in ([EOS], []):
        out = predictor.predict_generate_greedy("", out_max_length=MAX_NEW, eos_token_id=eos)
        expected = generate(predictor.model, torch.tensor([[EOS]]), None,
                            GenerationParams(max_new_tokens=MAX_NEW, eos_token_ids=eos))
        assert out.num_tokens == expected.num_generated[0]
        assert out == tok.decode(expected.new_tokens[0])
    assert out.num_tokens == MAX_NEW  # the model goes on after "</s>" when it may


# --- FlagAI's bugs, fixed -------------------------------------------------------------------


def test_generation_stops_on_eos(predictor, tok) -> None:
    ended = predictor.predict_generate_greedy(PROMPTS, out_max_length=MAX_NEW)
    endless = predictor.predict_generate_greedy(PROMPTS, out_max_length=MAX_NEW,
                                                eos_token_id=[])
    assert any(t.finish_reason == "eos" for t in ended)
    for stop, run_on in zip(ended, endless):
        assert run_on.finish_reason == "length" and run_on.num_tokens == MAX_NEW
        if stop.finish_reason == "eos":
            assert stop.num_tokens < MAX_NEW
            assert run_on.startswith(stop)


def test_top_k_zero_means_no_top_k(predictor) -> None:
    off = predictor.predict_generate_randomsample(PROMPTS, top_k=0, seed=5,
                                                  out_max_length=MAX_NEW)
    whole = predictor.predict_generate_randomsample(PROMPTS, top_k=VOCAB, seed=5,
                                                    out_max_length=MAX_NEW)
    assert off == whole


def test_integer_penalties_are_accepted(predictor) -> None:
    as_int = predictor.predict_generate_greedy(PROMPTS, repetition_penalty=2,
                                               out_max_length=MAX_NEW)
    as_float = predictor.predict_generate_greedy(PROMPTS, repetition_penalty=2.0,
                                                 out_max_length=MAX_NEW)
    plain = predictor.predict_generate_greedy(PROMPTS, out_max_length=MAX_NEW)
    assert as_int == as_float
    assert as_int != plain
    sampled = predictor.predict_generate_randomsample(PROMPTS[0], repetition_penalty=2,
                                                      top_k=5, seed=0, out_max_length=4)
    assert isinstance(sampled, str)


# --- stop strings ---------------------------------------------------------------------------


def _stop_inside(text: str) -> str:
    """A stop string from the middle of ``text``: its second word."""
    words = text.split()
    assert len(words) >= 3, text
    return " " + words[1]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_stop_strings_end_and_are_trimmed(predictor, method: str) -> None:
    plain = _call(predictor, method, PROMPTS)
    row = next(i for i, t in enumerate(plain) if len(t.split()) >= 3)
    stop = _stop_inside(plain[row])
    stopped = _call(predictor, method, PROMPTS, stop=stop)
    for before, after in zip(plain, stopped):
        if stop in before:
            assert after == before[:before.index(stop)]
            assert after.finish_reason == "stop"
            assert stop not in after
        else:
            assert after == before
    if method != "beamsearch":  # beams are trimmed afterwards; other rows end at the stop
        assert stopped[row].num_tokens < plain[row].num_tokens


def test_several_stop_strings_cut_at_the_first(scripted) -> None:
    out = scripted.predict_generate_greedy("x", out_max_length=60,
                                           stop=["\u043f\u0440\u0438", "\u00fcber"])
    assert out == "Caf\u00e9 na\u00efve "
    assert out.finish_reason == "stop"


def test_stop_strings_in_the_prompt_do_not_count(scripted) -> None:
    out = scripted.predict_generate_greedy("x marks the end", out_max_length=60, stop="x")
    assert out == MULTIBYTE and out.finish_reason == "eos"


# --- streaming ------------------------------------------------------------------------------


def _stream(predictor: Predictor, text: str, **params) -> list[str]:
    pieces = list(predictor.stream(text, **params))
    assert all(isinstance(p, str) and p for p in pieces)
    return pieces


STREAM_CASES = {
    "greedy": dict(strategy="greedy"),
    "sample": dict(strategy="sample", seed=3, top_k=0),
    "sample_top_p": dict(strategy="sample", seed=4, top_p=0.9, temperature=0.8),
    "contrastive": dict(strategy="contrastive", top_k=3),
    "beam": dict(strategy="beam", num_beams=2),
}


@pytest.mark.parametrize("case", sorted(STREAM_CASES))
def test_stream_joins_to_the_non_streaming_text(predictor, case: str) -> None:
    params = dict(max_new_tokens=MAX_NEW, **STREAM_CASES[case])
    for prompt in PROMPTS:
        whole = predictor.generate(prompt, **params).texts[0]
        pieces = _stream(predictor, prompt, **params)
        assert "".join(pieces) == whole
        if "\ufffd" not in whole:
            assert not any("\ufffd" in p for p in pieces)
        if case != "beam" and whole.num_tokens > 2:
            assert len(pieces) > 1  # it streamed


@pytest.mark.parametrize("case", ["greedy", "sample", "contrastive"])
def test_stream_with_stop_strings_joins_to_the_trimmed_text(predictor, case: str) -> None:
    params = dict(max_new_tokens=MAX_NEW, **STREAM_CASES[case])
    plain = [predictor.generate(p, **params).texts[0] for p in PROMPTS]
    row = next(i for i, t in enumerate(plain) if len(t.split()) >= 3)
    stop = _stop_inside(plain[row])
    whole = predictor.generate(PROMPTS[row], stop=stop, **params).texts[0]
    assert whole.finish_reason == "stop" and stop not in whole
    assert "".join(_stream(predictor, PROMPTS[row], stop=stop, **params)) == whole


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_stream_never_splits_a_character(scripted, strategy: str) -> None:
    params = dict(strategy=strategy, seed=0, max_new_tokens=60)
    whole = scripted.generate("x", **params).texts[0]
    assert whole == MULTIBYTE and whole.finish_reason == "eos"
    pieces = _stream(scripted, "x", **params)
    assert "".join(pieces) == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces)
    assert len(pieces) > 10


@pytest.mark.parametrize("stop", ["\u65e5\u672c", "\U0001F600 \u65e5", "\u0432\u0435\u0442 ",
                                  " end"])
def test_stream_stops_at_multibyte_stop_strings(scripted, stop: str) -> None:
    params = dict(max_new_tokens=60, stop=stop)
    whole = scripted.generate("x", **params).texts[0]
    assert whole == MULTIBYTE[:MULTIBYTE.index(stop)]
    assert whole.finish_reason == "stop"
    pieces = _stream(scripted, "x", **params)
    assert "".join(pieces) == whole
    assert not any("\ufffd" in p for p in pieces)


def test_stream_takes_one_prompt_and_one_sequence(predictor) -> None:
    with pytest.raises(TypeError, match="one prompt"):
        list(predictor.stream(PROMPTS))
    with pytest.raises(ValueError, match="num_return_sequences"):
        list(predictor.stream("a", strategy="sample", num_return_sequences=2))


# --- validation -----------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")

# (method, keyword arguments, exception, the parameter the message must name, its value)
BAD_VALUES = [
    ("randomsample", dict(temperature=-0.5), ValueError, "temperature", "-0.5"),
    ("randomsample", dict(top_p=0), ValueError, "top_p", "0"),
    ("randomsample", dict(top_p=1.5), ValueError, "top_p", "1.5"),
    ("randomsample", dict(top_p=NAN), ValueError, "top_p", "nan"),
    ("randomsample", dict(top_k=-1), ValueError, "top_k", "-1"),
    ("randomsample", dict(repetition_penalty=0), ValueError, "repetition_penalty", "0"),
    ("randomsample", dict(min_p=2), ValueError, "min_p", "2"),
    ("beamsearch", dict(beam_size=0), ValueError, "beam_size", "0"),
    ("beamsearch", dict(beam_size=2, num_return_sequences=0), ValueError,
     "num_return_sequences", "0"),
    ("beamsearch", dict(beam_size=2, num_return_sequences=3), ValueError,
     "num_return_sequences", "3"),
    ("greedy", dict(num_return_sequences=2), ValueError, "num_return_sequences", "2"),
    ("greedy", dict(out_max_length=0), ValueError, "out_max_length", "0"),
    ("greedy", dict(out_max_length=1.5), TypeError, "out_max_length", "1.5"),
    ("greedy", dict(out_max_length=True), TypeError, "out_max_length", "True"),
    ("greedy", dict(input_max_length=0), ValueError, "input_max_length", "0"),
    ("greedy", dict(stop=""), ValueError, "stop", "''"),
    ("greedy", dict(stop=["ok", ""]), ValueError, "stop", "''"),
    ("greedy", dict(eos_token_id=-1), ValueError, "eos_token_id", "-1"),
    ("beamsearch", dict(early_stopping="yes"), ValueError, "early_stopping", "'yes'"),
    ("beamsearch", dict(early_stopping=1), ValueError, "early_stopping", "1"),
    ("contrastive_search", dict(top_k=0), ValueError, "top_k", "0"),
    ("contrastive_search", dict(penalty_alpha=1.5), ValueError, "penalty_alpha", "1.5"),
]
# Every numeric parameter with NaN and infinity: floats are out of range (ValueError),
# integers are not integers (TypeError).
FLOAT_PARAMS = [("randomsample", "temperature"), ("randomsample", "top_p"),
                ("randomsample", "min_p"), ("randomsample", "repetition_penalty"),
                ("beamsearch", "length_penalty"), ("contrastive_search", "penalty_alpha")]
INT_PARAMS = [("randomsample", "top_k"), ("greedy", "out_max_length"),
              ("greedy", "input_max_length"), ("beamsearch", "beam_size"),
              ("greedy", "no_repeat_ngram_size"), ("greedy", "min_new_tokens"),
              ("randomsample", "seed"), ("beamsearch", "num_return_sequences"),
              ("greedy", "eos_token_id")]
for _value, _text in ((NAN, "nan"), (INF, "inf"), (-INF, "-inf")):
    BAD_VALUES += [(m, {p: _value}, ValueError, p, _text) for m, p in FLOAT_PARAMS]
    BAD_VALUES += [(m, {p: _value}, TypeError, p, _text) for m, p in INT_PARAMS]
BAD_VALUES += [(m, {p: "1"}, TypeError, p, "'1'") for m, p in FLOAT_PARAMS + INT_PARAMS]


@pytest.mark.parametrize("method, kwargs, error, name, value", BAD_VALUES,
                         ids=[f"{m}-{k}" for m, k, *_ in BAD_VALUES])
def test_bad_values_are_rejected_naming_parameter_and_value(predictor, method: str,
                                                            kwargs: dict, error, name: str,
                                                            value: str) -> None:
    with pytest.raises(error) as info:
        _call(predictor, method, "Hello", **kwargs)
    message = str(info.value)
    assert name in message and value in message, message


def test_errors_name_flagai_parameters_not_engine_fields(predictor) -> None:
    """One check (GenerationParams), under the caller's names."""
    with pytest.raises(ValueError) as info:
        _call(predictor, "beamsearch", "Hello", beam_size=2, num_return_sequences=3)
    assert str(info.value) == ("num_return_sequences=3 is out of range; expected between 1 "
                               "and beam_size=2")
    with pytest.raises(ValueError) as info:
        _call(predictor, "greedy", "Hello", out_max_length=0)
    assert "max_new_tokens" not in str(info.value)
    with pytest.raises(ValueError, match="eos_token_id=-1"):
        predictor.generate("Hello", eos_token_id=-1)
    with pytest.raises(ValueError, match="max_new_tokens=0"):  # generate() takes field names
        predictor.generate("Hello", max_new_tokens=0)


def test_numpy_numbers_are_accepted(predictor) -> None:
    """Any numbers.Integral / numbers.Real (numpy's too), never bool."""
    np = pytest.importorskip("numpy")
    plain = predictor.predict_generate_randomsample(PROMPTS, out_max_length=5, top_k=7,
                                                    top_p=0.9, seed=3, input_max_length=16)
    as_numpy = predictor.predict_generate_randomsample(
        PROMPTS, out_max_length=np.int64(5), top_k=np.int32(7), top_p=np.float32(0.9),
        seed=np.int64(3), input_max_length=np.int64(16))
    assert as_numpy == plain
    beams = predictor.predict_generate_beamsearch(PROMPTS[0], out_max_length=4,
                                                  beam_size=np.int64(2))
    assert beams == predictor.predict_generate_beamsearch(PROMPTS[0], out_max_length=4,
                                                          beam_size=2)
    params = GenerationParams(max_new_tokens=np.uint8(3), eos_token_ids=np.int64(2),
                              repetition_penalty=np.float64(1.5))
    assert (params.max_new_tokens, params.eos_token_ids) == (3, (2,))
    assert type(params.max_new_tokens) is int and type(params.repetition_penalty) is float
    with pytest.raises(TypeError, match="out_max_length"):
        predictor.predict_generate_greedy("Hello", out_max_length=np.bool_(True))


def test_stream_asks_the_strategy_table_whether_it_streams(predictor, monkeypatch) -> None:
    from dataclasses import replace

    from flagopt.predictor import strategies

    params = dict(strategy="greedy", max_new_tokens=MAX_NEW, eos_token_ids=())
    assert len(_stream(predictor, PROMPTS[0], **params)) > 1
    whole = predictor.generate(PROMPTS[0], **params).texts[0]
    monkeypatch.setitem(strategies.STRATEGIES, "greedy",
                        replace(strategies.STRATEGIES["greedy"], streaming=False))
    assert _stream(predictor, PROMPTS[0], **params) == [whole]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unknown_keyword_is_rejected_by_name(predictor, method: str) -> None:
    with pytest.raises(TypeError, match="max_lenght"):
        _call(predictor, method, "Hello", max_lenght=5)


@pytest.mark.parametrize("text", [5, None, [], ["ok", 3], b"bytes", ("a", None)])
def test_text_of_the_wrong_type_is_rejected(predictor, text) -> None:
    with pytest.raises(TypeError, match="text"):
        predictor.predict_generate_greedy(text, out_max_length=2)


def test_predictor_needs_a_language_model_head(pair, tok) -> None:
    with pytest.raises(TypeError, match="OPTModel"):
        Predictor(pair[1].model, tok)


def test_every_strategy_has_exactly_one_chooser() -> None:
    from flagopt.predictor.generation import CHOOSERS
    from flagopt.predictor.strategies import STRATEGIES

    assert list(CHOOSERS) == list(STRATEGIES)


def test_cache_dtype_reaches_the_engine(pair, tok, monkeypatch) -> None:
    import flagopt.predictor.generation as generation

    seen = []
    real = generation.start_state

    def spy(*args, **kwargs):
        state = real(*args, **kwargs)
        seen.append(state.cache.dtype)
        return state

    monkeypatch.setattr(generation, "start_state", spy)
    Predictor(pair[1], tok).predict_generate_greedy(PROMPTS[0], out_max_length=2)
    Predictor(pair[1], tok, cache_dtype="bfloat16").predict_generate_greedy(
        PROMPTS[0], out_max_length=2)
    assert seen == [torch.float32, torch.bfloat16]
    with pytest.raises(ValueError, match="cache_dtype"):
        Predictor(pair[1], tok, cache_dtype="float64")


# --- the position table and the caller's grad mode -----------------------------------------


def test_prompt_longer_than_the_position_table_is_truncated(predictor, tok, caplog) -> None:
    """Never a silent empty answer: the prompt keeps its last tokens, leaving room for one."""
    table = predictor.model.config.max_position_embeddings
    text = " ".join(f"word{i}" for i in range(table * 2))
    full = tok.encode_prompt(text)
    assert len(full) > table
    manual = [EOS, *full[len(full) - (table - 2):]]
    with caplog.at_level(logging.WARNING, logger="flagopt.predictor.predictor"):
        fed = _fed_prompt(predictor, lambda: predictor.predict_generate_greedy(
            text, input_max_length=10 * table, out_max_length=3))
    assert fed.tolist() == [manual]
    assert "position" in caplog.text and str(table) in caplog.text
    out = predictor.predict_generate_greedy(text, input_max_length=10 * table,
                                            out_max_length=3)
    assert out.truncated and out.num_tokens == 1 and out.finish_reason in ("positions", "eos")
    assert "".join(predictor.stream(text, max_new_tokens=3)) == out


def test_stream_leaves_the_callers_grad_mode_alone(predictor) -> None:
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    for params in (dict(strategy="greedy"), dict(strategy="sample", seed=0)):
        seen = []
        for _ in predictor.stream("Hello, my name is", max_new_tokens=4, **params):
            seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        assert seen and set(seen) == {(True, False)}
    with torch.no_grad():
        for _ in predictor.stream("Hello", max_new_tokens=3):
            assert not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_interleaved_streams_closed_in_order_leave_the_mode_unchanged(predictor) -> None:
    first = predictor.stream("Hello, my name is", max_new_tokens=6)
    second = predictor.stream("The capital of France", max_new_tokens=6)
    next(first)
    next(second)
    next(first)
    first.close()
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    second.close()
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


def test_predictor_refuses_a_model_without_weights(tok) -> None:
    from flagopt.model.heads import TASK_CLASSES

    with torch.device("meta"):
        model = TASK_CLASSES["lm"](tiny_config(vocab_size=VOCAB))
    with pytest.raises(ValueError, match="meta"):
        Predictor(model, tok)
