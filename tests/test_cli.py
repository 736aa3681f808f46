"""`flagopt generate` end to end: a served model, downloaded and streamed to stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flagopt.model.loading import load_pretrained
from flagopt.model.synthetic import write_random_checkpoint
from flagopt.predictor import Predictor
from flagopt.tokenizer import OPTTokenizer
from tests.conftest import tiny_config
from tests.hub_server import HubServer

REPO = "test-org/opt-tiny"
# Vocabulary of the real tokenizer so real prompts encode; everything else tiny.
CONFIG = tiny_config(vocab_size=50272, hidden_size=32, max_position_embeddings=128)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hub")
    source = write_random_checkpoint(root / REPO, CONFIG, layout="bin", std=0.5, seed=7)
    with HubServer(root) as server:
        yield server, source


def _run(args: list[str], server: HubServer, tmp_path: Path, stdin: str | None = None,
         **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "FLAGOPT_ENDPOINT": server.endpoint,
               "FLAGOPT_HOME": str(tmp_path / "home"), **env}
    environ.pop("FLAGOPT_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "flagopt.cli", *args], input=stdin,
                          capture_output=True, text=True, env=environ, timeout=300)


def _expected(source: Path, prompt: str, **params) -> str:
    predictor = Predictor(load_pretrained(source), OPTTokenizer.from_dir(source))
    return predictor.predict_generate_greedy(prompt, **params)


def test_generate_a_prompt_from_a_served_model(served, tmp_path: Path) -> None:
    server, source = served
    out = _run(["generate", "--model", REPO, "--max-new-tokens", "8", "--quiet",
                "Hello world"], server, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == _expected(source, "Hello world", out_max_length=8) + "\n"
    assert (tmp_path / "home").exists()  # downloaded into FLAGOPT_HOME


def test_prompts_from_stdin_one_line_each(served, tmp_path: Path) -> None:
    server, source = served
    prompts = ["Paris is the capital of", "The trophy doesn't fit"]
    out = _run(["generate", "--model", REPO, "--max-new-tokens", "5", "--quiet"], server,
               tmp_path, stdin="\n".join(prompts) + "\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [_expected(source, p, out_max_length=5)
                                         for p in prompts]


def test_registry_name_as_in_the_readme(served, tmp_path: Path) -> None:
    """`flagopt generate --model opt-125m-en` against a registry entry pointed at the server."""
    server, source = served
    extra = tmp_path / "extra.json"
    files = sorted(p.name for p in source.iterdir())
    arch = {"num_hidden_layers": CONFIG.num_hidden_layers, "hidden_size": CONFIG.hidden_size,
            "ffn_dim": CONFIG.ffn_dim, "num_attention_heads": CONFIG.num_attention_heads,
            "word_embed_proj_dim": CONFIG.word_embed_proj_dim,
            "do_layer_norm_before": CONFIG.do_layer_norm_before,
            "vocab_size": CONFIG.vocab_size,
            "max_position_embeddings": CONFIG.max_position_embeddings}
    extra.write_text(json.dumps({"format_version": 1, "models": {"opt-125m-en": {
        "repo": REPO, "revision": "main", "files": files, "architecture": arch}}}))
    out = _run(["generate", "--model", "opt-125m-en", "--max-new-tokens", "6", "--beam-size",
                "3", "--quiet", "Hello"], server, tmp_path, FLAGOPT_REGISTRY=str(extra))
    assert out.returncode == 0, out.stderr
    predictor = Predictor(load_pretrained(source), OPTTokenizer.from_dir(source))
    beam = predictor.predict_generate_beamsearch("Hello", out_max_length=6, beam_size=3)
    assert out.stdout == beam + "\n"


def test_sampling_with_a_seed_is_reproducible(served, tmp_path: Path) -> None:
    server, _ = served
    args = ["generate", "--model", REPO, "--max-new-tokens", "6", "--top-k", "20", "--top-p",
            "0.9", "--temperature", "0.8", "--seed", "3", "--quiet", "Once upon a time"]
    first, second = _run(args, server, tmp_path), _run(args, server, tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()


def test_errors_are_one_line_and_exit_non_zero(served, tmp_path: Path) -> None:
    server, _ = served
    bad = _run(["generate", "--model", REPO, "--top-p", "0", "x"], server, tmp_path)
    assert bad.returncode == 1 and "top_p" in bad.stderr and "Traceback" not in bad.stderr
    unknown = _run(["generate", "--model", "opt-126m-en", "x"], server, tmp_path)
    assert unknown.returncode == 1 and "opt-125m-en" in unknown.stderr  # nearest name


def test_strategy_choices_come_from_the_strategy_table(monkeypatch) -> None:
    """``--strategy`` offers exactly the strategies ``strategies.py`` lists, in its order."""
    from dataclasses import replace

    from flagopt import cli
    from flagopt.predictor import strategies

    def choices() -> list[str]:
        gen = cli._parser()._subparsers._group_actions[0].choices["generate"]
        return next(a for a in gen._actions if a.dest == "strategy").choices

    assert list(choices()) == list(strategies.STRATEGIES) == \
        ["greedy", "sample", "beam", "contrastive"]
    monkeypatch.setitem(strategies.STRATEGIES, "greedy-2",
                        replace(strategies.STRATEGIES["greedy"]))
    assert "greedy-2" in choices()
    args = cli._parser().parse_args(["generate", "--strategy", "greedy-2", "x"])
    assert args.strategy == "greedy-2"


def test_cache_dtype_flag(served, tmp_path: Path) -> None:
    server, source = served
    out = _run(["generate", "--model", REPO, "--max-new-tokens", "6", "--dtype", "bfloat16",
                "--cache-dtype", "float32", "--quiet", "Hello world"], server, tmp_path)
    assert out.returncode == 0, out.stderr
    predictor = Predictor(load_pretrained(source, dtype=torch.bfloat16),
                          OPTTokenizer.from_dir(source), cache_dtype=torch.float32)
    assert out.stdout == predictor.predict_generate_greedy("Hello world",
                                                           out_max_length=6) + "\n"
    bad = _run(["generate", "--model", REPO, "--cache-dtype", "int8", "x"], server, tmp_path)
    assert bad.returncode != 0 and "cache-dtype" in bad.stderr


# --- errors, argument checks, the stdin contract ---------------------------------------------


def _no_loading(monkeypatch) -> None:
    """Make any attempt to download or load fail the test."""
    import flagopt.auto_model

    def refuse(*args, **kwargs):
        raise AssertionError("the CLI loaded a model before checking its arguments")

    monkeypatch.setattr(flagopt.auto_model, "AutoLoader", refuse)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flagopt: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("args, named", [
    (["--input-max-length", "0"], "--input-max-length"),
    (["--beam-size", "0"], "--beam-size"),
    (["--beam-size", "3", "--strategy", "sample"], "--beam-size"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "abc"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--strategy", "greedy", "--top-p", "0"], "--top-p"),
    (["--seed", "-1"], "--seed"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--penalty-alpha", "2"], "--penalty-alpha"),
    (["--device", "meta"], "meta"),
    (["--device", "no-such-device"], "no-such-device"),
    (["--dtype", "float64"], "float64"),
])
def test_arguments_are_checked_before_loading(monkeypatch, capsys, args: list[str],
                                              named: str) -> None:
    from flagopt import cli

    _no_loading(monkeypatch)
    code = cli.main(["generate", *args, "x"])
    assert code != 0
    assert named in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("error", [RecursionError("maximum recursion depth exceeded"),
                                   RuntimeError("two\nlines"), KeyError("k")])
def test_any_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys,
                                                             error: Exception) -> None:
    import flagopt.auto_model
    from flagopt import cli

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(flagopt.auto_model, "AutoLoader", fail)
    assert cli.main(["generate", "x"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert type(error).__name__ in line
    assert cli.main(["generate", "--debug", "x"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == line


class _FakePredictor:
    """Writes continuations with newlines, carriage returns and backslashes."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    @staticmethod
    def _text(prompt: str) -> str:
        return f" a\\b\nline two\r\n{prompt}"

    def stream(self, prompt: str, input_max_length: int, **params):
        text = self._text(prompt)
        yield from (text[:4], text[4:])

    def generate(self, prompt: str, input_max_length: int, **params):
        from flagopt.predictor import GeneratedText

        text = GeneratedText(self._text(prompt), False, "length", 3)
        return SimpleNamespace(texts=[text])


def _fake_model(monkeypatch, stdin: bytes) -> None:
    import io

    import flagopt.auto_model
    import flagopt.predictor

    loader = SimpleNamespace(get_model=lambda: None, get_tokenizer=lambda: None)
    monkeypatch.setattr(flagopt.auto_model, "AutoLoader", lambda *a, **k: loader)
    monkeypatch.setattr(flagopt.predictor, "Predictor", _FakePredictor)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))


def _unescape(line: str) -> str:
    return line.replace("\\\\", "\0").replace("\\n", "\n").replace("\\r", "\r") \
        .replace("\0", "\\")


def test_stdin_mode_writes_one_line_per_prompt(monkeypatch, capsys) -> None:
    from flagopt import cli

    _fake_model(monkeypatch, b"first\nsecond \\n\r\nthird\n")
    assert cli.main(["generate"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[-1] == "" and len(lines) == 4
    assert [_unescape(x) for x in lines[:3]] == \
        [_FakePredictor._text(p) for p in ("first", "second \\n", "third")]


def test_jsonl_output_is_one_object_per_prompt(monkeypatch, capsys) -> None:
    from flagopt import cli

    _fake_model(monkeypatch, b"first\nsecond\n")
    assert cli.main(["generate", "--jsonl"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["first", "second"]
    assert [r["text"] for r in rows] == [_FakePredictor._text(p) for p in ("first", "second")]
    assert {r["finish_reason"] for r in rows} == {"length"}


def test_invalid_utf8_names_the_line_and_goes_on(monkeypatch, capsys) -> None:
    from flagopt import cli

    _fake_model(monkeypatch, b"first\nbad \xff\xfe here\nthird\n")
    assert cli.main(["generate"]) == 1  # some prompt failed
    captured = capsys.readouterr()
    lines = captured.out.split("\n")
    assert len(lines) == 4 and lines[1] == ""  # the bad line still has its (empty) line
    assert _unescape(lines[2]) == _FakePredictor._text("third")
    assert "line 2" in _one_error_line(captured.err)


def test_a_closed_pipe_ends_quietly(served, tmp_path: Path) -> None:
    """``flagopt generate < prompts | head -1``: no 'Broken pipe', the exit status of a
    filter killed by SIGPIPE (128 + 13)."""
    server, _ = served
    environ = {**os.environ, "FLAGOPT_ENDPOINT": server.endpoint,
               "FLAGOPT_HOME": str(tmp_path / "home")}
    environ.pop("FLAGOPT_OFFLINE", None)
    proc = subprocess.Popen([sys.executable, "-m", "flagopt.cli", "generate", "--model", REPO,
                             "--max-new-tokens", "3", "--quiet"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ)
    try:
        proc.stdin.write(b"Hello\n")
        proc.stdin.flush()
        assert proc.stdout.readline()  # as head -1 does: one line, then close the pipe
        proc.stdout.close()
        proc.stdin.write(b"More\n" * 3)
        proc.stdin.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=300) == 141, err
    finally:
        proc.kill()
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception" not in err
