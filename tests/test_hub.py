"""flagopt.hub against a real HTTP hub + CDN on loopback (tests/hub_server.py), no mocks of
requests: resume, verification, retries, redirects, locking, disk space, offline mode."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
import requests

from flagopt import hub
from flagopt.errors import (
    AccessDeniedError,
    ChecksumError,
    DownloadError,
    EntryNotFoundError,
    HTTPStatusError,
    HubUnreachableError,
    InsufficientDiskSpaceError,
    LockTimeoutError,
    OfflineError,
    StalledDownloadError,
    UnsafePathError,
    UnsafeURLError,
)
from tests.conftest import Env
from tests.hub_server import (  # noqa: F401 - hub_server_fixture provides `hub_server`
    FAKE_COMMIT,
    HubServer,
    git_blob_sha1,
    hub_server_fixture,
    wait_for,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO = "org/tiny-opt"
WEIGHTS = "pytorch_model.bin"
CONFIG = "config.json"
FAST = dict(progress=False, max_retries=3, retry_base_delay=0.001, retry_max_delay=0.01)

CHILD = """
import sys
from flagopt.hub import download_file
download_file(sys.argv[1], sys.argv[2], progress=False, stall_timeout=60.0, lock_timeout=60.0,
              retry_base_delay=0.01)
"""


def _bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def _clean_env(env: Env) -> None:
    for name in ("FLAGOPT_ENDPOINT", "FLAGOPT_OFFLINE", "FLAGOPT_DISABLE_PROGRESS",
                 "FLAGOPT_SKIP_DISK_CHECK", "HF_TOKEN"):
        env.delenv(name, raising=False)


@pytest.fixture
def weights(hub_server: HubServer) -> bytes:
    data = _bytes(256 * 1024)
    hub_server.add_file(REPO, WEIGHTS, data)
    return data


@pytest.fixture
def config(hub_server: HubServer) -> bytes:
    data = b'{"model_type": "opt", "hidden_size": 32}\n'
    hub_server.add_file(REPO, CONFIG, data)
    return data


def _cdn_gets(server: HubServer) -> list:
    return [r for r in server.requests if r.server == "cdn" and r.method == "GET"]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()
                  if p.name.endswith((".incomplete", ".lock")))


def _spawn(url: str, dest: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-c", CHILD, url, str(dest)], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# --- URLs and metadata ----------------------------------------------------------------------


def test_hub_url_quotes_each_part() -> None:
    url = hub.hub_url("https://hub.example/", "org/repo", "refs/pr/1", "sub dir/f#1.bin")
    assert url == "https://hub.example/org/repo/resolve/refs%2Fpr%2F1/sub%20dir/f%231.bin"


@pytest.mark.parametrize("endpoint", ["file:///etc", "ftp://hub.example", "hub.example",
                                      "javascript:alert(1)", "http://"])
def test_non_http_endpoint_refused(endpoint: str, env: Env) -> None:
    with pytest.raises(UnsafeURLError, match="refusing endpoint"):
        hub.get_endpoint(endpoint)
    env.setenv("FLAGOPT_ENDPOINT", endpoint)
    with pytest.raises(UnsafeURLError):
        hub.get_endpoint()


def test_endpoint_precedence(env: Env) -> None:
    assert hub.get_endpoint() == hub.DEFAULT_ENDPOINT
    env.setenv("FLAGOPT_ENDPOINT", "http://mirror.example:8080/")
    assert hub.get_endpoint() == "http://mirror.example:8080"
    assert hub.get_endpoint("https://arg.example") == "https://arg.example"


def test_download_file_refuses_non_http_url(tmp_path: Path) -> None:
    with pytest.raises(UnsafeURLError, match="file:///etc/passwd"):
        hub.download_file("file:///etc/passwd", tmp_path / "x", progress=False)


def test_metadata_of_lfs_and_small_files(hub_server: HubServer, weights: bytes,
                                         config: bytes) -> None:
    big = hub.get_file_metadata(hub_server.url(REPO, WEIGHTS))
    assert (big.size, big.sha256, big.git_sha1) == (len(weights), _sha(weights), None)
    assert big.commit == FAKE_COMMIT and big.url.startswith(hub_server.cdn_endpoint)
    small = hub.get_file_metadata(hub_server.url(REPO, CONFIG))
    assert (small.size, small.sha256, small.git_sha1) == (len(config), None, git_blob_sha1(config))
    assert all(r.server == "hub" and r.method == "HEAD" for r in hub_server.requests)


# --- happy path, cache hits, offline ----------------------------------------------------------


def test_first_download_verified_second_call_makes_no_request(
        hub_server: HubServer, weights: bytes, config: bytes, tmp_path: Path) -> None:
    out = tmp_path / "models" / "tiny"
    paths = hub.download_repo_files(REPO, [CONFIG, WEIGHTS], out, endpoint=hub_server.endpoint,
                                    progress=False)
    assert paths == [out / CONFIG, out / WEIGHTS]
    assert _sha(paths[1].read_bytes()) == _sha(weights) and paths[0].read_bytes() == config
    assert _leftovers(out) == []
    hub_server.clear_requests()
    again = hub.download_repo_files(REPO, [CONFIG, WEIGHTS], out, endpoint=hub_server.endpoint,
                                    progress=False)
    assert again == paths and hub_server.requests == []


def test_download_by_commit_revision(hub_server: HubServer, weights: bytes,
                                     tmp_path: Path) -> None:
    (path,) = hub.download_repo_files(REPO, [WEIGHTS], tmp_path, endpoint=hub_server.endpoint,
                                      revision=FAKE_COMMIT, progress=False)
    assert _sha(path.read_bytes()) == _sha(weights)


def test_registry_checksums_skip_the_head_request(hub_server: HubServer, weights: bytes,
                                                  tmp_path: Path) -> None:
    expected = {WEIGHTS: {"size": len(weights), "sha256": _sha(weights)}}
    hub.download_repo_files(REPO, [WEIGHTS], tmp_path, endpoint=hub_server.endpoint,
                            expected=expected, progress=False)
    assert [r.method for r in hub_server.requests] == ["GET", "GET"]


def test_registry_disagreeing_with_server_fails_before_get(hub_server: HubServer,
                                                           weights: bytes, tmp_path: Path) -> None:
    with pytest.raises(ChecksumError, match=f"expected sha256 {'0' * 64}.*{_sha(weights)}"):
        hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS,
                          expected_sha256="0" * 64, **FAST)
    assert [r.method for r in hub_server.requests] == ["HEAD"]
    assert not (tmp_path / WEIGHTS).exists()


@pytest.mark.parametrize("via_env", [False, True])
def test_offline_names_exactly_the_missing_files(hub_server: HubServer, tmp_path: Path,
                                                 env: Env,
                                                 via_env: bool) -> None:
    (tmp_path / CONFIG).write_text("{}")
    if via_env:
        env.setenv("FLAGOPT_OFFLINE", "1")
    with pytest.raises(OfflineError) as info:
        hub.download_repo_files(REPO, [CONFIG, WEIGHTS, "vocab.json"], tmp_path,
                                endpoint=hub_server.endpoint, offline=not via_env)
    message = str(info.value)
    assert "2 file(s)" in message and f"{WEIGHTS}, vocab.json" in message
    assert CONFIG not in message.replace(str(tmp_path), "")
    assert hub_server.requests == []
    assert hub.download_repo_files(REPO, [CONFIG], tmp_path, offline=True) == [tmp_path / CONFIG]


@pytest.mark.parametrize("name", ["../escape.bin", "/etc/passwd", "a/../../b.bin", "a\\..\\b"])
def test_escaping_file_names_refused(hub_server: HubServer, tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafePathError):
        hub.download_repo_files(REPO, [name], tmp_path / "m", endpoint=hub_server.endpoint)
    assert hub_server.requests == []


def test_hf_token_from_env_goes_to_the_hub(hub_server: HubServer, config: bytes, tmp_path: Path,
                                           env: Env) -> None:
    env.setenv("HF_TOKEN", "hf_env_token")
    hub.download_repo_files(REPO, [CONFIG], tmp_path, endpoint=hub_server.endpoint,
                            progress=False)
    assert {r.header("Authorization") for r in hub_server.requests} == {"Bearer hf_env_token"}


def test_user_agent(hub_server: HubServer, config: bytes, tmp_path: Path) -> None:
    hub.download_file(hub_server.url(REPO, CONFIG), tmp_path / CONFIG, progress=False)
    from flagopt.version import __version__

    assert {r.header("User-Agent") for r in hub_server.requests} == {f"flagopt/{__version__}"}


# --- progress -------------------------------------------------------------------------------


def test_progress_bar_shown_and_silenced(hub_server: HubServer, weights: bytes, tmp_path: Path,
                                         capsys: pytest.CaptureFixture,
                                         env: Env) -> None:
    url = hub_server.url(REPO, WEIGHTS)
    hub.download_file(url, tmp_path / "a" / WEIGHTS, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and WEIGHTS in err and "B/s" in err and "256k" in err
    hub.download_file(url, tmp_path / "b" / WEIGHTS, progress=False)
    env.setenv("FLAGOPT_DISABLE_PROGRESS", "1")
    hub.download_file(url, tmp_path / "c" / WEIGHTS, progress=True)
    assert capsys.readouterr() == ("", "")


# --- resume ---------------------------------------------------------------------------------


def test_resume_after_cut_connection(hub_server: HubServer, weights: bytes,
                                     tmp_path: Path) -> None:
    hub_server.faults.add(WEIGHTS, "cut_after", server="cdn", nbytes=100_000)
    path = hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS, **FAST)
    assert _sha(path.read_bytes()) == _sha(weights)
    first, second = _cdn_gets(hub_server)
    assert first.header("Range") is None and first.status == 200
    assert second.header("Range") == "bytes=100000-" and second.status == 206
    assert _leftovers(tmp_path) == []


def test_resume_after_short_body(hub_server: HubServer, weights: bytes, tmp_path: Path) -> None:
    hub_server.faults.add(WEIGHTS, "short_body", server="cdn", missing=1000)
    path = hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS, **FAST)
    assert _sha(path.read_bytes()) == _sha(weights)
    gets = _cdn_gets(hub_server)
    assert len(gets) == 2 and gets[1].header("Range") == f"bytes={len(weights) - 1000}-"


def test_small_file_resumes_and_passes_git_sha1(hub_server: HubServer, config: bytes,
                                                tmp_path: Path) -> None:
    hub_server.faults.add(CONFIG, "cut_after", server="hub", nbytes=10)
    path = hub.download_file(hub_server.url(REPO, CONFIG), tmp_path / CONFIG, **FAST)
    assert path.read_bytes() == config
    gets = [r for r in hub_server.requests if r.method == "GET"]
    assert [(g.header("Range"), g.status) for g in gets] == [(None, 200), ("bytes=10-", 206)]


def test_server_ignoring_range_starts_over(hub_server: HubServer, weights: bytes,
                                           tmp_path: Path) -> None:
    (tmp_path / (WEIGHTS + ".incomplete")).write_bytes(weights[:50_000])
    hub_server.faults.add(WEIGHTS, "ignore_range", server="cdn")
    path = hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS, **FAST)
    assert _sha(path.read_bytes()) == _sha(weights)
    (get,) = _cdn_gets(hub_server)
    assert get.header("Range") == "bytes=50000-" and get.status == 200


def test_corrupt_partial_is_rehashed_and_redownloaded(hub_server: HubServer, weights: bytes,
                                                      tmp_path: Path) -> None:
    (tmp_path / (WEIGHTS + ".incomplete")).write_bytes(b"\0" * 50_000)  # wrong bytes
    path = hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS, **FAST)
    assert _sha(path.read_bytes()) == _sha(weights)
    ranges = [r.header("Range") for r in _cdn_gets(hub_server)]
    assert ranges == ["bytes=50000-", None]


def test_killed_client_process_resumes(hub_server: HubServer, tmp_path: Path) -> None:
    data = _bytes(512 * 1024, seed=3)
    hub_server.add_file(REPO, WEIGHTS, data)
    hub_server.faults.add(WEIGHTS, "drip", server="cdn", after=160 * 1024, step=1024,
                          interval=0.05)
    dest = tmp_path / WEIGHTS
    partial, lock = tmp_path / (WEIGHTS + ".incomplete"), tmp_path / (WEIGHTS + ".lock")
    child = _spawn(hub_server.url(REPO, WEIGHTS), dest)
    try:
        assert wait_for(lambda: partial.exists() and partial.stat().st_size >= 64 * 1024, 30)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL and lock.exists() and not dest.exists()
    kept = partial.stat().st_size
    path = hub.download_file(hub_server.url(REPO, WEIGHTS), dest, lock_timeout=5, **FAST)
    assert _sha(path.read_bytes()) == _sha(data)
    assert _cdn_gets(hub_server)[-1].header("Range") == f"bytes={kept}-"
    assert _leftovers(tmp_path) == []


# --- verification ---------------------------------------------------------------------------


def test_corrupt_byte_detected_and_retried(hub_server: HubServer, weights: bytes,
                                           tmp_path: Path) -> None:
    hub_server.faults.add(WEIGHTS, "corrupt_byte", server="cdn")
    path = hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS, **FAST)
    assert _sha(path.read_bytes()) == _sha(weights)
    assert [r.header("Range") for r in _cdn_gets(hub_server)] == [None, None]


def test_corrupt_forever_raises_checksum_error(hub_server: HubServer, weights: bytes,
                                               tmp_path: Path) -> None:
    hub_server.faults.add(WEIGHTS, "corrupt_byte", count=None, server="cdn")
    dest = tmp_path / WEIGHTS
    with pytest.raises(ChecksumError) as info:
        hub.download_file(hub_server.url(REPO, WEIGHTS), dest, **{**FAST, "max_retries": 2})
    message = str(info.value)
    assert str(dest) in message and f"expected {_sha(weights)}, got " in message
    assert "gave up after 3 attempts" in message
    assert len(_cdn_gets(hub_server)) == 3
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_small_file_checked_against_git_blob_sha1(hub_server: HubServer, config: bytes,
                                                  tmp_path: Path) -> None:
    hub_server.faults.add(CONFIG, "corrupt_byte", count=None, server="hub")
    with pytest.raises(ChecksumError, match=f"git blob sha1 mismatch: expected "
                                            f"{git_blob_sha1(config)}"):
        hub.download_file(hub_server.url(REPO, CONFIG), tmp_path / CONFIG,
                          **{**FAST, "max_retries": 1})
    assert not (tmp_path / CONFIG).exists() and _leftovers(tmp_path) == []


def test_registry_sha256_checked_when_head_is_skipped(hub_server: HubServer, weights: bytes,
                                                      tmp_path: Path) -> None:
    wrong = "ab" * 32
    with pytest.raises(ChecksumError, match=f"expected {wrong}, got {_sha(weights)}"):
        hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS,
                          expected_sha256=wrong, expected_size=len(weights),
                          **{**FAST, "max_retries": 1})
    assert not (tmp_path / WEIGHTS).exists() and _leftovers(tmp_path) == []


# --- stalls, statuses, retries --------------------------------------------------------------


def test_dripping_server_is_cut_off(hub_server: HubServer, weights: bytes,
                                    tmp_path: Path) -> None:
    hub_server.faults.add(WEIGHTS, "drip", count=None, server="cdn", step=1, interval=0.05)
    start = time.monotonic()
    with pytest.raises(StalledDownloadError, match="stalled") as info:
        hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS, stall_timeout=0.3,
                          stall_min_bytes=1024, **{**FAST, "max_retries": 1})
    assert time.monotonic() - start < 20  # did not hang on the drip
    assert hub_server.cdn_endpoint in str(info.value)
    assert len(_cdn_gets(hub_server)) == 2 and not (tmp_path / WEIGHTS).exists()


def test_silent_server_hits_the_read_timeout(hub_server: HubServer, weights: bytes,
                                             tmp_path: Path) -> None:
    hub_server.faults.add(WEIGHTS, "drip", count=None, server="cdn", interval=30)
    with pytest.raises(StalledDownloadError, match="no data for 0.3s"):
        hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS, read_timeout=0.3,
                          **{**FAST, "max_retries": 1})
    assert len(_cdn_gets(hub_server)) == 2


def test_404_raises_entry_not_found_without_retry(hub_server: HubServer, tmp_path: Path) -> None:
    url = hub_server.url(REPO, "missing.bin")
    with pytest.raises(EntryNotFoundError, match="404") as info:
        hub.download_file(url, tmp_path / "missing.bin", **FAST)
    assert info.value.status == 404 and url in str(info.value)
    assert len(hub_server.requests) == 1
    assert _leftovers(tmp_path) == [] and not (tmp_path / "missing.bin").exists()


@pytest.mark.parametrize("code", [401, 403])
def test_access_denied_without_retry(hub_server: HubServer, weights: bytes, tmp_path: Path,
                                     code: int) -> None:
    hub_server.faults.add(WEIGHTS, "status", count=None, code=code)
    with pytest.raises(AccessDeniedError, match="HF_TOKEN") as info:
        hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS, **FAST)
    assert info.value.status == code and len(hub_server.requests) == 1


@pytest.mark.parametrize("retry_after,cap,expected", [(2, 60.0, 2.0), (1000, 0.5, 0.5)])
def test_429_retry_after_honoured(hub_server: HubServer, weights: bytes, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, retry_after: int, cap: float,
                                  expected: float) -> None:
    delays: list[float] = []
    monkeypatch.setattr(hub, "_sleep", delays.append)
    hub_server.faults.add(WEIGHTS, "status", server="cdn", code=429, retry_after=retry_after)
    path = hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS,
                             max_retry_after=cap, **FAST)
    assert _sha(path.read_bytes()) == _sha(weights)
    assert delays == [expected]
    assert [r.status for r in _cdn_gets(hub_server)] == [429, 200]


def test_500_retried_then_succeeds(hub_server: HubServer, weights: bytes, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []
    monkeypatch.setattr(hub, "_sleep", delays.append)
    hub_server.faults.add(WEIGHTS, "status", count=2, server="hub", code=500)
    path = hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS,
                             **{**FAST, "retry_base_delay": 1.0, "retry_max_delay": 1.5})
    assert _sha(path.read_bytes()) == _sha(weights)
    assert [r.status for r in hub_server.requests if r.server == "hub"] == [500, 500, 302, 302]
    assert len(delays) == 2 and 0.5 <= delays[0] <= 1.0 and 0.75 <= delays[1] <= 1.5


@pytest.mark.parametrize("code", [500, 503])
def test_5xx_forever_raises_http_status_error(hub_server: HubServer, weights: bytes,
                                              tmp_path: Path, code: int) -> None:
    hub_server.faults.add(WEIGHTS, "status", count=None, server="cdn", code=code)
    url = hub_server.url(REPO, WEIGHTS)
    with pytest.raises(HTTPStatusError) as info:
        hub.download_file(url, tmp_path / WEIGHTS, **FAST)
    assert info.value.status == code and info.value.url == url
    assert url in str(info.value) and f"HTTP {code}" in str(info.value)
    assert len(_cdn_gets(hub_server)) == FAST["max_retries"] + 1
    assert not (tmp_path / WEIGHTS).exists()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _CountingResolver:
    """Stands in for ``socket.getaddrinfo``: counts connection attempts (urllib3 resolves
    once per connection, even for an IP literal) and fails them with ``gaierror`` if asked."""

    def __init__(self, fail: bool) -> None:
        self.calls, self.fail, self._real = 0, fail, socket.getaddrinfo

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self._real(*args, **kwargs)


def _ways_out(message: str, directory: Path) -> None:
    assert "\n" not in message
    assert "check the network" in message and "FLAGOPT_ENDPOINT" in message
    assert f"FLAGOPT_OFFLINE=1 with the model's files in {directory}" in message


def test_connection_refused_one_quick_retry_then_the_ways_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = _closed_port()
    resolver, delays = _CountingResolver(fail=False), []
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    monkeypatch.setattr(hub, "_sleep", delays.append)
    url = f"http://127.0.0.1:{port}/{REPO}/resolve/main/{WEIGHTS}"
    with pytest.raises(HubUnreachableError, match=f"127.0.0.1:{port}") as info:
        hub.download_file(url, tmp_path / WEIGHTS, **{**FAST, "retry_base_delay": 1.0})
    assert isinstance(info.value, DownloadError) and not isinstance(info.value, HTTPStatusError)
    assert resolver.calls == 2 and len(delays) == 1 and delays[0] <= 1.0  # one quick retry
    assert info.value.host == f"127.0.0.1:{port}" and "refused" in str(info.value)
    assert "2 attempts" in str(info.value)
    _ways_out(str(info.value), tmp_path)
    assert not (tmp_path / WEIGHTS).exists()


def test_dns_failure_one_quick_retry_then_the_ways_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    resolver, delays = _CountingResolver(fail=True), []
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    monkeypatch.setattr(hub, "_sleep", delays.append)
    url = f"https://hub.example.invalid/{REPO}/resolve/main/{WEIGHTS}"
    with pytest.raises(HubUnreachableError, match="cannot reach hub.example.invalid ") as info:
        hub.download_file(url, tmp_path / "sub" / WEIGHTS, progress=False)  # default retries
    assert resolver.calls == 2 and len(delays) == 1 and delays[0] <= 1.0
    assert "does not resolve" in str(info.value)
    _ways_out(str(info.value), tmp_path / "sub")


def test_metadata_of_an_unreachable_host_is_one_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = _CountingResolver(fail=True)
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    with pytest.raises(HubUnreachableError, match="FLAGOPT_ENDPOINT"):
        hub.get_file_metadata(f"https://hub.example.invalid/{REPO}/resolve/main/{WEIGHTS}")
    assert resolver.calls == 1


def test_refusals_after_the_host_answered_keep_the_full_retries(
        hub_server: HubServer, weights: bytes, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Bytes arrived, then the server went away: a transient failure mid-download, not an
    # unreachable hub, so the bounded retries apply and the partial file is kept for a resume.
    hub_server.faults.add(WEIGHTS, "cut_after", server="cdn", nbytes=100_000)
    delays = []

    def stop_then_wait(delay: float) -> None:
        delays.append(delay)
        if len(delays) == 1:
            hub_server.stop()

    monkeypatch.setattr(hub, "_sleep", stop_then_wait)
    with pytest.raises(DownloadError, match="gave up after") as info:
        hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS, **FAST)
    assert len(delays) == FAST["max_retries"]
    assert "refused" in str(info.value)
    assert (tmp_path / (WEIGHTS + ".incomplete")).stat().st_size == 100_000


# --- redirects and credentials ----------------------------------------------------------------


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x"])
@pytest.mark.parametrize("skip_head", [False, True])
def test_non_http_redirect_refused(hub_server: HubServer, weights: bytes, tmp_path: Path,
                                   location: str, skip_head: bool) -> None:
    hub_server.faults.add(WEIGHTS, "redirect_to", count=None, server="hub", location=location)
    expected = dict(expected_sha256=_sha(weights), expected_size=len(weights)) if skip_head else {}
    with pytest.raises(UnsafeURLError, match="non-HTTP"):
        hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS, **expected, **FAST)
    assert len(hub_server.requests) == 1 and not (tmp_path / WEIGHTS).exists()


def test_token_never_sent_to_the_cdn(hub_server: HubServer, weights: bytes,
                                     tmp_path: Path) -> None:
    with requests.Session() as session:
        session.headers["Authorization"] = "Bearer from-session"
        hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS, token="hf_secret",
                          session=session, **FAST)
    hub_side = [r for r in hub_server.requests if r.server == "hub"]
    cdn_side = [r for r in hub_server.requests if r.server == "cdn"]
    assert hub_side and cdn_side
    assert {r.header("Authorization") for r in hub_side} == {"Bearer hf_secret"}
    assert all(r.header("Authorization") is None for r in cdn_side)
    assert {r.host.split(":")[0] for r in cdn_side} == {"localhost"}


# --- concurrency and locking ------------------------------------------------------------------


def test_two_processes_end_with_one_copy(hub_server: HubServer, weights: bytes,
                                         tmp_path: Path) -> None:
    hub_server.faults.add(WEIGHTS, "drip", server="cdn", step=32 * 1024, interval=0.05)
    dest = tmp_path / WEIGHTS
    children = [_spawn(hub_server.url(REPO, WEIGHTS), dest) for _ in range(2)]
    for child in children:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err.decode()
    assert _sha(dest.read_bytes()) == _sha(weights)
    assert len(_cdn_gets(hub_server)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS]


def test_two_threads_end_with_one_copy(hub_server: HubServer, weights: bytes,
                                       tmp_path: Path) -> None:
    hub_server.faults.add(WEIGHTS, "drip", server="cdn", step=32 * 1024, interval=0.05)
    dest, results, errors = tmp_path / WEIGHTS, [], []

    def run() -> None:
        try:
            results.append(hub.download_file(hub_server.url(REPO, WEIGHTS), dest, **FAST))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and results == [dest, dest]
    assert _sha(dest.read_bytes()) == _sha(weights)
    assert len(_cdn_gets(hub_server)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS]


def test_lock_timeout_names_the_lock(hub_server: HubServer, weights: bytes,
                                     tmp_path: Path) -> None:
    lock = tmp_path / (WEIGHTS + ".lock")
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LockTimeoutError, match=str(lock)):
            hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS, lock_timeout=0.2,
                              **FAST)
    assert hub_server.requests == []


# --- disk space -----------------------------------------------------------------------------


def test_disk_check_before_any_get(hub_server: HubServer, weights: bytes, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch, env: Env) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(InsufficientDiskSpaceError) as info:
        hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS, **FAST)
    message = str(info.value)
    assert f"need {len(weights)} bytes" in message and "1000 free" in message
    assert str(tmp_path) in message
    assert [r.method for r in hub_server.requests] == ["HEAD"]
    env.setenv("FLAGOPT_SKIP_DISK_CHECK", "1")
    path = hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS, **FAST)
    assert _sha(path.read_bytes()) == _sha(weights)


class _FillingFile:
    """A partial file whose disk fills after ``budget`` bytes."""

    def __init__(self, path: Path, mode: str, budget: int) -> None:
        self._f = open(path, mode)  # noqa: SIM115 - closed by __exit__
        self._left = budget

    def write(self, data: bytes) -> int:
        if len(data) > self._left:
            self._f.write(data[:self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def test_disk_filling_mid_write_simulated(hub_server: HubServer, weights: bytes, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "config.json"
    other.write_bytes(b"cached, must survive")
    monkeypatch.setattr(hub, "_open_partial", lambda path, mode: _FillingFile(path, mode, 10_000))
    with pytest.raises(InsufficientDiskSpaceError, match="disk full while writing"):
        hub.download_file(hub_server.url(REPO, WEIGHTS), tmp_path / WEIGHTS, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert other.read_bytes() == b"cached, must survive"
    assert len(_cdn_gets(hub_server)) == 1  # not retried


def test_disk_filling_mid_write_real_tmpfs(hub_server: HubServer, tmp_path: Path,
                                           env: Env) -> None:
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        other = mnt / "config.json"
        other.write_bytes(_bytes(200_000, seed=7))
        data = _bytes(1536 * 1024, seed=8)
        hub_server.add_file(REPO, WEIGHTS, data)
        url = hub_server.url(REPO, WEIGHTS)
        with pytest.raises(InsufficientDiskSpaceError, match="not enough disk space"):
            hub.download_file(url, mnt / WEIGHTS, **FAST)  # the up-front check
        assert _cdn_gets(hub_server) == []
        env.setenv("FLAGOPT_SKIP_DISK_CHECK", "1")  # as if the mount misreported
        with pytest.raises(InsufficientDiskSpaceError, match="disk full while writing"):
            hub.download_file(url, mnt / WEIGHTS, **FAST)
        assert sorted(p.name for p in mnt.iterdir()) == ["config.json"]
        assert other.read_bytes() == _bytes(200_000, seed=7)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# --- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_retries=-1), "max_retries"),
    (dict(stall_timeout=0), "stall_timeout"),
    (dict(expected_sha256="xyz"), "expected_sha256"),
    (dict(expected_size=-5), "expected_size"),
])
def test_bad_arguments_named(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hub.download_file("http://127.0.0.1:9/x", tmp_path / "x", **kwargs)


# --- the test server itself -------------------------------------------------------------------


def test_hub_server_restarts_on_the_same_endpoint(hub_server: HubServer, config: bytes,
                                                  tmp_path: Path) -> None:
    endpoint = hub_server.endpoint
    hub_server.stop()
    with pytest.raises(requests.ConnectionError):
        requests.head(hub_server.url(REPO, CONFIG), timeout=5)
    hub_server.start()
    assert hub_server.endpoint == endpoint
    path = hub.download_file(hub_server.url(REPO, CONFIG), tmp_path / CONFIG, progress=False)
    assert path.read_bytes() == config
