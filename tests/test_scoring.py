"""Scoring against transformers' OPTForCausalLM: log-likelihoods of pairs (lm-eval's recipe),
per-token scores of texts, and the perplexity guide's sliding windows.

The oracle is built independently of flagopt's scoring code: transformers' tokenizer from the
packaged OPT files, transformers' model with the same random weights, log-softmax in float32,
and lm-eval's steps written out here (or the guide's loop, verbatim in spirit).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import flagopt
from flagopt.errors import ScoringError
from flagopt.predictor import Predictor
from flagopt.predictor.scoring import (Window, perplexity_windows, rolling_windows,
                                       score_windows)
from flagopt.tokenizer import OPTTokenizer
from tests.conftest import reference_pair, tiny_config

VOCAB = 50272
WINDOW = 64  # the tiny models' max_position_embeddings
TEXT = ("The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey "
        "building, and the tallest structure in Paris. Its base is square, measuring 125 "
        "metres (410 ft) on each side. During its construction, the Eiffel Tower surpassed "
        "the Washington Monument to become the tallest man-made structure in the world, a "
        "title it held for 41 years until the Chrysler Building in New York City was "
        "finished in 1930. It was the first structure to reach a height of 300 metres.")
PAIRS = [("The capital of France is", " Paris"),
         ("The capital of France is ", "Paris"),  # trailing space moves to the continuation
         ("", "Hello world"),  # empty context: </s> alone
         ("Question: what is 2 + 2?\nAnswer:", " 4, of course."),
         (TEXT, " It was the first structure."),  # longer than the window: context cut
         ("x", " y"),
         ("</s>Already has a BOS", " text")]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> OPTTokenizer:
    return OPTTokenizer.default()


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer.from_pretrained(str(Path(flagopt.__file__).parent / "data"
                                             / "opt-tokenizer"))


@pytest.fixture(scope="module")
def pair():
    return reference_pair(tiny_config(vocab_size=VOCAB, max_position_embeddings=WINDOW))


@pytest.fixture(scope="module")
def predictor(pair, tok) -> Predictor:
    return Predictor(pair[1], tok)


def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log-softmax (T, vocab) in float32 of transformers' model over ``ids``."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _hf_pair(hf, hf_tok, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's hf model, step by step, on transformers' tokenizer and model."""
    if context == "":
        cont = hf_tok.encode(continuation, add_special_tokens=False)
        ctx = [2]
    else:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        special = {} if not context.startswith("</s>") else {"add_special_tokens": False}
        whole = hf_tok.encode(context + continuation, **special)
        ctx = hf_tok.encode(context, **special)
        cont = whole[len(ctx):]
    inp = (ctx + cont)[-(WINDOW + 1):][:-1]
    logp = _hf_logprobs(hf, inp)[len(inp) - len(cont):]
    target = torch.tensor(cont)
    return (float(logp.gather(-1, target[:, None]).sum()),
            bool((logp.argmax(-1) == target).all()))


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_loglikelihood_equals_transformers(pair, hf_tok, predictor: Predictor,
                                           batch_size: int) -> None:
    hf, _ = pair
    got = predictor.loglikelihood(PAIRS, batch_size=batch_size)
    assert len(got) == len(PAIRS)
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        ref_lp, ref_greedy = _hf_pair(hf, hf_tok, context, continuation)
        assert logprob == pytest.approx(ref_lp, abs=1e-4, rel=1e-5), (context, continuation)
        assert greedy == ref_greedy
        assert isinstance(logprob, float) and isinstance(greedy, bool)


def test_trailing_space_moves_to_the_continuation(predictor: Predictor) -> None:
    a, b = predictor.loglikelihood([("The capital of France is ", "Paris"),
                                    ("The capital of France is", " Paris")])
    assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_is_greedy_is_true_for_the_greedy_continuation(pair, tok: OPTTokenizer,
                                                       predictor: Predictor) -> None:
    hf, _ = pair
    found = 0
    for context in ["The capital of France is", "Hello, my name is", "Once upon a time",
                    "I like", "The weather today"]:
        ids = tok.encode(context, add_bos=True)
        greedy = []
        for _ in range(3):
            greedy.append(int(_hf_logprobs(hf, ids + greedy)[-1].argmax()))
        continuation = tok.decode(greedy)
        if tok.encode(context + continuation, add_bos=True)[len(ids):] != greedy:
            continue  # the text does not re-encode to the same tokens
        found += 1
        (_, is_greedy), = predictor.loglikelihood([(context, continuation)])
        assert is_greedy, (context, continuation)
    assert found >= 1


def test_score_equals_transformers_within_the_window(pair, tok: OPTTokenizer,
                                                     predictor: Predictor) -> None:
    hf, _ = pair
    texts = ["Hello world", "A photo of a cat sitting on a mat.", "x"]
    got = predictor.score(texts, batch_size=2)
    for text, s in zip(texts, got):
        ids = tok.encode(text)
        logp = _hf_logprobs(hf, [2] + ids[:-1])
        ref = logp.gather(-1, torch.tensor(ids)[:, None])[:, 0]
        assert s.tokens == ids
        torch.testing.assert_close(torch.tensor(s.token_logprobs), ref, atol=1e-4, rtol=1e-5)
        assert s.logprob == pytest.approx(float(ref.sum()), abs=1e-4)
    one = predictor.score("Hello world")
    assert one.tokens == got[0].tokens


def test_score_of_a_long_text_rolls_over_disjoint_windows(pair, tok: OPTTokenizer,
                                                          predictor: Predictor) -> None:
    hf, _ = pair
    ids = tok.encode(TEXT * 2)
    assert len(ids) > 2 * WINDOW
    got = predictor.score(TEXT * 2, batch_size=4)
    # Reference: token i is scored given the window that lm-eval's rolling windows give it:
    # the first WINDOW tokens after </s>, then blocks of WINDOW with WINDOW + 1 tokens of input.
    ref = []
    first = _hf_logprobs(hf, [2] + ids[:WINDOW - 1])
    ref += first.gather(-1, torch.tensor(ids[:WINDOW])[:, None])[:, 0].tolist()
    done = WINDOW
    while done < len(ids):
        end = min(done + WINDOW, len(ids))
        inp = ids[end - WINDOW - 1:end - 1]
        logp = _hf_logprobs(hf, inp)[-(end - done):]
        ref += logp.gather(-1, torch.tensor(ids[done:end])[:, None])[:, 0].tolist()
        done = end
    torch.testing.assert_close(torch.tensor(got.token_logprobs), torch.tensor(ref),
                               atol=1e-4, rtol=1e-5)


def test_rolling_windows_match_lm_eval() -> None:
    utils = pytest.importorskip("lm_eval.utils")
    for n in (1, 5, 63, 64, 65, 128, 129, 300):
        tokens = list(range(10, 10 + n))
        ref = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
            token_list=tokens, prefix_token=2, max_seq_len=WINDOW, context_len=1)]
        got = rolling_windows(tokens, 2, WINDOW)
        # lm-eval feeds (context + continuation)[-(window + 1):][:-1], scores len(continuation)
        assert got == [Window(tuple((a + b)[-(WINDOW + 1):]), len(b)) for a, b in ref]


def _guide_perplexity(hf, input_ids: torch.Tensor, stride: int, max_length: int
                      ) -> tuple[float, int]:
    """transformers' perplexity guide's loop (docs/source/en/perplexity.md)."""
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        ids = input_ids[:, begin_loc:end_loc]
        target_ids = ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = hf(ids, labels=target_ids).loss
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return float(torch.exp(nll_sum / n_tokens)), n_tokens


@pytest.mark.parametrize("stride,max_length", [(16, 64), (64, 64), (7, 32), (30, 31)])
def test_perplexity_equals_the_guide(pair, hf_tok, predictor: Predictor, stride: int,
                                     max_length: int) -> None:
    hf, _ = pair
    text = "\n\n".join([TEXT, TEXT[:200], TEXT])
    input_ids = hf_tok(text, return_tensors="pt").input_ids
    assert input_ids[0, 0] == 2 and input_ids.shape[1] > 2 * max_length
    ref_ppl, ref_tokens = _guide_perplexity(hf, input_ids, stride, max_length)
    got = predictor.perplexity(text, stride=stride, max_length=max_length, batch_size=3)
    assert got.ppl == pytest.approx(ref_ppl, rel=1e-4)
    assert got.tokens == ref_tokens
    assert got.nll == pytest.approx(math.log(ref_ppl), abs=1e-4)
    assert (got.stride, got.max_length) == (stride, max_length)
    assert set(got.to_dict()) == {"tokens", "nll", "ppl", "stride", "max_length"}


def test_perplexity_defaults_to_the_models_window(pair, predictor: Predictor) -> None:
    got = predictor.perplexity(TEXT, stride=32)
    assert got.max_length == WINDOW


def test_perplexity_windows_score_each_token_once() -> None:
    ids = list(range(100))
    windows = perplexity_windows(ids, stride=10, max_length=30)
    assert windows[0].window.tokens == tuple(range(30)) and windows[0].window.scored == 29
    assert windows[1].window.tokens == tuple(range(10, 40)) and windows[1].window.scored == 10
    assert sum(w.window.scored for w in windows) == 99  # every token but the first, once
    assert windows[-1].window.tokens[-1] == 99
    # a last window of one token scores nothing and is dropped (the guide would give NaN)
    assert [len(w.window.tokens) for w in perplexity_windows(list(range(5)), 4, 4)] == [4]


def test_score_windows_keeps_order_and_batching_changes_nothing(predictor: Predictor) -> None:
    model = predictor.model
    windows = [Window(tuple(range(5, 5 + n)), k) for n, k in
               [(3, 1), (40, 10), (65, 64), (2, 1), (40, 39), (10, 3)]]
    one = score_windows(model, windows, batch_size=1)
    many = score_windows(model, windows, batch_size=4)
    for a, b, w in zip(one, many, windows):
        assert a.logprobs.shape == (w.scored,) and a.logprobs.dtype == torch.float32
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.greedy, b.greedy)


def test_score_windows_top_k_is_the_models_own(pair, predictor: Predictor) -> None:
    hf, _ = pair
    ids = list(range(5, 25))
    score, = score_windows(predictor.model, [Window(tuple(ids), 12)], top=3)
    assert score_windows(predictor.model, [Window(tuple(ids), 12)])[0].top_ids is None
    want = _hf_logprobs(hf, ids)[len(ids) - 13:len(ids) - 1]  # positions predicting the last 12
    values, indices = want.topk(3, dim=-1)
    assert score.top_ids.shape == (12, 3) and torch.equal(score.top_ids, indices)
    torch.testing.assert_close(score.top_logprobs, values, atol=1e-4, rtol=0)
    assert torch.equal(score.greedy, score.top_ids[:, 0] == torch.tensor(ids[-12:]))
    with pytest.raises(ValueError, match="top=-1"):
        score_windows(predictor.model, [Window(tuple(ids), 12)], top=-1)


def test_progress_reports_every_window(predictor: Predictor) -> None:
    seen = []
    predictor.loglikelihood(PAIRS, batch_size=3, progress=lambda n, total: seen.append((n, total)))
    assert sum(n for n, _ in seen) == len(PAIRS) and {t for _, t in seen} == {len(PAIRS)}


# --- bad input --------------------------------------------------------------------------------


def test_empty_continuation_is_an_error_naming_the_pair(predictor: Predictor) -> None:
    with pytest.raises(ScoringError, match=r"pairs\[1\] has an empty continuation"):
        predictor.loglikelihood([("a", " b"), ("The end", "")])
    with pytest.raises(ScoringError, match=r"pairs\[0\].*'y'.* merges into the context's last"):
        predictor.loglikelihood([("x", "y")])  # "xy" is one token


def test_continuation_longer_than_the_window_is_an_error(predictor: Predictor) -> None:
    with pytest.raises(ScoringError, match=r"pairs\[0\].* longer than the model's window of 64"):
        predictor.loglikelihood([("Context", " " + TEXT)])


def test_long_context_is_truncated_not_an_error(predictor: Predictor) -> None:
    (lp, _), = predictor.loglikelihood([(TEXT * 3, " end")])
    assert math.isfinite(lp)


@pytest.mark.parametrize("pairs,error,match", [
    ("a string", TypeError, "pairs must be a non-empty list"),
    ([], TypeError, "pairs must be a non-empty list"),
    ([("only one",)], TypeError, r"pairs\[0\] must be a \(context, continuation\) pair"),
    ([("a", 3)], TypeError, r"pairs\[0\]"),
])
def test_malformed_pairs(predictor: Predictor, pairs, error, match) -> None:
    with pytest.raises(error, match=match):
        predictor.loglikelihood(pairs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(stride=0), ValueError, r"stride=0 is out of range; expected 1\.\.64"),
    (dict(stride=40, max_length=32), ValueError, r"stride=40 is out of range; expected 1\.\.32"),
    (dict(max_length=65), ValueError, r"max_length=65 is out of range; expected 2\.\.64"),
    (dict(max_length=1), ValueError, r"max_length=1"),
    (dict(stride=1.5), TypeError, "stride must be an int"),
    (dict(stride=16, batch_size=0), ValueError, "batch_size=0"),
])
def test_bad_perplexity_arguments(predictor: Predictor, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        predictor.perplexity(TEXT, **kwargs)


def test_empty_texts_are_errors(predictor: Predictor) -> None:
    with pytest.raises(ScoringError, match="empty"):
        predictor.perplexity("", stride=16)
    with pytest.raises(ScoringError, match=r"texts\[1\] is empty"):
        predictor.score(["fine", ""])


# --- flagopt perplexity -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(pair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The transformers twin saved in the hub layout, with the real tokenizer files."""
    import shutil

    directory = tmp_path_factory.mktemp("tiny-opt")
    pair[0].save_pretrained(directory)
    for f in (Path(flagopt.__file__).parent / "data" / "opt-tokenizer").iterdir():
        shutil.copy(f, directory / f.name)
    return directory


def test_cli_perplexity_prints_one_json_line(checkpoint: Path, predictor: Predictor,
                                             tmp_path: Path, capsys) -> None:
    from flagopt import cli

    text = TEXT + "\n\n" + TEXT
    path = tmp_path / "wiki.txt"
    path.write_text(text, encoding="utf-8")
    rc = cli.main(["perplexity", "--model", str(checkpoint), str(path), "--stride", "16",
                   "--max-length", "32", "--batch-size", "2", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1
    got = json.loads(lines[0])
    want = predictor.perplexity(text, stride=16, max_length=32).to_dict()
    assert set(got) == set(want) and got["tokens"] == want["tokens"]
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    assert (got["stride"], got["max_length"]) == (16, 32)
    assert "perplexity" in captured.err  # the progress bar, on stderr


def test_cli_perplexity_non_utf8_file_is_a_clear_error(checkpoint: Path, tmp_path: Path,
                                                       capsys) -> None:
    from flagopt import cli

    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    rc = cli.main(["perplexity", "--model", str(checkpoint), str(path), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{path} is not UTF-8 text: byte 0xe9 at offset 3" in err
    assert "Traceback" not in err


def test_cli_perplexity_missing_file(checkpoint: Path, tmp_path: Path, capsys) -> None:
    from flagopt import cli

    rc = cli.main(["perplexity", "--model", str(checkpoint), str(tmp_path / "nope.txt")])
    assert rc == 1 and "nope.txt" in capsys.readouterr().err
