"""A local stand-in for the Hugging Face hub and its CDN, over real HTTP on loopback.

Two threaded servers: the *hub* on ``127.0.0.1`` answers
``/{repo_id}/resolve/{revision}/{filename}`` like huggingface.co (``X-Repo-Commit``, a quoted
git blob SHA-1 ``ETag`` on small files; for LFS files a 302 carrying ``X-Linked-Etag`` and
``X-Linked-Size`` to the *CDN*), and the CDN on the other host name ``localhost`` serves the
bytes with ``Range`` support. Files live under ``root/<repo_id>/<filename>``.

Faults are injected per test (``server.faults.add(pattern, kind, count=n, **params)``) and
every request is logged (``server.requests``), so tests can assert what went over the wire::

    with HubServer(tmp_path / "hub") as hub:
        hub.add_file("org/tiny", "pytorch_model.bin", data)
        hub.faults.add("pytorch_model.bin", "cut_after", nbytes=1000)
        url = f"{hub.endpoint}/org/tiny/resolve/main/pytorch_model.bin"

Fault kinds and their parameters:

- ``status``: answer ``code`` (default 500), with ``Retry-After: retry_after`` if given.
- ``redirect_to``: answer 302 to ``location`` (any URL, e.g. ``file:///etc/passwd``).
- ``ignore_range``: answer 200 with the whole file to a request that carries ``Range``.
- ``corrupt_byte``: flip the byte at file ``offset`` (default: the middle) in the body.
- ``short_body``: declare the full Content-Length but send ``missing`` bytes fewer (default
  half the body), then close.
- ``cut_after``: close the connection after ``nbytes`` bytes of the body (default half).
- ``drip``: send ``after`` bytes (default 0) at once, then ``step`` bytes (default 1) every
  ``interval`` seconds (default 0.2).
- ``no_location``: answer 302 with no ``Location`` header and a body (``body``, default a
  short JSON text).
- ``html_page``: answer ``200 text/html`` with an HTML error page (``body`` to override).
- ``gzip``: answer 200 with the file gzip-compressed and ``Content-Encoding: gzip``,
  whatever ``Accept-Encoding`` said.

``mirror=True`` serves like a plain static mirror instead of the hub: every file straight from
the hub host, no LFS redirect and no checksum headers, only the validators a web server sends
(an ``ETag`` made of mtime and size, ``Last-Modified``). Both styles honour ``If-Range``: a
validator that no longer matches gets the whole file with 200, as RFC 9110 says.

A fault matches when ``pattern`` (an fnmatch glob) matches the request path or the repo file
name, and the optional ``method`` (``"GET"``/``"HEAD"``) and ``server`` (``"hub"``/``"cdn"``)
filters agree. ``count`` is how many requests it affects (``None``: all). Body faults only
affect GETs that send a body (the CDN for LFS files, the hub for small ones).
"""

from __future__ import annotations

import contextlib
import email.utils
import fnmatch
import gzip
import hashlib
import http.server
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pytest

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
STATUS_KINDS = frozenset({"status", "redirect_to", "no_location", "html_page", "gzip"})
BODY_KINDS = frozenset({"ignore_range", "corrupt_byte", "short_body", "cut_after", "drip"})
FAULT_KINDS = STATUS_KINDS | BODY_KINDS
_WRITE_CHUNK = 64 * 1024


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    """The id git gives ``data`` as a blob: what the hub sends as a small file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class RequestRecord:
    """One request as the server saw it; ``status`` is filled in when it is answered."""

    server: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict[str, str]
    host: str
    status: int | None = None

    def header(self, name: str) -> str | None:
        """A header's value, looked up case-insensitively."""
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


@dataclass
class Fault:
    pattern: str
    kind: str
    remaining: int | None
    params: dict[str, Any]
    method: str | None = None
    server: str | None = None

    def matches(self, path: str, filename: str, method: str, server: str) -> bool:
        return ((self.remaining is None or self.remaining > 0)
                and (fnmatch.fnmatch(path, self.pattern) or fnmatch.fnmatch(filename, self.pattern))
                and self.method in (None, method) and self.server in (None, server))


class Faults:
    """Thread-safe set of injected faults."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, pattern: str, kind: str, count: int | None = 1, *, method: str | None = None,
            server: str | None = None, **params: Any) -> Fault:
        """Inject ``kind`` into the next ``count`` matching requests (``None``: all of them)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if server not in (None, "hub", "cdn"):
            raise ValueError(f"server must be 'hub', 'cdn' or None, got {server!r}")
        fault = Fault(pattern, kind, count, params, method.upper() if method else None, server)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, kinds: frozenset[str], *, path: str, filename: str, method: str,
             server: str, has_range: bool = False) -> dict[str, dict[str, Any]]:
        """The first matching fault of each kind in ``kinds``, each consumed once."""
        taken: dict[str, dict[str, Any]] = {}
        with self._lock:
            for fault in self._faults:
                if fault.kind not in kinds or fault.kind in taken:
                    continue
                if fault.kind == "ignore_range" and not has_range:
                    continue
                if fault.matches(path, filename, method, server):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    taken[fault.kind] = fault.params
        return taken


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr
        pass

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    def send_response(self, code: int, message: str | None = None) -> None:
        record = getattr(self, "_record", None)
        if record is not None:
            record.status = code
        super().send_response(code, message)

    def _dispatch(self, send_body: bool) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        role: str = self.server.role  # type: ignore[attr-defined]
        self._record = hub._log(role, self.command, self.path, dict(self.headers.items()),
                                self.headers.get("Host", ""))
        try:
            if role == "hub":
                hub._serve_hub(self, send_body)
            else:
                hub._serve_cdn(self, send_body)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True

    # -- responses --

    def send_simple(self, code: int, headers: dict[str, str] | None = None,
                    body: bytes = b"") -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def send_error_json(self, code: int, message: str, headers: dict[str, str] | None = None
                        ) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_simple(code, {"Content-Type": "application/json", **(headers or {})}, body)


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up (killed processes, aborted downloads) are part of the tests."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class HubServer:
    """A fake hub (``.endpoint``) and CDN on loopback, serving files under ``root_dir``.

    Args:
        root_dir: holds ``<repo_id>/<filename>``; created if missing.
        commit: the fake commit sha; ``resolve/<commit>/`` works like ``resolve/main/``.
        lfs_threshold: files larger than this (or with a weights suffix) are served as LFS.
        cdn_host: host name in the CDN's URLs; must differ from ``127.0.0.1``.
        mirror: serve like a plain static mirror (no LFS redirect, no checksums; see above).
    """

    def __init__(self, root_dir: str | Path, *, commit: str = FAKE_COMMIT,
                 lfs_threshold: int = 10 * 1024 * 1024, cdn_host: str = "localhost",
                 mirror: bool = False) -> None:
        self.root = Path(root_dir)
        self.mirror = mirror
        self.root.mkdir(parents=True, exist_ok=True)
        self.commit = commit
        self.lfs_threshold = lfs_threshold
        self.cdn_host = cdn_host
        self.faults = Faults()
        self._log_lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._servers: dict[str, _QuietServer] = {}
        self._threads: list[threading.Thread] = []
        self._ports: dict[str, int] = {"hub": 0, "cdn": 0}
        self._stopping = threading.Event()
        self._sha_cache: dict[tuple[str, int, int], str] = {}

    # -- lifecycle --

    def start(self) -> HubServer:
        """Start both servers (again on the same ports after ``stop``, when possible)."""
        if self._servers:
            return self
        self._stopping.clear()
        for role in ("hub", "cdn"):
            server = _QuietServer(("127.0.0.1", self._ports[role]), _Handler)
            server.hub = self  # type: ignore[attr-defined]
            server.role = role  # type: ignore[attr-defined]
            self._ports[role] = server.server_address[1]
            self._servers[role] = server
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"fake-{role}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop both servers; dripping responses end at their next step."""
        self._stopping.set()
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- public helpers --

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._ports['hub']}"

    @property
    def cdn_endpoint(self) -> str:
        return f"http://{self.cdn_host}:{self._ports['cdn']}"

    def add_file(self, repo_id: str, filename: str, data: bytes) -> Path:
        """Write ``data`` as ``filename`` of ``repo_id``; returns its path on disk."""
        path = self.root / repo_id / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def url(self, repo_id: str, filename: str, revision: str = "main") -> str:
        """The resolve URL of a file, as a client would build it."""
        return f"{self.endpoint}/{quote(repo_id)}/resolve/{quote(revision, safe='')}/" \
               f"{quote(filename)}"

    def is_lfs(self, filename: str, size: int) -> bool:
        return filename.endswith(LFS_SUFFIXES) or size > self.lfs_threshold

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the request log, oldest first."""
        with self._log_lock:
            return list(self._records)

    def requests_for(self, pattern: str, *, server: str | None = None,
                     method: str | None = None) -> list[RequestRecord]:
        """Logged requests whose path matches the glob ``pattern``, optionally filtered."""
        return [r for r in self.requests
                if fnmatch.fnmatch(unquote(urlsplit(r.path).path), pattern)
                and server in (None, r.server) and method in (None, r.method)]

    def clear_requests(self) -> None:
        with self._log_lock:
            self._records.clear()

    # -- internals --

    def _log(self, server: str, method: str, path: str, headers: dict[str, str],
             host: str) -> RequestRecord:
        record = RequestRecord(server, method, path, headers, host)
        with self._log_lock:
            self._records.append(record)
        return record

    def _file(self, repo_id: str, filename: str) -> Path | None:
        base = self.root.resolve()
        path = (base / repo_id / filename).resolve()
        if base not in path.parents or not path.is_file():
            return None
        return path

    def _sha256(self, path: Path, data: bytes) -> str:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._sha_cache:
            self._sha_cache[key] = sha256_hex(data)
        return self._sha_cache[key]

    def _early_fault(self, handler: _Handler, path: str, filename: str, role: str) -> bool:
        """Answer a ``status``/``redirect_to`` fault; True if one was sent."""
        taken = self.faults.take(STATUS_KINDS, path=path, filename=filename,
                                 method=handler.command, server=role)
        if "status" in taken:
            params = taken["status"]
            headers = {}
            if params.get("retry_after") is not None:
                headers["Retry-After"] = str(params["retry_after"])
            handler.send_error_json(int(params.get("code", 500)), "injected fault", headers)
            return True
        if "redirect_to" in taken:
            handler.send_simple(302, {"Location": taken["redirect_to"]["location"]})
            return True
        if "no_location" in taken:
            body = taken["no_location"].get("body", b'{"moved": "somewhere"}')
            handler.send_simple(302, {"Content-Type": "application/json"}, body)
            return True
        if "html_page" in taken:
            body = taken["html_page"].get(
                "body", b"<!DOCTYPE html><html><body>Service unavailable</body></html>")
            handler.send_simple(200, {"Content-Type": "text/html; charset=utf-8"}, body)
            return True
        if "gzip" in taken:
            parsed = _parse_resolve(path) or _parse_cdn(path)
            file = self._file(parsed[0], parsed[2]) if parsed else None
            body = gzip.compress(file.read_bytes() if file else b"")
            handler.send_simple(200, {"Content-Encoding": "gzip",
                                      "Content-Type": "application/octet-stream"}, body)
            return True
        return False

    def _serve_hub(self, handler: _Handler, send_body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        parsed = _parse_resolve(path)
        filename = parsed[2] if parsed else ""
        if self._early_fault(handler, path, filename, "hub"):
            return
        if parsed is None or parsed[1] not in ("main", self.commit):
            handler.send_error_json(404, f"no such revision or path: {path}",
                                    {"X-Error-Code": "RevisionNotFound"})
            return
        repo_id, _, filename = parsed
        file = self._file(repo_id, filename)
        if file is None:
            handler.send_error_json(404, f"{filename} not found in {repo_id}",
                                    {"X-Error-Code": "EntryNotFound"})
            return
        data = file.read_bytes()
        if self.mirror:
            stat = file.stat()
            headers = {"ETag": f'"{stat.st_mtime_ns:x}-{len(data):x}"',
                       "Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True)}
            self._send_bytes(handler, data, headers, send_body, path, filename, "hub")
            return
        headers = {"X-Repo-Commit": self.commit}
        if self.is_lfs(filename, len(data)):
            sha = self._sha256(file, data)
            location = (f"{self.cdn_endpoint}/repos/{quote(repo_id)}/{sha}/{quote(filename)}"
                        f"?Expires=4102444800&Signature=fake-signature")
            headers.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                            "ETag": f'"{sha}"', "Location": location})
            handler.send_simple(302, headers)
            return
        headers["ETag"] = f'"{git_blob_sha1(data)}"'
        self._send_bytes(handler, data, headers, send_body, path, filename, "hub")

    def _serve_cdn(self, handler: _Handler, send_body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        parsed = _parse_cdn(path)
        filename = parsed[2] if parsed else ""
        if self._early_fault(handler, path, filename, "cdn"):
            return
        file = self._file(parsed[0], parsed[2]) if parsed else None
        data = file.read_bytes() if file else b""
        if file is None or self._sha256(file, data) != parsed[1]:
            handler.send_error_json(404, f"no such object: {path}")
            return
        # A CDN's ETag is its own (an MD5 here), not the hub's: clients must not trust it.
        headers = {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}
        self._send_bytes(handler, data, headers, send_body, path, filename, "cdn")

    def _send_bytes(self, handler: _Handler, data: bytes, headers: dict[str, str],
                    send_body: bool, path: str, filename: str, role: str) -> None:
        range_header = handler.headers.get("Range")
        faults: dict[str, dict[str, Any]] = {}
        if send_body:
            faults = self.faults.take(BODY_KINDS, path=path, filename=filename, method="GET",
                                      server=role, has_range=bool(range_header))
        start, end, status = 0, len(data), 200
        if_range = handler.headers.get("If-Range")
        if if_range is not None and if_range not in (headers.get("ETag"),
                                                     headers.get("Last-Modified")):
            range_header = None  # the file changed since the client's copy: send all of it
        if range_header and "ignore_range" not in faults:
            parsed = _parse_range(range_header, len(data))
            if parsed is None:
                handler.send_error_json(416, f"bad range {range_header!r}",
                                        {"Content-Range": f"bytes */{len(data)}"})
                return
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        payload = bytearray(data[start:end])
        if "corrupt_byte" in faults:
            offset = int(faults["corrupt_byte"].get("offset", len(data) // 2))
            if start <= offset < end:
                payload[offset - start] ^= 0xFF
        handler.send_response(status)
        for name, value in {**headers, "Accept-Ranges": "bytes",
                            "Content-Type": "application/octet-stream",
                            "Content-Length": str(len(payload))}.items():
            handler.send_header(name, value)
        handler.end_headers()
        if send_body:
            self._write_body(handler, bytes(payload), faults)

    def _write_body(self, handler: _Handler, payload: bytes,
                    faults: dict[str, dict[str, Any]]) -> None:
        limit = len(payload)
        if "short_body" in faults:
            limit -= int(faults["short_body"].get("missing", len(payload) // 2 or 1))
        if "cut_after" in faults:
            limit = min(limit, int(faults["cut_after"].get("nbytes", len(payload) // 2)))
        limit = max(0, limit)
        drip = faults.get("drip")
        fast = limit if drip is None else min(limit, int(drip.get("after", 0)))
        for pos in range(0, fast, _WRITE_CHUNK):
            handler.wfile.write(payload[pos:min(fast, pos + _WRITE_CHUNK)])
        if drip is not None:
            step, interval = int(drip.get("step", 1)), float(drip.get("interval", 0.2))
            for pos in range(fast, limit, step):
                if self._stopping.wait(interval):
                    break
                handler.wfile.write(payload[pos:min(limit, pos + step)])
        if limit < len(payload):
            handler.close_connection = True
            _shutdown(handler.connection)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _parse_resolve(path: str) -> tuple[str, str, str] | None:
    """``/{repo_id}/resolve/{revision}/{filename}`` → (repo_id, revision, filename)."""
    parts = path.lstrip("/").split("/")
    if "resolve" not in parts:
        return None
    i = parts.index("resolve")
    if i not in (1, 2) or len(parts) < i + 3:
        return None
    return "/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2:])


def _parse_cdn(path: str) -> tuple[str, str, str] | None:
    """``/repos/{repo_id}/{sha256}/{filename}`` → (repo_id, sha256, filename)."""
    parts = path.lstrip("/").split("/")
    if not parts or parts[0] != "repos":
        return None
    for i, part in enumerate(parts[1:], start=1):
        is_sha = len(part) == 64 and all(c in "0123456789abcdef" for c in part)
        if is_sha and 1 < i < len(parts) - 1:
            return "/".join(parts[1:i]), part, "/".join(parts[i + 1:])
    return None


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` → [start, end) within ``size``."""
    spec = header.strip()
    if not spec.startswith("bytes=") or "," in spec:
        return None
    first, _, last = spec[len("bytes="):].partition("-")
    try:
        if first == "":
            start, end = max(0, size - int(last)), size
        else:
            start = int(first)
            end = size if last == "" else min(size, int(last) + 1)
    except ValueError:
        return None
    if start >= size or start >= end:
        return None
    return start, end


@pytest.fixture(name="hub_server")
def hub_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A running ``HubServer`` over a fresh directory (not the test's ``tmp_path``)."""
    with HubServer(tmp_path_factory.mktemp("hub")) as server:
        yield server


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(interval)


__all__ = ["FAKE_COMMIT", "Fault", "Faults", "HubServer", "RequestRecord",
           "git_blob_sha1", "hub_server_fixture", "sha256_hex", "wait_for"]
