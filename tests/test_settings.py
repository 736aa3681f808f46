"""flagopt.settings: every environment variable, parsed once; explicit arguments win."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flagopt import hub, settings
from flagopt.auto_model import flagopt_home, list_models
from flagopt.settings import Settings
from tests.conftest import Env


def test_from_environ_parses_every_variable() -> None:
    assert Settings.from_environ({}) == Settings()
    parsed = Settings.from_environ({
        "FLAGOPT_ENDPOINT": "http://mirror.example", "FLAGOPT_HOME": "~/models",
        "FLAGOPT_OFFLINE": " TRUE ", "FLAGOPT_REGISTRY": os.pathsep.join(["a.json", "", "b.json"]),
        "FLAGOPT_DISABLE_PROGRESS": "yes", "FLAGOPT_SKIP_DISK_CHECK": "on", "HF_TOKEN": "hf_x"})
    assert parsed == Settings(endpoint="http://mirror.example", home=Path("~/models"),
                              offline=True, registry_paths=("a.json", "b.json"),
                              disable_progress=True, skip_disk_check=True, token="hf_x")
    off = Settings.from_environ({"FLAGOPT_OFFLINE": "0", "FLAGOPT_ENDPOINT": "", "HF_TOKEN": ""})
    assert (off.offline, off.endpoint, off.token) == (False, None, None)


def test_read_once_until_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "_current", settings.get())  # restored afterwards
    monkeypatch.delenv("FLAGOPT_OFFLINE", raising=False)
    settings.reload()
    assert not hub.is_offline()
    monkeypatch.setenv("FLAGOPT_OFFLINE", "1")
    assert not hub.is_offline()  # the environment was read at import (here: at reload)
    assert settings.reload().offline and hub.is_offline()


def test_values_reach_their_users(env: Env, tmp_path: Path) -> None:
    env.setenv("FLAGOPT_HOME", str(tmp_path / "models"))
    env.setenv("FLAGOPT_ENDPOINT", "http://mirror.example:1/")
    env.setenv("FLAGOPT_REGISTRY", str(tmp_path / "absent.json"))
    assert flagopt_home() == tmp_path / "models"
    assert hub.get_endpoint() == "http://mirror.example:1"
    assert hub.get_endpoint("https://arg.example") == "https://arg.example"  # argument wins
    with pytest.raises(ValueError, match="absent.json"):
        list_models()


def test_rank_variables_are_read_as_given() -> None:
    parsed = Settings.from_environ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert (parsed.rank, parsed.world_size, parsed.local_rank) == ("1", "2", "0")
    assert Settings.from_environ({"RANK": ""}).rank is None
