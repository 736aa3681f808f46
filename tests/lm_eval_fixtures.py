"""What the lm-eval tests share: local YAML tasks over JSONL, and a tiny hub-layout checkpoint."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import flagopt
from tests.conftest import reference_pair, tiny_config

TOKENIZER_DIR = Path(flagopt.__file__).parent / "data" / "opt-tokenizer"


def write_tasks(root: Path, tasks: Mapping[str, dict], docs: Mapping[str, list]) -> Path:
    """One ``<name>.yaml`` (``dataset_path: json``) and ``<name>.jsonl`` per task in ``root``."""
    for name, spec in tasks.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs[name]), encoding="utf-8")
        lines = [f"task: {name}", "dataset_path: json",
                 f"dataset_kwargs: {json.dumps({'data_files': {'test': str(data)}})}",
                 "test_split: test"]
        lines += [f"{key}: {json.dumps(value)}" for key, value in spec.items()]  # JSON is YAML
        (root / f"{name}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_checkpoint(directory: Path, window: int) -> Path:
    """A tiny random OPT in the hub layout (``save_pretrained``) with the real tokenizer files."""
    hf, _ = reference_pair(tiny_config(vocab_size=50272, max_position_embeddings=window))
    hf.save_pretrained(directory)
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, directory / f.name)
    return directory
