"""Shared fixtures: tiny OPT configs and reference/flagopt model pairs with equal weights."""

from __future__ import annotations

import os

import pytest
import torch

from flagopt import settings
from flagopt.model.config import OPTConfig

TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
            num_attention_heads=4, max_position_embeddings=64)

# The variants the reference distinguishes: pre-LN (125m...), post-LN with 512->1024-style
# projections (350m), no final LN, no biases, gelu, LayerNorm without affine parameters.
VARIANTS = {
    "pre_ln": {},
    "350m_style": dict(do_layer_norm_before=False, word_embed_proj_dim=16),
    "remove_final_ln": dict(_remove_final_layer_norm=True),
    "no_bias": dict(enable_bias=False),
    "gelu": dict(activation_function="gelu"),
    "no_affine_ln": dict(layer_norm_elementwise_affine=False),
}


def tiny_config(**overrides) -> OPTConfig:
    return OPTConfig(**{**TINY, **overrides})


def reference_pair(config: OPTConfig, task: str = "lm", attn: str = "sdpa", seed: int = 0):
    """A transformers model (the oracle) and a flagopt model sharing its random weights."""
    import transformers

    from flagopt.model.heads import TASK_CLASSES

    hf_cls = {"lm": transformers.OPTForCausalLM,
              "classification": transformers.OPTForSequenceClassification,
              "qa": transformers.OPTForQuestionAnswering}[task]
    torch.manual_seed(seed)
    hf_config = transformers.OPTConfig(**config.to_dict())
    hf_config._attn_implementation = attn
    hf = hf_cls(hf_config).eval()
    with torch.no_grad():  # LayerNorms start at exactly 1/0; make them matter
        for name, p in hf.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = TASK_CLASSES[task](config, attn_implementation=attn)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not stall on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=sorted(VARIANTS))
def variant(request) -> OPTConfig:
    return tiny_config(**VARIANTS[request.param])


class Env:
    """``monkeypatch.setenv``/``delenv`` that flagopt sees: flagopt reads the environment once
    (``flagopt.settings``), so each change re-reads it; the monkeypatch undoes both."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch

    def setenv(self, name: str, value: str) -> None:
        self._monkeypatch.setenv(name, value)
        self._refresh()

    def delenv(self, name: str, raising: bool = True) -> None:
        self._monkeypatch.delenv(name, raising=raising)
        self._refresh()

    def _refresh(self) -> None:
        self._monkeypatch.setattr(settings, "_current", settings.Settings.from_environ(os.environ))


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Env:
    """Change environment variables for one test, as flagopt's settings see them."""
    return Env(monkeypatch)
