"""Model names: the zoo registry, hub repo ids and local directories.

A ``model_name`` is resolved in this order (``resolve_model``):

1. a registry name such as ``opt-125m-en`` (exact, case-insensitive): the packaged
   ``model_zoo/registry.json``, then each file in ``FLAGOPT_REGISTRY`` (``os.pathsep``-separated),
   then a ``registry=`` path or dict; a later entry of the same name replaces the earlier one;
2. an existing local directory in the hub's layout (``config.json`` + weights), used in place;
3. a hub repo id ``owner/name`` with an optional ``@revision``; its weight files are found
   when it is fetched (``fetch.probe_weight_files``).

This module is data and lookup only: it reads files and never touches the network.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

from flagopt import settings
from flagopt.errors import CheckpointError, ConfigError, RegistryError, UnknownModelError
from flagopt.model.config import OPTConfig

__all__ = [
    "FORMAT_VERSION",
    "ModelSpec",
    "config_for",
    "get_model_spec",
    "is_weight_file",
    "list_models",
    "load_registry",
    "parse_repo_id",
    "resolve_model",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
RegistrySource = str | os.PathLike | Mapping[str, Any]

_TOP_FIELDS = ("format_version", "models")
_ENTRY_FIELDS = ("repo", "revision", "files", "sizes", "sha256", "architecture", "description")
_ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(OPTConfig) if f.name != "extra")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_REPO_RE = re.compile(f"{_REPO_PART}/{_REPO_PART}")
_REVISION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_WEIGHT_SUFFIXES = (".bin", ".safetensors", ".index.json", ".pt", ".pth")


def is_weight_file(name: str) -> bool:
    """Weights or a weights index (``*.bin``, ``*.safetensors``, ``*.index.json``...)."""
    return name.endswith(_WEIGHT_SUFFIXES)


@dataclass(frozen=True)
class ModelSpec:
    """What to download for one model, and what it is.

    ``files`` is empty for a hub repo id: its weight files are found by probing the hub.
    ``sizes``/``sha256`` hold only values known for certain; ``architecture`` uses
    ``config.json``'s field names; ``parameters`` counts the tied LM head once.
    """

    name: str
    repo: str
    revision: str = "main"
    files: tuple[str, ...] = ()
    sizes: Mapping[str, int] = field(default_factory=dict)
    sha256: Mapping[str, str] = field(default_factory=dict)
    architecture: Mapping[str, Any] = field(default_factory=dict)
    parameters: int | None = None
    description: str = ""

    @property
    def needs_probe(self) -> bool:
        """A hub repo id: the file list is not known until the hub is asked."""
        return not self.files

    @property
    def weight_files(self) -> tuple[str, ...]:
        return tuple(f for f in self.files if is_weight_file(f))

    @property
    def config_files(self) -> tuple[str, ...]:
        """Everything but the weights: config, generation config, tokenizer files."""
        return tuple(f for f in self.files if not is_weight_file(f))

    @property
    def weights_size(self) -> int | None:
        """Bytes of the weight files (indexes aside) when the registry knows every one."""
        data = [f for f in self.weight_files if not f.endswith(".index.json")]
        if not data or any(f not in self.sizes for f in data):
            return None
        return sum(self.sizes[f] for f in data)

    @property
    def dirname(self) -> str:
        """Directory name under a models folder: the registry name, or ``owner--name[@rev]``.

        Injective over (repo, revision): repo ids hold no ``--`` and no part starts or ends
        with ``-`` (``parse_repo_id``), and a revision is percent-quoted (``refs/pr/1`` →
        ``refs%2Fpr%2F1``; revisions never hold ``%``), so two models never share a directory.
        """
        if not self.needs_probe:
            return self.name
        suffix = "" if self.revision == "main" else "@" + quote(self.revision, safe="")
        return self.repo.replace("/", "--") + suffix

    def expected(self) -> dict[str, dict[str, Any]]:
        """``{file: {"size": ..., "sha256": ...}}`` for ``hub.download_repo_files``."""
        out: dict[str, dict[str, Any]] = {}
        for name, size in self.sizes.items():
            out.setdefault(name, {})["size"] = size
        for name, sha in self.sha256.items():
            out.setdefault(name, {})["sha256"] = sha
        return out


# --- loading the registry -----------------------------------------------------------------------


def load_registry(registry: RegistrySource | None = None) -> dict[str, ModelSpec]:
    """All registry entries by lower-case name: packaged, then ``FLAGOPT_REGISTRY``, then
    ``registry`` (a path to a JSON file or an already-parsed dict), later ones overriding.

    Raises:
        RegistryError: a file is missing or malformed (the message names entry and field).
    """
    specs = dict(_packaged_registry())
    for path in settings.get().registry_paths:
        specs.update(_read_registry_file(Path(path), f"{settings.REGISTRY_ENV} file {path}"))
    if isinstance(registry, Mapping):
        specs.update(_parse_registry(registry, "registry= dict"))
    elif registry is not None:
        if not isinstance(registry, (str, os.PathLike)):
            raise TypeError(f"registry must be a path or a dict, got {type(registry).__name__}")
        specs.update(_read_registry_file(Path(registry), f"registry file {registry}"))
    return specs


def list_models(registry: RegistrySource | None = None) -> list[str]:
    """Registry names, in registry order."""
    return list(load_registry(registry))


def get_model_spec(name: str, registry: RegistrySource | None = None) -> ModelSpec:
    """The registry entry called ``name`` (case-insensitive).

    Raises:
        UnknownModelError: no such entry; the message lists the nearest names and all names.
    """
    specs = load_registry(registry)
    spec = specs.get(name.strip().lower()) if isinstance(name, str) else None
    if spec is None:
        raise _unknown_model(name, list(specs), other_forms=False)
    return spec


def config_for(name: str, registry: RegistrySource | None = None) -> OPTConfig:
    """The architecture of registry entry ``name`` (e.g. ``"opt-350m-en"``), no download.

    Raises:
        UnknownModelError: no such entry (nearest names suggested).
        RegistryError: the entry states no architecture.
    """
    spec = get_model_spec(name, registry)
    if not spec.architecture:
        raise RegistryError(f"registry entry {spec.name!r} has no 'architecture'; read its "
                            f"config.json instead (OPTConfig.from_json after a download)")
    return OPTConfig(**spec.architecture)


@functools.cache
def _packaged_registry() -> Mapping[str, ModelSpec]:
    from model_zoo import registry_path

    path = registry_path()
    return MappingProxyType(_read_registry_file(path, f"packaged registry {path}"))


def _read_registry_file(path: Path, source: str) -> dict[str, ModelSpec]:
    try:
        data = json.loads(path.expanduser().read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{source}: no such file") from None
    except (OSError, ValueError, RecursionError) as exc:  # incl. UnicodeDecode, JSONDecode
        raise RegistryError(f"{source}: cannot read it as JSON ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from None
    return _parse_registry(data, source)


def _parse_registry(data: Any, source: str) -> dict[str, ModelSpec]:
    if not isinstance(data, Mapping):
        raise RegistryError(f"{source}: expected a JSON object with 'format_version' and "
                            f"'models', got {type(data).__name__}")
    _check_fields(data, _TOP_FIELDS, source)
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise RegistryError(f"{source}: field 'format_version' is {version!r}; this flagopt "
                            f"reads format_version {FORMAT_VERSION}")
    models = data.get("models")
    if not isinstance(models, Mapping):
        raise RegistryError(f"{source}: field 'models' must be an object of name -> entry, "
                            f"got {type(models).__name__}")
    specs: dict[str, ModelSpec] = {}
    for key, entry in models.items():
        name = _check_name(key, source)
        if name in specs:
            raise RegistryError(f"{source}: model {key!r} appears twice (names are "
                                f"case-insensitive)")
        specs[name] = _parse_entry(name, entry, f"{source}: model {name!r}")
    return specs


def _parse_entry(name: str, entry: Any, where: str) -> ModelSpec:
    if not isinstance(entry, Mapping):
        raise RegistryError(f"{where}: expected an object, got {type(entry).__name__}")
    _check_fields(entry, _ENTRY_FIELDS, where)
    repo = entry.get("repo")
    if not isinstance(repo, str) or parse_repo_id(repo) != (repo, "main"):
        raise RegistryError(f"{where}: field 'repo' must be a hub repo id 'owner/name', "
                            f"got {repo!r}")
    revision = entry.get("revision", "main")
    if not isinstance(revision, str) or not _valid_revision(revision):
        raise RegistryError(f"{where}: field 'revision' must be a branch, tag or commit, "
                            f"got {revision!r}")
    files = _files(entry.get("files"), where)
    sizes = _per_file(entry, "sizes", files, where, _valid_size, "an integer >= 0")
    sha256 = _per_file(entry, "sha256", files, where, _valid_sha256, "64 lower-case hex digits")
    architecture, parameters = _architecture(entry.get("architecture", {}), where)
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise RegistryError(f"{where}: field 'description' must be a string")
    return ModelSpec(name=name, repo=repo, revision=revision, files=files,
                     sizes=MappingProxyType(sizes), sha256=MappingProxyType(sha256),
                     architecture=architecture, parameters=parameters,
                     description=description)


def _check_name(key: Any, source: str) -> str:
    name = key.strip().lower() if isinstance(key, str) else ""
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise RegistryError(f"{source}: model name {key!r} must be letters, digits, '.', '_' "
                            f"and '-' (it names a directory)")
    if "--" in name:  # 'owner--name' is the directory of the hub repo 'owner/name'
        raise RegistryError(f"{source}: model name {key!r} must not contain '--': that is how "
                            f"the directory of a hub repo id is spelt, so the two would share "
                            f"one directory")
    return name


def _check_fields(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    """Unknown keys are errors; keys starting with '_' are comments."""
    for key in data:
        if key in allowed or (isinstance(key, str) and key.startswith("_")):
            continue
        raise RegistryError(f"{where}: unknown field {key!r}{_did_you_mean(str(key), allowed)}"
                            f" Fields: {', '.join(allowed)}")


def _files(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(f, str) for f in value):
        raise RegistryError(f"{where}: field 'files' must be a non-empty list of file names, "
                            f"got {value!r}")
    if len(set(value)) != len(value):
        raise RegistryError(f"{where}: field 'files' lists a file twice: {value!r}")
    for name in value:
        parts = PurePosixPath(name).parts
        if not name or name.startswith("/") or "\\" in name or "\x00" in name \
                or ".." in parts or ":" in name:
            raise RegistryError(f"{where}: field 'files': {name!r} must be a relative path "
                                f"inside the repo")
    if "config.json" not in value:
        raise RegistryError(f"{where}: field 'files' must include 'config.json'")
    return tuple(value)


def _per_file(entry: Mapping[str, Any], key: str, files: tuple[str, ...], where: str,
              valid: Any, what: str) -> dict[str, Any]:
    value = entry.get(key, {})
    if not isinstance(value, Mapping):
        raise RegistryError(f"{where}: field {key!r} must be an object of file -> value")
    for name, item in value.items():
        if name not in files:
            raise RegistryError(f"{where}: field {key!r} names {name!r}, which is not in "
                                f"'files'{_did_you_mean(name, files)}")
        if not valid(item):
            raise RegistryError(f"{where}: field {key!r}: {name!r} must be {what}, got {item!r}")
    return dict(value)


def _valid_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_sha256(value: Any) -> bool:
    return isinstance(value, str) and bool(_SHA256_RE.fullmatch(value))


def _architecture(value: Any, where: str) -> tuple[Mapping[str, Any], int | None]:
    """Validated architecture (config.json names) and its parameter count."""
    if not isinstance(value, Mapping):
        raise RegistryError(f"{where}: field 'architecture' must be an object")
    _check_fields(value, (*_ARCH_FIELDS, "parameters"), f"{where}, field 'architecture'")
    fields = {k: v for k, v in value.items() if k in _ARCH_FIELDS}
    if not fields:
        return MappingProxyType({}), None
    try:
        computed = OPTConfig(**fields).num_parameters
    except (ConfigError, TypeError) as exc:
        raise RegistryError(f"{where}: field 'architecture' is invalid: {exc}") from None
    stated = value.get("parameters", computed)
    if stated != computed:
        raise RegistryError(f"{where}: field 'architecture': 'parameters' is {stated!r} but the "
                            f"architecture has {computed} parameters")
    return MappingProxyType(fields), computed


# --- the other name forms -----------------------------------------------------------------------


def parse_repo_id(value: str) -> tuple[str, str] | None:
    """``"owner/name@rev"`` → ``("owner/name", "rev")`` (revision "main" if absent), or None.

    As huggingface_hub, a repo id may not contain ``--`` or ``..``, and each part starts and
    ends with a letter, digit (or ``_`` at the end): that keeps ``ModelSpec.dirname`` injective.
    """
    repo, sep, revision = value.partition("@")
    if not _REPO_RE.fullmatch(repo) or ".." in repo or "--" in repo:
        return None
    if sep and not _valid_revision(revision):
        return None
    return repo, revision or "main"


def _valid_revision(revision: str) -> bool:
    return bool(_REVISION_RE.fullmatch(revision)) and ".." not in revision.split("/") \
        and not revision.endswith("/")


def resolve_model(model_name: str | os.PathLike,
                  registry: RegistrySource | None = None) -> ModelSpec | Path:
    """What ``model_name`` means: a registry or hub-repo ``ModelSpec``, or a local directory.

    Makes no network request.

    Raises:
        UnknownModelError: none of the three forms; lists the nearest and all registry names.
        CheckpointError: an existing directory without ``config.json``.
        RegistryError: a registry file is malformed.
    """
    if isinstance(model_name, os.PathLike):
        return _local_dir(Path(model_name))
    if not isinstance(model_name, str) or not model_name.strip():
        raise UnknownModelError(f"model_name must be a non-empty string, got {model_name!r}")
    specs = load_registry(registry)
    spec = specs.get(model_name.strip().lower())
    if spec is not None:
        return spec
    path = Path(model_name).expanduser()
    if path.is_dir():
        return _local_dir(path)
    parsed = parse_repo_id(model_name.strip())
    if parsed is not None:
        repo, revision = parsed
        return ModelSpec(name=model_name.strip(), repo=repo, revision=revision)
    raise _unknown_model(model_name, list(specs), other_forms=True)


def _local_dir(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a checkpoint directory in the "
                              f"hub's layout (config.json, tokenizer files, weights)")
    return path.resolve()


def _did_you_mean(value: str, options: Sequence[str]) -> str:
    near = difflib.get_close_matches(value, list(options), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else "."


def _unknown_model(name: Any, names: list[str], *, other_forms: bool) -> UnknownModelError:
    key = name.strip().lower() if isinstance(name, str) else repr(name)
    message = f"unknown model_name {name!r}{_did_you_mean(key, names)}"
    message += f" Known models: {', '.join(names)}."
    if other_forms:
        message += (" A model_name may also be a hub repo id 'owner/name[@revision]' or an "
                    "existing local directory.")
    return UnknownModelError(message)
