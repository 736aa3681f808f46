"""Download files from a Hugging Face-style hub: resumable, verified, locked and atomic.

One file's life: take ``<dest>.lock`` (``fcntl.flock``, released by the kernel if the process
dies) → HEAD the hub for size and checksums (``X-Linked-Size``/``X-Linked-Etag`` for LFS
files, ``Content-Length``/``ETag`` for small ones) → check free disk space → stream to
``<dest>.incomplete``, resuming it with ``Range`` (the bytes already there are re-hashed first;
a server that answers 200 starts the file over) → verify size and sha256 (or the git blob
SHA-1 of a small file) → ``os.replace`` into place. A file under its final name is complete
and verified, so a later call finds it and makes no request at all.

What counts as the file: only a 200 or 206 answer without a ``Content-Encoding`` (we ask for
``identity``); a redirect without ``Location``, an encoded body or an HTML page where JSON or
weights were expected is refused before anything is cached, and a small ``.json`` file that
does not parse is moved aside to ``<dest>.invalid``. A resume sends ``If-Range`` with the
validator (``ETag`` or ``Last-Modified``) kept in ``<dest>.incomplete.validator``, so a file that
changed on the server starts over instead of being stitched from two versions; a partial file
with neither a validator nor a checksum to catch such a change is not resumed. The partial,
validator and lock files are opened without following symlinks. Credentials in a URL
(``http://user:password@host``) never appear in a message or a log line.

Transient failures (connection errors, timeouts, stalls, short bodies, 5xx, 429, checksum
mismatches) are retried with exponential back-off and jitter; the count resets while bytes
keep arriving. A host never reached at all (its name does not resolve, the connection is
refused) gets one quick retry, then ``HubUnreachableError``: one line naming the host and the
ways out. Redirects are followed by hand: only to http(s), and the token never goes to another
host.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import logging
import os
import random
import re
import shutil
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urljoin, urlsplit

import requests
import urllib3
from tqdm.auto import tqdm

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
    ReadOnlyCacheError,
    StalledDownloadError,
    UnexpectedContentError,
    UnsafePathError,
    UnsafeURLError,
)
from flagopt.paths import safe_join
from flagopt.settings import get as get_settings
from flagopt.version import __version__

__all__ = [
    "DEFAULT_ENDPOINT",
    "FileMetadata",
    "download_file",
    "download_repo_files",
    "get_endpoint",
    "get_file_metadata",
    "hub_url",
]

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"

_CHUNK_SIZE = 1 << 20
_MAX_REDIRECTS = 10
_LOCK_POLL_S = 0.05
_ATTEMPT_CEILING = 100  # hard bound on attempts, even while every attempt makes progress
_UNREACHABLE_RETRIES = 1  # a host never reached: one quick retry (a resolver hiccup), no more
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_SHA1_RE = re.compile(r"[0-9a-f]{40}")
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s]*@")
_READ_ONLY_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_CHECKED_JSON_MAX = 16 * 1024 * 1024  # .json files up to this size are parsed before caching
_NO_HTML_SUFFIXES = (".json", ".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".msgpack")
_HTML_HEADS = (b"<!doctype", b"<html", b"<head", b"<body")

_sleep = time.sleep  # the back-off sleep; tests replace it to observe the delays


@dataclass(frozen=True)
class FileMetadata:
    """What the hub says about one file before it is downloaded.

    ``size`` and ``sha256`` come from ``X-Linked-Size``/``X-Linked-Etag`` for LFS files;
    ``git_sha1`` (the git blob hash in ``ETag``) only for small non-LFS files; ``commit`` from
    ``X-Repo-Commit``; ``url`` is where the bytes are served (the CDN for LFS files).
    """

    size: int | None
    sha256: str | None
    git_sha1: str | None
    commit: str | None
    url: str


@dataclass(frozen=True)
class _Settings:
    max_retries: int
    retry_base_delay: float
    retry_max_delay: float
    max_retry_after: float
    connect_timeout: float
    read_timeout: float
    stall_timeout: float
    stall_min_bytes: int
    lock_timeout: float

    def __post_init__(self) -> None:
        for name in ("max_retries", "stall_min_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("retry_base_delay", "retry_max_delay", "max_retry_after", "connect_timeout",
                     "read_timeout", "stall_timeout", "lock_timeout"):
            value = getattr(self, name)
            low = "> 0" if name.endswith("timeout") else ">= 0"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                    or (value == 0 and low == "> 0"):
                raise ValueError(f"{name} must be a number of seconds {low}, got {value!r}")

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.connect_timeout, self.read_timeout)


@dataclass
class _Job:
    """One file being downloaded; ``size`` and ``meta`` fill in as they become known."""

    url: str
    dest: Path
    token: str | None
    session: requests.Session
    settings: _Settings
    bar: Any
    expected_sha256: str | None
    size: int | None
    meta: FileMetadata | None = None

    @property
    def partial(self) -> Path:
        return _sibling(self.dest, ".incomplete")

    @property
    def validator_path(self) -> Path:
        """Beside the partial file: the ``ETag`` or ``Last-Modified`` its bytes came with."""
        return _sibling(self.dest, ".incomplete.validator")

    @property
    def sha256(self) -> str | None:
        return self.expected_sha256 or (self.meta.sha256 if self.meta else None)

    @property
    def git_sha1(self) -> str | None:
        return None if self.sha256 or self.meta is None else self.meta.git_sha1


class _Transient(Exception):
    """A retryable failure; ``error`` is the typed error raised once retries run out."""

    def __init__(self, error: DownloadError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


class _Hashes:
    """sha256 and (when the final size is known) git blob SHA-1 of the bytes seen so far."""

    def __init__(self, git_size: int | None) -> None:
        self.sha256 = hashlib.sha256()
        self.git = None
        if git_size is not None:
            self.git = hashlib.sha1(b"blob %d\0" % git_size, usedforsecurity=False)
        self.size = 0

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.git is not None:
            self.git.update(data)
        self.size += len(data)

    def update_from_file(self, path: Path) -> None:
        with open(path, "rb") as f:
            while block := f.read(_CHUNK_SIZE):
                self.update(block)


# --- URLs ---------------------------------------------------------------------------------------


def get_endpoint(endpoint: str | None = None) -> str:
    """The hub's base URL: ``endpoint``, else env ``FLAGOPT_ENDPOINT``, else the public hub.

    Returns:
        The URL without a trailing slash.

    Raises:
        UnsafeURLError: the URL is not plain http(s) with a host.
    """
    value = endpoint if endpoint is not None else get_settings().endpoint or ""
    value = value or DEFAULT_ENDPOINT
    with _no_secrets():
        _check_http_url(value, "endpoint")
    return value.rstrip("/")


def hub_url(endpoint: str | None, repo_id: str, revision: str, filename: str) -> str:
    """``{endpoint}/{repo_id}/resolve/{revision}/{filename}``, each part quoted.

    Raises:
        UnsafeURLError: the endpoint is not http(s).
        UnsafePathError: ``repo_id`` or ``filename`` is empty or contains ``..``.
    """
    base = get_endpoint(endpoint)
    for what, value in (("repo_id", repo_id), ("filename", filename)):
        if not isinstance(value, str) or not value or ".." in value.split("/") \
                or value.startswith("/"):
            raise UnsafePathError(f"refusing {what} {value!r}: expected a relative path")
    if not isinstance(revision, str) or not revision:
        raise ValueError(f"revision must be a non-empty string, got {revision!r}")
    return (f"{base}/{quote(repo_id, safe='/')}/resolve/{quote(revision, safe='')}/"
            f"{quote(filename, safe='/')}")


def _check_http_url(url: str, what: str) -> None:
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
            or any(c.isspace() or ord(c) < 32 for c in url):
        shown = redact(url) if isinstance(url, str) else url
        raise UnsafeURLError(
            f"refusing {what} {shown!r}: only http:// and https:// URLs are allowed")


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced: ``http://***@host/...``."""
    return _USERINFO_RE.sub(r"\1***@", text)


@contextlib.contextmanager
def _no_secrets() -> Iterator[None]:
    """Redact URL credentials from any exception leaving the block (and its causes)."""
    try:
        yield
    except Exception as exc:
        seen: set[int] = set()
        error: BaseException | None = exc
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            error.args = tuple(redact(a) if isinstance(a, str) else a for a in error.args)
            if isinstance(getattr(error, "url", None), str):
                with contextlib.suppress(AttributeError):
                    error.url = redact(error.url)  # type: ignore[union-attr]
            error = error.__cause__ or error.__context__
        raise


def _host(url: str) -> tuple[str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return ((parts.hostname or "").lower(), port)


def _redirect_target(current: str, location: str) -> str:
    target = urljoin(current, location)
    if urlsplit(target).scheme not in ("http", "https"):
        raise UnsafeURLError(
            f"{current} redirected to {location!r}: refusing a non-HTTP(S) redirect target")
    if urlsplit(current).scheme == "https" and urlsplit(target).scheme == "http":
        raise UnsafeURLError(f"{current} redirected to {location!r}: refusing https → http")
    _check_http_url(target, "redirect target")
    return target


# --- HTTP -------------------------------------------------------------------------------------


def _new_session() -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = f"flagopt/{__version__}"
    return session


def _headers(token: str | None, cross_host: bool, offset: int = 0,
             if_range: str | None = None) -> dict[str, str | None]:
    # identity: sizes and hashes are of the bytes on the wire.
    headers: dict[str, str | None] = {"Accept-Encoding": "identity"}
    # None also removes an Authorization a caller's session carries (requests merges headers).
    headers["Authorization"] = None if cross_host or not token else f"Bearer {token}"
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if if_range:
            headers["If-Range"] = if_range  # a changed file comes back whole, with 200
    return headers


def _send(session: requests.Session, method: str, url: str, headers: Mapping[str, str | None],
          timeout: tuple[float, float], stream: bool = False) -> requests.Response:
    try:
        return session.request(method, url, headers=dict(headers), timeout=timeout,
                               allow_redirects=False, stream=stream)
    except (requests.ConnectionError, requests.Timeout) as exc:
        if (reason := _unreachable_reason(exc)) is not None:
            host = urlsplit(url).netloc.rpartition("@")[2]
            raise _Transient(HubUnreachableError(_unreachable_message(host, reason),
                                                 host=host, reason=reason)) from exc
        raise _Transient(DownloadError(f"{method} {url} failed: {exc}")) from exc
    except requests.RequestException as exc:
        raise DownloadError(f"{method} {url} failed: {exc}") from exc


def _unreachable_reason(exc: requests.RequestException) -> str | None:
    """Why no connection could be made at all (DNS, refused, no route), or None for other
    failures (timeouts, resets: the host was there)."""
    retry = exc.args[0] if exc.args else None
    reason = getattr(retry, "reason", None)  # requests wraps urllib3's MaxRetryError
    if isinstance(reason, urllib3.exceptions.NameResolutionError):
        return "its name does not resolve"
    if not isinstance(reason, urllib3.exceptions.NewConnectionError):
        return None
    cause = reason.__cause__ or reason.__context__
    if isinstance(cause, ConnectionRefusedError):
        return "the connection was refused"
    return f"no connection could be made: {cause or reason}"


def _unreachable_message(host: str, reason: str, local_dir: Path | None = None,
                         attempts: int = 1) -> str:
    tries = f", {attempts} attempts" if attempts > 1 else ""
    where = f"in {local_dir}" if local_dir is not None else "in the model's directory"
    return (f"cannot reach {host} ({reason}{tries}): check the network connection, set "
            f"FLAGOPT_ENDPOINT to a mirror you can reach, or set FLAGOPT_OFFLINE=1 with the "
            f"model's files {where}")


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _check_status(resp: requests.Response, url: str) -> None:
    """Raise the typed error for an HTTP error status (``_Transient`` when retryable)."""
    status = resp.status_code
    if status < 400:
        return
    resp.close()
    where = resp.url if resp.url == url else f"{resp.url} (for {url})"
    message = f"{resp.request.method} {where} answered HTTP {status} {resp.reason or ''}".strip()
    if detail := resp.headers.get("X-Error-Message"):
        message += f": {detail}"
    if status == 404:
        raise EntryNotFoundError(message, url=url, status=status)
    if status in (401, 403):
        raise AccessDeniedError(
            f"{message} (a gated or private repo needs a token: pass token= or set HF_TOKEN)",
            url=url, status=status)
    error = HTTPStatusError(message, url=url, status=status)
    if status in (408, 429) or status >= 500:
        raise _Transient(error, retry_after=_retry_after(resp))
    raise error


def _check_is_file(resp: requests.Response, url: str, name: str = "") -> None:
    """Only a 200/206 with no content coding is the file; anything else is refused."""
    where = resp.url if resp.url == url else f"{resp.url} (for {url})"
    problem = None
    if resp.status_code not in (200, 206):
        problem = f"answered HTTP {resp.status_code} {resp.reason or ''}".rstrip()
        if 300 <= resp.status_code < 400 and "Location" not in resp.headers:
            problem += " with no Location header"
        problem += ", not the file"
    elif (coding := resp.headers.get("Content-Encoding", "").strip().lower()) \
            not in ("", "identity"):
        problem = (f"sent the file with Content-Encoding {coding!r} although identity was "
                   f"asked for; its size and checksum would not be the file's")
    elif name.endswith(_NO_HTML_SUFFIXES) and "html" in resp.headers.get("Content-Type", ""):
        problem = (f"sent an HTML page (Content-Type {resp.headers['Content-Type']!r}) where "
                   f"{name} was expected (a proxy or login page?)")
    if problem:
        resp.close()
        raise UnexpectedContentError(f"{resp.request.method} {where} {problem}")


# --- metadata -----------------------------------------------------------------------------------


def get_file_metadata(url: str, *, token: str | None = None,
                      session: requests.Session | None = None,
                      timeout: float | tuple[float, float] = (10.0, 60.0)) -> FileMetadata:
    """HEAD ``url`` without following the redirect to the CDN, and read the hub's headers.

    Args:
        url: a resolve URL (see ``hub_url``).
        token: sent as ``Authorization: Bearer`` to the hub's host only.
        session: reused if given.
        timeout: seconds, or (connect, read).

    Returns:
        The file's size, checksums, commit and serving URL (fields ``None`` when not sent).

    Raises:
        EntryNotFoundError, AccessDeniedError, HTTPStatusError: the server said no.
        HubUnreachableError: no connection could be made (one attempt, no retry).
        DownloadError: the request failed. UnsafeURLError: a non-http(s) URL or redirect.
    """
    with _no_secrets():
        _check_http_url(url, "URL")
    pair = timeout if isinstance(timeout, tuple) else (float(timeout), float(timeout))
    with _no_secrets(), contextlib.ExitStack() as stack:
        if session is None:
            session = stack.enter_context(_new_session())
        try:
            return _fetch_metadata(session, url, token, pair)
        except _Transient as t:
            raise t.error from t.__cause__


def _fetch_metadata(session: requests.Session, url: str, token: str | None,
                    timeout: tuple[float, float]) -> FileMetadata:
    current = url
    for _ in range(_MAX_REDIRECTS + 1):
        cross = _host(current) != _host(url)
        resp = _send(session, "HEAD", current, _headers(token, cross), timeout)
        resp.close()
        if not resp.is_redirect:
            _check_status(resp, url)
            _check_is_file(resp, url)
            return _metadata_from(resp.headers, current, final=True)
        target = _redirect_target(current, resp.headers["Location"])
        linked = "X-Linked-Etag" in resp.headers or "X-Linked-Size" in resp.headers
        if linked or _host(target) != _host(current):
            return _metadata_from(resp.headers, target, final=False)
        current = target  # a same-host redirect (a renamed repo): follow it
    raise DownloadError(f"HEAD {url}: more than {_MAX_REDIRECTS} redirects")


def _metadata_from(headers: Mapping[str, str], url: str, final: bool) -> FileMetadata:
    """``final``: the answer carries the file itself, so Content-Length is its size."""
    linked = _clean_etag(headers.get("X-Linked-Etag"))
    etag = _clean_etag(headers.get("ETag"))
    sha256 = next((v for v in (linked, etag) if v and _SHA256_RE.fullmatch(v)), None)
    git_sha1 = etag if etag and not linked and _SHA1_RE.fullmatch(etag) else None
    size = _int_header(headers.get("X-Linked-Size"))
    if size is None and final:
        size = _int_header(headers.get("Content-Length"))
    return FileMetadata(size=size, sha256=sha256, git_sha1=git_sha1,
                        commit=headers.get("X-Repo-Commit"), url=url)


def _clean_etag(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"').lower() or None


def _int_header(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and number >= 0 else None


# --- locking and disk -------------------------------------------------------------------------


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``; the lock file is removed on release.

    Raises:
        LockTimeoutError: another process or thread held it for ``timeout`` seconds.
    """
    fd = _acquire_lock(path, time.monotonic() + timeout, timeout)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # still holding the lock, so no one else is using this inode
        os.close(fd)


def _acquire_lock(path: Path, deadline: float, timeout: float) -> int:
    announced = False
    while True:
        fd = _open_own(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"timed out after {timeout:g}s waiting for lock {path}: another process or "
                    f"thread is downloading the same file") from None
            if not announced:
                logger.info("waiting for lock %s held by another download", path)
                announced = True
            time.sleep(_LOCK_POLL_S)
            continue
        if _same_inode(fd, path):
            return fd
        os.close(fd)  # the holder removed this lock file while we waited: lock the new one


def _same_inode(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _open_own(path: Path, flags: int) -> int:
    """Open a file flagopt creates or appends to, never through a symlink.

    Raises:
        UnsafePathError: ``path`` is a symlink or not a regular file.
        ReadOnlyCacheError: its directory cannot be written.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(
                f"refusing to write {path}: it is a symbolic link (flagopt never writes "
                f"through a link it did not make); remove it and retry") from None
        if exc.errno in _READ_ONLY_ERRNOS:
            raise _read_only(path.parent, exc) from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePathError(f"refusing to write {path}: it is not a regular file")
    return fd


def _check_own_file(path: Path) -> None:
    """A leftover partial or validator file must be a plain file, not a planted link."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise UnsafePathError(
            f"refusing to resume into {path}: it is {kind} (flagopt never writes through a "
            f"link it did not make); remove it and retry")


def _read_only(directory: Path, exc: OSError) -> ReadOnlyCacheError:
    return ReadOnlyCacheError(
        f"cannot write to {directory} ({exc.strerror or exc}): the cache is read-only here; "
        f"point the download elsewhere with model_dir= (or set FLAGOPT_HOME) to a writable "
        f"directory, or put the complete files there first")


def is_offline(offline: bool = False) -> bool:
    """Whether the network is forbidden: ``offline=True`` or ``FLAGOPT_OFFLINE=1``."""
    return bool(offline) or get_settings().offline


def _check_disk_space(directory: Path, needed: int) -> None:
    """Raises InsufficientDiskSpaceError unless ``needed`` bytes fit (or the check is off)."""
    if needed <= 0 or get_settings().skip_disk_check:
        return
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise InsufficientDiskSpaceError(
            f"not enough disk space in {directory}: need {needed} bytes, {free} free; free some "
            f"space, or set FLAGOPT_SKIP_DISK_CHECK=1 if this mount misreports its free space")


def _discard(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _open_partial(path: Path, mode: str) -> BinaryIO:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "ab" else os.O_TRUNC)
    return os.fdopen(_open_own(path, flags), mode)


# --- downloading ------------------------------------------------------------------------------


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    token: str | None = None,
    progress: bool = True,
    session: requests.Session | None = None,
    max_retries: int = 5,
    retry_base_delay: float = 1.0,
    retry_max_delay: float = 30.0,
    max_retry_after: float = 60.0,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    stall_timeout: float = 30.0,
    stall_min_bytes: int = 16 * 1024,
    lock_timeout: float = 3600.0,
    desc: str | None = None,
) -> Path:
    """Download ``url`` to ``dest``, verified, resumable and safe against concurrent callers.

    Args:
        url: http(s) URL, typically from ``hub_url``.
        dest: final path; ``dest.incomplete`` and ``dest.lock`` are used beside it.
        expected_sha256, expected_size: from a registry; otherwise the hub's headers are used.
        token: bearer token for the URL's host (never sent to a redirect's other host).
        progress: show a tqdm bar (also silenced by env ``FLAGOPT_DISABLE_PROGRESS=1``).
        session: reused if given.
        max_retries: retries after a transient failure (reset while bytes keep arriving).
        retry_base_delay, retry_max_delay: exponential back-off bounds, in seconds.
        max_retry_after: cap on a server's ``Retry-After``, in seconds.
        connect_timeout, read_timeout: socket timeouts, in seconds.
        stall_timeout, stall_min_bytes: fewer than ``stall_min_bytes`` bytes in any
            ``stall_timeout``-second window is a stall.
        lock_timeout: seconds to wait for another download of the same file.
        desc: label of the progress bar (default: the file name).

    Returns:
        ``dest``, complete and verified.

    Raises:
        EntryNotFoundError, AccessDeniedError: 404, 401/403 (not retried).
        HubUnreachableError: the host was never reached (DNS, refused), after one retry.
        HTTPStatusError, StalledDownloadError, ChecksumError, DownloadError: still failing
            after the retries.
        InsufficientDiskSpaceError: the file does not fit, or the disk filled while writing.
        LockTimeoutError: another download held the lock too long.
        UnexpectedContentError: not the file (redirect without Location, encoded body, HTML
            page, unparsable small JSON moved to ``<dest>.invalid``); not retried.
        ReadOnlyCacheError: ``dest``'s directory cannot be written.
        UnsafePathError: a partial, validator or lock file is a symlink or not a regular file.
        UnsafeURLError: a non-http(s) URL or redirect target.
    """
    with _no_secrets():
        return _download_file(url, Path(dest), expected_sha256, expected_size, token, progress,
                              session, desc, _Settings(
                                  max_retries=max_retries, retry_base_delay=retry_base_delay,
                                  retry_max_delay=retry_max_delay,
                                  max_retry_after=max_retry_after,
                                  connect_timeout=connect_timeout, read_timeout=read_timeout,
                                  stall_timeout=stall_timeout, stall_min_bytes=stall_min_bytes,
                                  lock_timeout=lock_timeout))


def _download_file(url: str, dest: Path, expected_sha256: str | None,
                   expected_size: int | None, token: str | None, progress: bool,
                   session: requests.Session | None, desc: str | None,
                   settings: _Settings) -> Path:
    _check_http_url(url, "URL")
    expected_sha256 = _check_expected(expected_sha256, expected_size)
    if dest.is_file():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno not in _READ_ONLY_ERRNOS:
            raise
        raise _read_only(Path(exc.filename or dest.parent), exc) from exc
    show = progress and not get_settings().disable_progress
    with contextlib.ExitStack() as stack:
        if session is None:
            session = stack.enter_context(_new_session())
        stack.enter_context(_file_lock(_sibling(dest, ".lock"), settings.lock_timeout))
        if dest.is_file():  # another process finished it while we waited for the lock
            logger.debug("%s was completed by another download", dest)
            return dest
        bar = stack.enter_context(tqdm(total=expected_size, unit="B", unit_scale=True,
                                       unit_divisor=1024, desc=desc or dest.name,
                                       disable=not show))
        job = _Job(url=url, dest=dest, token=token, session=session, settings=settings, bar=bar,
                   expected_sha256=expected_sha256, size=expected_size)
        _download_with_retries(job)
    return dest


def _check_expected(sha256: str | None, size: int | None) -> str | None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ValueError(f"expected_size must be an integer >= 0 or None, got {size!r}")
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256.lower()):
        raise ValueError(f"expected_sha256 must be 64 hex digits or None, got {sha256!r}")
    return sha256.lower()


def _download_with_retries(job: _Job) -> None:
    _check_own_file(job.partial)
    _check_own_file(job.validator_path)
    failures, attempts = 0, 0
    high_water = _partial_size(job.partial)
    reached = False  # the host answered once: a later refusal is a transient failure
    while True:
        attempts += 1
        try:
            _attempt(job)
            return
        except _Transient as t:
            unreachable = isinstance(t.error, HubUnreachableError)
            reached = reached or not unreachable
            kept = _partial_size(job.partial)
            if _made_progress(t, kept - high_water, job.settings):
                failures = 0  # bytes keep arriving: not a streak of failures
            high_water = max(high_water, kept)
            failures += 1
            limit = job.settings.max_retries
            if not reached:
                limit = min(limit, _UNREACHABLE_RETRIES)
            if failures > limit or attempts >= _ATTEMPT_CEILING:
                if not reached:
                    raise _never_reached(t.error, job, attempts) from t.__cause__
                raise _gave_up(t.error, attempts) from t.__cause__
            delay = _backoff(job.settings, failures, t.retry_after)
            logger.warning("%s; retry %d of %d in %.2fs", redact(str(t.error)), failures,
                           limit, delay)
            _sleep(delay)


def _made_progress(t: _Transient, gained: int, settings: _Settings) -> bool:
    """A failed attempt that still grew the partial file by a stall window's worth of bytes."""
    stalled = isinstance(t.error, StalledDownloadError)
    return not stalled and gained >= max(1, settings.stall_min_bytes)


def _never_reached(error: DownloadError, job: _Job, attempts: int) -> DownloadError:
    """The one line for a host never reached: which host, why, and where the files go."""
    if not isinstance(error, HubUnreachableError):
        return _gave_up(error, attempts)
    return HubUnreachableError(
        _unreachable_message(error.host, error.reason, job.dest.parent, attempts),
        host=error.host, reason=error.reason)


def _gave_up(error: DownloadError, attempts: int) -> DownloadError:
    error.args = (f"{error.args[0]} (gave up after {attempts} attempt"
                  f"{'s' if attempts > 1 else ''})",)
    return error


def _backoff(settings: _Settings, failures: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(retry_after, settings.max_retry_after)
    delay = min(settings.retry_max_delay, settings.retry_base_delay * 2 ** (failures - 1))
    return delay * random.uniform(0.5, 1.0)


def _partial_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _attempt(job: _Job) -> None:
    """One try: metadata if needed, then one GET that resumes the partial file, then verify."""
    if job.meta is None and (job.expected_sha256 is None or job.size is None):
        job.meta = _fetch_metadata(job.session, job.url, job.token, job.settings.timeout)
        _check_against_registry(job)
    offset = _partial_size(job.partial)
    validator = _read_validator(job) if offset else None
    if offset and ((job.size is not None and offset > job.size)
                   or (validator is None and not job.sha256 and not job.git_sha1)):
        # Too long, or nothing (validator or checksum) would notice a file that changed.
        logger.info("not resuming %s: no validator or checksum to check it against",
                    job.partial)
        _drop_partial(job)
        offset = 0
    if job.size is not None:
        _check_disk_space(job.dest.parent, job.size - offset)
    hashes = _start_hashes(job, offset)
    resp = _open_stream(job, offset, validator)
    with resp:
        offset, hashes = _align_to_response(job, resp, offset, hashes, validator)
        _stream_to_partial(job, resp, offset, hashes)
    _verify(job, hashes)
    _check_parses(job)
    os.replace(job.partial, job.dest)
    _discard(job.validator_path)


def _response_validator(resp: requests.Response) -> str | None:
    """A strong ``ETag`` (If-Range needs one), else ``Last-Modified``, else None."""
    etag = resp.headers.get("ETag", "").strip()
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified", "").strip() or None


def _read_validator(job: _Job) -> str | None:
    try:
        fd = _open_own(job.validator_path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        text = f.read(4096).decode("latin-1").strip()
    return text or None


def _write_validator(job: _Job, validator: str | None) -> None:
    _discard(job.validator_path)
    if validator is None:
        return
    fd = _open_own(job.validator_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as f:
        f.write(validator.encode("latin-1", "replace"))


def _drop_partial(job: _Job) -> None:
    _discard(job.partial)
    _discard(job.validator_path)


def _check_parses(job: _Job) -> None:
    """Refuse an HTML page saved as JSON or weights, and a small .json file that does not
    parse: either is moved to ``<dest>.invalid``, never cached under the final name."""
    name = job.dest.name
    if not name.endswith(_NO_HTML_SUFFIXES):
        return
    with open(job.partial, "rb") as f:
        head = f.read(_CHECKED_JSON_MAX + 1 if name.endswith(".json") else 512)
    problem = None
    if head.lstrip()[:16].lower().startswith(_HTML_HEADS):
        problem = "is an HTML page, not the file"
    elif name.endswith(".json") and len(head) <= _CHECKED_JSON_MAX:
        try:
            json.loads(head.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            problem = f"is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})"
    if problem:
        aside = _sibling(job.dest, ".invalid")
        os.replace(job.partial, aside)
        _discard(job.validator_path)
        raise UnexpectedContentError(
            f"{job.url} sent a {name} that {problem}; it was moved to {aside} instead of "
            f"being cached")


def _check_against_registry(job: _Job) -> None:
    """Fail fast when the registry and the server disagree, before downloading anything."""
    meta = job.meta
    if meta is None:
        return
    if job.size is None:
        job.size = meta.size
    elif meta.size is not None and meta.size != job.size:
        raise ChecksumError(f"{job.dest.name}: expected {job.size} bytes but {job.url} reports "
                            f"{meta.size}; the registry or the repo has changed")
    if job.expected_sha256 and meta.sha256 and meta.sha256 != job.expected_sha256:
        raise ChecksumError(f"{job.dest.name}: expected sha256 {job.expected_sha256} but "
                            f"{job.url} reports {meta.sha256}; the registry or the repo has "
                            f"changed")


def _start_hashes(job: _Job, offset: int) -> _Hashes:
    """Fresh hashes over the bytes already on disk: a corrupt partial fails verification."""
    hashes = _Hashes(job.size if job.git_sha1 else None)
    if offset:
        hashes.update_from_file(job.partial)
    job.bar.reset(total=job.size)
    job.bar.update(offset)
    return hashes


def _open_stream(job: _Job, offset: int, validator: str | None = None) -> requests.Response:
    """GET with redirects followed by hand; returns a 200/206 response not yet read."""
    current = job.url
    for _ in range(_MAX_REDIRECTS + 1):
        cross = _host(current) != _host(job.url)
        resp = _send(job.session, "GET", current, _headers(job.token, cross, offset, validator),
                     job.settings.timeout, stream=True)
        if not resp.is_redirect:
            if resp.status_code == 416 and offset:
                resp.close()
                _drop_partial(job)
                raise _Transient(DownloadError(
                    f"GET {current} answered 416 to Range bytes={offset}-; starting over"))
            _check_status(resp, job.url)
            _check_is_file(resp, job.url, job.dest.name)
            return resp
        resp.close()
        current = _redirect_target(current, resp.headers["Location"])
    raise DownloadError(f"GET {job.url}: more than {_MAX_REDIRECTS} redirects")


def _align_to_response(job: _Job, resp: requests.Response, offset: int,
                       hashes: _Hashes, validator: str | None = None) -> tuple[int, _Hashes]:
    """Where the body starts in the file: a 200 means from scratch, a 206 must match ``offset``
    (and the validator the partial file's bytes came with)."""
    size_was_known = job.size is not None
    if resp.status_code == 206:
        match = _CONTENT_RANGE_RE.fullmatch(resp.headers.get("Content-Range", "").strip())
        now = _response_validator(resp)
        if validator is not None and now is not None and now != validator:
            _drop_partial(job)  # the server ignored If-Range: this tail is another version's
            raise _Transient(DownloadError(
                f"GET {resp.url} resumed a file that changed on the server (validator "
                f"{validator} became {now}); starting over"))
        if match is None or int(match.group(1)) != offset:
            _drop_partial(job)
            raise _Transient(DownloadError(
                f"GET {resp.url} answered 206 with Content-Range "
                f"{resp.headers.get('Content-Range')!r} for Range bytes={offset}-"))
        if job.size is None and match.group(3) != "*":
            job.size = int(match.group(3))
    elif offset:
        logger.info("%s ignored the Range header or the file changed; downloading %s from "
                    "the start", redact(resp.url), job.dest.name)
        offset = 0
        job.size = job.size if job.size is not None else _int_header(
            resp.headers.get("Content-Length"))
        hashes = _start_hashes(job, 0)
    elif job.size is None:
        job.size = _int_header(resp.headers.get("Content-Length"))
        job.bar.reset(total=job.size)
    if not size_was_known and job.size is not None:  # learned only now: check before writing
        _check_disk_space(job.dest.parent, job.size - offset)
    if resp.status_code == 200:
        _write_validator(job, _response_validator(resp))
    return offset, hashes


def _stream_to_partial(job: _Job, resp: requests.Response, offset: int,
                       hashes: _Hashes) -> None:
    """Append the body to the partial file (truncating it when ``offset`` is 0)."""
    declared = _int_header(resp.headers.get("Content-Length"))
    received = 0
    try:
        with _open_partial(job.partial, "ab" if offset else "wb") as f:
            for chunk in _read_body(resp, job.url, job.settings):
                if job.size is not None and offset + received + len(chunk) > job.size:
                    raise _too_long(job)
                f.write(chunk)
                hashes.update(chunk)
                received += len(chunk)
                job.bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    except DownloadError:
        raise
    except OSError as exc:
        raise _write_error(job, exc) from exc
    if declared is not None and received < declared:
        raise _Transient(DownloadError(
            f"GET {resp.url}: connection closed after {received} of {declared} bytes"))


def _too_long(job: _Job) -> _Transient:
    _drop_partial(job)
    return _Transient(ChecksumError(
        f"{job.dest.name}: {job.url} sent more than the expected {job.size} bytes"))


def _write_error(job: _Job, exc: OSError) -> DownloadError:
    _drop_partial(job)
    if exc.errno in _READ_ONLY_ERRNOS:
        return _read_only(job.dest.parent, exc)
    if exc.errno in _DISK_FULL_ERRNOS:
        free = shutil.disk_usage(job.dest.parent).free
        return InsufficientDiskSpaceError(
            f"disk full while writing {job.partial} ({exc.strerror or exc}); {free} bytes free "
            f"in {job.dest.parent}; the partial file was removed")
    return DownloadError(f"cannot write {job.partial}: {exc}")


def _read_body(resp: requests.Response, url: str, settings: _Settings) -> Iterator[bytes]:
    """Yield the raw body as it arrives; raises ``_Transient`` on a stall or a broken read."""
    window_start, window_bytes = time.monotonic(), 0
    while True:
        try:
            chunk = resp.raw.read1(_CHUNK_SIZE)
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError) as exc:
            raise _Transient(StalledDownloadError(
                f"GET {resp.url} (for {url}): no data for {settings.read_timeout:g}s")) from exc
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
            raise _Transient(DownloadError(f"reading {resp.url} (for {url}) failed: {exc}")) \
                from exc
        if not chunk:
            return
        yield chunk
        window_bytes += len(chunk)
        now = time.monotonic()
        if now - window_start >= settings.stall_timeout:
            if window_bytes < settings.stall_min_bytes:
                raise _Transient(StalledDownloadError(
                    f"GET {resp.url} (for {url}) stalled: {window_bytes} bytes in "
                    f"{now - window_start:.1f}s, below {settings.stall_min_bytes} bytes per "
                    f"{settings.stall_timeout:g}s"))
            window_start, window_bytes = now, 0


def _verify(job: _Job, hashes: _Hashes) -> None:
    """Check size, then sha256 or the git blob SHA-1; a mismatch deletes the partial file."""
    problem = None
    if job.size is not None and hashes.size != job.size:
        problem = f"expected {job.size} bytes, got {hashes.size}"
    elif job.sha256 and (got := hashes.sha256.hexdigest()) != job.sha256:
        problem = f"sha256 mismatch: expected {job.sha256}, got {got}"
    elif job.git_sha1 and hashes.git and (got := hashes.git.hexdigest()) != job.git_sha1:
        problem = f"git blob sha1 mismatch: expected {job.git_sha1}, got {got}"
    elif not job.sha256 and not job.git_sha1:
        logger.debug("no checksum known for %s; checked its size only", redact(job.url))
    if problem:
        _drop_partial(job)
        raise _Transient(ChecksumError(
            f"{job.dest}: {problem} (from {job.url}); the bad bytes were deleted"))


# --- repositories -----------------------------------------------------------------------------


def download_repo_files(
    repo_id: str,
    filenames: Sequence[str],
    local_dir: str | os.PathLike,
    *,
    endpoint: str | None = None,
    revision: str = "main",
    expected: Mapping[str, Mapping[str, Any]] | None = None,
    token: str | None = None,
    progress: bool = True,
    offline: bool = False,
    session: requests.Session | None = None,
    **options: Any,
) -> list[Path]:
    """Make ``filenames`` of ``repo_id`` present in ``local_dir``, downloading only missing ones.

    A file under its final name was verified before it was renamed there, so when every file
    is present no request is made at all.

    Args:
        repo_id: e.g. ``"facebook/opt-125m"``.
        filenames: relative POSIX paths inside the repo.
        local_dir: where the files go (``local_dir/<filename>``).
        endpoint: hub base URL (default: env ``FLAGOPT_ENDPOINT``, else the public hub).
        revision: branch, tag or commit.
        expected: per file name, ``{"size": int, "sha256": str}`` from a registry.
        token: bearer token (default: env ``HF_TOKEN``).
        progress: show tqdm bars.
        offline: never touch the network (also env ``FLAGOPT_OFFLINE=1``).
        session: reused if given.
        **options: passed to ``download_file`` (``max_retries``, timeouts, ``lock_timeout``...).

    Returns:
        The local paths, in the order of ``filenames``.

    Raises:
        UnsafePathError: a file name would escape ``local_dir``.
        OfflineError: offline, and some files are missing (all are named).
        Whatever ``download_file`` raises.
    """
    with _no_secrets():
        return _download_repo_files(repo_id, filenames, local_dir, endpoint, revision, expected,
                                    token, progress, offline, session, options)


def _download_repo_files(repo_id: str, filenames: Sequence[str], local_dir: str | os.PathLike,
                         endpoint: str | None, revision: str,
                         expected: Mapping[str, Mapping[str, Any]] | None, token: str | None,
                         progress: bool, offline: bool, session: requests.Session | None,
                         options: dict[str, Any]) -> list[Path]:
    if isinstance(filenames, str):
        raise TypeError(f"filenames must be a list of names, got the string {filenames!r}")
    targets = [(name, safe_join(local_dir, name)) for name in filenames]
    missing = [(name, path) for name, path in targets if not path.is_file()]
    if missing and is_offline(offline):
        names = ", ".join(name for name, _ in missing)
        raise OfflineError(
            f"offline mode (offline=True or FLAGOPT_OFFLINE=1): {len(missing)} file(s) of "
            f"{repo_id} missing from {local_dir}: {names}")
    if missing:
        base = get_endpoint(endpoint)
        token = token or get_settings().token
        with contextlib.ExitStack() as stack:
            if session is None:
                session = stack.enter_context(_new_session())
            for name, path in missing:
                want = (expected or {}).get(name, {})
                download_file(hub_url(base, repo_id, revision, name), path,
                              expected_sha256=want.get("sha256"), expected_size=want.get("size"),
                              token=token, progress=progress, session=session, desc=name,
                              **options)
    return [path for _, path in targets]
