"""Random-weight OPT checkpoints in the real on-disk layouts, written shard by shard.

Tests, the local test hub and the benchmark use these instead of real weights (which cannot be
downloaded here): same file names, key names, shapes and index format as the hub's, so the
real loading and download code runs on them unchanged. A shard is generated, written and freed
before the next, so an opt-13b-shaped checkpoint can be made on a machine with little memory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from flagopt.model.config import OPTConfig
from flagopt.model.heads import OPTForCausalLM

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "data" / "opt-tokenizer"
LAYOUTS = ("bin", "safetensors", "metaseq")


def parameter_shapes(config: OPTConfig) -> dict[str, tuple[int, ...]]:
    """Names (``decoder.*``, no ``model.`` prefix) and shapes of a causal LM's tensors."""
    with torch.device("meta"):
        model = OPTForCausalLM(config)
    return {name[len("model."):]: tuple(p.shape)
            for name, p in model.named_parameters() if name.startswith("model.")}


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator,
                  dtype: torch.dtype, std: float) -> torch.Tensor:
    """LayerNorm weights near 1, biases and others small normal noise."""
    t = torch.randn(shape, generator=generator, dtype=torch.float32) * std
    if "layer_norm.weight" in name:
        t += 1.0
    return t.to(dtype)


def write_random_checkpoint(directory: str | os.PathLike, config: OPTConfig, *,
                            layout: str = "bin", num_shards: int = 1,
                            prefix: bool = True, lm_head: bool = True,
                            dtype: torch.dtype = torch.float16, seed: int = 0,
                            std: float = 0.02, tokenizer: bool = True) -> Path:
    """Write ``config.json``, weights and tokenizer files for a random OPT model.

    Args:
        layout: ``"bin"`` (pytorch_model*.bin), ``"safetensors"`` (model*.safetensors) or
            ``"metaseq"`` (one ``.bin`` with fused K,V,Q ``qkv_proj`` and metaseq names).
        num_shards: more than 1 writes ``-0000N-of-0000M`` shards plus ``*.index.json``.
        prefix: keys as ``model.decoder.*`` (125m/1.3b style) or ``decoder.*`` (350m style).
        lm_head: include ``lm_head.weight`` (a copy of the embeddings; OPT ties them).
    Returns:
        The directory.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.replace(torch_dtype=str(dtype).removeprefix("torch.")).to_json(directory)
    _write_generation_config(directory, config)
    if tokenizer:
        for name in os.listdir(TOKENIZER_DIR):
            shutil.copyfile(TOKENIZER_DIR / name, directory / name)
    shapes = parameter_shapes(config)
    groups = _split(list(shapes), num_shards)
    gen = torch.Generator().manual_seed(seed)
    stem, ext = ("model", "safetensors") if layout == "safetensors" else ("pytorch_model", "bin")
    weight_map: dict[str, str] = {}
    embed = None
    for i, names in enumerate(groups):
        shard = {n: random_tensor(n, shapes[n], gen, dtype, std) for n in names}
        if "decoder.embed_tokens.weight" in shard:
            embed = shard["decoder.embed_tokens.weight"]
        if lm_head and i == len(groups) - 1:
            shard["lm_head.weight"] = embed.clone()
        shard = _rename(shard, layout, prefix)
        file = f"{stem}.{ext}" if num_shards == 1 else \
            f"{stem}-{i + 1:05d}-of-{num_shards:05d}.{ext}"
        _save(shard, directory / file, layout)
        weight_map.update({k: file for k in shard})
        del shard
    if num_shards > 1:
        total = sum(os.path.getsize(directory / f) for f in set(weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return directory


def _split(names: list[str], n: int) -> list[list[str]]:
    if n < 1:
        raise ValueError(f"num_shards={n}; expected >= 1")
    size = -(-len(names) // n)
    return [names[i:i + size] for i in range(0, len(names), size)]


def _rename(shard: dict[str, torch.Tensor], layout: str, prefix: bool
            ) -> dict[str, torch.Tensor]:
    if layout == "metaseq":
        return dict(_metaseq_names(shard))
    if not prefix:
        return shard
    return {(k if k.startswith("lm_head") else "model." + k): v for k, v in shard.items()}


def _metaseq_names(shard: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in shard.items():
        if ".self_attn." in name and name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj"):
            base, proj, kind = name.rsplit(".", 2)
            parts = pending.setdefault(f"{base}.qkv_proj.{kind}", {})
            parts[proj] = t
            if len(parts) == 3:  # metaseq stores K, V, Q
                yield f"{base}.qkv_proj.{kind}", torch.cat(
                    [parts["k_proj"], parts["v_proj"], parts["q_proj"]])
            continue
        name = name.replace("decoder.final_layer_norm.", "decoder.layer_norm.")
        name = name.replace("decoder.project_in.", "decoder.project_in_dim.")
        name = name.replace("decoder.project_out.", "decoder.project_out_dim.")
        name = name.replace("lm_head.", "decoder.output_projection.")
        yield name, t
    if any(len(p) != 3 for p in pending.values()):
        raise ValueError("metaseq layout needs q/k/v of a layer in one shard; use num_shards=1")
    yield "decoder.version", torch.tensor([3.0])


def _save(shard: dict[str, torch.Tensor], path: Path, layout: str) -> None:
    if layout == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in shard.items()}, os.fspath(path),
                  metadata={"format": "pt"})
    elif layout == "metaseq":
        torch.save({"model": shard, "cfg": {"note": "random weights"}}, path)
    else:
        torch.save(shard, path)


def _write_generation_config(directory: Path, config: OPTConfig) -> None:
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
