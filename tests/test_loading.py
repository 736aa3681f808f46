"""Checkpoint loading: every OPT layout against transformers (the oracle), broken and hostile
files, meta-device construction, and peak memory.

Checkpoints are written here the way their producers write them: ``save_pretrained`` for
safetensors (transformers 5 can no longer write ``pytorch_model.bin``: ``safe_serialization=False``
is ignored), ``torch.save`` of the reference's state dict for ``.bin`` (single and sharded, the
index written by hand), and metaseq's own names with the fused K,V,Q ``qkv_proj``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flagopt.errors import (CheckpointError, CorruptCheckpointError, MissingWeightsError,
                            ShapeMismatchError, UnsafeCheckpointError, UnsafePathError)
from flagopt.model import loading
from flagopt.model.checkpoint import find_weight_files, iter_tensors, read_index
from flagopt.model.config import OPTConfig
from flagopt.model.decoder import OPTModel
from flagopt.model.heads import (OPTForCausalLM, OPTForQuestionAnswering,
                                 OPTForSequenceClassification)
from flagopt.model.loading import load_pretrained
from flagopt.model.synthetic import write_random_checkpoint

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
            num_attention_heads=4, max_position_embeddings=64)
STYLES = {
    "pre_ln": {},
    "350m": dict(do_layer_norm_before=False, word_embed_proj_dim=16),  # post-LN + projections
}


def tiny_config(**overrides) -> OPTConfig:
    return OPTConfig(**{**TINY, **overrides})


def reference(config: OPTConfig, seed: int = 0):
    """transformers' OPTForCausalLM in fp32 with every tensor random (biases and LNs too)."""
    torch.manual_seed(seed)
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**config.to_dict())).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hf


def hf_state(hf, *, prefix: bool = True, lm_head: bool = True) -> dict[str, torch.Tensor]:
    """The reference's state dict as stored on the hub: ``model.decoder.*`` (125m) or
    ``decoder.*`` (350m), with or without ``lm_head.weight``."""
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    if not lm_head:
        del state["lm_head.weight"]
    if not prefix:
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return state


def metaseq_state(hf, *, output_projection: bool = False) -> dict:
    """Original metaseq names: fused qkv_proj in K, V, Q order, decoder.layer_norm,
    project_in_dim/project_out_dim, decoder.version; wrapped as {"model": ..., "cfg": ...}."""
    state = hf_state(hf, prefix=False, lm_head=output_projection)
    out: dict[str, torch.Tensor] = {}
    for i in range(hf.config.num_hidden_layers):
        attn = f"decoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            out[f"{attn}qkv_proj.{kind}"] = torch.cat(
                [state.pop(f"{attn}{p}_proj.{kind}") for p in ("k", "v", "q")])
    renames = {"decoder.final_layer_norm.": "decoder.layer_norm.",
               "decoder.project_in.": "decoder.project_in_dim.",
               "decoder.project_out.": "decoder.project_out_dim.",
               "lm_head.": "decoder.output_projection."}
    for name, tensor in state.items():
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old):]
        out[name] = tensor
    out["decoder.version"] = torch.tensor([3.0])
    return {"model": out, "cfg": {"model": {"arch": "transformer_lm_gpt"}}}


def write_config(directory: Path, config: OPTConfig) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config.to_json(directory)
    return directory


def write_bin(directory: Path, config: OPTConfig, state: dict, shards: int = 1) -> Path:
    """``pytorch_model.bin``, or N shards plus ``pytorch_model.bin.index.json``."""
    write_config(directory, config)
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return directory
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
             "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return directory


def write_safetensors(directory: Path, config: OPTConfig, state: dict) -> Path:
    write_config(directory, config)
    save_file({k: v.contiguous() for k, v in state.items()},
              directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def ids(bsz: int = 2, t: int = 7, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (bsz, t), generator=torch.Generator().manual_seed(1))


def assert_same_weights(ours: torch.nn.Module, hf, dtype: torch.dtype = torch.float32) -> None:
    reference_state = hf.state_dict()
    for name, param in ours.named_parameters():
        assert param.device.type == "cpu", name
        assert param.dtype == dtype, name
        torch.testing.assert_close(param, reference_state[name].to(dtype), atol=0, rtol=0,
                                   msg=lambda m: f"{name}: {m}")


def assert_logits_match(ours: torch.nn.Module, hf) -> None:
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-5, rtol=0)


# ---- every layout gives the oracle's model ------------------------------------------------------


def _save_pretrained(d: Path, config: OPTConfig, hf) -> None:
    hf.save_pretrained(d)  # transformers' own config.json, model.safetensors without lm_head
    assert (d / "model.safetensors").is_file() and not (d / "pytorch_model.bin").exists()


def _save_pretrained_sharded(d: Path, config: OPTConfig, hf) -> None:
    hf.save_pretrained(d, max_shard_size="20KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


LAYOUTS = {
    "hf_safetensors": _save_pretrained,
    "hf_safetensors_sharded": _save_pretrained_sharded,
    "safetensors_prefix_lm_head": lambda d, c, hf: write_safetensors(d, c, hf_state(hf)),
    "safetensors_no_prefix": lambda d, c, hf: write_safetensors(
        d, c, hf_state(hf, prefix=False, lm_head=False)),
    "bin_prefix_lm_head": lambda d, c, hf: write_bin(d, c, hf_state(hf)),
    "bin_prefix_no_lm_head": lambda d, c, hf: write_bin(d, c, hf_state(hf, lm_head=False)),
    "bin_no_prefix": lambda d, c, hf: write_bin(d, c, hf_state(hf, prefix=False, lm_head=False)),
    "bin_no_prefix_lm_head": lambda d, c, hf: write_bin(d, c, hf_state(hf, prefix=False)),
    "bin_state_dict_tied_storage": lambda d, c, hf: torch.save(  # lm_head shares embed's bytes
        hf.state_dict(), write_config(d, c) / "pytorch_model.bin"),
    "bin_sharded_prefix": lambda d, c, hf: write_bin(d, c, hf_state(hf), shards=3),
    "bin_sharded_no_prefix": lambda d, c, hf: write_bin(
        d, c, hf_state(hf, prefix=False, lm_head=False), shards=3),
    "metaseq": lambda d, c, hf: torch.save(metaseq_state(hf), write_config(d, c) /
                                           "pytorch_model.bin"),
    "metaseq_output_projection": lambda d, c, hf: torch.save(
        metaseq_state(hf, output_projection=True), write_config(d, c) / "pytorch_model.bin"),
}


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_loads_the_reference_model(tmp_path: Path, layout: str, style: str) -> None:
    config = tiny_config(**STYLES[style])
    hf = reference(config)
    LAYOUTS[layout](tmp_path, config, hf)
    model = load_pretrained(tmp_path, dtype=torch.float32)
    assert not model.training
    assert_same_weights(model, hf)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert_logits_match(model, hf)


@pytest.mark.parametrize("sharded", [False, True])
def test_safetensors_preferred_over_bin(tmp_path: Path, sharded: bool) -> None:
    config = tiny_config()
    wanted, other = reference(config, seed=0), reference(config, seed=1)
    assert not torch.equal(wanted.lm_head.weight, other.lm_head.weight)
    if sharded:
        _save_pretrained_sharded(tmp_path, config, wanted)
    else:
        write_safetensors(tmp_path, config, hf_state(wanted))
    torch.save(hf_state(other), tmp_path / "pytorch_model.bin")
    model = load_pretrained(tmp_path)
    assert_same_weights(model, wanted)


def test_synthetic_layouts_hold_the_same_weights(tmp_path: Path) -> None:
    """write_random_checkpoint's layouts (same seed) load to identical models."""
    config = tiny_config(**STYLES["350m"])
    models = {}
    for layout, shards, prefix in (("bin", 1, True), ("bin", 2, False),
                                   ("safetensors", 3, True), ("metaseq", 1, True)):
        d = write_random_checkpoint(tmp_path / f"{layout}{shards}", config, layout=layout,
                                    num_shards=shards, prefix=prefix, dtype=torch.float32,
                                    seed=3, tokenizer=False)
        models[d.name] = load_pretrained(d).state_dict()
    first, *rest = models.values()
    for state in rest:
        assert state.keys() == first.keys()
        for name in first:
            assert torch.equal(state[name], first[name]), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_load_in_half_precision(tmp_path: Path, dtype: torch.dtype, fmt: str) -> None:
    config = tiny_config()
    hf = reference(config)
    (write_bin if fmt == "bin" else write_safetensors)(tmp_path, config, hf_state(hf))
    model = load_pretrained(tmp_path, dtype=dtype)
    assert_same_weights(model, hf, dtype)
    with torch.no_grad():
        assert model(ids()).logits.dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_load_onto_cuda(tmp_path: Path, fmt: str) -> None:
    config = tiny_config()
    hf = reference(config)
    (write_bin if fmt == "bin" else write_safetensors)(tmp_path, config, hf_state(hf))
    model = load_pretrained(tmp_path, dtype=torch.float16, device="cuda")
    for name, p in model.named_parameters():
        assert p.device.type == "cuda" and p.dtype == torch.float16, name
        assert torch.equal(p.cpu(), hf.state_dict()[name].half()), name


def test_half_checkpoint_upcast_to_fp32(tmp_path: Path) -> None:
    config = tiny_config()
    hf = reference(config)
    write_safetensors(tmp_path, config, {k: v.half() for k, v in hf_state(hf).items()})
    model = load_pretrained(tmp_path, dtype=torch.float32)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p, hf.state_dict()[name].half().float()), name


def test_decoder_only_model_loads_from_lm_checkpoint(tmp_path: Path) -> None:
    config = tiny_config(**STYLES["350m"])
    hf = reference(config)
    write_bin(tmp_path, config, hf_state(hf))  # has lm_head.weight, which OPTModel lacks
    model = load_pretrained(tmp_path, OPTModel)
    assert isinstance(model, OPTModel)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state,
                                   hf.model(x).last_hidden_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls,head", [(OPTForSequenceClassification, ["score.weight"]),
                                      (OPTForQuestionAnswering,
                                       ["qa_outputs.bias", "qa_outputs.weight"])])
def test_task_heads_start_fresh_with_one_warning(tmp_path: Path, caplog, cls, head) -> None:
    config = tiny_config()
    hf = reference(config)
    write_bin(tmp_path, config, hf_state(hf))
    with caplog.at_level(logging.WARNING, logger=loading.__name__):
        model = load_pretrained(tmp_path, cls)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    for name in head:
        assert name in warnings[0].getMessage()
    params = dict(model.named_parameters())
    for name in head:
        assert params[name].device.type == "cpu" and torch.isfinite(params[name]).all()
    if "qa_outputs.bias" in head:
        assert torch.equal(params["qa_outputs.bias"], torch.zeros(2))
    assert params[head[-1]].std() > 0  # initialised, not zeros
    reference_state = hf.state_dict()
    for name, p in params.items():
        if name not in head:
            assert torch.equal(p, reference_state[name]), name
    with torch.no_grad():
        model(ids())


@pytest.mark.parametrize("cls,head", [(OPTForSequenceClassification, "score.weight"),
                                      (OPTForQuestionAnswering, "qa_outputs.weight")])
def test_missing_head_is_an_error_without_fresh_heads(tmp_path: Path, cls, head) -> None:
    config = tiny_config()
    write_bin(tmp_path, config, hf_state(reference(config)))
    with pytest.raises(MissingWeightsError, match=head.replace(".", r"\.")):
        load_pretrained(tmp_path, cls, fresh_heads=False)


def test_untied_head_needs_its_own_weights(tmp_path: Path) -> None:
    config = tiny_config().replace(extra={"tie_word_embeddings": False})
    hf = reference(config)
    write_bin(tmp_path, config, hf_state(hf, lm_head=False))
    with pytest.raises(MissingWeightsError, match=r"lm_head\.weight"):
        load_pretrained(tmp_path)
    state = hf_state(hf)
    state["lm_head.weight"] = torch.randn_like(state["lm_head.weight"])
    write_bin(tmp_path, config, state)
    model = load_pretrained(tmp_path)
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])
    assert model.lm_head.weight is not model.model.decoder.embed_tokens.weight


# ---- the reader itself: views, shared storage, dtypes, conversion ----------------------------


def _awkward_state() -> dict[str, torch.Tensor]:
    """Views, shared and strided storages spanning several pages, non-float and empty tensors."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 256, generator=g)  # 64 KiB: madvise has whole pages to drop
    return {"base": base, "rows": base[8:40], "transposed": base.t(), "column": base[:, 3],
            "bf16": torch.randn(4096, generator=g).bfloat16(), "int": torch.arange(5000),
            "bool": torch.arange(9) % 2 == 0, "empty": torch.zeros(0, 4),
            "scalar": torch.tensor(2.5, dtype=torch.float64)}


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_reader_views_and_conversion(tmp_path: Path, fmt: str, dtype) -> None:
    state = _awkward_state()
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path, _use_new_zipfile_serialization=fmt == "zip")
    got = dict(iter_tensors(path, dtype=dtype, keep=lambda name: name != "column"))
    assert list(got) == [n for n in state if n != "column"]
    for name, tensor in got.items():
        want = state[name]
        if dtype is not None and want.is_floating_point():
            want = want.to(dtype)
        assert tensor.dtype == want.dtype and torch.equal(tensor, want), name


def test_reader_safetensors_conversion_and_misaligned_offsets(tmp_path: Path) -> None:
    values = torch.arange(4, dtype=torch.float32)
    header = {"pad": _entry(0, 2, dtype="U8", shape=(2,)), "a": _entry(2, 18, shape=(4,))}
    path = tmp_path / "model.safetensors"
    path.write_bytes(_safetensors_bytes(header, data=b"\1\2" + values.numpy().tobytes()))
    got = dict(iter_tensors(path))
    assert torch.equal(got["a"], values) and got["pad"].tolist() == [1, 2]
    assert dict(iter_tensors(path, dtype=torch.bfloat16))["a"].dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_loading_never_writes_the_checkpoint(tmp_path: Path, fmt: str) -> None:
    """Weights loaded without conversion are views of the mapped file; changing them in place
    must change neither the file nor the next load."""
    config = tiny_config()
    hf = reference(config)
    (write_bin if fmt == "bin" else write_safetensors)(tmp_path, config, hf_state(hf))
    files = {p: p.read_bytes() for p in tmp_path.iterdir()}
    model = load_pretrained(tmp_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    del model
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == files
    assert_same_weights(load_pretrained(tmp_path), hf)


# ---- broken checkpoints: typed errors that name the tensor/file and say what to do ------------


@pytest.fixture
def good_state() -> dict[str, torch.Tensor]:
    return hf_state(reference(tiny_config()))


def test_missing_tensor(tmp_path: Path, good_state) -> None:
    del good_state["model.decoder.layers.1.fc2.bias"]
    write_bin(tmp_path, tiny_config(), good_state)
    with pytest.raises(MissingWeightsError) as err:
        load_pretrained(tmp_path)
    assert "model.decoder.layers.1.fc2.bias" in str(err.value)
    assert "re-download" in str(err.value) and "config.json" in str(err.value)


def test_unexpected_tensor(tmp_path: Path, good_state) -> None:
    good_state["model.decoder.layers.7.fc1.weight"] = torch.zeros(64, 32)
    write_bin(tmp_path, tiny_config(), good_state)
    with pytest.raises(MissingWeightsError, match=r"layers\.7\.fc1\.weight"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_wrong_shape(tmp_path: Path, good_state, fmt: str) -> None:
    good_state["model.decoder.layers.0.fc1.weight"] = torch.zeros(48, 32)
    (write_bin if fmt == "bin" else write_safetensors)(tmp_path, tiny_config(), good_state)
    with pytest.raises(ShapeMismatchError) as err:
        load_pretrained(tmp_path)
    message = str(err.value)
    assert "model.decoder.layers.0.fc1.weight" in message
    assert "(48, 32)" in message and "(64, 32)" in message


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(tmp_path: Path, good_state, fmt: str, keep: float) -> None:
    write = write_bin if fmt == "bin" else write_safetensors
    path = next(write(tmp_path, tiny_config(), good_state).glob(f"*.{fmt}"))
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CorruptCheckpointError) as err:
        load_pretrained(tmp_path)
    assert path.name in str(err.value) and "re-download" in str(err.value)


def test_bin_record_shorter_than_its_tensor(tmp_path: Path, good_state) -> None:
    """A zip whose data record holds fewer bytes than the pickle says: never read past it."""
    path = write_bin(tmp_path, tiny_config(), good_state) / "pytorch_model.bin"
    original = path.with_suffix(".orig")
    path.rename(original)
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[:len(data) // 2] if "/data/0" in
                         info.filename else data)
    original.unlink()
    with pytest.raises(CorruptCheckpointError) as err:
        load_pretrained(tmp_path)
    assert "pytorch_model.bin" in str(err.value) and "re-download" in str(err.value)


HTML = b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head></html>\n"


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.safetensors"])
@pytest.mark.parametrize("page", [HTML, b"\n  <html><body>Access denied</body></html>"])
def test_html_error_page_saved_as_weights(tmp_path: Path, name: str, page: bytes) -> None:
    write_config(tmp_path, tiny_config())
    (tmp_path / name).write_bytes(page)
    with pytest.raises(CorruptCheckpointError) as err:
        load_pretrained(tmp_path)
    assert name in str(err.value) and "re-download" in str(err.value)


def _safetensors_bytes(header: dict | bytes, data: bytes = b"\0" * 64,
                       declared_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared_len is None else declared_len) + raw + data


def _entry(begin, end, dtype="F32", shape=(16,)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


HOSTILE_SAFETENSORS = {
    "header_longer_than_file": _safetensors_bytes({"a": _entry(0, 64)}, declared_len=10_000),
    "header_length_2_60": _safetensors_bytes({"a": _entry(0, 64)}, declared_len=2 ** 60),
    "header_length_all_ones": _safetensors_bytes({"a": _entry(0, 64)}, declared_len=2 ** 64 - 1),
    "shorter_than_length_field": b"\x10\0\0",
    "offsets_beyond_file": _safetensors_bytes({"a": _entry(0, 64 * 1024, shape=(16 * 1024,))}),
    "end_beyond_file": _safetensors_bytes({"a": _entry(32, 96)}),
    "overlapping_offsets": _safetensors_bytes({"a": _entry(0, 64), "b": _entry(32, 96)},
                                              data=b"\0" * 96),
    "same_bytes_twice": _safetensors_bytes({"a": _entry(0, 64), "b": _entry(0, 64)}),
    "negative_offsets": _safetensors_bytes({"a": _entry(-64, 0)}),
    "reversed_offsets": _safetensors_bytes({"a": _entry(64, 0)}),
    "float_offsets": _safetensors_bytes({"a": _entry(0.0, 64.0)}),
    "string_offsets": _safetensors_bytes({"a": _entry("0", "64")}),
    "bool_offsets": _safetensors_bytes({"a": _entry(False, True, dtype="U8", shape=(1,))}),
    "one_offset": _safetensors_bytes({"a": {"dtype": "F32", "shape": [16],
                                            "data_offsets": [0]}}),
    "size_disagrees_with_shape": _safetensors_bytes({"a": _entry(0, 64, shape=(17,))},
                                                    data=b"\0" * 68),
    "negative_shape": _safetensors_bytes({"a": _entry(0, 64, shape=(-16,))}),
    "unknown_dtype": _safetensors_bytes({"a": _entry(0, 64, dtype="F33")}),
    "entry_not_an_object": _safetensors_bytes({"a": [0, 64]}),
    "header_not_an_object": _safetensors_bytes([1, 2, 3]),
    "non_json_header": _safetensors_bytes(b"\xff\xfe this is not json at all"),
    "empty_header": _safetensors_bytes(b""),
    "deeply_nested_header": _safetensors_bytes(b"[" * 100_000 + b"]" * 100_000),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_SAFETENSORS))
def test_hostile_safetensors_header(tmp_path: Path, case: str) -> None:
    write_config(tmp_path, tiny_config())
    path = tmp_path / "model.safetensors"
    path.write_bytes(HOSTILE_SAFETENSORS[case])
    with pytest.raises(CorruptCheckpointError) as err:
        load_pretrained(tmp_path)
    assert "model.safetensors" in str(err.value) and "re-download" in str(err.value)


def test_hostile_header_crafts_are_otherwise_valid(tmp_path: Path) -> None:
    """The cases above fail for the reason named, not for a mistake in the helper."""
    path = tmp_path / "ok.safetensors"
    path.write_bytes(_safetensors_bytes({"a": _entry(0, 64), "__metadata__": {"k": "v"}}))
    [(name, tensor)] = list(iter_tensors(path))
    assert name == "a" and torch.equal(tensor, torch.zeros(16))


@pytest.mark.parametrize("shard", ["../x.bin", "/etc/passwd", "sub/../../x.bin", "..\\x.bin"])
@pytest.mark.parametrize("index", ["pytorch_model.bin.index.json", "model.safetensors.index.json"])
def test_index_shard_outside_directory(tmp_path: Path, shard: str, index: str) -> None:
    d = write_config(tmp_path / "model", tiny_config())
    torch.save({}, tmp_path / "x.bin")  # the escape target exists
    (d / index).write_text(json.dumps({"weight_map": {"model.decoder.embed_tokens.weight": shard}}))
    with pytest.raises(UnsafePathError) as err:
        load_pretrained(d)
    assert repr(shard) in str(err.value)


def test_index_names_missing_shard(tmp_path: Path, good_state) -> None:
    write_bin(tmp_path, tiny_config(), good_state, shards=3)
    (tmp_path / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(MissingWeightsError) as err:
        load_pretrained(tmp_path)
    assert "pytorch_model-00002-of-00003.bin" in str(err.value)
    assert "re-download" in str(err.value)


@pytest.mark.parametrize("text", ['{"weight_map": {', "[1, 2]", '{"weight_map": {}}',
                                  '{"weight_map": {"a": 3}}', '{"metadata": {}}', "\xff"])
def test_malformed_index(tmp_path: Path, text: str) -> None:
    write_config(tmp_path, tiny_config())
    (tmp_path / "pytorch_model.bin.index.json").write_text(text, encoding="latin-1")
    with pytest.raises(CorruptCheckpointError) as err:
        load_pretrained(tmp_path)
    assert "pytorch_model.bin.index.json" in str(err.value)
    assert "re-download" in str(err.value)


def test_no_weights_at_all(tmp_path: Path) -> None:
    write_config(tmp_path, tiny_config())
    (tmp_path / "model.ckpt").write_bytes(b"not a known name")
    with pytest.raises(CheckpointError) as err:
        load_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "model.safetensors" in str(err.value) and "pytorch_model.bin" in str(err.value)


# ---- pickles that carry code are refused and never run ---------------------------------------


class _CreateFile:
    """Unpickling this calls open(marker, "w"), creating the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _System:
    """Unpickling this runs a shell command that creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _payload_files(marker: Path) -> dict:
    weights = {"model.decoder.embed_tokens.weight": torch.zeros(128, 32)}
    return {
        "open_in_state_dict": lambda p: torch.save({**weights, "x": _CreateFile(marker)}, p),
        "system_in_state_dict": lambda p: torch.save({**weights, "x": _System(marker)}, p),
        "system_as_whole_file": lambda p: torch.save(_System(marker), p),
        "metaseq_wrapper": lambda p: torch.save(
            {"model": {**weights, "x": _System(marker)}, "cfg": {}}, p),
        "metaseq_cfg": lambda p: torch.save({"model": weights, "cfg": _CreateFile(marker)}, p),
        "legacy_pickle": lambda p: p.write_bytes(pickle.dumps(
            {"x": _System(marker)}, protocol=2)),
        "legacy_torch_format": lambda p: torch.save(
            {**weights, "x": _System(marker)}, p, _use_new_zipfile_serialization=False),
    }


PAYLOADS = sorted(_payload_files(Path("unused")))


@pytest.mark.parametrize("force_unsafe_env", [False, True])
@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("sharded", [False, True])
def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path, monkeypatch, payload: str,
                                                  force_unsafe_env: bool, sharded: bool) -> None:
    if force_unsafe_env:  # must not turn the explicit weights_only=True off
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "PWNED"
    d = write_config(tmp_path / "model", tiny_config())
    name = "pytorch_model-00001-of-00001.bin" if sharded else "pytorch_model.bin"
    _payload_files(marker)[payload](d / name)
    if sharded:
        (d / "pytorch_model.bin.index.json").write_text(
            json.dumps({"weight_map": {"model.decoder.embed_tokens.weight": name}}))
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError) as err:
        load_pretrained(d)
    assert not marker.exists(), "the pickle's payload ran"
    assert name in str(err.value) and "safetensors" in str(err.value)


def test_payload_marker_would_be_created_by_plain_pickle(tmp_path: Path) -> None:
    """The payloads above are live: unpickling them unsafely does create the marker."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(_CreateFile(marker))).close()
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps(_System(marker)))
    assert marker.exists()


# ---- the model is built on meta: no random weights, and nothing left on meta -----------------


@pytest.mark.parametrize("cls", [OPTForCausalLM, OPTForSequenceClassification, OPTModel])
def test_no_random_init_and_nothing_left_on_meta(tmp_path: Path, monkeypatch, cls) -> None:
    config = tiny_config(**STYLES["350m"])
    write_bin(tmp_path, config, hf_state(reference(config)))
    devices: list[str] = []
    for module in (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm):
        original = module.reset_parameters

        def spy(self, _original=original):
            devices.append(self.weight.device.type)
            return _original(self)
        monkeypatch.setattr(module, "reset_parameters", spy)
    model = load_pretrained(tmp_path, cls)
    # Built on meta with initialisation skipped: no initialiser ever touched a real device.
    assert [d for d in devices if d != "meta"] == [], devices
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.device.type == "cpu", name


# ---- memory: one copy of the weights in the target dtype, never two ---------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import gc, json, resource, sys
    import torch
    from flagopt.model.config import OPTConfig
    from flagopt.model.heads import OPTForCausalLM
    from flagopt.model.loading import load_pretrained

    def peak_rss():
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child of the
        # (large) pytest process starts with the parent's peak and would see no increase.
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))

    # The first module built on meta sets up torch's meta kernels (~70 MB, once per process,
    # whatever the model's size): not the loader's memory, so it happens before the baseline.
    with torch.device("meta"):
        OPTForCausalLM(OPTConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, ffn_dim=8,
                                 num_attention_heads=1, max_position_embeddings=8))
    gc.collect()
    before = peak_rss()
    model = load_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
    for p in model.parameters():  # memory-mapped weights count once they are read
        p.sum()
    print(json.dumps({"peak": peak_rss() - before,
                      "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
                      "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")

# ~30M parameters: 119 MB in fp32, 60 MB in fp16; the largest tensor (embeddings) is 1/7 of it.
_MEMORY_CONFIG = OPTConfig(vocab_size=8192, hidden_size=512, num_hidden_layers=8, ffn_dim=2048,
                           num_attention_heads=8, max_position_embeddings=512)


@pytest.fixture(scope="module")
def memory_checkpoints(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("memory")
    return {(fmt, dtype): write_random_checkpoint(  # with lm_head: the loader must skip it
                root / f"{fmt}-{dtype}", _MEMORY_CONFIG, layout=fmt, lm_head=True,
                dtype=getattr(torch, dtype), tokenizer=False)
            for fmt in ("bin", "safetensors") for dtype in ("float32", "float16")}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's VmHWM")
@pytest.mark.parametrize("stored,target", [("float32", "float32"), ("float16", "float32"),
                                           ("float32", "float16")])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_peak_memory_is_one_copy(memory_checkpoints, fmt: str, stored: str, target: str) -> None:
    run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT,
                          str(memory_checkpoints[fmt, stored]), target],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    weights, peak = report["weights"], report["peak"]
    assert weights == _MEMORY_CONFIG.num_parameters * getattr(torch, target).itemsize
    print(f"{fmt} {stored}->{target}: peak RSS +{peak / 2**20:.0f} MiB for "
          f"{weights / 2**20:.0f} MiB of weights ({peak / weights:.2f}x)")
    # One copy plus one tensor measures 1.01-1.10x here; keeping the mapped source pages of
    # converted tensors (two copies) measured 1.51x (fp16->fp32) and 3.0x (fp32->fp16).
    assert 0.8 * weights < peak < 1.3 * weights, (peak, weights)


# ---- fresh weights: one initialiser, randomness as an argument ---------------------------------


def test_fresh_model_follows_its_generator() -> None:
    config = tiny_config()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = loading.fresh_model(OPTForCausalLM, config, dtype=torch.float32, device="cpu",
                            generator=g())
    b = loading.fresh_model(OPTForCausalLM, config, dtype=torch.bfloat16, device="cpu",
                            generator=g())
    c = loading.fresh_model(OPTForCausalLM, config, dtype=torch.float32, device="cpu",
                            generator=torch.Generator().manual_seed(4))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pb.dtype == torch.bfloat16  # same draws, converted after
        torch.testing.assert_close(pa.bfloat16(), pb, rtol=0, atol=0, msg=name)
    assert not torch.equal(a.model.decoder.embed_tokens.weight,
                           c.model.decoder.embed_tokens.weight)
    embed = a.model.decoder.embed_tokens
    assert torch.equal(embed.weight[config.pad_token_id], torch.zeros(config.hidden_size))
    assert a.lm_head.weight is embed.weight and not a.training
    ln = a.model.decoder.layers[0].final_layer_norm
    assert torch.equal(ln.weight, torch.ones_like(ln.weight)) and not ln.bias.any()


def test_fresh_heads_use_the_same_initialiser(tmp_path: Path) -> None:
    config = tiny_config()
    write_bin(tmp_path, config, hf_state(reference(config)))
    torch.manual_seed(5)
    model = load_pretrained(tmp_path, OPTForQuestionAnswering)
    torch.manual_seed(5)
    fresh = loading.fresh_tensor(model, "qa_outputs.weight", model.qa_outputs.weight.shape,
                                 dtype=torch.float32, device="cpu")
    assert torch.equal(model.qa_outputs.weight, fresh)
    assert not model.qa_outputs.bias.any()


def test_read_index_names_shards_before_they_exist(tmp_path: Path) -> None:
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s-2.bin", "b": "s-1.bin", "c": "s-2.bin"}}))
    assert read_index(index) == ["s-2.bin", "s-1.bin"]  # what the download side fetches
    with pytest.raises(MissingWeightsError, match="s-2.bin, s-1.bin"):
        find_weight_files(tmp_path)  # what the load side needs present
    index.write_text(json.dumps({"weight_map": {"a": "../outside.bin"}}))
    with pytest.raises(UnsafePathError):
        read_index(index)
