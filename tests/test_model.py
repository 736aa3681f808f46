"""The decoder and its heads against transformers' OPT (the reference), on random weights."""

from __future__ import annotations

import pytest
import torch

from flagopt.errors import ConfigError
from flagopt.model.cache import KVCache
from flagopt.model.config import OPTConfig
from flagopt.model.decoder import OPTModel
from flagopt.model.heads import OPTForCausalLM
from tests.conftest import reference_pair, tiny_config

ATOL = 1e-4


def _ids(bsz: int, t: int, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (bsz, t), generator=g)


def _left_pad(rows: list[torch.Tensor], pad: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_match_reference(variant: OPTConfig, attn: str) -> None:
    hf, ours = reference_pair(variant, attn=attn)
    ids = _ids(3, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padding_gives_unpadded_outputs(variant: OPTConfig, attn: str) -> None:
    hf, ours = reference_pair(variant, attn=attn)
    rows = [_ids(1, n, seed=n)[0] for n in (7, 3, 5)]
    ids, mask = _left_pad(rows)
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask).logits
        reference = hf(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = ours(row[None]).logits[0]
            real = batched[i, mask[i].bool()]
            torch.testing.assert_close(real, alone, atol=ATOL, rtol=0)
            torch.testing.assert_close(real, reference[i, mask[i].bool()], atol=ATOL, rtol=0)
        assert torch.isfinite(batched).all()  # padding queries must not produce NaN


def test_right_padding_gives_unpadded_outputs() -> None:
    _, ours = reference_pair(tiny_config())
    row = _ids(1, 4)[0]
    ids = torch.cat([row, torch.ones(3, dtype=torch.long)])[None]
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[0, :4],
                                   ours(row[None]).logits[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_cached_step_by_step_equals_full_forward(variant: OPTConfig, padded: bool) -> None:
    _, ours = reference_pair(variant)
    rows = [_ids(1, 8, seed=3)[0], _ids(1, 5, seed=4)[0]]
    ids, mask = _left_pad(rows) if padded else (_ids(2, 8), torch.ones(2, 8, dtype=torch.long))
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        cache = KVCache.for_model(variant, 2, 16, dtype=torch.float32, device="cpu")
        prompt = 4
        steps = [ours(ids[:, :prompt], attention_mask=mask[:, :prompt], cache=cache).logits]
        for t in range(prompt, ids.shape[1]):
            steps.append(ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits)
        stepped = torch.cat(steps, dim=1)
    assert cache.length == ids.shape[1]
    real = mask.bool()
    torch.testing.assert_close(stepped[real], full[real], atol=ATOL, rtol=0)


def test_use_cache_without_a_cache_allocates_and_grows() -> None:
    _, ours = reference_pair(tiny_config())
    ids = _ids(1, 6)
    with torch.no_grad():
        full = ours(ids).logits
        out = ours(ids[:, :3], use_cache=True)
        assert isinstance(out.cache, KVCache) and out.cache.length == 3
        nxt = ours(ids[:, 3:], cache=out.cache).logits
    torch.testing.assert_close(torch.cat([out.logits, nxt], 1), full, atol=ATOL, rtol=0)


def test_inputs_embeds_equal_input_ids() -> None:
    _, ours = reference_pair(tiny_config(word_embed_proj_dim=16, do_layer_norm_before=False))
    ids = _ids(2, 5)
    with torch.no_grad():
        embeds = ours.model.decoder.embed_tokens(ids)
        torch.testing.assert_close(ours(inputs_embeds=embeds).logits, ours(ids).logits)
    with pytest.raises(ValueError, match="exactly one"):
        ours(ids, inputs_embeds=embeds)


def test_hidden_states_and_attentions_match_reference() -> None:
    hf, ours = reference_pair(tiny_config(), attn="eager")
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        b = ours(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert len(b.hidden_states) == len(a.hidden_states) == 3
    for x, y in zip(b.hidden_states, a.hidden_states):
        torch.testing.assert_close(x[mask.bool()], y[mask.bool()], atol=ATOL, rtol=0)
    assert len(b.attentions) == 2
    for x, y in zip(b.attentions, a.attentions):
        torch.testing.assert_close(x[0], y[0], atol=ATOL, rtol=0)


def test_sdpa_and_eager_agree_and_output_attentions_switches_to_eager() -> None:
    config = tiny_config()
    _, sdpa = reference_pair(config, attn="sdpa")
    _, eager = reference_pair(config, attn="eager")
    ids = _ids(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids).logits, eager(ids).logits, atol=ATOL, rtol=0)
        out = sdpa(ids, output_attentions=True)
    assert out.attentions[0].shape == (2, 4, 7, 7)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 7))


def test_head_mask() -> None:
    config = tiny_config()
    _, ours = reference_pair(config, attn="eager")
    ids = _ids(1, 5)
    with torch.no_grad():
        base = ours(ids).logits
        ones = ours(ids, head_mask=torch.ones(2, 4)).logits
        torch.testing.assert_close(ones, base)
        masked = ours(ids, head_mask=torch.tensor([1.0, 0.0, 1.0, 1.0])).logits
        assert not torch.allclose(masked, base)
        # Zeroing head 1 everywhere equals zeroing the rows of out_proj that read it.
        for layer in ours.model.decoder.layers:
            layer.self_attn.out_proj.weight[:, 8:16] = 0
        torch.testing.assert_close(ours(ids).logits, masked, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="head_mask"):
        ours(ids, head_mask=torch.ones(3))


def test_lm_loss_matches_reference_and_ignores_minus_100() -> None:
    hf, ours = reference_pair(tiny_config())
    ids = _ids(2, 6)
    labels = ids.clone()
    labels[0, 3] = -100
    with torch.no_grad():
        out = ours(ids, labels=labels)
        torch.testing.assert_close(out.loss, hf(ids, labels=labels).loss)
    # By hand: position t predicts labels[t + 1]; the -100 target is left out of the mean.
    logp = out.logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    keep = target != -100
    picked = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(out.loss, -picked[keep].mean())


@pytest.mark.parametrize("problem", ["single", "multi", "regression"])
def test_sequence_classification_matches_reference(problem: str) -> None:
    num_labels = 1 if problem == "regression" else 3
    config = tiny_config(num_labels=num_labels)
    hf, ours = reference_pair(config, task="classification")
    ids, mask = _left_pad([_ids(1, 6, seed=5)[0], _ids(1, 3, seed=6)[0]])
    labels = {"single": torch.tensor([0, 2]),
              "multi": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
              "regression": torch.tensor([0.5, -1.0])}[problem]
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, labels=labels)
        b = ours(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(b.loss, a.loss, atol=ATOL, rtol=0)


def test_question_answering_matches_reference() -> None:
    hf, ours = reference_pair(tiny_config(), task="qa")
    ids = _ids(2, 8)
    start, end = torch.tensor([1, 20]), torch.tensor([3, 5])  # 20 is outside: ignored
    with torch.no_grad():
        a = hf(ids, start_positions=start, end_positions=end)
        b = ours(ids, start_positions=start, end_positions=end)
    torch.testing.assert_close(b.start_logits, a.start_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(b.end_logits, a.end_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(b.loss, a.loss, atol=ATOL, rtol=0)


def test_fused_qkv_gives_the_same_logits() -> None:
    _, ours = reference_pair(tiny_config())
    ids = _ids(2, 6)
    with torch.no_grad():
        before = ours(ids).logits
        ours.fuse_qkv()
        after = ours(ids).logits
    assert ours.model.decoder.layers[0].self_attn.qkv_proj is not None
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_close_to_fp32(dtype: torch.dtype) -> None:
    _, ours = reference_pair(tiny_config())
    ids = _ids(2, 6)
    with torch.no_grad():
        ref = ours(ids).logits
        half = ours.to(dtype)(ids).logits
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), ref, atol=0.05, rtol=0.05)


def test_positions_beyond_the_table_are_an_error() -> None:
    _, ours = reference_pair(tiny_config(max_position_embeddings=8))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(_ids(1, 9))


def test_bad_attention_mask_shape_is_an_error() -> None:
    _, ours = reference_pair(tiny_config())
    with pytest.raises(ValueError, match="attention_mask"):
        ours(_ids(1, 4), attention_mask=torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="attn_implementation"):
        OPTModel(tiny_config(), attn_implementation="flash")


# --- KV cache ----------------------------------------------------------------------------------

def test_cache_update_reorder_repeat() -> None:
    cache = KVCache(2, 3, 1, 4, 2)
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    keys, values = cache.update(0, k, k + 10)
    assert keys.shape == (3, 1, 2, 2)
    cache.advance(2)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.k[0, :, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]
    assert cache.v[0, :, 0, 0, 0].tolist() == [12.0, 12.0, 10.0]
    wide = KVCache(2, 6, 1, 4, 2)
    wide.copy_rows_from(cache, 2)
    assert wide.length == 2
    assert wide.k[0, :, 0, 0, 0].tolist() == [2.0, 2.0, 2.0, 2.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="cannot copy"):
        wide.copy_rows_from(cache, 3)
    cache.reset()
    assert cache.length == 0


# --- config ------------------------------------------------------------------------------------

def test_config_round_trips_and_keeps_unknown_keys(tmp_path) -> None:
    import transformers

    hub = transformers.OPTConfig(hidden_size=64, num_attention_heads=4, ffn_dim=128,
                                 num_hidden_layers=3, word_embed_proj_dim=32,
                                 do_layer_norm_before=False).to_dict()
    hub["some_future_key"] = {"x": 1}
    config = OPTConfig.from_dict(hub)
    assert config.extra["some_future_key"] == {"x": 1}
    assert config.has_projections and not config.has_final_layer_norm
    config.to_json(tmp_path)
    again = OPTConfig.from_json(tmp_path / "config.json")
    assert again == config and again.extra["some_future_key"] == {"x": 1}
    back = transformers.OPTConfig.from_pretrained(tmp_path)
    assert back.word_embed_proj_dim == 32 and back.do_layer_norm_before is False


def test_num_parameters_matches_the_module() -> None:
    for overrides in ({}, {"word_embed_proj_dim": 16, "do_layer_norm_before": False},
                      {"enable_bias": False}):
        config = tiny_config(**overrides)
        model = OPTForCausalLM(config)
        assert config.num_parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("bad, match", [
    (dict(hidden_size=30, num_attention_heads=4), "divisible"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(activation_function="tanhh"), "activation_function"),
    (dict(dropout=1.5), "dropout"),
])
def test_inconsistent_config_is_a_clear_error(bad: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny_config(**bad)


def test_malformed_config_json(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        OPTConfig.from_json(tmp_path)
    with pytest.raises(ConfigError, match="model_type"):
        OPTConfig.from_dict({"model_type": "gpt2"})


def test_config_for_a_zoo_name_uses_the_registry() -> None:
    from flagopt.auto_model.registry import config_for
    from flagopt.errors import UnknownModelError

    config = config_for("OPT-350M-EN")
    assert (config.hidden_size, config.word_embed_proj_dim) == (1024, 512)
    assert not config.do_layer_norm_before and not config.has_final_layer_norm
    assert config_for("opt-13b-en").num_parameters > 12e9
    with pytest.raises(UnknownModelError, match="opt-125m-en"):
        config_for("opt-125-en")


# --- one stack, one cache interface ------------------------------------------------------------

def _prefilled(model, ids, mask, capacity):
    cache = KVCache.for_model(model.config, ids.shape[0], capacity, dtype=torch.float32,
                              device="cpu")
    model(ids, attention_mask=mask, cache=cache)
    return cache


@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_view_and_kv_cache_give_the_same_keys_values_and_logits(
        variant: OPTConfig, padded: bool) -> None:
    """Both ``Cache`` implementations through the one decoder stack: the dynamic forward and
    the static step write the same keys/values and give the same next-token logits."""
    _, ours = reference_pair(variant)
    rows = [_ids(1, 6, seed=7)[0], _ids(1, 4, seed=8)[0]]
    ids, mask = _left_pad(rows) if padded else (_ids(2, 6), torch.ones(2, 6, dtype=torch.long))
    nxt = torch.tensor([[7], [9]])
    full_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        dynamic = _prefilled(ours, ids, mask, 12)
        static = _prefilled(ours, ids, mask, 12)
        eager = ours(nxt, attention_mask=full_mask, cache=dynamic).logits[:, -1]
        key_mask = torch.zeros(2, 12, dtype=torch.bool)
        key_mask[:, :7] = full_mask.bool()
        stepped = ours.static_step(nxt, key_mask, static.k, static.v, torch.tensor([6]))
    assert dynamic.length == 7 and static.length == 6  # the static view leaves counting to its owner
    torch.testing.assert_close(static.k, dynamic.k, atol=1e-6, rtol=0)
    torch.testing.assert_close(static.v, dynamic.v, atol=1e-6, rtol=0)
    torch.testing.assert_close(stepped, eager, atol=ATOL, rtol=0)


def test_cache_update_shapes_of_both_implementations() -> None:
    from flagopt.model.cache import StaticCacheView

    dynamic = KVCache(1, 2, 1, 5, 3)
    k = torch.randn(2, 1, 2, 3)
    keys, values = dynamic.update(0, k, k + 1)
    assert keys.shape == (2, 1, 2, 3)  # the filled prefix
    dynamic.advance(2)
    view = dynamic.static_view(torch.tensor([2]))
    assert isinstance(view, StaticCacheView)
    k1 = torch.randn(2, 1, 1, 3)
    keys, values = view.update(0, k1, k1 + 1)
    assert keys.shape == (2, 1, 5, 3)  # the whole capacity: no shape depends on the step
    view.advance(1)
    assert dynamic.length == 2
    torch.testing.assert_close(dynamic.k[0, :, :, :2], k)
    torch.testing.assert_close(dynamic.k[0, :, :, 2:3], k1)
    torch.testing.assert_close(dynamic.v[0, :, :, 2:3], k1 + 1)


def test_decoder_forward_is_the_stack_under_the_hf_forward(variant: OPTConfig) -> None:
    """OPTDecoder.forward with explicit positions and a causal mask equals OPTModel.forward."""
    _, ours = reference_pair(variant)
    ids = _ids(2, 5)
    positions = torch.arange(5).expand(2, 5)
    with torch.no_grad():
        stack = ours.model.decoder(ids, positions, None, is_causal=True)
        embedded = ours.model.decoder(ours.get_input_embeddings()(ids), positions, None,
                                      is_causal=True)
        hf_style = ours.model(ids).last_hidden_state
    torch.testing.assert_close(stack, hf_style)
    torch.testing.assert_close(embedded, hf_style)


def test_trace_collects_what_the_flags_ask_for() -> None:
    from flagopt.model.decoder import Trace

    config = tiny_config()
    _, ours = reference_pair(config, attn="eager")
    assert Trace.of(config, None, False, False) is None  # ordinary callers pass nothing
    ids = _ids(1, 4)
    positions = torch.arange(4)[None]
    trace = Trace.of(config, torch.ones(4), True, True)
    with torch.no_grad():
        out = ours.model.decoder(ids, positions, None, is_causal=True, trace=trace)
        flags = ours.model(ids, output_hidden_states=True, output_attentions=True)
    assert len(trace.hidden_states) == 3 and len(trace.attentions) == 2
    torch.testing.assert_close(trace.hidden_states[-1], out)
    for a, b in zip(trace.attentions, flags.attentions):
        torch.testing.assert_close(a, b)


def test_model_surface_for_the_engine() -> None:
    _, ours = reference_pair(tiny_config(word_embed_proj_dim=16, do_layer_norm_before=False))
    ids, mask = _left_pad([_ids(1, 5, seed=2)[0], _ids(1, 3, seed=3)[0]])
    assert ours.get_input_embeddings() is ours.model.decoder.embed_tokens
    assert ours.get_output_embeddings() is ours.lm_head
    with torch.no_grad():
        hidden = ours.last_hidden_state(ids, mask)
        assert hidden.shape == (2, 5, 16)
        torch.testing.assert_close(ours.logits(hidden), ours(ids, attention_mask=mask).logits)
        torch.testing.assert_close(ours.logits(hidden[:, -1]),
                                   ours(ids, attention_mask=mask, logits_to_keep=1).logits[:, 0])
        cache = KVCache.for_model(ours.config, 2, 8, dtype=torch.float32, device="cpu")
        ours.last_hidden_state(ids, mask, cache)
        assert cache.length == 5
