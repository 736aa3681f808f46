"""Saving a model in the hub layout: it loads back here and in transformers, same logits."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from tests.conftest import VARIANTS, reference_pair, tiny_config
from flagopt.errors import CheckpointError
from flagopt.model import export
from flagopt.model.loading import load_pretrained
from flagopt.model.heads import TASK_CLASSES
from flagopt.model.synthetic import TOKENIZER_DIR


@pytest.mark.parametrize("task", ["lm", "classification", "qa"])
@pytest.mark.parametrize("name", ["pre_ln", "350m_style"])
def test_round_trip_here_and_in_transformers(tmp_path, task, name, one_thread):
    import transformers

    config = tiny_config(**VARIANTS[name], num_labels=3)
    hf, ours = reference_pair(config, task)
    labels = {"id2label": {"0": "a", "1": "b", "2": "c"}, "label2id": {"a": 0, "b": 1, "c": 2}}
    export.save_pretrained(ours, tmp_path, tokenizer_dir=TOKENIZER_DIR, config_updates=labels)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [type(ours).__name__] and saved["id2label"]["2"] == "c"
    ids = torch.randint(4, config.vocab_size, (2, 7))
    back = load_pretrained(tmp_path, TASK_CLASSES[task], fresh_heads=False)
    hf_cls = {"lm": transformers.OPTForCausalLM,
              "classification": transformers.OPTForSequenceClassification,
              "qa": transformers.OPTForQuestionAnswering}[task]
    theirs = hf_cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        want = ours(input_ids=ids)
        for other in (back(input_ids=ids), theirs(input_ids=ids)):
            for key in ("logits",) if task != "qa" else ("start_logits", "end_logits"):
                torch.testing.assert_close(other[key], want[key], rtol=0, atol=1e-6)
    if task == "lm":
        assert "lm_head.weight" not in export.hub_state_dict(ours)  # tied: stored once


def test_fused_qkv_is_split_back(tmp_path, one_thread):
    _, ours = reference_pair(tiny_config())
    ids = torch.randint(4, 128, (1, 5))
    with torch.no_grad():
        want = ours(input_ids=ids).logits
    ours.fuse_qkv()
    export.save_pretrained(ours, tmp_path)
    with torch.no_grad():
        got = load_pretrained(tmp_path)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_int8_model_is_refused(tmp_path):
    from flagopt.model.synthetic import write_random_checkpoint

    source = write_random_checkpoint(tmp_path / "src", tiny_config())
    model = load_pretrained(source, quantize="int8")
    with pytest.raises(CheckpointError, match="int8"):
        export.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out" / export.WEIGHTS_NAME).exists()


def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    _, ours = reference_pair(tiny_config())
    export.save_pretrained(ours, tmp_path)
    before = (tmp_path / export.WEIGHTS_NAME).read_bytes()

    def full(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_file", full)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match="No space"):
        export.save_pretrained(ours, tmp_path)
    assert (tmp_path / export.WEIGHTS_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_tokenizer_files_required(tmp_path):
    _, ours = reference_pair(tiny_config())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="vocab.json"):
        export.save_pretrained(ours, tmp_path / "out", tokenizer_dir=tmp_path / "empty")
