"""Fine-tuning data: each task's local file format, read, validated and tokenized.

``load_task_data(task, path, tokenizer)`` is the entry point; it returns a torch ``Dataset`` of
dict examples whose ``collate`` pads a list of them into the batch the task's head takes
(``model(**dataset.collate(examples))`` returns a loss).

- ``lm``: a ``.txt`` file (one text per line, line breaks kept, as ``run_clm.py`` reads text
  files) or ``.jsonl`` ``{"text": ...}`` (one text per record). Each text gets ``</s>``
  prepended, as OPT's tokenizer does, so ``</s>`` separates the texts; all are concatenated
  and cut into ``block_size`` blocks, the remainder dropped. Labels are the inputs: loss on
  every token.
- ``classification``: ``.jsonl`` ``{"text", "label"}``; labels all ints (the ids themselves)
  or all strings (mapped to ids in sorted order). A validation set takes the training set's
  ``label2id``.
- ``qa``: SQuAD ``.json`` (``{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}``) or flat
  ``.jsonl`` (``context``, ``question``, ``answers: {"text": [...], "answer_start": [...]}``, as
  Hugging Face's ``squad``). One sequence ``</s> question </s> context``, the context cut to
  ``max_length``. The first answer is the training target, mapped to tokens through character
  offsets; an answer cut off by truncation, or a question without answers, targets position 0
  (the leading ``</s>``) as ``run_qa.py`` does with its CLS index.

Every problem in a file raises a ``DataError`` subclass naming the file, the line (JSONL) or the
JSON path (JSON), and the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from flagopt.errors import (AnswerSpanError, CorpusTooShortError, DataError,
                            DataFormatError, EmptyFieldError, FieldTypeError, MissingFieldError,
                            UnknownLabelError, UnknownTaskError)
from flagopt.tokenizer import OPTTokenizer

TASKS = ("lm", "classification", "qa")
EXTENSIONS = {"lm": (".txt", ".jsonl"), "classification": (".jsonl",), "qa": (".json", ".jsonl")}
MAX_DEFAULT_LENGTH = 1024  # run_clm.py's cap on the default block size


def default_block_size(max_positions: int) -> int:
    """``min(1024, max_positions)``: ``run_clm.py``'s default block size for a model with
    ``max_positions`` (``config.max_position_embeddings``) positions."""
    return min(MAX_DEFAULT_LENGTH, max_positions)


# --- the entry point --------------------------------------------------------------------------


def load_task_data(task: str, path: str | Path, tokenizer: OPTTokenizer, *,
                   block_size: int | None = None, max_length: int | None = None,
                   label2id: Mapping[str, int] | None = None, max_positions: int = 2048
                   ) -> LMDataset | ClassificationDataset | QADataset:
    """Read, validate and tokenize one task's data file.

    Args:
        task: ``"lm"``, ``"classification"`` or ``"qa"``.
        path: the file; its extension picks the format (see the module docstring).
        tokenizer: the model's tokenizer.
        block_size: ``lm`` only: tokens per block (default ``min(1024, max_positions)``).
        max_length: ``classification``/``qa``: tokens per example at most, ``</s>``
            included (default ``min(1024, max_positions)``).
        label2id: ``classification`` only: the training set's mapping, for a validation set.
        max_positions: the model's ``config.max_position_embeddings``; no block or example
            may be longer.

    Returns:
        An ``LMDataset``, ``ClassificationDataset`` or ``QADataset``.

    Raises:
        UnknownTaskError: ``task`` is not one of ``TASKS``.
        FileNotFoundError: ``path`` does not exist.
        DataError: the file is malformed (the subclass says how; the message says where).
        ValueError: ``block_size``/``max_length`` is not an int in ``1..max_positions``, or an
            option is given to a task that does not take it.
    """
    if task not in TASKS:
        raise UnknownTaskError(f"task={task!r}; expected one of {', '.join(TASKS)}")
    path = Path(path)
    if path.suffix.lower() not in EXTENSIONS[task]:
        raise DataFormatError(f"{path}: unknown extension {path.suffix!r} for task {task!r}; "
                              f"expected one of {', '.join(EXTENSIONS[task])}", str(path))
    if not path.is_file():
        raise FileNotFoundError(f"{task} data file not found: {path}")
    length = default_block_size(max_positions)
    if task == "lm":
        _refuse(task, max_length=max_length, label2id=label2id)
        size = length if block_size is None else _check_length("block_size", block_size,
                                                                max_positions)
        return LMDataset.from_file(path, tokenizer, size)
    _refuse(task, block_size=block_size)
    if max_length is not None:
        length = _check_length("max_length", max_length, max_positions)
    if task == "classification":
        return ClassificationDataset.from_file(path, tokenizer, length, label2id)
    _refuse(task, label2id=label2id)
    return QADataset.from_file(path, tokenizer, length)


def label_mapping(path: str | Path) -> dict[str, int]:
    """The label -> id mapping a ``classification`` training file defines (as
    ``load_task_data`` numbers them), read without tokenizing: the model's ``num_labels``
    must be known before it is built.

    Raises:
        FileNotFoundError / DataError: as ``load_task_data``.
    """
    path = Path(path)
    if path.suffix.lower() not in EXTENSIONS["classification"]:
        raise DataFormatError(f"{path}: unknown extension {path.suffix!r} for task "
                              f"'classification'; expected one of "
                              f"{', '.join(EXTENSIONS['classification'])}", str(path))
    if not path.is_file():
        raise FileNotFoundError(f"classification data file not found: {path}")
    records = [(where, _text_field(r, "text", path, where), _label_field(r, path, where))
               for where, r in _read_jsonl(path)]
    return _label_mapping(records, path)


def _check_length(name: str, value: object, max_positions: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max_positions:
        raise ValueError(f"{name}={value!r}; expected an int in 1..{max_positions} "
                         "(the model's max_position_embeddings)")
    return value


def _refuse(task: str, **options: object) -> None:
    given = sorted(name for name, value in options.items() if value is not None)
    if given:
        raise ValueError(f"task {task!r} does not take {', '.join(given)}")


# --- padding ----------------------------------------------------------------------------------


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded on the right to the longest: (B, T) int64 ids and (B, T) int64 mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


# --- lm ---------------------------------------------------------------------------------------


class LMDataset(Dataset):
    """Equal blocks of a concatenated corpus; each example is ``{"input_ids": (block,)}``."""

    task = "lm"

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks  # (N, block_size) int64

    @classmethod
    def from_file(cls, path: Path, tokenizer: OPTTokenizer, block_size: int) -> LMDataset:
        """Tokenize ``path``'s texts, concatenate and cut into ``block_size`` blocks.

        Raises:
            DataError: the file is malformed. CorpusTooShortError: fewer tokens than a block.
        """
        texts = list(_read_lm_texts(path))
        ids = [i for row in tokenizer.encode_batch(texts, add_bos=True) for i in row]
        if len(ids) < block_size:
            raise CorpusTooShortError(
                f"{path}: {len(texts)} texts make {len(ids)} tokens, fewer than one block of "
                f"block_size={block_size}; add text or lower block_size", str(path))
        n = len(ids) // block_size  # the remainder is dropped, as run_clm.py does
        return cls(torch.tensor(ids[:n * block_size], dtype=torch.long).view(n, block_size))

    @property
    def block_size(self) -> int:
        return self.blocks.shape[1]

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index]}

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (all ones) and ``labels`` (the ids), each (B, T)."""
        ids = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _read_lm_texts(path: Path) -> Iterator[str]:
    if path.suffix.lower() == ".txt":
        text = _read_utf8(path)
        if not text.strip():
            raise EmptyFieldError(f"{path}: the file holds no text", str(path))
        yield from text.splitlines(keepends=True)  # run_clm.py's keep_linebreaks=True
        return
    for where, record in _read_jsonl(path):
        yield _text_field(record, "text", path, where)


# --- classification ---------------------------------------------------------------------------


class ClassificationDataset(Dataset):
    """Examples ``{"input_ids": [...], "label": id}``; ``label2id``/``id2label`` are the
    mapping to save in the model's config."""

    task = "classification"

    def __init__(self, examples: list[dict[str, Any]], label2id: dict[str, int],
                 pad_token_id: int) -> None:
        self.examples = examples
        self.label2id = label2id
        self.pad_token_id = pad_token_id

    @property
    def id2label(self) -> dict[int, str]:
        return {i: label for label, i in self.label2id.items()}

    @property
    def num_labels(self) -> int:
        return len(self.label2id)

    @classmethod
    def from_file(cls, path: Path, tokenizer: OPTTokenizer, max_length: int,
                  label2id: Mapping[str, int] | None = None) -> ClassificationDataset:
        """Read ``{"text", "label"}`` records; ``label2id`` given: labels must be in it.

        Raises:
            DataError: the file is malformed or a label is unknown.
        """
        records = [(where, _text_field(r, "text", path, where), _label_field(r, path, where))
                   for where, r in _read_jsonl(path)]
        mapping = dict(label2id) if label2id is not None else _label_mapping(records, path)
        ids = tokenizer.encode_batch([text for _, text, _ in records], add_bos=True)
        examples = [{"input_ids": row[:max_length], "label": _label_id(label, mapping, path, w)}
                    for (w, _, label), row in zip(records, ids)]
        return cls(examples, mapping, tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """``input_ids``/``attention_mask`` (B, T) right-padded, ``labels`` (B,) int64."""
        ids, mask = pad_right([e["input_ids"] for e in examples], self.pad_token_id)
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _label_field(record: Mapping[str, Any], path: Path, where: str) -> int | str:
    label = _field(record, "label", path, where)
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise FieldTypeError(f"{path}, {where}: field 'label' is {label!r} "
                             f"({_json_type(label)}); expected an int or a string",
                             str(path), where, "label")
    if isinstance(label, int) and label < 0:
        raise FieldTypeError(f"{path}, {where}: field 'label' is {label}; an int label is the "
                             "class id, expected >= 0", str(path), where, "label")
    if isinstance(label, str) and not label.strip():
        raise EmptyFieldError(f"{path}, {where}: field 'label' is empty", str(path), where,
                              "label")
    return label


def _label_mapping(records: list[tuple[str, str, int | str]], path: Path) -> dict[str, int]:
    """String labels: sorted, numbered from 0. Int labels: ``LABEL_i`` for 0..max (the names
    Hugging Face gives a config's ids)."""
    first_where, _, first = records[0]
    for where, _, label in records:
        if isinstance(label, str) != isinstance(first, str):
            raise FieldTypeError(
                f"{path}, {where}: field 'label' is {label!r} but {first_where} has {first!r}; "
                "labels must be all ints or all strings", str(path), where, "label")
    if isinstance(first, str):
        return {label: i for i, label in enumerate(sorted({r[2] for r in records}))}
    return {f"LABEL_{i}": i for i in range(max(r[2] for r in records) + 1)}


def _label_id(label: int | str, label2id: Mapping[str, int], path: Path, where: str) -> int:
    if isinstance(label, int):
        if label in label2id.values():
            return label
    elif label in label2id:
        return label2id[label]
    known = ", ".join(map(repr, label2id)) if isinstance(label, str) else \
        f"ids {sorted(label2id.values())}"
    raise UnknownLabelError(f"{path}, {where}: field 'label' is {label!r}, which is not in the "
                            f"label mapping (known: {known})", str(path), where, "label")


# --- qa ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QAExample:
    """One question, as read and checked: ``answer_starts[i]`` is where ``answers[i]`` starts
    in ``context`` (characters); no answers means unanswerable."""

    id: str
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int]


class QADataset(Dataset):
    """Examples ``{"input_ids", "start_positions", "end_positions"}`` plus, for decoding
    predictions back to text: ``example_id``, ``context``, ``answers``, ``context_start`` (the
    sequence position of the first context token) and ``offsets`` (each kept context token's
    character span in ``context``)."""

    task = "qa"

    def __init__(self, examples: list[dict[str, Any]], pad_token_id: int) -> None:
        self.examples = examples
        self.pad_token_id = pad_token_id

    @classmethod
    def from_file(cls, path: Path, tokenizer: OPTTokenizer, max_length: int) -> QADataset:
        """Read SQuAD JSON or flat JSONL and map each first answer to token positions.

        Raises:
            DataError: the file is malformed, or a question leaves no room for its context.
        """
        read = _read_squad_json if path.suffix.lower() == ".json" else _read_squad_jsonl
        return cls([_qa_features(ex, where, tokenizer, max_length, path)
                    for where, ex in read(path)], tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """``input_ids``/``attention_mask`` (B, T) right-padded, ``start_positions`` and
        ``end_positions`` (B,) int64."""
        ids, mask = pad_right([e["input_ids"] for e in examples], self.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask,
                "start_positions": torch.tensor([e["start_positions"] for e in examples]),
                "end_positions": torch.tensor([e["end_positions"] for e in examples])}


def _qa_features(ex: QAExample, where: str, tokenizer: OPTTokenizer, max_length: int,
                 path: Path) -> dict[str, Any]:
    question = tokenizer.encode(ex.question)
    context_start = len(question) + 2  # </s> question </s> context
    room = max_length - context_start
    if room < 1:
        raise DataError(
            f"{path}, {where}: field 'question' takes {len(question)} tokens, leaving no room "
            f"for the context within max_length={max_length}; shorten it or raise max_length",
            str(path), where, "question")
    context, offsets = tokenizer.encode_with_offsets(ex.context)
    context, offsets = context[:room], offsets[:room]
    start = end = 0  # unanswerable, or the answer was cut off: the leading </s>
    if ex.answers:
        span = _token_span(offsets, ex.answer_starts[0], ex.answer_starts[0] + len(ex.answers[0]))
        if span is not None:
            start, end = span[0] + context_start, span[1] + context_start
    bos = tokenizer.bos_token_id
    return {"input_ids": [bos, *question, bos, *context], "start_positions": start,
            "end_positions": end, "example_id": ex.id, "context": ex.context,
            "answers": list(ex.answers), "context_start": context_start, "offsets": offsets}


def _token_span(offsets: Sequence[tuple[int, int]], start_char: int, end_char: int
                ) -> tuple[int, int] | None:
    """First and last token overlapping characters ``[start_char, end_char)``, or None when
    the kept tokens stop before ``end_char``."""
    if not offsets or offsets[-1][1] < end_char:
        return None
    first = next(i for i, (_, e) in enumerate(offsets) if e > start_char)
    last = max((i for i, (s, _) in enumerate(offsets) if s < end_char), default=first)
    return first, max(first, last)


def _read_squad_json(path: Path) -> Iterator[tuple[str, QAExample]]:
    try:
        root = json.loads(_read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}, line {e.lineno} column {e.colno}: not valid JSON "
                              f"({e.msg})", str(path), f"line {e.lineno}") from None
    if not isinstance(root, dict):
        raise FieldTypeError(f"{path}: the top level is {_json_type(root)}; expected a SQuAD "
                             'object {"data": [...]}', str(path))
    articles = _list_field(root, "data", path, "the top level")
    for a, article in enumerate(articles):
        here = f"data[{a}]"
        for p, paragraph in enumerate(_list_field(_record(article, path, here), "paragraphs",
                                                  path, here)):
            here_p = f"data[{a}].paragraphs[{p}]"
            paragraph = _record(paragraph, path, here_p)
            context = _text_field(paragraph, "context", path, here_p)
            for q, qa in enumerate(_list_field(paragraph, "qas", path, here_p)):
                here_q = f"{here_p}.qas[{q}]"
                qa = _record(qa, path, here_q)
                question = _text_field(qa, "question", path, here_q)
                answers, starts = [], []
                for n, answer in enumerate(_list_field(qa, "answers", path, here_q)):
                    here_a = f"{here_q}.answers[{n}]"
                    answer = _record(answer, path, here_a)
                    answers.append(_text_field(answer, "text", path, here_a))
                    starts.append(_start_field(answer.get("answer_start"), "answer_start",
                                               path, here_a, "answer_start" in answer))
                _check_answers(context, answers, starts, path, here_q,
                               lambda n: f"answers[{n}]")
                yield here_q, QAExample(_id_field(qa, path, here_q), question, context,
                                        answers, starts)


def _read_squad_jsonl(path: Path) -> Iterator[tuple[str, QAExample]]:
    for where, record in _read_jsonl(path):
        context = _text_field(record, "context", path, where)
        question = _text_field(record, "question", path, where)
        answers = _field(record, "answers", path, where)
        if not isinstance(answers, dict):
            raise FieldTypeError(f"{path}, {where}: field 'answers' is {_json_type(answers)}; "
                                 'expected {"text": [...], "answer_start": [...]}',
                                 str(path), where, "answers")
        texts = _list_field(answers, "text", path, where, "answers.text")
        starts = _list_field(answers, "answer_start", path, where, "answers.answer_start")
        if len(texts) != len(starts):
            raise FieldTypeError(f"{path}, {where}: field 'answers' has {len(texts)} texts but "
                                 f"{len(starts)} answer_start values; expected one each",
                                 str(path), where, "answers")
        for n, text in enumerate(texts):
            _check_text(text, f"answers.text[{n}]", path, where)
        starts = [_start_field(s, f"answers.answer_start[{n}]", path, where)
                  for n, s in enumerate(starts)]
        _check_answers(context, texts, starts, path, where, lambda n: f"answers.text[{n}]")
        yield where, QAExample(_id_field(record, path, where), question, context, texts, starts)


def _id_field(record: Mapping[str, Any], path: Path, where: str) -> str:
    value = record.get("id", where)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise FieldTypeError(f"{path}, {where}: field 'id' is {_json_type(value)}; expected a "
                             "string", str(path), where, "id")
    return str(value)


def _start_field(value: object, field: str, path: Path, where: str, present: bool = True
                 ) -> int:
    if not present:
        raise MissingFieldError(f"{path}, {where}: field {field!r} is missing", str(path),
                                where, field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldTypeError(f"{path}, {where}: field {field!r} is {value!r} "
                             f"({_json_type(value)}); expected an int character offset",
                             str(path), where, field)
    return value


def _check_answers(context: str, texts: list[str], starts: list[int], path: Path, where: str,
                   field_of: Callable[[int], str]) -> None:
    for n, (text, start) in enumerate(zip(texts, starts)):
        found = context[start:start + len(text)] if start >= 0 else ""
        if found != text:
            raise AnswerSpanError(
                f"{path}, {where}: field {field_of(n)!r} is {text!r} but answer_start={start} "
                f"points at {found!r} in the context (length {len(context)})",
                str(path), where, field_of(n))


# --- reading and checking JSON ----------------------------------------------------------------


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is no text
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataFormatError(f"{path}, line {line}: byte {e.start} is not UTF-8 ({e.reason}); "
                              "expected UTF-8 text", str(path), f"line {line}") from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("line N", record)`` for each non-blank line; a file with none is an error."""
    any_record = False
    # Split on "\n" alone: JSON strings may hold U+2028 and the like raw, which splitlines cuts.
    for n, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}, {where}: not valid JSON ({e.msg} at column "
                                  f"{e.colno})", str(path), where) from None
        any_record = True
        yield where, _record(record, path, where)
    if not any_record:
        raise DataFormatError(f"{path}: no JSON records (the file is empty)", str(path))


def _record(value: object, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FieldTypeError(f"{path}, {where}: the record is {_json_type(value)}; expected a "
                             "JSON object", str(path), where)
    return value


def _field(record: Mapping[str, Any], field: str, path: Path, where: str,
           name: str | None = None) -> Any:
    if field not in record:
        name = name or field
        raise MissingFieldError(f"{path}, {where}: field {name!r} is missing (fields present: "
                                f"{sorted(record)})", str(path), where, name)
    return record[field]


def _list_field(record: Mapping[str, Any], field: str, path: Path, where: str,
                name: str | None = None) -> list[Any]:
    name = name or field
    value = _field(record, field, path, where, name)
    if not isinstance(value, list):
        raise FieldTypeError(f"{path}, {where}: field {name!r} is {_json_type(value)}; expected "
                             "a list", str(path), where, name)
    return value


def _text_field(record: Mapping[str, Any], field: str, path: Path, where: str) -> str:
    value = _field(record, field, path, where)
    _check_text(value, field, path, where)
    return value


def _check_text(value: object, field: str, path: Path, where: str) -> None:
    if not isinstance(value, str):
        raise FieldTypeError(f"{path}, {where}: field {field!r} is {_json_type(value)}; "
                             "expected a string", str(path), where, field)
    if not value.strip():
        raise EmptyFieldError(f"{path}, {where}: field {field!r} is empty", str(path), where,
                              field)


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
