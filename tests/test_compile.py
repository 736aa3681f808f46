"""generate(compile=True): the torch.compile'd static-shape step gives the eager results.

One module-scoped model so the compilation (tens of seconds on CPU) happens once per shape.
"""

from __future__ import annotations

import pytest
import torch

from flagopt.model.cache import KVCache
from flagopt.predictor.generation import generate
from flagopt.predictor.params import GenerationParams
from tests.conftest import reference_pair, tiny_config


@pytest.fixture(scope="module")
def model():
    _, ours = reference_pair(tiny_config(do_layer_norm_before=False, word_embed_proj_dim=16))
    return ours


@pytest.fixture(scope="module")
def batch():
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 1
    return ids, mask


def test_static_step_equals_the_cached_forward(model, batch) -> None:
    """The uncompiled static step: same logits as the ordinary cached forward pass."""
    ids, mask = batch
    with torch.inference_mode():
        cache = KVCache.for_model(model.config, 2, 10, dtype=torch.float32, device="cpu")
        model(ids, attention_mask=mask, cache=cache)
        nxt = torch.tensor([[7], [9]])
        full_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        eager = model(nxt, attention_mask=full_mask, cache=cache).logits[:, -1]
        cache.length -= 1  # write the same slot again through the static path
        key_mask = torch.zeros(2, 10, dtype=torch.bool)
        key_mask[:, :7] = full_mask.bool()
        static = model.static_step(nxt, key_mask, cache.k, cache.v, torch.tensor([6]))
    torch.testing.assert_close(static, eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("params", [
    GenerationParams(max_new_tokens=8, eos_token_ids=()),
    GenerationParams(max_new_tokens=8, strategy="beam", num_beams=3, eos_token_ids=()),
    GenerationParams(max_new_tokens=8, strategy="sample", top_k=20, seed=4),
], ids=["greedy", "beam", "sample"])
def test_compiled_generation_gives_the_eager_tokens(model, batch, params) -> None:
    ids, mask = batch
    eager = generate(model, ids, mask, params)
    compiled = generate(model, ids, mask, params, compile=True)
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(compiled.sequence_scores, eager.sequence_scores, atol=1e-4,
                               rtol=0)


def test_the_compiled_step_is_kept_off_the_model(model) -> None:
    from flagopt.predictor.engine import compiled_step

    step = compiled_step(model)
    assert compiled_step(model) is step  # one per model
    assert not any(callable(v) and "compile" in repr(v).lower() for v in vars(model).values())
    assert "_flagopt_compiled_step" not in vars(model)
