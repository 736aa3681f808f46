"""Random-weight checkpoints at the real OPT shapes, and their CTranslate2 conversions.

Both are cached under the work directory and reused: a checkpoint is written into
``<name>.incomplete/`` and renamed into place only once complete, with a ``bench-spec.json``
describing what it holds, so an interrupted run never leaves a half-written checkpoint that a
later run would trust. Free disk is checked before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

VOCAB_SIZE = 50272
SPEC_FILE = "bench-spec.json"
_DISK_MARGIN = 512 * 2 ** 20  # bytes kept free beyond the estimate


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: the ``config.json`` fields that differ from OPTConfig's defaults
    and the hub's on-disk layout (key prefix, stored ``lm_head``, number of shards)."""

    config: dict
    num_shards: int = 1
    prefix: bool = True  # keys as model.decoder.* (125m/1.3b/2.7b) or decoder.* (350m/6.7b/13b)
    big: bool = False  # default to the light suite (load, TTFT, a short batch-1 decode)
    extra: dict = field(default_factory=dict)

    @property
    def lm_head(self) -> bool:  # the hub stores lm_head.weight exactly when keys are prefixed
        return self.prefix

    def num_parameters(self) -> int:
        h, f, n = self.config["hidden_size"], self.config["ffn_dim"], \
            self.config["num_hidden_layers"]
        e = self.config.get("word_embed_proj_dim", h)
        per_layer = 4 * h * h + 2 * h * f + 9 * h + f
        total = n * per_layer + VOCAB_SIZE * e + 2050 * h + 2 * h
        return total + (2 * h * e if e != h else 0)

    def position_parameters(self) -> int:
        """Parameters of the learned position table (read one row per token, not all)."""
        return (self.config.get("max_position_embeddings", 2048) + 2) * \
            self.config["hidden_size"]


def _opt(hidden: int, layers: int, ffn: int, heads: int, **kw) -> dict:
    return dict(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
                num_attention_heads=heads, vocab_size=VOCAB_SIZE, **kw)


# The real shapes (REFERENCE.md); "tiny" models exist for --quick and the smoke test.
MODELS: dict[str, ModelSpec] = {
    "opt-125m": ModelSpec(_opt(768, 12, 3072, 12)),
    "opt-350m": ModelSpec(_opt(1024, 24, 4096, 16, word_embed_proj_dim=512,
                               do_layer_norm_before=False), prefix=False),
    "opt-1.3b": ModelSpec(_opt(2048, 24, 8192, 32)),
    "opt-2.7b": ModelSpec(_opt(2560, 32, 10240, 32)),
    "opt-6.7b": ModelSpec(_opt(4096, 32, 16384, 32), num_shards=2, prefix=False, big=True),
    "opt-13b": ModelSpec(_opt(5120, 40, 20480, 40), num_shards=3, prefix=False, big=True),
    "tiny": ModelSpec(_opt(64, 2, 256, 4, max_position_embeddings=1024)),
    # 6.7b/13b's layout (sharded, decoder.* keys, no lm_head) at a tiny size.
    "tiny-sharded": ModelSpec(_opt(64, 2, 256, 4, max_position_embeddings=1024),
                              num_shards=3, prefix=False, big=True),
}
DEFAULT_MODELS = ("opt-125m", "opt-350m", "opt-1.3b")

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "w8a8": 1}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise SystemExit(f"--models: unknown model {name!r}; expected some of {list(MODELS)}")
    return MODELS[name]


def checkpoint_dir(work_dir: Path, name: str, layout: str) -> Path:
    return work_dir / "checkpoints" / f"{name}-{layout}"


def ct2_dir(work_dir: Path, name: str, layout: str, quantization: str) -> Path:
    return work_dir / "ct2" / f"{name}-{layout}-{quantization}"


def checkpoint_bytes(spec: ModelSpec) -> int:
    """fp16 bytes on disk (plus the stored copy of the LM head for prefixed layouts)."""
    head = VOCAB_SIZE * spec.config.get("word_embed_proj_dim", spec.config["hidden_size"])
    return 2 * (spec.num_parameters() + (head if spec.lm_head else 0))


def check_free_disk(directory: Path, needed: int, what: str) -> None:
    """Raise a clear error before writing ``needed`` bytes where there is not room."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed + _DISK_MARGIN:
        raise OSError(f"{what} needs about {needed / 1e9:.1f} GB of free disk under "
                      f"{directory}, but only {free / 1e9:.1f} GB is free; free some space "
                      f"or pass --work-dir on a bigger disk")


def is_complete(directory: Path, expected: dict) -> bool:
    marker = directory / SPEC_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == expected
    except json.JSONDecodeError:
        return False


def _finish(tmp: Path, final: Path, description: dict) -> None:
    (tmp / SPEC_FILE).write_text(json.dumps(description, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def checkpoint_description(name: str, spec: ModelSpec, layout: str) -> dict:
    return {"model": name, "layout": layout, "spec": asdict(spec), "std": 0.02,
            "dtype": "float16", "seed": 0}


def write_checkpoint(name: str, directory: Path, layout: str) -> None:
    """Write the random fp16 checkpoint of ``name`` (in a worker process: it imports torch)."""
    import torch

    from flagopt.model.config import OPTConfig
    from flagopt.model.synthetic import write_random_checkpoint

    spec = model_spec(name)
    tmp = directory.with_name(directory.name + ".incomplete")
    if tmp.exists():
        shutil.rmtree(tmp)
    write_random_checkpoint(tmp, OPTConfig(**spec.config), layout=layout,
                            num_shards=spec.num_shards, prefix=spec.prefix,
                            lm_head=spec.lm_head, dtype=torch.float16, seed=0, std=0.02,
                            tokenizer=True)
    _finish(tmp, directory, checkpoint_description(name, spec, layout))


def convert_ct2(checkpoint: Path, directory: Path, quantization: str) -> None:
    """Convert a checkpoint with CTranslate2's Transformers converter (in a worker process)."""
    import ctranslate2

    tmp = directory.with_name(directory.name + ".incomplete")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    # The checkpoint is fp16: loading it as such halves the converter's memory, loses nothing.
    converter = ctranslate2.converters.TransformersConverter(
        str(checkpoint), load_as_float16=True, low_cpu_mem_usage=True)
    converter.convert(str(tmp), quantization=quantization, force=True)
    _finish(tmp, directory, ct2_description(checkpoint, quantization))


def ct2_description(checkpoint: Path, quantization: str) -> dict:
    source = json.loads((checkpoint / SPEC_FILE).read_text())
    return {"source": source, "quantization": quantization}
