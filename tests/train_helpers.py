"""Tiny models, a learnable synthetic LM task and a killable training script for the trainer
tests (``python -m tests.train_helpers SAVE_DIR [LOAD_DIR]`` runs ``run_reference_job``)."""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from flagopt.model.config import OPTConfig
from flagopt.model.heads import OPTForCausalLM
from flagopt.train.trainer import Trainer

VOCAB = 32
JOB = dict(max_steps=10, batch_size=4, lr=3e-3, warm_up=2, save_interval=2, seed=7)


def tiny_lm(seed: int = 0, **overrides) -> OPTForCausalLM:
    """A 2-layer OPT with small normal weights (std 0.02, as OPT's init), dropout off unless
    asked for."""
    config = OPTConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                 ffn_dim=64, num_attention_heads=4, max_position_embeddings=32,
                                 dropout=0.0), **overrides})
    torch.manual_seed(seed)
    model = OPTForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" not in name:
                p.normal_(0.0, 0.02)
    return model


def counting_dataset(n: int, length: int = 12, padded: bool = False, seed: int = 0
                     ) -> list[dict[str, torch.Tensor]]:
    """Rows counting up mod VOCAB from a random start (next token = this + 1: learnable);
    ``padded``: random lengths, right padding with attention 0 and labels -100."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = (torch.randint(2, VOCAB, (1,), generator=gen) + torch.arange(length)) % VOCAB
        keep = int(torch.randint(3, length + 1, (1,), generator=gen)) if padded else length
        mask = (torch.arange(length) < keep).long()
        rows.append({"input_ids": torch.where(mask.bool(), ids, 1), "attention_mask": mask,
                     "labels": torch.where(mask.bool(), ids, -100)})
    return rows


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def run_reference_job(save_dir: str, load_dir: str | None = None, delay: float = 0.0) -> dict:
    """The job the SIGKILL test kills and resumes: dropout on, so RNG state must round-trip."""
    torch.set_num_threads(1)
    model = tiny_lm(seed=3, dropout=0.1)
    if delay:
        model.register_forward_pre_hook(lambda *_: time.sleep(delay))
    trainer = Trainer(save_dir=save_dir, load_dir=load_dir, progress=False, **JOB)
    return trainer.train(model, train_dataset=counting_dataset(16, padded=True))


if __name__ == "__main__":
    run_reference_job(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None, delay=0.25)
