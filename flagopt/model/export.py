"""Write a model back out in the hub's layout: ``config.json`` + ``model.safetensors``.

What ``save_pretrained`` in transformers writes for OPT, so the directory loads both here
(``AutoLoader`` by path, ``load_pretrained``) and in transformers' ``from_pretrained``: keys as
the model names them (``model.decoder.*``, ``lm_head.weight``, ``score.weight``,
``qa_outputs.*``), the tied LM head left out (it is the token embedding), fused q/k/v split
back into ``q_proj``/``k_proj``/``v_proj``. Each file is written to a temporary name and
renamed, so a full disk never leaves a half-written file under the real name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file
from torch import nn

from flagopt.errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "tokenizer.json")
_ARCHITECTURES = {"OPTForCausalLM": "OPTForCausalLM",
                  "OPTForSequenceClassification": "OPTForSequenceClassification",
                  "OPTForQuestionAnswering": "OPTForQuestionAnswering",
                  "OPTModel": "OPTModel"}


def hub_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under the hub's names, contiguous and on the CPU.

    Raises:
        CheckpointError: the model holds int8 weights (a quantized model is not a
            checkpoint: save the float model, or train LoRA adapters over it) or LoRA
            layers that are not merged.
    """
    tied = bool(getattr(model, "tied", False))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if tensor.dtype == torch.int8 or name.endswith(".scale"):
            raise CheckpointError(f"{name} is int8: a quantized model cannot be saved as a "
                                  f"checkpoint; save the float model instead")
        if ".lora_" in name or ".base_layer." in name:
            raise CheckpointError(f"{name} is a LoRA tensor: merge the adapter first, or "
                                  f"save it as an adapter")
        if ".qkv_proj." in name:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                out[name.replace("qkv_proj", part)] = chunk.detach().cpu().contiguous()
            continue
        out[name] = tensor.detach().cpu().contiguous()
    return out


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *,
                    tokenizer_dir: str | os.PathLike | None = None,
                    config_updates: dict | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and (from ``tokenizer_dir``) the
    tokenizer files into ``directory``; returns it.

    ``config_updates`` adds config keys (e.g. ``id2label`` / ``label2id``) that transformers
    reads; ``architectures`` names the model's class.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hub_state_dict(model)
    config = model.config.to_dict()
    config["architectures"] = [_ARCHITECTURES.get(type(model).__name__, type(model).__name__)]
    if tensors:
        config["torch_dtype"] = str(next(iter(tensors.values())).dtype).replace("torch.", "")
    config.update(config_updates or {})
    _atomic(directory / WEIGHTS_NAME,
            lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic(directory / "config.json",
            lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8"))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, directory)
    return directory


def copy_tokenizer_files(source: str | os.PathLike, directory: str | os.PathLike,
                         names: Iterable[str] = TOKENIZER_FILES) -> None:
    """Copy the tokenizer files ``source`` has into ``directory`` (vocab and merges must
    be there: a model directory without them does not load)."""
    source, directory = Path(source), Path(directory)
    for required in ("vocab.json", "merges.txt"):
        if not (source / required).is_file():
            raise CheckpointError(f"{source} has no {required}; expected the tokenizer files "
                                  f"beside the model")
    for name in names:
        if (source / name).is_file() and (source / name).resolve() != \
                (directory / name).resolve():
            _atomic(directory / name, lambda tmp, n=name: shutil.copyfile(source / n, tmp))


def _atomic(path: Path, write) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it over
    ``path``; on any error the temporary file goes and ``path`` is untouched."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
