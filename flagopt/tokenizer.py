"""OPT's tokenizer: GPT-2's byte-level BPE with fairseq's id order, built on ``tokenizers``.

OPT quirks, written down once:

- Every prompt gets ``</s>`` (id 2) *prepended* as BOS; no EOS is appended and no prefix space
  is added. ``</s>`` is BOS, EOS and UNK at once; ``<pad>`` (id 1) pads.
- Only ``</s>`` and ``<pad>`` are special. Written inside a text they become ids 2 and 1, as in
  the reference ``GPT2Tokenizer``, and ``skip_special_tokens`` drops them when decoding. ``<s>``
  (0), ``<unk>`` (3) and ``<mask>`` (50264) are ordinary vocabulary entries.
- The model's embedding has 50272 rows but the vocabulary 50265 entries: ids past the vocabulary
  decode to nothing, as in the reference.
"""

from __future__ import annotations

import codecs
import errno
import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from flagopt.errors import TokenizerError

DATA_DIR = Path(__file__).parent / "data" / "opt-tokenizer"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# What the hub's facebook/opt-* files say; also the defaults when a directory has no such files.
OPT_SPECIAL_TOKENS = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>",
                      "pad_token": "<pad>"}
# tokenizer_config.json settings that flagopt does not make switchable: OPT's value only.
OPT_FIXED_SETTINGS = {"add_prefix_space": False, "add_bos_token": True}
SIDES = ("left", "right")

TokenIds = int | Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class Encoding:
    """A padded batch of prompts.

    Attributes:
        input_ids: (B, T) int64 token ids, padded with the tokenizer's ``pad_token_id``.
        attention_mask: (B, T) int64, 1 for real tokens and 0 for padding.
        truncated: per row, whether ``max_length`` cut tokens off.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: list[bool]

    def to(self, device: torch.device | str) -> Encoding:
        """Return a copy with both tensors on ``device``."""
        return Encoding(self.input_ids.to(device), self.attention_mask.to(device),
                        list(self.truncated))


class IncrementalDecoder:
    """Turns a stream of token ids into text without ever splitting a UTF-8 character.

    A byte-level BPE token is a run of raw bytes and may end inside a multi-byte character
    (an emoji is often two tokens). Bytes are fed to an incremental UTF-8 decoder that holds an
    unfinished character back until it completes. ``"".join(pushes) + flush()`` equals
    ``OPTTokenizer.decode`` of all the ids with the same ``skip_special_tokens``.
    """

    def __init__(self, token_bytes: Sequence[bytes], skip_ids: frozenset[int]) -> None:
        self._token_bytes = token_bytes
        self._skip_ids = skip_ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: TokenIds) -> str:
        """Add one or more token ids.

        Args:
            token_id: an id, a sequence of ids or a 0-/1-D integer tensor.

        Returns:
            The text completed by these tokens (possibly ``""``).

        Raises:
            TokenizerError: an id is negative, or the tensor has the wrong shape or dtype.
            TypeError: an id is not an integer.
        """
        ids = _as_id_list(token_id, "token_id")
        data = b"".join(self._bytes_of(i) for i in ids)
        return self._utf8.decode(data, final=False)

    def flush(self) -> str:
        """End the stream: return what is held back, an unfinished character as U+FFFD."""
        return self._utf8.decode(b"", final=True)  # a final decode also empties the buffer

    def _bytes_of(self, token_id: int) -> bytes:
        if token_id in self._skip_ids or token_id >= len(self._token_bytes):
            return b""
        return self._token_bytes[token_id]


class OPTTokenizer:
    """OPT's tokenizer: byte-level BPE, ``</s>`` prepended, left padding with ``<pad>``.

    Build it with ``default()`` (the packaged hub files), ``from_dir`` or ``from_files``.
    """

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]],
                 special_tokens: Mapping[str, str | AddedToken] | None = None,
                 *, source: str = "the vocabulary") -> None:
        """Build from parsed files.

        Args:
            vocab: token -> id, ids exactly ``0 .. len(vocab) - 1``.
            merges: BPE merges, highest priority first.
            special_tokens: ``bos_token``/``eos_token``/``unk_token``/``pad_token`` overrides of
                OPT's (``</s>``, ``</s>``, ``</s>``, ``<pad>``); each must be in ``vocab``.
            source: where ``vocab`` came from, for error messages.

        Raises:
            TokenizerError: the vocabulary, the merges or a special token is unusable.
        """
        unknown = sorted(set(special_tokens or {}) - set(OPT_SPECIAL_TOKENS))
        if unknown:
            raise TokenizerError(f"unknown special token keys {unknown}; "
                                 f"expected some of {list(OPT_SPECIAL_TOKENS)}")
        specials = {key: _as_added_token(value, key, source)
                    for key, value in {**OPT_SPECIAL_TOKENS, **(special_tokens or {})}.items()}
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = (
            specials[key].content for key in OPT_SPECIAL_TOKENS)
        ids = {key: _special_id(vocab, token.content, key, source)
               for key, token in specials.items()}
        self.bos_token_id: int = ids["bos_token"]
        self.eos_token_id: int = ids["eos_token"]
        self.unk_token_id: int = ids["unk_token"]
        self.pad_token_id: int = ids["pad_token"]
        self.all_special_ids: frozenset[int] = frozenset(ids.values())
        self._tokenizer = _build_bpe(vocab, merges, specials.values(), source)
        self._token_bytes = _token_bytes_table(vocab)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_files(cls, vocab_file: str | Path, merges_file: str | Path,
                   special_tokens: Mapping[str, str | AddedToken] | None = None) -> OPTTokenizer:
        """Build from a ``vocab.json`` and a ``merges.txt``.

        Raises:
            FileNotFoundError: a file is missing (the error names it).
            TokenizerError: a file is malformed (the error names it).
        """
        vocab = _read_vocab(Path(vocab_file))
        merges = _read_merges(Path(merges_file))
        return cls(vocab, merges, special_tokens, source=str(vocab_file))

    @classmethod
    def from_dir(cls, path: str | Path) -> OPTTokenizer:
        """Build from a hub-style directory: ``vocab.json``, ``merges.txt`` and, if present,
        ``tokenizer_config.json`` then ``special_tokens_map.json`` for the special tokens.

        Raises:
            FileNotFoundError: ``path``, ``vocab.json`` or ``merges.txt`` is missing.
            TokenizerError: a file is malformed, or asks for a non-OPT setting such as
                ``add_prefix_space: true``.
        """
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(errno.ENOENT, "OPT tokenizer directory not found", str(path))
        special_tokens = _read_special_tokens(directory)
        return cls.from_files(directory / VOCAB_FILE, directory / MERGES_FILE, special_tokens)

    @classmethod
    def default(cls) -> OPTTokenizer:
        """The tokenizer of every facebook/opt-* checkpoint, from flagopt's packaged files."""
        return cls.from_dir(DATA_DIR)

    # --- sizes --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of vocabulary entries (50265 for OPT; the model pads its embedding to 50272)."""
        return len(self._token_bytes)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"OPTTokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
                f"eos_token_id={self.eos_token_id}, pad_token_id={self.pad_token_id})")

    # --- encoding -----------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text`` alone, as FlagAI's ``encode``: no ``</s>`` prepended
        (``encode("day") == [1208]``); ``add_bos=True`` prepends it, as a prompt gets.

        Raises:
            TypeError: ``text`` is not a ``str``.
            TokenizerError: ``text`` holds a lone surrogate, which is not encodable text.
        """
        _check_text(text, "text")
        try:
            ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        except TypeError:
            _check_encodable(text, "text")
            raise
        return [self.bos_token_id, *ids] if add_bos else ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` alone (as ``encode``) and each token's character span in ``text``.

        A span is ``(start, end)`` into the ``str``, leading and trailing whitespace left out
        unless the token is only whitespace (``"Hello world"`` -> ``[(0, 5), (6, 11)]``, as
        Hugging Face's ``trim_offsets``). The byte tokens of one multi-byte character all span
        that character.

        Raises:
            TypeError, TokenizerError: as ``encode``.
        """
        _check_text(text, "text")
        _check_encodable(text, "text")
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), [_trim_span(text, s, e) for s, e in encoding.offsets]

    def encode_prompt(self, text: str) -> list[int]:
        """The ids the model sees for a prompt: ``</s>`` (2) prepended, no EOS appended
        (``encode_prompt("Hello world") == [2, 31414, 232]``).

        Raises:
            TypeError, TokenizerError: as ``encode``.
        """
        return self.encode(text, add_bos=True)

    # --- FlagAI's tokenizer methods -----------------------------------------------------------

    def tokenize(self, text: str) -> list[str]:
        """Byte-level BPE pieces of ``text`` (``"fried chicken"`` -> ``['fried', 'Ġchicken']``).

        Raises:
            TypeError, TokenizerError: as ``encode``.
        """
        _check_text(text, "text")
        _check_encodable(text, "text")
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Vocabulary ids of BPE pieces: one id for a ``str``, a list for a list.

        Raises:
            TokenizerError: a piece is not in the vocabulary (the error names it).
            TypeError: a piece is not a ``str``.
        """
        if isinstance(tokens, str):
            return self._token_id(tokens)
        return [self._token_id(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int] | torch.Tensor
                              ) -> str | list[str]:
        """BPE pieces of ids: one piece for an ``int``, a list for a sequence or 1-D tensor.

        Raises:
            TokenizerError: an id is negative or past the vocabulary (50265 entries).
            TypeError: an id is not an integer.
        """
        single = not isinstance(ids, (torch.Tensor, Sequence)) or \
            isinstance(ids, torch.Tensor) and ids.dim() == 0
        pieces = [self._token_piece(i) for i in _as_id_list(ids, "ids")]
        return pieces[0] if single else pieces

    def encode_plus(self, text: str, second_text: str | None = None,
                    truncation: bool = True, max_length: int | None = None
                    ) -> dict[str, list[int]]:
        """FlagAI's ``encode_plus`` for OPT: ``{"input_ids", "token_type_ids"}``.

        One text gives ``[</s>] + ids`` with type ids all 0. A pair gives
        ``[<s>] + ids + [</s>] + second_ids + [</s>]``, type ids 0 up to and including the
        first ``</s>`` and 1 after. With ``truncation`` and a ``max_length`` that the texts'
        ids plus 3 exceed, the last id of the longer text (of the second on a tie) is dropped
        until the texts' ids alone fit in ``max_length``; the special ids come on top, as in
        FlagAI.

        Raises:
            TypeError: a text is not a ``str``.
            TokenizerError: ``max_length`` is not an int >= 1 or None.
        """
        _check_max_length(max_length)
        first = self.encode(text)
        second = None if second_text is None else self.encode(second_text)
        both = len(first) + (len(second) if second is not None else 0)
        if truncation and max_length is not None and both + 3 > max_length:
            _truncate_longest_first(first, second or [], max_length)
        if second is None:
            input_ids = [self.bos_token_id, *first]
            return {"input_ids": input_ids, "token_type_ids": [0] * len(input_ids)}
        end = self.eos_token_id
        input_ids = [self.get_command_id("cls"), *first, end, *second, end]
        token_type_ids = [0] * (len(first) + 2) + [1] * (len(second) + 1)
        return {"input_ids": input_ids, "token_type_ids": token_type_ids}

    def get_command_id(self, name: str) -> int:
        """The id FlagAI's tokenizer gives a command token for OPT's vocabulary.

        ``cls`` 0 (``<s>``), ``pad`` 1, ``bos`` 2, ``eos`` 2, ``unk`` 3 (``<unk>``, not the
        ``</s>`` that Hugging Face uses), ``mask`` 50264; ``sep``, which OPT's vocabulary
        lacks, is the first id past it (50265), as FlagAI adds it.

        Raises:
            KeyError: ``name`` is not one of these (the error lists them).
        """
        ids = self._command_ids()
        if name not in ids:
            raise KeyError(f"unknown command token name {name!r}; expected one of "
                           f"{', '.join(sorted(ids))}")
        return ids[name]

    def _command_ids(self) -> dict[str, int]:
        vocab = self._tokenizer.get_vocab(with_added_tokens=False)
        ids = {"cls": vocab.get("<s>"), "pad": self.pad_token_id, "bos": self.bos_token_id,
               "eos": self.eos_token_id, "unk": vocab.get("<unk>"), "mask": vocab.get("<mask>"),
               "sep": vocab.get("<sep>", self.vocab_size)}
        return {name: i for name, i in ids.items() if i is not None}

    def _token_id(self, token: object) -> int:
        if not isinstance(token, str):
            raise TypeError(f"tokens must be str pieces, got {token!r} "
                            f"({type(token).__name__})")
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary")
        return token_id

    def _token_piece(self, token_id: int) -> str:
        piece = self._tokenizer.id_to_token(token_id) if token_id < self.vocab_size else None
        if piece is None:
            raise TokenizerError(f"token id {token_id} is past the vocabulary "
                                 f"(ids 0..{self.vocab_size - 1})")
        return piece

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
        """``encode`` for many texts at once (in parallel, in ``tokenizers``).

        Raises:
            TypeError: ``texts`` is a bare ``str`` or holds a non-``str``.
            TokenizerError: a text holds a lone surrogate.
        """
        texts = _check_texts(texts)
        try:
            encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:
            for i, text in enumerate(texts):
                _check_encodable(text, f"texts[{i}]")
            raise
        prefix = [self.bos_token_id] if add_bos else []
        return [prefix + encoding.ids for encoding in encodings]

    def __call__(self, text: str | Sequence[str], *, padding_side: str = "left",
                 max_length: int | None = None, truncation_side: str = "left") -> Encoding:
        """Encode one prompt or a batch into padded (B, T) tensors, ``</s>`` prepended.

        Args:
            text: a prompt (B = 1) or a non-empty list of prompts.
            padding_side: ``"left"`` (for generation) or ``"right"``.
            max_length: if set, rows longer than this are truncated to it.
            truncation_side: ``"left"`` drops the oldest tokens but keeps the leading ``</s>``
                (``[2] + ids[-(max_length - 1):]``); ``"right"`` keeps the first tokens.

        Returns:
            An ``Encoding``; ``truncated[i]`` tells whether row ``i`` was cut.

        Raises:
            TokenizerError: a side is not ``"left"``/``"right"``, ``max_length`` is not an int
                >= 1, or ``text`` is an empty list.
            TypeError: ``text`` is neither a ``str`` nor a list of ``str``.
        """
        _check_side("padding_side", padding_side)
        _check_side("truncation_side", truncation_side)
        _check_max_length(max_length)
        texts = [text] if isinstance(text, str) else _check_texts(text)
        if not texts:
            raise TokenizerError("text is an empty list; pass a string or a list of strings")
        rows = self.encode_batch(texts)
        truncated = [max_length is not None and len(row) > max_length for row in rows]
        rows = [_truncate(row, max_length, truncation_side) if cut else row
                for row, cut in zip(rows, truncated)]
        input_ids, attention_mask = _pad(rows, self.pad_token_id, padding_side)
        return Encoding(input_ids, attention_mask, truncated)

    # --- decoding -----------------------------------------------------------------------------

    def decode(self, ids: TokenIds, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 (a cut-off character) becomes U+FFFD.

        Args:
            ids: a sequence of ids or a 1-D integer tensor.
            skip_special_tokens: drop ``</s>`` and ``<pad>``.

        Raises:
            TokenizerError: an id is negative, or the tensor is not 1-D integer.
            TypeError: an id is not an integer.
        """
        known = [i for i in _as_id_list(ids, "ids") if i < self.vocab_size]
        return self._tokenizer.decode(known, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Sequence[TokenIds] | torch.Tensor,
                     skip_special_tokens: bool = True) -> list[str]:
        """``decode`` for each row of a (B, T) tensor or each sequence of a list.

        Raises:
            TokenizerError: as ``decode``, or a tensor is not 2-D.
        """
        if isinstance(sequences, torch.Tensor) and sequences.dim() != 2:
            raise TokenizerError("sequences must be a 2-D (batch, length) tensor, "
                                 f"got shape {tuple(sequences.shape)}")
        rows = [[i for i in _as_id_list(_check_row(row, b), f"sequences[{b}]")
                 if i < self.vocab_size] for b, row in enumerate(sequences)]
        return self._tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A fresh streaming decoder (one per generated sequence)."""
        skip_ids = self.all_special_ids if skip_special_tokens else frozenset()
        return IncrementalDecoder(self._token_bytes, skip_ids)


# --- reading files ----------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "OPT tokenizer file not found", str(path)) from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path} is not UTF-8 text: {e}") from None


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except (json.JSONDecodeError, RecursionError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {str(e)[:200]}") from None


def _read_vocab(path: Path) -> dict[str, int]:
    """Read ``vocab.json``: a JSON object of token -> id with ids ``0 .. n-1``, each once."""
    vocab = _read_json(path)
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"{path} must hold a non-empty JSON object of token -> id, "
                             f"got {type(vocab).__name__}")
    bad = next(((k, v) for k, v in vocab.items() if type(v) is not int), None)
    if bad is not None:
        raise TokenizerError(f"{path}: token {bad[0]!r} has id {bad[1]!r}, expected an integer")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise TokenizerError(f"{path}: ids must be 0..{len(vocab) - 1}, each used once")
    return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """Read ``merges.txt``: an optional ``#version`` line, then one ``left right`` pair a line."""
    lines = _read_text(path).split("\n")
    first = 1 if lines and lines[0].startswith("#version") else 0
    merges = []
    for number, line in enumerate(lines[first:], start=first + 1):
        if not line:
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise TokenizerError(f"{path} line {number}: expected 'left right', got {line!r}")
        merges.append((pair[0], pair[1]))
    if not merges:
        raise TokenizerError(f"{path} holds no merges")
    return merges


def _read_special_tokens(directory: Path) -> dict[str, str | AddedToken]:
    """Special tokens from ``tokenizer_config.json``, overridden by ``special_tokens_map.json``.

    Raises:
        TokenizerError: a file is malformed or asks for a setting OPT does not use.
    """
    tokens: dict[str, str | AddedToken] = {}
    for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
        path = directory / name
        if not path.is_file():
            continue
        data = _read_json(path)
        if not isinstance(data, dict):
            raise TokenizerError(f"{path} must hold a JSON object, got {type(data).__name__}")
        _check_fixed_settings(data, path)
        tokens.update({key: _as_added_token(data[key], key, str(path))
                       for key in OPT_SPECIAL_TOKENS if key in data})
    return tokens


def _check_fixed_settings(data: Mapping[str, object], path: Path) -> None:
    for key, expected in OPT_FIXED_SETTINGS.items():
        if key in data and data[key] != expected:
            raise TokenizerError(f"{path}: {key} is {data[key]!r}; OPT's tokenizer has "
                                 f"{json.dumps(expected)} and flagopt supports only that")


def _as_added_token(value: object, key: str, source: str) -> AddedToken:
    """A special token from a string or a hub ``{"content": ..., "lstrip": ...}`` object."""
    if isinstance(value, AddedToken):
        return value
    if isinstance(value, str) and value:
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str) and value["content"]:
        return AddedToken(value["content"], single_word=bool(value.get("single_word", False)),
                          lstrip=bool(value.get("lstrip", False)),
                          rstrip=bool(value.get("rstrip", False)), normalized=False, special=True)
    raise TokenizerError(f"{source}: {key} must be a non-empty string or an object with a "
                         f"'content' string, got {value!r}")


def _special_id(vocab: Mapping[str, int], content: str, key: str, source: str) -> int:
    if content not in vocab:
        raise TokenizerError(f"{key} {content!r} is not in {source}")
    return vocab[content]


# --- building ---------------------------------------------------------------------------------


def _build_bpe(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]],
               specials: Iterable[AddedToken], source: str) -> Tokenizer:
    """GPT-2's byte-level BPE: no prefix space, GPT-2's split regex, specials matched first."""
    try:
        tokenizer = Tokenizer(BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False))
    except Exception as e:  # tokenizers raises a bare Exception for bad merges
        raise TokenizerError(f"cannot build BPE from {source} and its merges: {e}") from None
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    unique = {token.content: token for token in specials}
    tokenizer.add_special_tokens(list(unique.values()))
    return tokenizer


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable char that stands for each byte.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves;
    the other 68 bytes take ``chr(256)``, ``chr(257)``, ... in byte order.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = sorted(set(range(256)) - set(printable))
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def _token_to_bytes(token: str) -> bytes:
    """Raw bytes of a vocabulary entry; an entry outside the alphabet is its own UTF-8 (as the
    ``tokenizers`` ByteLevel decoder does)."""
    table = _byte_of_char()
    if all(char in table for char in token):
        return bytes(table[char] for char in token)
    return token.encode("utf-8")


def _token_bytes_table(vocab: Mapping[str, int]) -> list[bytes]:
    table = [b""] * len(vocab)
    for token, token_id in vocab.items():
        table[token_id] = _token_to_bytes(token)
    return table


def _trim_span(text: str, start: int, end: int) -> tuple[int, int]:
    """``(start, end)`` without the whitespace at either side, unless that is all there is."""
    piece = text[start:end]
    if not piece.strip():
        return start, end
    return start + len(piece) - len(piece.lstrip()), end - len(piece) + len(piece.rstrip())


# --- validating arguments ---------------------------------------------------------------------


def _check_text(text: object, name: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")


def _check_texts(texts: object) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        _check_text(text, f"texts[{i}]")
    return list(texts)


def _check_encodable(text: str, name: str) -> None:
    """Raise a clear error for a lone surrogate, which ``tokenizers`` rejects obscurely."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"{name} holds a lone surrogate U+{ord(text[e.start]):04X} at index "
                             f"{e.start}; it is not valid Unicode text") from None


def _check_side(name: str, side: object) -> None:
    if side not in SIDES:
        raise TokenizerError(f"{name} must be 'left' or 'right', got {side!r}")


def _check_max_length(max_length: object) -> None:
    if max_length is None:
        return
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise TokenizerError(f"max_length must be an int >= 1 or None, got {max_length!r}")


def _as_id_list(ids: object, name: str) -> list[int]:
    """Token ids as a list of non-negative ints, from an int, an iterable or a 0-/1-D tensor."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1 or ids.dtype.is_floating_point or ids.dtype.is_complex \
                or ids.dtype == torch.bool:
            raise TokenizerError(f"{name} must be a 1-D integer tensor, got shape "
                                 f"{tuple(ids.shape)} and dtype {ids.dtype}")
        values = ids.reshape(-1).tolist()
    elif isinstance(ids, (str, bytes)):
        raise TypeError(f"{name} must be token ids, got {type(ids).__name__}")
    elif isinstance(ids, Iterable):
        values = [_as_id(i, name) for i in ids]
    else:
        values = [_as_id(ids, name)]
    negative = next((i for i in values if i < 0), None)
    if negative is not None:
        raise TokenizerError(f"{name} holds the negative token id {negative}")
    return values


def _check_row(row: object, index: int) -> object:
    if isinstance(row, int) or isinstance(row, torch.Tensor) and row.dim() == 0:
        raise TypeError(f"sequences[{index}] is the single id {row!r}; batch_decode takes a "
                        "list of id sequences (use decode for one sequence)")
    return row


def _as_id(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} holds {value!r}, expected an integer token id")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} holds {value!r} ({type(value).__name__}), "
                        "expected an integer token id") from None


# --- batching ---------------------------------------------------------------------------------


def _truncate_longest_first(first: list[int], second: list[int], max_length: int) -> None:
    """FlagAI's pair truncation, in place: drop the last id of the longer list (``first``
    only when strictly longer) until both together hold at most ``max_length`` ids."""
    while len(first) + len(second) > max_length:
        (first if len(first) > len(second) else second).pop()


def _truncate(row: list[int], max_length: int, side: str) -> list[int]:
    """Cut ``row`` to ``max_length``; from the left, the leading ``</s>`` stays."""
    if side == "right":
        return row[:max_length]
    return [row[0], *row[len(row) - (max_length - 1):]]


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad rows to the longest; returns (B, T) ids and (B, T) mask, both int64."""
    width = max(len(row) for row in rows)
    ids, mask = [], []
    for row in rows:
        pad = width - len(row)
        ids.append([pad_id] * pad + row if side == "left" else row + [pad_id] * pad)
        mask.append([0] * pad + [1] * len(row) if side == "left" else [1] * len(row) + [0] * pad)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
