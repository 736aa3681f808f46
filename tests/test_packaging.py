"""The project's own promises: README commands, CI, and the library's dependency rules."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    main_job, tests = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert tests in ci, f"{tests!r} is not a line of .ci/run"
    assert tests.startswith("pip install torch==2.13.0 && ")
    assert main_job.startswith("pip install torch==2.13.0 && ")
    assert "flagopt generate --model opt-125m-en" in main_job
    run = "\n".join(ci)
    assert '"$rc" -eq 5' in run  # pytest's "no tests collected" must fail CI


def test_library_never_imports_transformers() -> None:
    pattern = re.compile(r"^\s*(import transformers|from transformers)", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "flagopt").rglob("*.py")
                 if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_pickles_are_only_loaded_weights_only() -> None:
    for path in (ROOT / "flagopt").rglob("*.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if re.search(r"(?<!`)torch\.load\(", line):  # a call, not a ``mention``
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


def test_packaged_data_files_exist() -> None:
    data = ROOT / "flagopt" / "data" / "opt-tokenizer"
    assert (data / "vocab.json").stat().st_size == 898822
    assert (data / "merges.txt").stat().st_size == 456318
    assert (ROOT / "model_zoo" / "registry.json").is_file()
