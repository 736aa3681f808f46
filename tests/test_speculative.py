"""Speculative decoding: the same greedy tokens and the same sampling distribution as plain
decoding, with a separate random draft model and with the target's own int8 weights."""

from __future__ import annotations

import itertools

import pytest
import torch

from flagopt.model.cache import KVCache
from flagopt.model.config import OPTConfig
from flagopt.model.quantize import Int8Linear
from flagopt.predictor import GenerationParams, Predictor, generate
from flagopt.predictor import speculative
from flagopt.predictor.speculative import K_MAX, accepted_prefix, final_tokens, int8_draft
from tests.conftest import VARIANTS, reference_pair, tiny_config
from tests.test_cli import REPO, _expected, _no_loading, _one_error_line, _run, \
    served  # noqa: F401 (the served-checkpoint fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

EOS, PAD = 2, 1
# Every architecture variant of the fidelity tests, plus an untied LM head.
SPEC_VARIANTS = {**VARIANTS, "untied": dict(extra={"tie_word_embeddings": False})}


def _model(config: OPTConfig, seed: int, eos_scale: float = 1.0):
    """A flagopt model with the fidelity tests' random weights (EOS made likelier: its row
    of the LM head, tied or not, is scaled)."""
    model = reference_pair(config, seed=seed)[1]
    with torch.no_grad():
        model.lm_head.weight[EOS] *= eos_scale
    return model


def _padded_batch(lengths=(7, 3, 5, 6), vocab: int = 128, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.full((len(lengths), t), PAD)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, t - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, t - n:] = 1
    return ids, mask


def _assert_same(plain, spec) -> None:
    assert torch.equal(plain.sequences, spec.sequences)
    assert plain.num_generated == spec.num_generated
    assert plain.finish_reasons == spec.finish_reasons
    torch.testing.assert_close(plain.token_scores, spec.token_scores, atol=1e-4, rtol=1e-4)


# --- the cache's rollback --------------------------------------------------------------------


def test_truncate_drops_the_newest_positions() -> None:
    cache = KVCache(1, 1, 1, 8, 2)
    cache.update(0, torch.ones(1, 1, 5, 2), torch.ones(1, 1, 5, 2))
    cache.advance(5)
    cache.truncate(3)
    assert cache.length == 3
    k, _ = cache.update(0, torch.full((1, 1, 1, 2), 7.0), torch.zeros(1, 1, 1, 2))
    assert k.shape[2] == 4 and bool((k[0, 0, 3] == 7).all())  # written at the new length
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=f"to {bad}"):
            cache.truncate(bad)


# --- greedy: token for token -----------------------------------------------------------------


@pytest.mark.parametrize("draft_kind", ["random", "int8"])
@pytest.mark.parametrize("name", sorted(SPEC_VARIANTS))
def test_greedy_equals_plain_greedy_on_every_variant(name: str, draft_kind: str) -> None:
    config = tiny_config(init_std=0.3, **SPEC_VARIANTS[name])
    target = _model(config, seed=0, eos_scale=1.2)
    # A smaller draft of another seed (one layer), sharing the vocabulary.
    draft = "int8" if draft_kind == "int8" else \
        _model(tiny_config(init_std=0.3, num_hidden_layers=1), seed=3)
    ids, mask = _padded_batch()
    params = GenerationParams(max_new_tokens=16)
    plain = generate(target, ids, mask, params)
    assert len(set(plain.num_generated)) > 1  # rows end at different steps (EOS)
    spec = generate(target, ids, mask, params, draft=draft)
    _assert_same(plain, spec)
    assert spec.speculative.rounds > 0 and spec.speculative.proposed > 0


@pytest.mark.parametrize("kw", [
    dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2),
    dict(min_new_tokens=5, presence_penalty=0.5, frequency_penalty=0.3),
    dict(max_new_tokens=1), dict(max_new_tokens=2), dict(eos_token_ids=())])
def test_greedy_with_processors_and_limits_equals_plain(kw: dict) -> None:
    target = _model(tiny_config(init_std=0.3), seed=0, eos_scale=1.2)
    ids, mask = _padded_batch(lengths=(5, 2, 6))
    params = GenerationParams(**{"max_new_tokens": 20, **kw})
    plain = generate(target, ids, mask, params)
    for draft in ("int8", target):  # the target itself agrees everywhere: long rounds
        _assert_same(plain, generate(target, ids, mask, params, draft=draft))


def test_stop_strings_end_rows_as_in_plain_decoding() -> None:
    target = _model(tiny_config(init_std=0.3), seed=0)
    ids, mask = _padded_batch(lengths=(4, 6))
    decode = lambda row: " ".join(map(str, row))  # noqa: E731
    plain_free = generate(target, ids, mask, GenerationParams(max_new_tokens=12,
                                                              eos_token_ids=()))
    stop = str(plain_free.new_tokens[0][5])  # a token row 0 makes on its way
    params = GenerationParams(max_new_tokens=12, eos_token_ids=(), stop=(stop,))
    plain = generate(target, ids, mask, params, decode=decode)
    assert "stop" in plain.finish_reasons
    _assert_same(plain, generate(target, ids, mask, params, decode=decode, draft=target))


def test_a_full_position_table_ends_rows_as_in_plain_decoding() -> None:
    target = _model(tiny_config(init_std=0.3), seed=0)
    ids = torch.randint(3, 128, (2, 60))  # 64 positions: 4 left
    params = GenerationParams(max_new_tokens=10, eos_token_ids=())
    plain = generate(target, ids, None, params)
    spec = generate(target, ids, None, params, draft=target)
    _assert_same(plain, spec)
    assert spec.finish_reasons == ["positions"] * 2


def test_a_draft_that_always_agrees_grows_k_and_saves_target_passes(monkeypatch) -> None:
    # The acceptance rule alone (the cost rule would see a draft as slow as the target).
    monkeypatch.setattr(speculative.SpeculativeChooser, "greedy_policy",
                        speculative.AcceptanceK)
    target = _model(tiny_config(init_std=0.3), seed=0)
    ids = torch.randint(3, 128, (1, 5))
    spec = generate(target, ids, None, GenerationParams(max_new_tokens=30, eos_token_ids=()),
                    draft=target)
    stats = spec.speculative
    assert stats.rate == 1.0 and stats.accepted == stats.kept == stats.proposed
    # 29 tokens after the prompt's: k = 4, 6, 8, 8 proposals (+1 each) cover them.
    assert stats.rounds == 4


def test_int8_draft_shares_nothing_with_the_target() -> None:
    target = _model(tiny_config(init_std=0.3), seed=0)
    before = {n: p.clone() for n, p in target.state_dict().items()}
    draft = int8_draft(target)
    assert isinstance(draft.model.decoder.layers[0].fc1, Int8Linear)
    assert draft.lm_head.weight is draft.model.decoder.embed_tokens.weight  # tied, in int8
    target_storage = {p.data_ptr() for p in target.state_dict().values()}
    assert not target_storage & {p.data_ptr() for p in draft.state_dict().values()}
    with torch.no_grad():
        for p in draft.parameters():
            p.zero_()
    for name, p in target.state_dict().items():
        assert torch.equal(p, before[name]), name


def test_int8_draft_of_a_fused_target() -> None:
    target = _model(tiny_config(init_std=0.3), seed=0)
    ids, mask = _padded_batch(lengths=(3, 5))
    params = GenerationParams(max_new_tokens=8)
    plain = generate(target, ids, mask, params)
    target.fuse_qkv()
    _assert_same(plain, generate(target, ids, mask, params, draft="int8"))


# --- sampling: the target's distribution -------------------------------------------------------


def test_the_acceptance_rule_emits_the_target_distribution() -> None:
    """One position, many rows: accept with min(1, p/q), else draw from norm(max(0, p - q))."""
    rows, vocab = 200_000, 5
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.4, 0.1, 0.3, 0.1])
    p_rows = p.expand(rows, 2, vocab)  # (R, k+1, V), k = 1
    q_rows = q.expand(rows, 1, vocab)
    drafts = torch.multinomial(q, rows, replacement=True, generator=g)[:, None]  # (R, 1)
    accepted = accepted_prefix(p_rows, q_rows, drafts, g)
    expected_rate = torch.minimum(p, q).sum()  # P(accept) = sum_x min(p, q)
    assert abs(accepted.float().mean() - expected_rate) < 0.005
    tokens = torch.where(accepted > 0, drafts[:, 0], final_tokens(p_rows, q_rows, drafts, accepted, g))
    freq = torch.bincount(tokens, minlength=vocab).float() / rows
    torch.testing.assert_close(freq, p, atol=0.005, rtol=0)
    # Without the residual draw (a rejected proposal kept anyway) the result is q, not p.
    assert (torch.bincount(drafts[:, 0], minlength=vocab).float() / rows - p).abs().max() > 0.1


def _exact_joint(model, prompt: torch.Tensor, temperature: float, top_k: int,
                 vocab: int) -> torch.Tensor:
    """P(t1, t2, t3) (V, V, V) of the target's plain sampling (temperature, then top-k)."""
    def probs(prefixes: torch.Tensor) -> torch.Tensor:  # (N, T) -> (N, V)
        with torch.no_grad():
            scores = model(prefixes).logits[:, -1].float() / temperature
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        return scores.masked_fill(scores < kth, float("-inf")).softmax(-1)

    p1 = probs(prompt[None])[0]  # (V,)
    firsts = torch.arange(vocab)[:, None]
    p2 = probs(torch.cat([prompt.expand(vocab, -1), firsts], 1))  # (V, V)
    pairs = torch.tensor(list(itertools.product(range(vocab), repeat=2)))  # (V*V, 2)
    p3 = probs(torch.cat([prompt.expand(len(pairs), -1), pairs], 1)).view(vocab, vocab, vocab)
    return p1[:, None, None] * p2[:, :, None] * p3


def test_speculative_sampling_matches_the_target_distribution() -> None:
    """Three tokens, 1200 seeds: the first from the prompt's logits, then a round of one
    proposal; when it is accepted the third is the target's bonus draw, else a round of its
    own. The (t2, t3) marginal is what the acceptance rule emitted."""
    vocab, temperature, top_k, n = 4, 0.9, 3, 1200
    config = tiny_config(vocab_size=vocab, init_std=0.1, num_hidden_layers=1)
    target, draft = _model(config, seed=0), _model(config, seed=5)
    prompt = torch.tensor([2, 3, 0])
    want = _exact_joint(target, prompt, temperature, top_k, vocab).sum(0)  # (V, V)
    params = dict(strategy="sample", temperature=temperature, top_k=top_k, max_new_tokens=3,
                  eos_token_ids=())
    counts = torch.zeros(vocab, vocab, vocab)
    proposed = accepted = 0
    for seed in range(n):
        out = generate(target, prompt[None], None, GenerationParams(**params, seed=seed),
                       draft=draft)
        counts[tuple(out.new_tokens[0])] += 1
        proposed += out.speculative.proposed
        accepted += out.speculative.accepted
    assert 0.2 < accepted / proposed < 0.9  # both branches of the rule ran often
    tv = 0.5 * (counts.sum(0) / n - want).abs().sum()
    assert tv < 0.08, f"total variation {tv:.3f}"
    # The draft's own distribution is far off, so the check can tell the two apart.
    draft_joint = _exact_joint(draft, prompt, temperature, top_k, vocab).sum(0)
    assert 0.5 * (draft_joint - want).abs().sum() > 0.25


def test_seeded_speculative_sampling_is_reproducible() -> None:
    target = _model(tiny_config(init_std=0.3), seed=0)
    draft = _model(tiny_config(init_std=0.3, num_hidden_layers=1), seed=3)
    ids, mask = _padded_batch()
    params = lambda seed: GenerationParams(strategy="sample", top_k=20, top_p=0.9,  # noqa
                                           max_new_tokens=12, seed=seed)
    a = generate(target, ids, mask, params(7), draft=draft)
    b = generate(target, ids, mask, params(7), draft=draft)
    c = generate(target, ids, mask, params(8), draft=draft)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)


def test_temperature_zero_with_a_draft_is_greedy() -> None:
    target = _model(tiny_config(init_std=0.3), seed=0)
    ids, mask = _padded_batch()
    greedy = generate(target, ids, mask, GenerationParams(max_new_tokens=10))
    spec = generate(target, ids, mask, GenerationParams(strategy="sample", temperature=0,
                                                        max_new_tokens=10), draft="int8")
    assert torch.equal(greedy.sequences, spec.sequences)


# --- the Predictor and errors -------------------------------------------------------------------


class _Tokenizer:
    """Just enough of OPTTokenizer for the Predictor: ids are the words."""

    def __call__(self, texts, padding_side="left", max_length=None):
        from types import SimpleNamespace
        rows = [[2] + [int(w) for w in t.split()] for t in texts]
        ids, mask = torch.tensor(rows), torch.ones(len(rows), len(rows[0]), dtype=torch.long)
        enc = SimpleNamespace(input_ids=ids, attention_mask=mask, truncated=[False] * len(rows))
        enc.to = lambda device: enc
        return enc

    def decode(self, ids):
        return " ".join(str(i) for i in ids)

    def batch_decode(self, rows):
        return [self.decode(r) for r in rows]


def test_predictor_with_a_draft_gives_the_same_text_and_reports_stats() -> None:
    target = _model(tiny_config(init_std=0.3), seed=0)
    plain = Predictor(target, _Tokenizer())
    spec = Predictor(target, _Tokenizer(), draft="int8")
    prompts = ["5 6 7", "8 9 10"]
    assert plain.last_speculative_stats is None
    want = plain.predict_generate_greedy(prompts, out_max_length=12, eos_token_id=[])
    assert plain.last_speculative_stats is None
    assert spec.predict_generate_greedy(prompts, out_max_length=12, eos_token_id=[]) == want
    stats = spec.last_speculative_stats
    assert stats is not None and stats.proposed > 0 and 0.0 <= stats.rate <= 1.0


@pytest.mark.parametrize("strategy, kw", [("beam", dict(num_beams=2)),
                                          ("contrastive", dict(top_k=3))])
def test_beam_and_contrastive_refuse_a_draft(strategy: str, kw: dict) -> None:
    target = _model(tiny_config(init_std=0.3), seed=0)
    ids = torch.randint(3, 128, (1, 4))
    with pytest.raises(ValueError, match=f"strategy='{strategy}' cannot use a draft"):
        generate(target, ids, None, GenerationParams(strategy=strategy, **kw), draft=target)
    predictor = Predictor(target, _Tokenizer(), draft=target)
    with pytest.raises(ValueError, match="cannot use this Predictor's draft"):
        predictor.generate("5 6", strategy=strategy, **kw)


def test_draft_errors() -> None:
    target = _model(tiny_config(init_std=0.3), seed=0)
    other_vocab = _model(tiny_config(vocab_size=96), seed=1)
    with pytest.raises(ValueError, match="vocab_size=96 differs from the target's 128"):
        Predictor(target, _Tokenizer(), draft=other_vocab)
    short = _model(tiny_config(max_position_embeddings=32), seed=1)
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        Predictor(target, _Tokenizer(), draft=short)
    with pytest.raises(ValueError, match="draft='opt-125m-en'; expected 'int8' or a model"):
        Predictor(target, _Tokenizer(), draft="opt-125m-en")
    with pytest.raises(TypeError, match="draft must be a causal LM"):
        Predictor(target, _Tokenizer(), draft=3)
    with pytest.raises(ValueError, match="already int8"):
        int8_draft(int8_draft(target))
    with torch.device("meta"):
        elsewhere = type(target)(target.config)
    with pytest.raises(ValueError, match="the draft is on meta but the target on cpu"):
        Predictor(target, _Tokenizer(), draft=elsewhere)


def test_the_untied_variant_is_untied() -> None:
    model = _model(tiny_config(**SPEC_VARIANTS["untied"]), seed=0)
    assert model.lm_head.weight is not model.model.decoder.embed_tokens.weight
    assert not int8_draft(model).tied


# --- flagopt generate --draft -----------------------------------------------------------------

def test_cli_draft_int8_prints_the_greedy_text(served, tmp_path) -> None:
    server, source = served
    out = _run(["generate", "--model", REPO, "--max-new-tokens", "8", "--draft", "int8",
                "--quiet", "Hello world"], server, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == _expected(source, "Hello world", out_max_length=8) + "\n"


def test_cli_draft_model_by_name_prints_the_greedy_text(served, tmp_path) -> None:
    server, source = served
    out = _run(["generate", "--model", REPO, "--max-new-tokens", "6", "--draft", REPO,
                "--quiet", "Hello world"], server, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == _expected(source, "Hello world", out_max_length=6) + "\n"


@pytest.mark.parametrize("args, named", [
    (["--draft", "int8", "--beam-size", "3"], "--draft applies to --strategy greedy or sample"),
    (["--draft", "int8", "--strategy", "contrastive"], "not --strategy contrastive"),
    (["--draft", "int8", "--quantize", "int8"], "drop --quantize"),
])
def test_cli_draft_errors_come_before_loading(monkeypatch, capsys, args, named) -> None:
    from flagopt import cli

    _no_loading(monkeypatch)
    assert cli.main(["generate", *args, "x"]) != 0
    assert named in _one_error_line(capsys.readouterr().err)


def test_a_draft_with_non_finite_logits_changes_nothing() -> None:
    target = _model(tiny_config(init_std=0.3), seed=0)
    broken = _model(tiny_config(init_std=0.3), seed=3)
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    ids, mask = _padded_batch()
    params = GenerationParams(max_new_tokens=8)
    _assert_same(generate(target, ids, mask, params), generate(target, ids, mask, params,
                                                               draft=broken))
    out = generate(target, ids, mask, GenerationParams(strategy="sample", max_new_tokens=8,
                                                       seed=0), draft=broken)
    assert out.sequences.shape[1] > ids.shape[1]


def test_non_finite_target_logits_still_raise_with_a_draft() -> None:
    """NaN logits at a verified position (after a token whose embedding is NaN) raise."""
    from flagopt.errors import NonFiniteLogitsError

    target = _model(tiny_config(init_std=0.3, **SPEC_VARIANTS["untied"]), seed=0)
    ids = torch.tensor([[2, 5, 6, 7]])
    params = GenerationParams(max_new_tokens=8, eos_token_ids=())
    third = generate(target, ids, None, params).new_tokens[0][2]
    assert third not in ids.tolist()[0]
    with torch.no_grad():
        target.model.decoder.embed_tokens.weight[third] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match="position"):
        generate(target, ids, None, params, draft=target)


# --- batches: each row keeps its own proposals ------------------------------------------------


def test_each_row_of_a_batch_keeps_its_own_accepted_proposals(monkeypatch) -> None:
    """A draft that agrees with the target on row 0 everywhere and on row 1 except where
    the target picks token X: row 1's rejections no longer hold row 0 back."""
    import copy

    monkeypatch.setattr(speculative.SpeculativeChooser, "greedy_policy",
                        speculative.AcceptanceK)  # rounds that do not depend on timing

    target = _model(tiny_config(init_std=0.3, **SPEC_VARIANTS["untied"]), seed=0)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(4))
    params = GenerationParams(max_new_tokens=40, eos_token_ids=())
    plain = generate(target, ids, None, params)
    first, second = plain.new_tokens
    x = max((t for t in set(second) if t not in first), key=second.count)
    assert second.count(x) >= 3  # row 1 rejects several times
    draft = copy.deepcopy(target)
    with torch.no_grad():  # X's logit becomes 0: below the (positive) maximum, never chosen
        draft.lm_head.weight[x] = 0.0
    spec = generate(target, ids, None, params, draft=draft)
    _assert_same(plain, spec)
    stats = spec.speculative
    assert stats.accepted < stats.proposed  # row 1 rejected some
    # Every accepted proposal is emitted, except past a row's last position (the final
    # round of each row); the shortest-prefix rule would drop row 0's at every rejection.
    assert stats.accepted - stats.kept <= 2 * K_MAX


def test_compacting_the_holes_changes_no_token(monkeypatch) -> None:
    """With no room for holes, every round compacts the caches: same greedy tokens as plain
    decoding, and the same seeded samples as with room."""
    monkeypatch.setattr(speculative.SpeculativeChooser, "greedy_policy",
                        speculative.AcceptanceK)  # rounds that do not depend on timing
    calls = []
    gather = KVCache.gather_slots
    monkeypatch.setattr(KVCache, "gather_slots",
                        lambda self, index: (calls.append(1), gather(self, index))[1])
    target = _model(tiny_config(init_std=0.3), seed=0)
    draft = int8_draft(target)  # agrees often, on each row for its own stretch
    ids, mask = _padded_batch()
    greedy = GenerationParams(max_new_tokens=40, repetition_penalty=1.3, eos_token_ids=())
    sampled = GenerationParams(strategy="sample", top_k=20, max_new_tokens=40, seed=3)
    roomy = generate(target, ids, mask, sampled, draft=draft)
    assert not calls
    monkeypatch.setattr(speculative, "HOLE_ROUNDS", 0)
    _assert_same(generate(target, ids, mask, greedy),
                 generate(target, ids, mask, greedy, draft=draft))
    assert calls  # compaction ran
    _assert_same(roomy, generate(target, ids, mask, sampled, draft=draft))


def test_gather_slots_and_reserve() -> None:
    cache = KVCache(2, 2, 1, 4, 1)
    values = torch.arange(8.0).view(2, 1, 4, 1)  # row b, slot s: 4b + s
    cache.update(0, values, values)
    cache.update(1, values, -values)
    cache.advance(4)
    cache.reserve(10)
    assert cache.capacity == 10 and cache.length == 4
    cache.reserve(6)  # never shrinks
    assert cache.capacity == 10
    cache.gather_slots(torch.tensor([[0, 2, 3], [1, 3, 3]]))
    assert cache.length == 3
    assert cache.k[0, :, 0, :3, 0].tolist() == [[0, 2, 3], [5, 7, 7]]
    assert cache.v[1, :, 0, :3, 0].tolist() == [[0, -2, -3], [-5, -7, -7]]
    with pytest.raises(ValueError, match="n <= length=3"):
        cache.gather_slots(torch.zeros(2, 4, dtype=torch.long))


# --- choosing k ----------------------------------------------------------------------------


def _rounds(policy, rounds: int, rate: float, step_s: float, round_s) -> list[int]:
    """Feed ``policy`` rounds of the given acceptance and costs; the k it chose each time."""
    ks = []
    for _ in range(rounds):
        k = policy.k
        ks.append(k)
        policy.update(k, rate * k, step_s if k else None, round_s(k))
    return ks


def test_cost_k_runs_long_rounds_when_the_draft_is_cheap() -> None:
    policy = speculative.CostK(k_max=8)
    ks = _rounds(policy, 6, rate=0.95, step_s=0.01, round_s=lambda k: 0.2 + 0.011 * k)
    assert ks[0] == speculative.K_START and ks[-1] == 8


def test_cost_k_stops_drafting_when_it_does_not_pay_and_probes_again() -> None:
    """A draft step as slow as the target's pass, half the proposals kept: plain decoding
    (k = 0) emits more per second; after PROBE such rounds one round tries k = 1."""
    policy = speculative.CostK(k_max=8)
    probe = speculative.CostK.PROBE
    ks = _rounds(policy, 3 + probe, rate=0.5, step_s=0.2,
                 round_s=lambda k: 0.2 * (1 + 1.5 * k))
    first = ks.index(0)
    assert first <= 2
    assert ks[first:first + probe] == [0] * probe and ks[first + probe] == 1


def test_cost_k_weighs_the_price_of_verifying_more_positions() -> None:
    """Cheap draft steps but a target pass whose cost grows with every position (compute
    bound, as batches on a CPU): a short k beats the longest."""
    policy = speculative.CostK(k_max=8)
    ks = _rounds(policy, 12, rate=0.7, step_s=0.02, round_s=lambda k: 0.1 * (k + 1) + 0.02 * k)
    assert 0 < ks[-1] < 8


def test_greedy_with_a_slow_draft_still_gives_the_plain_tokens() -> None:
    target = _model(tiny_config(init_std=0.3), seed=0)
    ids, mask = _padded_batch()
    params = GenerationParams(max_new_tokens=24, eos_token_ids=())
    slow = _model(tiny_config(init_std=0.3, num_hidden_layers=4), seed=3)  # 2x the target
    _assert_same(generate(target, ids, mask, params), generate(target, ids, mask, params,
                                                               draft=slow))
