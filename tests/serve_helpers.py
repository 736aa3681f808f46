"""A tiny random OPT with the real vocabulary, for the server's tests."""

from __future__ import annotations

import torch

from flagopt.model.heads import OPTForCausalLM
from tests.conftest import tiny_config

EOS = 2
POSITIONS = 96


def tiny_lm(seed: int = 0, eos_scale: float = 2.0) -> OPTForCausalLM:
    """Random weights with OPT's vocabulary; EOS made likelier so some requests end on it."""
    torch.manual_seed(seed)
    model = OPTForCausalLM(tiny_config(vocab_size=50272, max_position_embeddings=POSITIONS,
                                       init_std=0.3)).eval()
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight[EOS] *= eos_scale  # tied: the EOS logit too
    return model


def prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts of mixed lengths (1 to ~20 words)."""
    words = ("the cat sat on a mat while rain fell over old town hills and every bird "
             "sang its song to café owners naïve about 日本 weather").split()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 20, (1,), generator=g))
        idx = torch.randint(0, len(words), (k,), generator=g).tolist()
        out.append(" ".join(words[i] for i in idx))
    return out
