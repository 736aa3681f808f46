"""What to download for a resolved model name, and fetching it.

A registry entry lists its files; a hub repo id does not, so its weights are found by asking
the hub for ``checkpoint.WEIGHT_FILES`` in order (``probe_weight_files``), an index first and
then the shards it names. Files go to ``model_dir/<dirname>/`` (FlagAI's layout) or
``$FLAGOPT_HOME/<dirname>/``. When every file is present no request is made.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from flagopt import hub, settings
from flagopt.auto_model.registry import ModelSpec, RegistrySource, resolve_model
from flagopt.errors import CheckpointError, EntryNotFoundError, OfflineError
from flagopt.model.checkpoint import WEIGHT_FILES, find_weight_files, read_index
from flagopt.paths import safe_join

__all__ = ["FetchOptions", "download_model", "fetch_model", "flagopt_home", "model_local_dir",
           "probe_weight_files"]

logger = logging.getLogger(__name__)

# Hub-repo form: fetched when the repo has them (a 404 is fine); config.json comes last, so its
# presence means the small files are done.
_OPTIONAL_FILES = ("generation_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "tokenizer_config.json")


@dataclass(frozen=True)
class FetchOptions:
    """How files are fetched: passed through to ``hub.download_repo_files``."""

    endpoint: str | None = None
    token: str | None = None
    offline: bool = False
    progress: bool = True


def flagopt_home() -> Path:
    """Where models go without ``model_dir``: ``$FLAGOPT_HOME``, else ``~/.cache/flagopt``."""
    return settings.get().home.expanduser()


def model_local_dir(spec: ModelSpec, model_dir: str | os.PathLike | None = None) -> Path:
    """``model_dir/<dirname>``, or ``$FLAGOPT_HOME/<dirname>`` (see ``ModelSpec.dirname``)."""
    base = Path(model_dir).expanduser() if model_dir is not None else flagopt_home()
    return safe_join(base, spec.dirname)


def download_model(model_name: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                   *, only_config: bool = False, registry: RegistrySource | None = None,
                   endpoint: str | None = None, token: str | None = None,
                   offline: bool = False, progress: bool = True) -> Path:
    """Make a model's files present locally, downloading only what is missing.

    Args:
        model_name: a registry name, hub repo id ``owner/name[@revision]`` or local directory.
        model_dir: parent directory (FlagAI layout); default ``flagopt_home()``.
        only_config: config and tokenizer files only, no weights.
        registry, endpoint, token, offline, progress: as for ``AutoLoader``.

    Returns:
        The directory holding the files (a local directory is returned as it is).

    Raises:
        UnknownModelError, RegistryError: a bad name or registry.
        OfflineError: files are missing and the network is off. DownloadError and
            subclasses, CheckpointError: fetching failed.
    """
    if endpoint is not None:
        endpoint = hub.get_endpoint(endpoint)
    options = FetchOptions(endpoint=endpoint, token=token,
                           offline=hub.is_offline(offline), progress=progress)
    return fetch_model(resolve_model(model_name, registry=registry), model_dir, only_config,
                       options)


def fetch_model(target: ModelSpec | Path, model_dir: str | os.PathLike | None,
                only_config: bool, options: FetchOptions) -> Path:
    """The local directory of a resolved name, with its files present (see ``download_model``).

    Returns:
        ``target`` itself for a local directory, else ``model_local_dir(target, model_dir)``.
    """
    if isinstance(target, Path):
        if model_dir is not None:
            logger.debug("model_dir is not used for the local directory %s", target)
        return target
    local_dir = model_local_dir(target, model_dir)
    if target.needs_probe:
        _fetch_hub_repo(target, local_dir, only_config, options)
    else:
        files = target.config_files if only_config else target.files
        hub.download_repo_files(target.repo, files, local_dir, endpoint=options.endpoint,
                                revision=target.revision, expected=target.expected(),
                                token=options.token, progress=options.progress,
                                offline=options.offline)
    return local_dir


def _fetch_hub_repo(spec: ModelSpec, local_dir: Path, only_config: bool,
                    options: FetchOptions) -> None:
    """A hub repo id: small files if the repo has them, config.json, then the weights found by
    probing (an index is fetched first, then its shards). Nothing is asked when complete."""
    missing = _missing_from(local_dir, only_config)
    if missing is None:
        return
    if options.offline:
        raise OfflineError(f"offline mode (offline=True or {settings.OFFLINE_ENV}=1): "
                           f"{spec.name} is not complete in {local_dir}: {missing}")

    def get(names: list[str], expected: dict[str, dict[str, Any]] | None = None) -> list[Path]:
        return hub.download_repo_files(spec.repo, names, local_dir, endpoint=options.endpoint,
                                       revision=spec.revision, expected=expected,
                                       token=options.token, progress=options.progress)

    for name in _OPTIONAL_FILES:
        try:
            get([name])
        except EntryNotFoundError:
            logger.info("%s@%s has no %s", spec.repo, spec.revision, name)
    try:
        get(["config.json"])
    except EntryNotFoundError as exc:
        raise EntryNotFoundError(
            f"{spec.repo}@{spec.revision} has no config.json: not an OPT repo in the hub's "
            f"layout, or a wrong revision ({exc})", url=exc.url, status=exc.status) from exc
    if only_config:
        return
    name, meta = probe_weight_files(spec.repo, spec.revision, endpoint=options.endpoint,
                                    token=options.token)
    expected = {k: v for k, v in (("size", meta.size), ("sha256", meta.sha256)) if v is not None}
    (path,) = get([name], {name: expected})
    if name.endswith(".index.json"):
        get(read_index(path))


def _missing_from(local_dir: Path, only_config: bool) -> str | None:
    """What keeps ``local_dir`` from being a complete checkpoint, or None."""
    if not (local_dir / "config.json").is_file():
        return "config.json is missing"
    if only_config:
        return None
    try:
        find_weight_files(local_dir)
    except CheckpointError as exc:
        return str(exc)
    return None


def probe_weight_files(repo: str, revision: str = "main", *, endpoint: str | None = None,
                       token: str | None = None, session: requests.Session | None = None
                       ) -> tuple[str, hub.FileMetadata]:
    """The first of ``checkpoint.WEIGHT_FILES`` the repo has, asked by HEAD, 404 meaning no.

    Args:
        token: default ``$HF_TOKEN``.

    Returns:
        The file name and the hub's metadata for it (size and sha256 for LFS files).

    Raises:
        CheckpointError: the repo has none of them.
        AccessDeniedError, HTTPStatusError, DownloadError: the hub said no or was unreachable.
    """
    token = token or settings.get().token
    for name in WEIGHT_FILES:
        url = hub.hub_url(endpoint, repo, revision, name)
        try:
            return name, hub.get_file_metadata(url, token=token, session=session)
        except EntryNotFoundError:
            logger.debug("%s@%s has no %s", repo, revision, name)
    where = hub.redact(hub.get_endpoint(endpoint))  # no credentials in messages
    raise CheckpointError(f"{repo}@{revision} has no weights at {where}: "
                          f"none of {', '.join(WEIGHT_FILES)}")
