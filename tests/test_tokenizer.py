"""OPTTokenizer against transformers' GPT2Tokenizer (configured as the facebook/opt-* hub files
are) and against a small pure-Python byte-level BPE, on the real OPT vocabulary."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import regex
import torch

from flagopt.errors import TokenizerError
from flagopt.tokenizer import DATA_DIR, Encoding, OPTTokenizer

SPECIALS = ("</s>", "<pad>")

TEXTS = [
    "Hello world",
    "A photo of a cat",
    "",
    " leading space",
    "trailing space ",
    "  two  spaces   three    four",
    "line one\nline two\n\n\nend\n",
    "\ttabs\tand\r\nwindows\r\n",
    "中文分词测试，你好世界。",
    "日本語のテキスト、カタカナとひらがな。",
    "مرحبا بالعالم! هذا اختبار.",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "Привет, мир! Ёжик в тумане.",
    "😀 emoji 👍🏽 thumbs, family 👨‍👩‍👧‍👦, flag 🏳️‍🌈 and 🇫🇷",
    "combining: e\u0301 n\u0303 Z\u0351\u0368a\u036b\u0353l\u0358go\u0301",
    "controls \x00 nul \x01\x07\x1b[31mred\x1b[0m \x7f del \x85 \u200b\u200d \ufeff",
    "more controls a\x1c\x1d b\x1e\x1f c \x0b\x0c d \x00\x00",
    "separators \u2028 \u2029 \xa0nbsp \u3000ideographic",
    "def f(x: int) -> int:\n    return x ** 2  # square\n",
    "3.14159 1,000,000 42nd -7 0x1F 1e-9 Ⅻ ² ½ ٣",
    "https://example.com/path/to?q=1&r=two#frag mailto:a@b.org",
    "I'm sure they've said we'll, you'd, it's, THEY'RE",
    "ÿ¡¬®\xad latin-1 edge bytes",
    "</s>",
    "before</s>after",
    " <pad> padded </s></s>",
    "<s> <unk> <mask> <|endoftext|> are plain text",
    "\ufffd already a replacement char",
    "Mixed: English, 中文, العربية, हिन्दी, русский, 😀 in one line.",
]
PLAIN_TEXTS = [t for t in TEXTS if not any(s in t for s in SPECIALS)]

# GPT-2's split pattern; the pure-Python oracle below needs nothing from `tokenizers`.
GPT2_SPLIT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def gpt2_byte_chars() -> list[str]:
    """byte -> printable char, GPT-2's published construction."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


class PurePythonBPE:
    """Textbook byte-level BPE: split, map bytes to chars, merge the best-ranked pair."""

    def __init__(self, directory: Path) -> None:
        self.vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        lines = (directory / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
        self.ranks = {tuple(line.split(" ")): r for r, line in enumerate(lines) if line}
        self.byte_chars = gpt2_byte_chars()

    def encode(self, text: str) -> list[int]:
        ids = [2]
        for part in regex.split("(</s>|<pad>)", text):
            if part in SPECIALS:
                ids.append(self.vocab[part])
                continue
            for piece in GPT2_SPLIT.findall(part):
                ids += [self.vocab[t] for t in self.bpe("".join(
                    self.byte_chars[b] for b in piece.encode("utf-8")))]
        return ids

    def bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts


@pytest.fixture(scope="module")
def tok() -> OPTTokenizer:
    return OPTTokenizer.default()


@pytest.fixture(scope="module")
def ref():
    """transformers' tokenizer for OPT, built as the hub's tokenizer_config.json says."""
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer(vocab=str(DATA_DIR / "vocab.json"), merges=str(DATA_DIR / "merges.txt"),
                         bos_token="</s>", eos_token="</s>", unk_token="</s>",
                         pad_token="<pad>", add_bos_token=True, add_prefix_space=False)


@pytest.fixture(scope="module")
def py_bpe() -> PurePythonBPE:
    return PurePythonBPE(DATA_DIR)


def ref_decode(ref, ids: list[int], skip: bool) -> str:
    return ref.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def copy_files(dst: Path, *names: str) -> Path:
    for name in names:
        shutil.copy(DATA_DIR / name, dst / name)
    return dst


# --- packaged files -------------------------------------------------------------------------


@pytest.mark.parametrize("name, sha256", [
    ("vocab.json", "06b4d46c8e752d410213d9548eb27a54db70fda0319b6271fb8d59dead5e1cab"),
    ("merges.txt", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
])
def test_packaged_files_are_the_real_opt_files(name: str, sha256: str) -> None:
    assert hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest() == sha256


def test_packaged_configs_read_by_transformers_as_opt() -> None:
    from transformers import GPT2Tokenizer

    hub = GPT2Tokenizer.from_pretrained(str(DATA_DIR))
    assert (hub.bos_token, hub.eos_token, hub.unk_token, hub.pad_token) == (
        "</s>", "</s>", "</s>", "<pad>")
    assert hub.add_bos_token is True
    assert hub("Hello world")["input_ids"] == [2, 31414, 232]


# --- ids and sizes ------------------------------------------------------------------------------


def test_special_ids_and_sizes(tok: OPTTokenizer, ref) -> None:
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 2, 2)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (
        ref.pad_token_id, ref.bos_token_id, ref.eos_token_id, ref.unk_token_id)
    assert tok.vocab_size == len(tok) == len(ref) == 50265


@pytest.mark.parametrize("text, ids", [
    ("Hello world", [2, 31414, 232]),
    ("A photo of a cat", [2, 250, 1345, 9, 10, 4758]),
    ("", [2]),
])
def test_known_encodings(tok: OPTTokenizer, text: str, ids: list[int]) -> None:
    assert tok.encode_prompt(text) == ids
    assert tok.encode(text, add_bos=False) == ids[1:]


# --- encoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_reference(tok: OPTTokenizer, ref, text: str) -> None:
    assert tok.encode_prompt(text) == ref(text)["input_ids"]
    assert tok.encode(text, add_bos=False) == ref(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_pure_python_bpe(tok: OPTTokenizer, py_bpe: PurePythonBPE,
                                        text: str) -> None:
    assert tok.encode_prompt(text) == py_bpe.encode(text)


def test_special_token_strings_in_text_become_special_ids(tok: OPTTokenizer) -> None:
    assert tok.encode_prompt("a</s>b") == [2, tok.encode("a", add_bos=False)[0], 2,
                                    tok.encode("b", add_bos=False)[0]]
    assert tok.encode("<pad>", add_bos=False) == [1]
    assert 0 not in tok.encode_prompt("<s>") and 3 not in tok.encode_prompt("<unk>")


def test_encode_batch_matches_encode(tok: OPTTokenizer) -> None:
    assert tok.encode_batch(TEXTS) == [tok.encode_prompt(t) for t in TEXTS]
    assert tok.encode_batch(TEXTS, add_bos=False) == [tok.encode(t, add_bos=False) for t in TEXTS]
    assert tok.encode_batch([]) == []


def test_very_long_texts_match_reference(tok: OPTTokenizer, ref) -> None:
    rng = random.Random(0)
    mixed = "".join(rng.choice(TEXTS) + rng.choice([" ", "\n", ""]) for _ in range(2000))
    for text in ("a" * 100_000, "😀" * 20_000, mixed):
        assert tok.encode_prompt(text) == ref(text)["input_ids"]
        assert tok.decode(tok.encode_prompt(text)) == text.replace("</s>", "").replace("<pad>", "")


# --- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_reference(tok: OPTTokenizer, ref, text: str, skip: bool) -> None:
    ids = ref(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=skip) == ref_decode(ref, ids, skip)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(tok: OPTTokenizer, text: str) -> None:
    without_specials = text.replace("</s>", "").replace("<pad>", "")
    assert tok.decode(tok.encode_prompt(text)) == without_specials
    assert tok.decode(tok.encode_prompt(text), skip_special_tokens=False) == "</s>" + text


def test_decode_accepts_tensor_and_ids_past_the_vocabulary(tok: OPTTokenizer, ref) -> None:
    ids = tok.encode_prompt("tensor 😀 input")
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids) == "tensor 😀 input"
    assert tok.decode(torch.tensor(ids, dtype=torch.int32)) == "tensor 😀 input"
    padded_vocab = [50264, 50265, 50271, 31414]  # the model has 50272 rows
    assert tok.decode(padded_vocab) == ref_decode(ref, padded_vocab, True) == "<mask>Hello"


def test_decode_random_ids_matches_reference(tok: OPTTokenizer, ref) -> None:
    """Random ids cut characters anywhere: invalid UTF-8 must become U+FFFD like the reference."""
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.choice([rng.randrange(50272), rng.randrange(4), rng.randrange(200, 260)])
               for _ in range(rng.randint(0, 12))]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref_decode(ref, ids, skip), ids


def test_batch_decode(tok: OPTTokenizer, ref) -> None:
    enc = tok(TEXTS)
    assert tok.batch_decode(enc.input_ids) == [
        t.replace("</s>", "").replace("<pad>", "") for t in TEXTS]
    rows = [tok.encode_prompt(t) for t in TEXTS]
    assert tok.batch_decode(rows, skip_special_tokens=False) == [
        ref_decode(ref, r, False) for r in rows]


# --- batching, padding and truncation ----------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding(tok: OPTTokenizer, side: str) -> None:
    texts = ["Hello world", "A photo of a cat", ""]
    enc = tok(texts, padding_side=side)
    rows = [tok.encode_prompt(t) for t in texts]
    width = max(map(len, rows))
    assert enc.input_ids.dtype == enc.attention_mask.dtype == torch.long
    assert enc.input_ids.shape == enc.attention_mask.shape == (3, width)
    for row, ids, mask in zip(rows, enc.input_ids.tolist(), enc.attention_mask.tolist()):
        pad = width - len(row)
        if side == "left":
            assert ids == [1] * pad + row and mask == [0] * pad + [1] * len(row)
        else:
            assert ids == row + [1] * pad and mask == [1] * len(row) + [0] * pad
    assert enc.truncated == [False, False, False]


def test_single_string_is_a_batch_of_one(tok: OPTTokenizer) -> None:
    enc = tok("Hello world")
    assert isinstance(enc, Encoding)
    assert enc.input_ids.tolist() == [[2, 31414, 232]]
    assert enc.attention_mask.tolist() == [[1, 1, 1]]
    assert enc.to("cpu").input_ids.tolist() == [[2, 31414, 232]]


def test_truncation_keeps_leading_bos_and_last_tokens(tok: OPTTokenizer) -> None:
    long_ids = tok.encode_prompt("A photo of a cat")  # [2, 250, 1345, 9, 10, 4758]
    enc = tok(["A photo of a cat", "Hello world"], max_length=4)
    assert enc.input_ids.tolist() == [[2, 9, 10, 4758], [1, 2, 31414, 232]]
    assert enc.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert enc.truncated == [True, False]
    assert tok("A photo of a cat", max_length=1).input_ids.tolist() == [[2]]
    assert tok("A photo of a cat", max_length=2).input_ids.tolist() == [[2, 4758]]
    exact = tok("A photo of a cat", max_length=len(long_ids))
    assert exact.input_ids.tolist() == [long_ids] and exact.truncated == [False]


def test_truncation_from_the_right_keeps_first_tokens(tok: OPTTokenizer) -> None:
    enc = tok("A photo of a cat", max_length=3, truncation_side="right")
    assert enc.input_ids.tolist() == [[2, 250, 1345]] and enc.truncated == [True]


# --- incremental decoding ----------------------------------------------------------------------


def stream(tok: OPTTokenizer, chunks: list[list[int]], skip: bool) -> list[str]:
    decoder = tok.incremental_decoder(skip_special_tokens=skip)
    return [decoder.push(chunk) for chunk in chunks] + [decoder.flush()]


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoder_equals_decode_over_every_split(tok: OPTTokenizer, text: str,
                                                            skip: bool) -> None:
    ids = tok.encode_prompt(text)
    full = tok.decode(ids, skip_special_tokens=skip)
    one_by_one = stream(tok, [[i] for i in ids], skip)
    assert "".join(one_by_one) == full
    assert all("\ufffd" not in piece for piece in one_by_one) or "\ufffd" in text
    for cut in range(len(ids) + 1):
        assert "".join(stream(tok, [ids[:cut], ids[cut:]], skip)) == full


def test_incremental_decoder_holds_back_a_split_character(tok: OPTTokenizer) -> None:
    ids = tok.encode("😀", add_bos=False)
    assert len(ids) == 2  # the emoji's four bytes span two tokens
    decoder = tok.incremental_decoder()
    assert decoder.push(ids[0]) == ""
    assert decoder.push(torch.tensor(ids[1])) == "😀"
    assert decoder.flush() == ""


def test_incremental_decoder_random_ids_match_decode(tok: OPTTokenizer) -> None:
    """Invalid UTF-8 mid-stream and at the end gives the same U+FFFDs as a full decode."""
    rng = random.Random(2)
    for _ in range(300):
        ids = [rng.choice([rng.randrange(50272), rng.randrange(4), rng.randrange(200, 260)])
               for _ in range(rng.randint(0, 12))]
        for skip in (True, False):
            chunks, i = [], 0
            while i < len(ids):
                step = rng.randint(1, 3)
                chunks.append(ids[i:i + step])
                i += step
            assert "".join(stream(tok, chunks, skip)) == tok.decode(ids, skip), ids


def test_incremental_decoder_flush_replaces_an_unfinished_character(tok: OPTTokenizer) -> None:
    first = tok.encode("😀", add_bos=False)[0]
    decoder = tok.incremental_decoder()
    assert decoder.push([first]) == ""
    assert decoder.flush() == "\ufffd" == tok.decode([first])
    assert decoder.push(tok.encode("ok", add_bos=False)) == "ok"


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    ({"padding_side": "center"}, ["padding_side", "'center'"]),
    ({"truncation_side": "middle"}, ["truncation_side", "'middle'"]),
    ({"max_length": 0}, ["max_length", "0"]),
    ({"max_length": -3}, ["max_length", "-3"]),
    ({"max_length": 2.5}, ["max_length", "2.5"]),
    ({"max_length": True}, ["max_length", "True"]),
])
def test_call_rejects_bad_arguments(tok: OPTTokenizer, kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        tok("Hello", **kwargs)
    assert all(word in str(info.value) for word in words)
    assert isinstance(info.value, TokenizerError)


def test_rejects_bad_texts(tok: OPTTokenizer) -> None:
    with pytest.raises(ValueError, match="empty list"):
        tok([])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="texts must be a list"):
        tok.encode_batch("not a list")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok(["fine", None])
    with pytest.raises(TokenizerError, match="surrogate U\\+D800 at index 1"):
        tok.encode("a\ud800b")
    with pytest.raises(TokenizerError, match=r"texts\[1\] holds a lone surrogate"):
        tok.encode_batch(["ok", "\udfff"])


def test_decode_rejects_bad_ids(tok: OPTTokenizer) -> None:
    with pytest.raises(TokenizerError, match="negative token id -1"):
        tok.decode([5, -1])
    with pytest.raises(TypeError, match="1.5"):
        tok.decode([1.5])
    with pytest.raises(TypeError):
        tok.decode("hello")
    with pytest.raises(TokenizerError, match="1-D integer tensor"):
        tok.decode(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(TokenizerError, match="1-D integer tensor"):
        tok.decode(torch.ones(3))
    with pytest.raises(TokenizerError, match="2-D"):
        tok.batch_decode(torch.ones(3, dtype=torch.long))
    with pytest.raises(TypeError, match="single id"):
        tok.batch_decode([1, 2, 3])
    with pytest.raises(TokenizerError, match="negative"):
        tok.incremental_decoder().push(-2)


# --- loading from files --------------------------------------------------------------------------


def test_from_dir_and_from_files_agree_with_default(tok: OPTTokenizer, tmp_path: Path) -> None:
    bare = copy_files(tmp_path, "vocab.json", "merges.txt")  # no config: OPT's defaults
    for other in (OPTTokenizer.from_dir(bare),
                  OPTTokenizer.from_files(bare / "vocab.json", bare / "merges.txt")):
        assert (other.pad_token_id, other.bos_token_id, other.unk_token_id) == (1, 2, 2)
        assert other.encode_batch(TEXTS) == tok.encode_batch(TEXTS)


def test_from_dir_takes_special_tokens_from_the_files(tmp_path: Path) -> None:
    copy_files(tmp_path, "vocab.json", "merges.txt", "tokenizer_config.json")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": {"content": "<unk>"}, "unk_token": "<unk>"}))
    other = OPTTokenizer.from_dir(tmp_path)
    assert (other.pad_token_id, other.unk_token_id, other.bos_token_id) == (3, 3, 2)
    assert other(["a", "a b"]).input_ids[0, 0].item() == 3
    assert other.encode_prompt("x<unk>") == [2, 1178, 3]  # now special, so matched in text


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_missing_file_is_named(tmp_path: Path, missing: str) -> None:
    copy_files(tmp_path, *({"vocab.json", "merges.txt"} - {missing}))
    with pytest.raises(FileNotFoundError, match=missing):
        OPTTokenizer.from_dir(tmp_path)


def test_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        OPTTokenizer.from_dir(tmp_path / "nowhere")


@pytest.mark.parametrize("name, content, words", [
    ("vocab.json", "{not json", ["vocab.json", "not valid JSON"]),
    ("vocab.json", "[1, 2]", ["vocab.json", "JSON object"]),
    ("vocab.json", '{"a": "zero"}', ["vocab.json", "'a'", "'zero'"]),
    ("vocab.json", '{"a": 0, "b": 5}', ["vocab.json", "ids must be 0..1"]),
    ("vocab.json", '{"</s>": 0, "<pad>": 1}', ["merges", "out of vocabulary"]),
    ("merges.txt", "#version: 0.2\nĠ t\nbroken-line\n", ["merges.txt", "line 3", "broken-line"]),
    ("merges.txt", "#version: 0.2\n", ["merges.txt", "no merges"]),
    ("special_tokens_map.json", '{"pad_token": "<nope>"}', ["pad_token", "'<nope>'"]),
    ("special_tokens_map.json", '{"bos_token": 7}', ["special_tokens_map.json", "bos_token", "7"]),
    ("special_tokens_map.json", "[]", ["special_tokens_map.json", "JSON object"]),
    ("tokenizer_config.json", '{"add_prefix_space": true}', ["add_prefix_space", "True"]),
    ("tokenizer_config.json", '{"add_bos_token": false}', ["add_bos_token", "False"]),
])
def test_garbled_files_raise_naming_the_problem(tmp_path: Path, name: str, content: str,
                                                words: list[str]) -> None:
    copy_files(tmp_path, "vocab.json", "merges.txt")
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError) as info:
        OPTTokenizer.from_dir(tmp_path)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    copy_files(tmp_path, "vocab.json")
    (tmp_path / "merges.txt").write_bytes(b"#version: 0.2\n\xff\xfe t\n")
    with pytest.raises(TokenizerError, match="merges.txt is not UTF-8"):
        OPTTokenizer.from_dir(tmp_path)


def test_unknown_special_token_key_is_rejected() -> None:
    with pytest.raises(TokenizerError, match="mask_token"):
        OPTTokenizer({"</s>": 0, "<pad>": 1}, [], {"mask_token": "<pad>"})


# --- FlagAI's methods (the names keep FlagAI's meanings) --------------------------------------

FRIED = "fried chicken makes me happy"
FRIED_IDS = [21209, 5884, 817, 162, 1372]  # FlagAI's own tokenizer test


def test_flagai_encode_has_no_bos_and_encode_prompt_has(tok: OPTTokenizer) -> None:
    assert tok.encode("day") == [1208]
    assert tok.encode(FRIED) == FRIED_IDS
    assert tok.encode_prompt(FRIED) == [2, *FRIED_IDS] == tok.encode(FRIED, add_bos=True)
    assert tok("day").input_ids.tolist() == [[2, 1208]]  # the batch call still prepends


def test_flagai_tokenize_and_decode(tok: OPTTokenizer) -> None:
    assert tok.tokenize(FRIED) == ["fried", "Ġchicken", "Ġmakes", "Ġme", "Ġhappy"]
    assert tok.decode(FRIED_IDS) == FRIED


def test_flagai_encode_plus_one_text(tok: OPTTokenizer) -> None:
    out = tok.encode_plus(FRIED)
    assert set(out) == {"input_ids", "token_type_ids"}
    assert out["input_ids"] == [2, *FRIED_IDS] and out["token_type_ids"] == [0] * 6


def test_flagai_encode_plus_pair_joins_with_eos(tok: OPTTokenizer) -> None:
    a, b = tok.encode("day"), tok.encode(FRIED)
    out = tok.encode_plus("day", FRIED)
    assert out["input_ids"] == [0, *a, 2, *b, 2]
    assert out["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert tok.encode_plus("day", second_text=FRIED) == out


def test_flagai_encode_plus_truncates_the_longer_text_first(tok: OPTTokenizer) -> None:
    # FlagAI cuts when ids + 3 > max_length, until the texts' ids alone fit max_length
    assert tok.encode_plus(FRIED, max_length=8)["input_ids"] == [2, *FRIED_IDS]  # 5 + 3 fits
    assert tok.encode_plus(FRIED, max_length=7)["input_ids"] == [2, *FRIED_IDS]  # 5 <= 7
    assert tok.encode_plus(FRIED, max_length=3)["input_ids"] == [2, *FRIED_IDS[:3]]
    out = tok.encode_plus(FRIED, "day", max_length=4)  # 5 + 1 ids -> 3 + 1
    assert out["input_ids"] == [0, *FRIED_IDS[:3], 2, 1208, 2]
    tie = tok.encode_plus("a b", "c d", max_length=3)  # equal lengths: the second loses one
    assert tie["input_ids"] == [0, *tok.encode("a b"), 2, tok.encode("c d")[0], 2]
    assert tok.encode_plus(FRIED, max_length=3, truncation=False)["input_ids"] == \
        [2, *FRIED_IDS]
    with pytest.raises(TokenizerError, match="max_length"):
        tok.encode_plus(FRIED, max_length=0)


def test_flagai_command_ids(tok: OPTTokenizer) -> None:
    expected = {"cls": 0, "pad": 1, "bos": 2, "eos": 2, "unk": 3, "mask": 50264, "sep": 50265}
    assert {name: tok.get_command_id(name) for name in expected} == expected
    with pytest.raises(KeyError, match="sop"):
        tok.get_command_id("sop")


@pytest.mark.parametrize("text", TEXTS)
def test_flagai_pieces_and_ids_match_gpt2_tokenizer(tok: OPTTokenizer, ref, text: str) -> None:
    pieces = tok.tokenize(text)
    assert pieces == ref.tokenize(text)
    ids = tok.convert_tokens_to_ids(pieces)
    assert ids == ref.convert_tokens_to_ids(pieces) == tok.encode(text)
    assert tok.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids) == pieces
    with_bos = tok.encode_prompt(text)
    assert tok.decode(with_bos, skip_special_tokens=False) == ref.decode(with_bos)
    assert tok.decode(with_bos) == ref.decode(with_bos, skip_special_tokens=True)


def test_flagai_convert_single_values_and_errors(tok: OPTTokenizer, ref) -> None:
    assert tok.convert_tokens_to_ids("Ġchicken") == 5884 == ref.convert_tokens_to_ids("Ġchicken")
    assert tok.convert_ids_to_tokens(5884) == "Ġchicken" == ref.convert_ids_to_tokens(5884)
    assert tok.convert_ids_to_tokens(torch.tensor(5884)) == "Ġchicken"
    assert tok.convert_ids_to_tokens(torch.tensor([2, 5884])) == ["</s>", "Ġchicken"]
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        tok.convert_tokens_to_ids(["fried", "no-such-piece"])
    with pytest.raises(TokenizerError, match="50265"):
        tok.convert_ids_to_tokens([50265])
