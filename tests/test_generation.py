"""The decoding engine against transformers' ``generate`` (the reference), on tiny random OPTs.

The models are biased towards EOS (its tied embedding row is scaled, in both models alike) so
that rows of a left-padded batch end at different steps and some never end; every parity test
first checks that this actually happened.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from flagopt.errors import NonFiniteLogitsError
from flagopt.predictor import GenerationParams, generate, iter_generate
from tests.conftest import reference_pair, tiny_config

EOS, PAD = 2, 1
VOCAB = 128
MAX_NEW = 10
LENGTHS = (7, 3, 5, 6, 4, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _biased_pair(init_std: float = 0.3, eos_scale: float = 1.2, seed: int = 0, **overrides):
    """A transformers and a flagopt OPT with equal weights and EOS made likelier (tied head)."""
    hf, ours = reference_pair(tiny_config(init_std=init_std, **overrides), seed=seed)
    with torch.no_grad():
        for model in (hf, ours):
            model.model.decoder.embed_tokens.weight[EOS] *= eos_scale
    cfg = hf.generation_config
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = PAD, EOS, EOS
    return hf, ours


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), PAD)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor(r)
        mask[i, t - len(r):] = 1
    return ids, mask


def _rows(lengths=LENGTHS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def pair():
    return _biased_pair()


@pytest.fixture(scope="module")
def batch():
    return _left_pad(_rows())


def _hf_generate(hf, ids, mask, **kwargs):
    return hf.generate(ids, attention_mask=mask, do_sample=False, output_scores=True,
                       return_dict_in_generate=True, **kwargs)


def _end_steps(sequences: torch.Tensor, prompt_len: int, eos=(EOS,)) -> list[int | None]:
    """1-based step of each row's first EOS, None where the row has none."""
    out = []
    for row in sequences[:, prompt_len:].tolist():
        hit = [i for i, tok in enumerate(row) if tok in eos]
        out.append(hit[0] + 1 if hit else None)
    return out


# --- greedy and beam search vs transformers -------------------------------------------------

GREEDY_CASES = {
    "plain": ({}, {}),
    "repetition_penalty": ({"repetition_penalty": 1.5}, {"repetition_penalty": 1.5}),
    "repetition_reward": ({"repetition_penalty": 0.7}, {"repetition_penalty": 0.7}),
    "no_repeat_ngram_2": ({"no_repeat_ngram_size": 2}, {"no_repeat_ngram_size": 2}),
    "no_repeat_ngram_3": ({"no_repeat_ngram_size": 3}, {"no_repeat_ngram_size": 3}),
    "min_new_tokens": ({"min_new_tokens": 3}, {"min_new_tokens": 3}),
    "several_eos": ({"eos_token_ids": (2, 57)}, {"eos_token_id": [2, 57]}),
    "everything": ({"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 2,
                    "eos_token_ids": (2, 19)},
                   {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 2,
                    "eos_token_id": [2, 19]}),
}


@pytest.mark.parametrize("case", sorted(GREEDY_CASES))
def test_greedy_matches_reference(pair, batch, case: str) -> None:
    hf, ours = pair
    ids, mask = batch
    our_kw, hf_kw = GREEDY_CASES[case]
    eos = our_kw.get("eos_token_ids", (EOS,))
    with torch.no_grad():
        theirs = _hf_generate(hf, ids, mask, max_new_tokens=MAX_NEW, **hf_kw)
    result = generate(ours, ids, mask, GenerationParams(max_new_tokens=MAX_NEW, **our_kw))
    ends = _end_steps(theirs.sequences, ids.shape[1], eos)
    assert any(e is not None and e > 1 for e in ends), ends  # EOS mid-sequence,
    assert len(set(ends)) > 1, ends  # at different steps in different rows
    assert torch.equal(result.sequences, theirs.sequences)
    # token_scores: log-probabilities of the chosen tokens under the processed distribution.
    chosen = theirs.sequences[:, ids.shape[1]:]
    for step, scores in enumerate(theirs.scores):
        logp = scores.float().log_softmax(-1).gather(1, chosen[:, step:step + 1])[:, 0]
        live = torch.tensor([step < n for n in result.num_generated])
        torch.testing.assert_close(result.token_scores[live, step], logp[live], atol=1e-4,
                                   rtol=0)
        assert torch.equal(result.token_scores[~live, step], torch.zeros(int((~live).sum())))


@pytest.mark.parametrize("n_return", [1, 2])
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("num_beams", [2, 3, 5])
def test_beam_search_matches_reference(pair, batch, num_beams: int, length_penalty: float,
                                       early_stopping, n_return: int) -> None:
    hf, ours = pair
    ids, mask = batch
    kw = dict(max_new_tokens=MAX_NEW, num_beams=num_beams, length_penalty=length_penalty,
              early_stopping=early_stopping, num_return_sequences=n_return)
    with torch.no_grad():
        theirs = _hf_generate(hf, ids, mask, **kw)
    result = generate(ours, ids, mask, GenerationParams(strategy="beam", **kw))
    ends = _end_steps(theirs.sequences, ids.shape[1])
    if not (early_stopping == "never" and length_penalty > 1):  # there long beams must win
        assert any(e is not None for e in ends), ends
    assert torch.equal(result.sequences, theirs.sequences)
    torch.testing.assert_close(result.sequence_scores, theirs.sequences_scores, atol=1e-4,
                               rtol=0)
    assert result.finish_reasons == ["length" if e is None else "eos" for e in ends]
    assert result.num_generated == [MAX_NEW if e is None else e for e in ends]


BEAM_PROCESSOR_CASES = {
    "min_new_tokens": ({"min_new_tokens": 4}, {"min_new_tokens": 4}),
    "several_eos": ({"eos_token_ids": (2, 57, 19)}, {"eos_token_id": [2, 57, 19]}),
    "penalties": ({"repetition_penalty": 1.3, "no_repeat_ngram_size": 2},
                  {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}),
    "negative_length_penalty": ({"length_penalty": -0.5}, {"length_penalty": -0.5}),
    "one_step": ({"max_new_tokens": 1}, {"max_new_tokens": 1}),
}


@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("case", sorted(BEAM_PROCESSOR_CASES))
def test_beam_search_with_processors_matches_reference(pair, batch, case: str,
                                                       num_beams: int) -> None:
    hf, ours = pair
    ids, mask = batch
    our_kw, hf_kw = BEAM_PROCESSOR_CASES[case]
    common = dict(num_beams=num_beams, num_return_sequences=2)
    with torch.no_grad():
        theirs = _hf_generate(hf, ids, mask, **{"max_new_tokens": MAX_NEW, **common, **hf_kw})
    result = generate(ours, ids, mask, GenerationParams(
        strategy="beam", **{"max_new_tokens": MAX_NEW, **common, **our_kw}))
    assert torch.equal(result.sequences, theirs.sequences)
    torch.testing.assert_close(result.sequence_scores, theirs.sequences_scores, atol=1e-4,
                               rtol=0)


@pytest.mark.parametrize("variant", [{}, dict(do_layer_norm_before=False,
                                              word_embed_proj_dim=16)],
                         ids=["pre_ln", "350m_style"])
def test_variants_match_reference(variant: dict) -> None:
    hf, ours = _biased_pair(init_std=0.1, seed=3, **variant)
    ids, mask = _left_pad(_rows(seed=4))
    for our_kw, hf_kw in [({}, {}), ({"strategy": "beam", "num_beams": 3},
                                     {"num_beams": 3})]:
        with torch.no_grad():
            theirs = _hf_generate(hf, ids, mask, max_new_tokens=MAX_NEW, **hf_kw)
        result = generate(ours, ids, mask, GenerationParams(max_new_tokens=MAX_NEW, **our_kw))
        assert torch.equal(result.sequences, theirs.sequences)


def _random_settings(rng: random.Random) -> tuple[str, dict, dict]:
    """A strategy and its settings, as (strategy, flagopt kwargs, transformers kwargs)."""
    strategy = rng.choice(["greedy", "beam", "beam", "sample"])
    kw: dict = {"max_new_tokens": rng.randint(1, 12)}
    if rng.random() < 0.3:
        kw["repetition_penalty"] = rng.choice([0.8, 1.3, 2.0])
    if rng.random() < 0.3:
        kw["no_repeat_ngram_size"] = rng.choice([1, 2, 3])
    if rng.random() < 0.3:
        kw["min_new_tokens"] = rng.randint(1, kw["max_new_tokens"])
    eos = [EOS] + (rng.sample(range(3, VOCAB), rng.randint(1, 3)) if rng.random() < 0.3
                   else [])
    if strategy == "beam":
        kw["num_beams"] = rng.randint(2, 6)
        kw["length_penalty"] = rng.choice([0.0, 0.5, 1.0, 2.0, -0.5])
        kw["early_stopping"] = rng.choice([False, True, "never"])
        kw["num_return_sequences"] = rng.randint(1, kw["num_beams"])
    if strategy == "sample":
        kw["top_k"] = rng.choice([0, 3, 20])
        kw["top_p"] = rng.choice([1.0, 0.9, 0.5])
        kw["min_p"] = rng.choice([0.0, 0.05])
        kw["temperature"] = rng.choice([1.0, 0.7, 1.5])
        kw["num_return_sequences"] = rng.randint(1, 3)
    return strategy, dict(kw, eos_token_ids=tuple(eos)), dict(kw, eos_token_id=eos)


@pytest.mark.parametrize("trial", range(40))
def test_random_settings_match_reference(trial: int) -> None:
    """Random strategies, processors, EOS sets, model variants and batches vs transformers."""
    rng = random.Random(trial)
    variant = rng.choice([{}, dict(do_layer_norm_before=False, word_embed_proj_dim=16)])
    hf, ours = _biased_pair(init_std=rng.choice([0.1, 0.3]),
                            eos_scale=rng.choice([1.0, 1.2, 1.5]), seed=trial, **variant)
    lengths = [rng.randint(1, 8) for _ in range(rng.randint(1, 4))]
    ids, mask = _left_pad(_rows(lengths, seed=trial))
    strategy, our_kw, hf_kw = _random_settings(rng)
    torch.manual_seed(trial)  # transformers samples from the global generator
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, do_sample=strategy == "sample",
                             output_scores=True, return_dict_in_generate=True, **hf_kw)
    result = generate(ours, ids, mask, GenerationParams(strategy=strategy, seed=trial,
                                                        **our_kw))
    assert torch.equal(result.sequences, theirs.sequences), (strategy, our_kw)
    if strategy == "beam":
        torch.testing.assert_close(result.sequence_scores, theirs.sequences_scores,
                                   atol=1e-4, rtol=0)


# --- a row does not depend on its batch -----------------------------------------------------

ROW_CASES = {
    "greedy": dict(strategy="greedy", repetition_penalty=1.2),
    "beam": dict(strategy="beam", num_beams=3, num_return_sequences=2),
    "beam_early": dict(strategy="beam", num_beams=2, early_stopping=True),
    "contrastive": dict(strategy="contrastive", top_k=3, penalty_alpha=0.6),
}


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_row_does_not_depend_on_the_batch(pair, case: str) -> None:
    _, ours = pair
    rows = _rows()
    params = GenerationParams(max_new_tokens=MAX_NEW, **ROW_CASES[case])
    ids, mask = _left_pad(rows)
    together = generate(ours, ids, mask, params)
    assert len(set(together.num_generated)) > 1  # rows end at different steps
    n = len(together.num_generated) // len(rows)
    for i, row in enumerate(rows):
        alone = generate(ours, torch.tensor([row]), None, params)
        got = slice(i * n, (i + 1) * n)
        assert alone.new_tokens == together.new_tokens[got]
        assert alone.finish_reasons == together.finish_reasons[got]
        torch.testing.assert_close(alone.sequence_scores, together.sequence_scores[got],
                                   atol=1e-4, rtol=0)


# --- sampling ----------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    dict(top_k=0), dict(top_k=10), dict(top_k=0, top_p=0.8, temperature=0.7),
    dict(top_k=0, min_p=0.1), dict(top_k=0, num_return_sequences=3),
    dict(top_k=5, repetition_penalty=1.3),
], ids=["plain", "top_k", "top_p_temperature", "min_p", "num_return_sequences", "penalty"])
def test_seeded_sampling_matches_reference_with_the_same_seed(kw: dict) -> None:
    """transformers draws with torch.multinomial on the global generator; ours on a
    generator made from ``seed``: the same seed must give the same tokens."""
    hf, ours = _biased_pair(init_std=0.1)
    ids, mask = _left_pad(_rows(LENGTHS[:4]))
    torch.manual_seed(7)
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=12, **kw)
    result = generate(ours, ids, mask, GenerationParams(strategy="sample", seed=7,
                                                        max_new_tokens=12, **kw))
    assert torch.equal(result.sequences, theirs)


def _constant_distribution_model(logits: torch.Tensor):
    """A flagopt OPT whose next-token logits are ``logits`` (V,) at every position.

    The final LayerNorm's weight is zeroed and its bias is the first unit vector, so every
    hidden state is e_0 and the tied head gives column 0 of the embedding matrix.
    """
    _, model = reference_pair(tiny_config())
    with torch.no_grad():
        ln = model.model.decoder.final_layer_norm
        ln.weight.zero_()
        ln.bias.zero_()
        ln.bias[0] = 1.0
        model.model.decoder.embed_tokens.weight[:, 0] = logits
    return model


def _logits(seed: int = 0) -> torch.Tensor:
    """Distinct, well separated logits in a random order over the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.linspace(3.0, -3.0, VOCAB)[torch.randperm(VOCAB, generator=g)]


def _kept(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> set[int]:
    """The tokens sampling may draw, computed the slow obvious way, filter after filter."""
    probs = dict(enumerate((logits / temperature).softmax(-1).tolist()))

    def renorm(keep):
        total = sum(probs[t] for t in keep)
        return {t: probs[t] / total for t in keep}

    if top_k:
        probs = renorm(sorted(probs, key=probs.get, reverse=True)[:top_k])
    if top_p < 1.0:
        kept, mass = [], 0.0
        for t in sorted(probs, key=probs.get, reverse=True):
            if mass < top_p:  # keep while the more likely tokens hold less than top_p
                kept.append(t)
            mass += probs[t]
        probs = renorm(kept)
    if min_p:
        top = max(probs.values())
        probs = renorm([t for t, p in probs.items() if p >= min_p * top])
    return set(probs)


@pytest.mark.parametrize("kw", [
    dict(top_k=5), dict(top_k=0, top_p=0.5, temperature=0.8), dict(top_k=0, min_p=0.3),
    dict(top_k=40, top_p=0.9, min_p=0.2, temperature=1.3),
], ids=["top_k", "top_p", "min_p", "all"])
def test_sampling_never_leaves_the_kept_set(kw: dict) -> None:
    logits = _logits()
    model = _constant_distribution_model(logits)
    kept = _kept(logits, **kw)
    assert 2 <= len(kept) < VOCAB // 2
    ids = torch.randint(3, VOCAB, (16, 4), generator=torch.Generator().manual_seed(0))
    result = generate(model, ids, None, GenerationParams(
        strategy="sample", seed=0, max_new_tokens=40, eos_token_ids=(), **kw))
    drawn = set(result.sequences[:, 4:].flatten().tolist())
    assert drawn <= kept
    assert len(drawn) >= min(len(kept), 3)  # it did sample, not pick one token
    assert result.finish_reasons == ["length"] * 16


def test_seeded_sampling_is_reproducible() -> None:
    model = _constant_distribution_model(_logits() * 0.2)  # nearly uniform
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))

    def draw(seed):
        return generate(model, ids, None, GenerationParams(
            strategy="sample", seed=seed, max_new_tokens=30, eos_token_ids=())).sequences

    assert torch.equal(draw(11), draw(11))
    assert not torch.equal(draw(11), draw(12))


def test_temperature_zero_is_greedy(pair, batch) -> None:
    _, ours = pair
    ids, mask = batch
    greedy = generate(ours, ids, mask, GenerationParams(max_new_tokens=MAX_NEW))
    cold = generate(ours, ids, mask, GenerationParams(
        strategy="sample", temperature=0, top_k=3, top_p=0.5, seed=1, max_new_tokens=MAX_NEW))
    assert torch.equal(cold.sequences, greedy.sequences)


# --- contrastive search -------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 3, 6])
def test_contrastive_with_alpha_zero_is_greedy(pair, batch, top_k: int) -> None:
    _, ours = pair
    ids, mask = batch
    greedy = generate(ours, ids, mask, GenerationParams(max_new_tokens=MAX_NEW))
    contrastive = generate(ours, ids, mask, GenerationParams(
        strategy="contrastive", top_k=top_k, penalty_alpha=0.0, max_new_tokens=MAX_NEW))
    assert torch.equal(contrastive.sequences, greedy.sequences)
    assert contrastive.finish_reasons == greedy.finish_reasons


def _naive_contrastive(model, row: list[int], k: int, alpha: float, steps: int,
                       repetition_penalty: float = 1.0) -> list[int]:
    """Contrastive search written out with full forward passes and no cache."""
    context, generated = list(row), []
    for _ in range(steps):
        hidden = model.model(torch.tensor([context])).last_hidden_state[0]  # (T, E)
        logits = model.lm_head(hidden[-1]).float()
        if repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(context)))
            s = logits[seen]
            logits[seen] = torch.where(s < 0, s * repetition_penalty, s / repetition_penalty)
        probs, candidates = logits.softmax(-1).topk(k)
        best, best_score = None, -float("inf")
        for p, token in zip(probs.tolist(), candidates.tolist()):
            h = model.model(torch.tensor([context + [token]])).last_hidden_state[0, -1]
            similarity = F.cosine_similarity(h[None], hidden, dim=-1).max().item()
            score = (1 - alpha) * p - alpha * similarity
            if score > best_score:
                best, best_score = token, score
        context.append(best)
        generated.append(best)
        if best == EOS:
            break
    return generated


@pytest.mark.parametrize("case", [
    dict(init_std=0.3, eos_scale=1.2, top_k=3, penalty_alpha=0.6),
    dict(init_std=0.1, eos_scale=1.0, top_k=5, penalty_alpha=0.4),
    dict(init_std=0.1, eos_scale=1.0, top_k=4, penalty_alpha=0.9, repetition_penalty=1.4),
    dict(init_std=0.02, eos_scale=1.0, top_k=3, penalty_alpha=0.5, do_layer_norm_before=False,
         word_embed_proj_dim=16),
], ids=["eos", "k5", "penalty", "350m_style"])
def test_contrastive_matches_naive_reference(case: dict) -> None:
    case = dict(case)
    k, alpha = case.pop("top_k"), case.pop("penalty_alpha")
    penalty = case.pop("repetition_penalty", 1.0)
    _, model = _biased_pair(seed=3, **case)
    rows = _rows((6, 3), seed=2)
    ids, mask = _left_pad(rows)
    steps = 8
    result = generate(model, ids, mask, GenerationParams(
        strategy="contrastive", top_k=k, penalty_alpha=alpha, max_new_tokens=steps,
        repetition_penalty=penalty))
    with torch.no_grad():
        expected = [_naive_contrastive(model, row, k, alpha, steps, penalty) for row in rows]
    assert result.new_tokens == expected
    greedy = generate(model, ids, mask, GenerationParams(max_new_tokens=steps,
                                                         repetition_penalty=penalty))
    assert greedy.new_tokens != expected  # the penalty changed something
    assert result.finish_reasons == ["eos" if r[-1] == EOS else "length" for r in expected]


def test_contrastive_ends_rows_at_eos() -> None:
    _, model = _biased_pair(seed=3)
    ids, mask = _left_pad(_rows((6, 3), seed=2))
    result = generate(model, ids, mask, GenerationParams(
        strategy="contrastive", top_k=3, penalty_alpha=0.6, max_new_tokens=8))
    assert result.finish_reasons == ["eos", "length"]
    assert result.num_generated == [1, 8]
    assert result.sequences.shape == (2, ids.shape[1] + 8)
    assert (result.sequences[0, ids.shape[1] + 1:] == PAD).all()


# --- stopping -------------------------------------------------------------------------------


def test_eos_ends_rows_independently(pair, batch) -> None:
    _, ours = pair
    ids, mask = batch
    t = ids.shape[1]
    result = generate(ours, ids, mask, GenerationParams(max_new_tokens=MAX_NEW))
    assert result.num_generated == [2, 10, 2, 1, 3, 10]  # pinned: precondition of the test
    assert result.finish_reasons == ["eos", "length", "eos", "eos", "eos", "length"]
    assert result.sequences.shape == (len(LENGTHS), t + MAX_NEW)
    assert torch.equal(result.sequences[:, :t], ids)  # the prompt as given, padding included
    for row, n, reason in zip(result.sequences, result.num_generated, result.finish_reasons):
        assert (row[t:t + n - 1] != EOS).all()
        assert (row[t + n - 1] == EOS) == (reason == "eos")
        assert (row[t + n:] == PAD).all()
    assert result.new_tokens == [r[t:t + n].tolist()
                                 for r, n in zip(result.sequences, result.num_generated)]


def test_all_rows_ending_early_shortens_the_output(pair, batch) -> None:
    _, ours = pair
    ids, mask = batch
    result = generate(ours, ids[[0, 2, 3]], mask[[0, 2, 3]], GenerationParams(max_new_tokens=50))
    assert result.num_generated == [2, 2, 1]
    assert result.sequences.shape[1] == ids.shape[1] + 2


def test_no_eos_ids_runs_to_max_new_tokens(pair, batch) -> None:
    _, ours = pair
    ids, mask = batch
    result = generate(ours, ids, mask, GenerationParams(max_new_tokens=7, eos_token_ids=()))
    assert result.num_generated == [7] * len(LENGTHS)
    assert result.finish_reasons == ["length"] * len(LENGTHS)
    assert result.sequences.shape[1] == ids.shape[1] + 7


@pytest.mark.parametrize("strategy", ["greedy", "sample", "contrastive"])
def test_stop_strings_end_rows(pair, batch, strategy: str) -> None:
    _, ours = pair
    ids, mask = batch
    decode = lambda tokens: "".join(f"<{t}>" for t in tokens)  # noqa: E731
    kw = dict(max_new_tokens=MAX_NEW, strategy=strategy, seed=0, top_k=3, eos_token_ids=())
    plain = generate(ours, ids, mask, GenerationParams(**kw))
    target = plain.new_tokens[1][3]  # a token the second row makes at step 4
    stopped = generate(ours, ids, mask, GenerationParams(stop=f"<{target}>", **kw),
                       decode=decode)
    for before, after, reason, n in zip(plain.new_tokens, stopped.new_tokens,
                                        stopped.finish_reasons, stopped.num_generated):
        cut = before.index(target) + 1 if target in before else len(before)
        assert after == before[:cut]  # same tokens up to and including the stop
        assert n == cut
        assert reason == ("stop" if target in before else "length")
    assert stopped.finish_reasons[1] == "stop" and stopped.num_generated[1] <= 4
    t = ids.shape[1]
    for row, n in zip(stopped.sequences, stopped.num_generated):
        assert (row[t + n:] == PAD).all()


def test_stop_strings_need_a_decoder(pair, batch) -> None:
    _, ours = pair
    with pytest.raises(ValueError, match="decode"):
        generate(ours, *batch, GenerationParams(stop="x"))


@pytest.mark.parametrize("max_new", [1, 4])
def test_max_new_tokens(pair, batch, max_new: int) -> None:
    _, ours = pair
    ids, mask = batch
    result = generate(ours, ids, mask, GenerationParams(max_new_tokens=max_new,
                                                        eos_token_ids=()))
    assert result.sequences.shape == (len(LENGTHS), ids.shape[1] + max_new)
    assert result.num_generated == [max_new] * len(LENGTHS)
    assert result.token_scores.shape == (len(LENGTHS), max_new)


POSITION_STRATEGIES = {
    "greedy": {}, "sample": dict(strategy="sample", seed=0),
    "beam": dict(strategy="beam", num_beams=3, num_return_sequences=2),
    "contrastive": dict(strategy="contrastive", top_k=3),
}


@pytest.mark.parametrize("strategy", sorted(POSITION_STRATEGIES))
def test_position_table_limits_new_tokens(strategy: str) -> None:
    _, model = reference_pair(tiny_config(max_position_embeddings=16, init_std=0.3))
    kw = dict(eos_token_ids=(), **POSITION_STRATEGIES[strategy])
    n = kw.get("num_return_sequences", 1)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ids[1, :5] = PAD

    capped = generate(model, ids[:, 2:], mask[:, 2:], GenerationParams(max_new_tokens=10, **kw))
    assert capped.sequences.shape == (2 * n, 16)
    assert capped.num_generated == [2] * (2 * n)
    assert capped.finish_reasons == ["positions"] * (2 * n)

    fits = generate(model, ids[:, 2:], mask[:, 2:], GenerationParams(max_new_tokens=2, **kw))
    assert fits.finish_reasons == ["length"] * (2 * n)
    assert torch.equal(fits.sequences, capped.sequences)

    full = generate(model, ids, mask, GenerationParams(max_new_tokens=10, **kw))
    assert torch.equal(full.sequences, ids.repeat_interleave(n, 0))
    assert full.num_generated == [0] * (2 * n)
    assert full.finish_reasons == ["positions"] * (2 * n)
    assert full.new_tokens == [[]] * (2 * n)


# --- bad inputs and bad numbers -------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam", "contrastive"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_raise(strategy: str, value: float) -> None:
    _, model = reference_pair(tiny_config())
    with torch.no_grad():
        model.model.decoder.layers[0].fc1.weight[0, 0] = value
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    params = GenerationParams(strategy=strategy, num_beams=2, top_k=2, seed=0)
    with pytest.raises(NonFiniteLogitsError, match="float32"):
        generate(model, ids, None, params)


def test_non_finite_logits_name_the_dtype() -> None:
    _, model = reference_pair(tiny_config())
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        model.model.decoder.final_layer_norm.bias[0] = float("inf")
    ids = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteLogitsError, match="bfloat16"):
        generate(model, ids, None, GenerationParams(max_new_tokens=3))


@pytest.mark.parametrize("bad_id", [VOCAB, VOCAB + 5, -1])
def test_token_outside_the_vocabulary_is_rejected(pair, bad_id: int) -> None:
    _, ours = pair
    ids = torch.tensor([[5, 6, bad_id]])
    with pytest.raises(ValueError, match=str(bad_id)):
        generate(ours, ids, None, GenerationParams(max_new_tokens=2))


def test_bad_masks_and_inputs_are_rejected(pair) -> None:
    _, ours = pair
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    params = GenerationParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="shape"):
        generate(ours, ids, torch.ones(2, 4, dtype=torch.long), params)
    with pytest.raises(ValueError, match="shape"):
        generate(ours, ids, torch.ones(3, dtype=torch.long), params)
    with pytest.raises(ValueError, match="no real token"):
        generate(ours, ids, torch.tensor([[1, 1, 1], [0, 0, 0]]), params)
    with pytest.raises(TypeError):
        generate(ours, ids.float(), None, params)
    with pytest.raises(TypeError):
        generate(ours, ids[0], None, params)
    with pytest.raises(ValueError):
        generate(ours, ids[:, :0], None, params)


@pytest.mark.parametrize("kw", [
    {}, dict(strategy="sample", seed=1, top_k=4), dict(min_new_tokens=2),
    dict(strategy="beam", num_beams=3, num_return_sequences=2),
    dict(strategy="beam", num_beams=2, early_stopping=True),
    dict(strategy="contrastive", top_k=3), dict(stop="<57>"),
    dict(strategy="sample", seed=2, top_k=4, stop="<57>"),
], ids=["greedy", "sample", "min_new", "beam", "beam_early", "contrastive", "stop",
        "sample_stop"])
def test_checking_for_the_end_less_often_changes_nothing(pair, batch, kw: dict) -> None:
    """On CUDA the loop asks "all done?" every few steps; finished rows emit padding meanwhile."""
    _, ours = pair
    rows = [0, 2, 3, 4]  # rows that end early
    ids, mask = batch[0][rows], batch[1][rows]
    decode = lambda tokens: "".join(f"<{t}>" for t in tokens)  # noqa: E731
    params = GenerationParams(max_new_tokens=30, **kw)
    every = generate(ours, ids, mask, params, decode=decode, check_every=1)
    assert max(every.num_generated) < 30  # all rows ended early: later checks see padding
    for check_every in (3, 4, 7):
        rarely = generate(ours, ids, mask, params, decode=decode, check_every=check_every)
        assert torch.equal(rarely.sequences, every.sequences)
        assert rarely.num_generated == every.num_generated
        assert rarely.finish_reasons == every.finish_reasons
        torch.testing.assert_close(rarely.sequence_scores, every.sequence_scores)


# --- iter_generate --------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {}, dict(strategy="sample", seed=3, top_k=5), dict(strategy="beam", num_beams=3),
    dict(strategy="contrastive", top_k=3),
], ids=["greedy", "sample", "beam", "contrastive"])
def test_iter_generate_yields_each_step_and_returns_the_result(pair, batch, kw: dict) -> None:
    _, ours = pair
    ids, mask = batch
    params = GenerationParams(max_new_tokens=MAX_NEW, **kw)
    steps = iter_generate(ours, ids, mask, params)
    yielded = []
    while True:
        try:
            yielded.append(next(steps))
        except StopIteration as done:
            result = done.value
            break
    expected = generate(ours, ids, mask, params)
    assert torch.equal(result.sequences, expected.sequences)
    assert result.num_generated == expected.num_generated
    assert result.finish_reasons == expected.finish_reasons
    torch.testing.assert_close(result.sequence_scores, expected.sequence_scores)
    assert all(isinstance(s, torch.Tensor) and s.dim() == 1 for s in yielded)
    if kw.get("strategy") != "beam":  # beams are re-ranked: their step tokens move about
        assert len(yielded) == max(expected.num_generated)
        rows = slice(None, None, kw.get("top_k", 1) if kw.get("strategy") == "contrastive"
                     else 1)
        stacked = torch.stack([s[rows] for s in yielded], dim=1)
        assert torch.equal(stacked, expected.sequences[:, ids.shape[1]:])
    else:
        assert len(yielded) >= max(expected.num_generated)
        assert all(s.shape == (len(LENGTHS) * 3,) for s in yielded)


# --- the KV cache's dtype is a choice ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_dtype_defaults_to_the_models(dtype: torch.dtype) -> None:
    from flagopt.predictor.engine import start_state

    _, model = reference_pair(tiny_config())
    model = model.to(dtype)
    ids = torch.tensor([[2, 5, 6]])
    state = start_state(model, ids, torch.ones_like(ids), 4)
    assert state.cache.dtype == dtype  # the reference's numerics: no silent widening on CPU
    wide = start_state(model, ids, torch.ones_like(ids), 4, cache_dtype=torch.float32)
    assert wide.cache.dtype == torch.float32


@pytest.mark.parametrize("strategy", ["greedy", "beam", "contrastive"])
def test_float32_cache_dtype_for_a_bf16_model_works(strategy: str) -> None:
    _, model = reference_pair(tiny_config())
    model = model.to(torch.bfloat16)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    params = GenerationParams(strategy=strategy, max_new_tokens=4, num_beams=2, top_k=2,
                              eos_token_ids=())
    own = generate(model, ids, None, params)
    wide = generate(model, ids, None, params, cache_dtype=torch.float32)
    named = generate(model, ids, None, params, cache_dtype="float32")
    assert wide.num_generated == own.num_generated == [4, 4]
    assert torch.equal(named.sequences, wide.sequences)


@pytest.mark.parametrize("bad, error", [("float64", ValueError), (torch.int8, ValueError),
                                        (32, TypeError)])
def test_bad_cache_dtype_is_rejected(pair, bad, error) -> None:
    _, ours = pair
    with pytest.raises(error, match="cache_dtype"):
        generate(ours, torch.tensor([[2, 5]]), None, GenerationParams(max_new_tokens=2),
                 cache_dtype=bad)


def test_non_finite_logits_raise_before_the_step_is_yielded_and_name_the_position() -> None:
    _, model = reference_pair(tiny_config())
    with torch.no_grad():
        model.model.decoder.layers[0].fc1.weight[0, 0] = float("nan")
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    steps = iter_generate(model, ids, None, GenerationParams(strategy="sample", seed=0))
    with pytest.raises(NonFiniteLogitsError, match="at position 5"):
        next(steps)  # on CPU the check reads the first step's flag before yielding it
