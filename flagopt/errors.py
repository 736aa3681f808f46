"""Every exception flagopt raises on purpose, in one place.

Each subclasses the builtin a caller would already catch (``ValueError`` for bad input,
``OSError`` for files and the network), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class FlagOptError(Exception):
    """Base class of flagopt's own errors."""


# --- configuration and registry -------------------------------------------------------------


class ConfigError(FlagOptError, ValueError):
    """A model configuration is inconsistent or malformed."""


class UnknownModelError(FlagOptError, ValueError):
    """A model name is in neither the registry nor the hub-id / local-directory forms."""


class UnknownTaskError(FlagOptError, ValueError):
    """A task name is not one flagopt knows."""


class RegistryError(FlagOptError, ValueError):
    """A model-zoo registry file is malformed."""


# --- checkpoints ------------------------------------------------------------------------------


class CheckpointError(FlagOptError, OSError):
    """A checkpoint on disk cannot be used as it is."""


class CorruptCheckpointError(CheckpointError):
    """A weights file is truncated, not a weights file at all, or has a hostile header."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint tries to run code; it is refused and never executed."""


class MissingWeightsError(CheckpointError):
    """A checkpoint lacks tensors the model needs, or has tensors the model does not."""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape in the checkpoint differs from what the config implies."""


class CheckpointSaveError(CheckpointError):
    """A training checkpoint could not be written (a full disk, most often); the previous
    checkpoint is left as it was and nothing half-written stays behind."""


class UnsafePathError(FlagOptError, ValueError):
    """A file name (from a registry or an index) would escape its model directory."""


# --- downloads --------------------------------------------------------------------------------


class DownloadError(FlagOptError, OSError):
    """A file could not be downloaded."""


class HTTPStatusError(DownloadError):
    """The server answered with an HTTP error status."""

    def __init__(self, message: str, url: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class EntryNotFoundError(HTTPStatusError):
    """The server answered 404 for a file."""


class AccessDeniedError(HTTPStatusError):
    """The server answered 401 or 403 for a file."""


class ChecksumError(DownloadError):
    """A downloaded file's size or hash does not match what was expected."""


class UnexpectedContentError(DownloadError):
    """The server answered with something other than the file: an HTML page, a redirect with
    nowhere to go, an encoded body, or JSON that does not parse."""


class ReadOnlyCacheError(DownloadError):
    """A file is missing and the directory it would be downloaded to cannot be written."""


class StalledDownloadError(DownloadError):
    """A transfer delivered too few bytes for too long and was cut off."""


class InsufficientDiskSpaceError(DownloadError):
    """The disk cannot hold the file (checked up front, or filled while writing)."""


class LockTimeoutError(DownloadError):
    """Another process held a download lock for longer than the wait allowed."""


class HubUnreachableError(DownloadError):
    """No connection to a host could be made at all: its name does not resolve, or it refused
    or could not be routed to. ``host`` names it (``name`` or ``name:port``), ``reason`` says
    why in words."""

    def __init__(self, message: str, host: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.host = host
        self.reason = reason


class OfflineError(DownloadError):
    """Files are missing and the network is forbidden (``offline=True`` / ``FLAGOPT_OFFLINE``)."""


class UnsafeURLError(FlagOptError, ValueError):
    """An endpoint or redirect is not plain HTTP(S)."""


# --- generation -------------------------------------------------------------------------------


class NonFiniteLogitsError(FlagOptError, FloatingPointError):
    """The model produced NaN or infinite logits (often fp16 overflow)."""


# --- training ---------------------------------------------------------------------------------


class TrainerConfigError(FlagOptError, ValueError):
    """A ``Trainer`` option has a bad value, or names a FlagAI feature flagopt does not have."""


class NonFiniteLossError(FlagOptError, FloatingPointError):
    """The training loss became NaN or infinite; ``step`` is the optimizer step it happened at
    (the step is not taken and no checkpoint of the bad state is written)."""

    def __init__(self, message: str, step: int = 0) -> None:
        super().__init__(message)
        self.step = step


# --- tokenizer --------------------------------------------------------------------------------


class TokenizerError(FlagOptError, ValueError):
    """Tokenizer files are malformed, or a tokenizer call got an invalid argument."""


# --- scoring and evaluation -------------------------------------------------------------------


class ScoringError(FlagOptError, ValueError):
    """A scoring request cannot be scored: an empty continuation, one longer than the model's
    window, a text with nothing to score, or a file that is not UTF-8 text."""


class UnknownEvalTaskError(UnknownTaskError):
    """An lm-evaluation-harness task name that lm-eval does not know."""


class MissingDependencyError(FlagOptError, ImportError):
    """An optional dependency (an extra such as ``flagopt[eval]``) is not installed."""


# --- fine-tuning data -------------------------------------------------------------------------


class DataError(FlagOptError, ValueError):
    """A training or evaluation data file cannot be used as it is.

    ``path`` is the file, ``where`` the spot in it (``"line 3"`` for JSONL, a JSON path such as
    ``"data[0].paragraphs[1].qas[2]"`` for JSON, ``""`` for the whole file) and ``field`` the
    field at fault (``""`` when none); the message names all three.
    """

    def __init__(self, message: str, path: str = "", where: str = "", field: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.where = where
        self.field = field


class DataFormatError(DataError):
    """A data file cannot be read at all: an unknown extension, JSON that does not parse,
    bytes that are not UTF-8, or no records."""


class MissingFieldError(DataError):
    """A record lacks a field its task needs."""


class FieldTypeError(DataError):
    """A field (or a record) has the wrong JSON type, or lists of unequal length."""


class EmptyFieldError(DataError):
    """A text field (text, question, context, answer text) is empty or only whitespace."""


class AnswerSpanError(DataError):
    """A QA answer's ``answer_start`` does not point at its text in the context."""


class UnknownLabelError(DataError):
    """A classification label is not in the label mapping (the training set's)."""


class CorpusTooShortError(DataError):
    """A language-modelling corpus holds fewer tokens than one block."""


# --- adapters ---------------------------------------------------------------------------------


class AdapterError(FlagOptError, ValueError):
    """A LoRA configuration or adapter directory cannot be used as it is."""


class UnsupportedAdapterOptionError(AdapterError):
    """An adapter uses a PEFT option flagopt does not implement (named; never ignored)."""


class AdapterMismatchError(AdapterError):
    """An adapter's tensors do not fit the model: another size, layer count or head."""
