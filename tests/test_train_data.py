"""Fine-tuning data: each task's formats parse to the right tokens and targets, every format
error names its file, line (or JSON path) and field, and each head trains on a collated batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flagopt.errors import (AnswerSpanError, CorpusTooShortError, DataError, DataFormatError,
                            EmptyFieldError, FieldTypeError, MissingFieldError, UnknownLabelError,
                            UnknownTaskError)
from flagopt.model.heads import TASK_CLASSES
from flagopt.tokenizer import OPTTokenizer
from flagopt.train.data import (ClassificationDataset, LMDataset, QADataset, default_block_size,
                                load_task_data)
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def tok() -> OPTTokenizer:
    return OPTTokenizer.default()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, *records: object) -> Path:
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def squad(path: Path, context: str, qas: list[dict]) -> Path:
    return write(path, json.dumps({"version": "1.1", "data": [
        {"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}, ensure_ascii=False))


def qa_record(context: str, question: str, answer: str, start: int | None = None,
              id: str = "q") -> dict:
    start = context.index(answer) if start is None else start
    return {"id": id, "context": context, "question": question,
            "answers": {"text": [answer], "answer_start": [start]}}


# --- the tokenizer's offsets ------------------------------------------------------------------


def test_encode_with_offsets_spans_each_token_without_its_space(tok: OPTTokenizer) -> None:
    ids, offsets = tok.encode_with_offsets("Hello world")
    assert ids == tok.encode("Hello world") == [31414, 232]
    assert offsets == [(0, 5), (6, 11)]
    text = "près de 東京"
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    pieces = [text[s:e] for s, e in offsets]
    assert pieces[-1] == "京" and "東" in pieces  # byte tokens of one character span it


# --- lm ---------------------------------------------------------------------------------------


def test_lm_jsonl_concatenates_with_bos_and_drops_the_remainder(tmp_path: Path,
                                                                 tok: OPTTokenizer) -> None:
    path = jsonl(tmp_path / "c.jsonl", {"text": "Hello world"}, {"text": "A photo of a cat"})
    ds = load_task_data("lm", path, tok, block_size=4)
    # [2, 31414, 232] + [2, 250, 1345, 9, 10, 4758]: 9 tokens, two blocks of 4, 4758 dropped
    assert isinstance(ds, LMDataset) and len(ds) == 2
    assert ds.blocks.tolist() == [[2, 31414, 232, 2], [250, 1345, 9, 10]]


def test_lm_txt_is_one_text_per_line_with_line_breaks_kept(tmp_path: Path,
                                                           tok: OPTTokenizer) -> None:
    path = write(tmp_path / "c.txt", "Hello world\nA photo of a cat")
    ds = load_task_data("lm", path, tok, block_size=5)
    assert ds.blocks.tolist() == [[2, 31414, 232, 50118, 2], [250, 1345, 9, 10, 4758]]


def test_lm_default_block_size_is_min_1024_and_max_positions(tmp_path: Path,
                                                              tok: OPTTokenizer) -> None:
    assert default_block_size(2048) == 1024 and default_block_size(64) == 64
    path = write(tmp_path / "c.txt", "word " * 40)
    ds = load_task_data("lm", path, tok, max_positions=16)
    assert ds.block_size == 16 and len(ds) == 41 // 16  # </s> + 40 tokens


def test_lm_corpus_shorter_than_a_block_says_the_counts(tmp_path: Path,
                                                        tok: OPTTokenizer) -> None:
    path = write(tmp_path / "c.txt", "Hello world")
    with pytest.raises(CorpusTooShortError, match=r"c\.txt: 1 texts make 3 tokens.*"
                                                  r"block_size=8"):
        load_task_data("lm", path, tok, block_size=8)


def test_lm_block_size_beyond_the_model_is_refused(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = write(tmp_path / "c.txt", "Hello world")
    with pytest.raises(ValueError, match=r"block_size=4096; expected an int in 1\.\.2048"):
        load_task_data("lm", path, tok, block_size=4096)
    with pytest.raises(ValueError, match="does not take label2id"):
        load_task_data("lm", path, tok, label2id={"a": 0})


def test_lm_collate_labels_every_token(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = write(tmp_path / "c.txt", "one two three four five six seven eight nine ten\n")
    ds = load_task_data("lm", path, tok, block_size=4)
    batch = ds.collate([ds[0], ds[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 4) and bool(batch["attention_mask"].all())
    assert torch.equal(batch["labels"], batch["input_ids"])


# --- classification ---------------------------------------------------------------------------


def test_classification_string_labels_map_sorted(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = jsonl(tmp_path / "t.jsonl", {"text": "great film", "label": "pos"},
                 {"text": "dull", "label": "neg"}, {"text": "fine", "label": "neutral"})
    ds = load_task_data("classification", path, tok)
    assert isinstance(ds, ClassificationDataset)
    assert ds.label2id == {"neg": 0, "neutral": 1, "pos": 2}
    assert ds.id2label == {0: "neg", 1: "neutral", 2: "pos"} and ds.num_labels == 3
    assert [e["label"] for e in ds] == [2, 0, 1]
    assert ds[0]["input_ids"] == tok.encode_prompt("great film")


def test_jsonl_lines_split_on_newline_only(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = tmp_path / "t.jsonl"  # a raw U+2028 inside a string, a BOM, CRLF line ends
    path.write_bytes("\ufeff{\"text\": \"a\u2028b\", \"label\": 1}\r\n"
                     "{\"text\": \"c\", \"label\": 0}\r\n".encode())
    ds = load_task_data("classification", path, tok)
    assert [e["label"] for e in ds] == [1, 0]
    assert ds[0]["input_ids"] == tok.encode_prompt("a\u2028b")


def test_classification_int_labels_are_the_ids(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = jsonl(tmp_path / "t.jsonl", {"text": "a", "label": 2}, {"text": "b", "label": 0})
    ds = load_task_data("classification", path, tok)
    assert [e["label"] for e in ds] == [2, 0]
    assert ds.label2id == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}


def test_classification_valid_set_uses_the_train_mapping(tmp_path: Path,
                                                         tok: OPTTokenizer) -> None:
    train = load_task_data("classification", jsonl(
        tmp_path / "t.jsonl", {"text": "x", "label": "b"}, {"text": "y", "label": "c"}), tok)
    valid = load_task_data("classification", jsonl(tmp_path / "v.jsonl",
                                                   {"text": "z", "label": "c"}),
                           tok, label2id=train.label2id)
    assert valid.label2id == {"b": 0, "c": 1} and valid[0]["label"] == 1


def test_classification_truncates_to_max_length(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = jsonl(tmp_path / "t.jsonl", {"text": "A photo of a cat", "label": 0})
    ds = load_task_data("classification", path, tok, max_length=3)
    assert ds[0]["input_ids"] == [2, 250, 1345]


def test_classification_collate_pads_right(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = jsonl(tmp_path / "t.jsonl", {"text": "A photo of a cat", "label": 1},
                 {"text": "Hello world", "label": 0})
    ds = load_task_data("classification", path, tok)
    batch = ds.collate([ds[0], ds[1]])
    assert batch["input_ids"].tolist() == [[2, 250, 1345, 9, 10, 4758], [2, 31414, 232, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long


# --- qa ---------------------------------------------------------------------------------------

CONTEXTS = {
    "ascii": ("The Denver Broncos won Super Bowl 50 in Santa Clara.", "Who won?",
              "Denver Broncos"),
    "accents": ("Le café de Zürich est près de la gare.", "Où?", "Zürich"),
    "cjk_emoji": ("会议在東京举行 🎉 然后结束。", "在哪里?", "東京"),
    "emoji_answer": ("Party time 🎉🎉 tonight", "What?", "🎉🎉"),
}


@pytest.mark.parametrize("name", sorted(CONTEXTS))
def test_qa_spans_decode_back_to_the_answer(tmp_path: Path, tok: OPTTokenizer,
                                            name: str) -> None:
    context, question, answer = CONTEXTS[name]
    path = jsonl(tmp_path / "q.jsonl", qa_record(context, question, answer))
    ex = load_task_data("qa", path, tok)[0]
    s, e = ex["start_positions"], ex["end_positions"]
    assert ex["input_ids"][:ex["context_start"]] == [2, *tok.encode(question), 2]
    assert 0 < ex["context_start"] <= s <= e < len(ex["input_ids"])
    assert tok.decode(ex["input_ids"][s:e + 1]).strip() == answer
    base = ex["context_start"]
    assert context[ex["offsets"][s - base][0]:ex["offsets"][e - base][1]] == answer


def test_qa_squad_json_equals_flat_jsonl(tmp_path: Path, tok: OPTTokenizer) -> None:
    context, question, answer = CONTEXTS["ascii"]
    start = context.index(answer)
    nested = squad(tmp_path / "s.json", context, [
        {"id": "a1", "question": question,
         "answers": [{"text": answer, "answer_start": start},
                     {"text": "Broncos", "answer_start": context.index("Broncos")}]}])
    flat = jsonl(tmp_path / "s.jsonl", qa_record(context, question, answer, id="a1"))
    a, b = load_task_data("qa", nested, tok), load_task_data("qa", flat, tok)
    assert isinstance(a, QADataset) and len(a) == len(b) == 1
    for key in ("input_ids", "start_positions", "end_positions", "example_id", "offsets"):
        assert a[0][key] == b[0][key]
    assert a[0]["answers"] == [answer, "Broncos"] and a[0]["example_id"] == "a1"


def test_qa_answer_cut_off_by_truncation_targets_position_0(tmp_path: Path,
                                                            tok: OPTTokenizer) -> None:
    context = "filler " * 30 + "the answer is here"
    path = jsonl(tmp_path / "q.jsonl", qa_record(context, "Where?", "here"))
    ex = load_task_data("qa", path, tok, max_length=16)[0]
    assert len(ex["input_ids"]) == 16
    assert (ex["start_positions"], ex["end_positions"]) == (0, 0)
    full = load_task_data("qa", path, tok, max_length=64)[0]
    assert full["start_positions"] > 0


def test_qa_unanswerable_targets_position_0(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = squad(tmp_path / "s.json", "Some context.",
                 [{"id": "x", "question": "Why?", "answers": [], "is_impossible": True}])
    ex = load_task_data("qa", path, tok)[0]
    assert (ex["start_positions"], ex["end_positions"], ex["answers"]) == (0, 0, [])


def test_qa_collate_shapes(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = jsonl(tmp_path / "q.jsonl", qa_record(*CONTEXTS["ascii"], id="1"),
                 qa_record(*CONTEXTS["accents"], id="2"))
    ds = load_task_data("qa", path, tok)
    batch = ds.collate([ds[0], ds[1]])
    t = max(len(ds[0]["input_ids"]), len(ds[1]["input_ids"]))
    assert set(batch) == {"input_ids", "attention_mask", "start_positions", "end_positions"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, t)
    assert batch["start_positions"].tolist() == [ds[0]["start_positions"],
                                                 ds[1]["start_positions"]]
    assert batch["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in ds]


# --- each head takes a collated batch ---------------------------------------------------------


def _datasets(tmp_path: Path, tok: OPTTokenizer) -> dict:
    return {
        "lm": load_task_data("lm", write(tmp_path / "c.txt", "some words here " * 20), tok,
                             block_size=16, max_positions=64),
        "classification": load_task_data("classification", jsonl(
            tmp_path / "t.jsonl", {"text": "good movie", "label": "pos"},
            {"text": "a bad, bad movie", "label": "neg"}), tok, max_positions=64),
        "qa": load_task_data("qa", jsonl(tmp_path / "q.jsonl",
                                         qa_record(*CONTEXTS["ascii"], id="1"),
                                         qa_record(*CONTEXTS["cjk_emoji"], id="2")),
                             tok, max_positions=64),
    }


@pytest.mark.parametrize("task", ["lm", "classification", "qa"])
def test_each_head_returns_a_finite_loss_on_a_collated_batch(tmp_path: Path, tok: OPTTokenizer,
                                                             task: str, one_thread) -> None:
    ds = _datasets(tmp_path, tok)[task]
    torch.manual_seed(0)
    model = TASK_CLASSES[task](tiny_config(vocab_size=50272, num_labels=2))
    out = model(**ds.collate([ds[0], ds[1]]))
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.decoder.embed_tokens.weight.grad is not None


# --- every format error -----------------------------------------------------------------------


def _raises(error: type[DataError], task: str, path: Path, tok: OPTTokenizer, *parts: str,
            **kwargs: object) -> DataError:
    """Load and expect ``error``, its message naming the file and each of ``parts``."""
    with pytest.raises(error) as info:
        load_task_data(task, path, tok, **kwargs)
    message = str(info.value)
    assert str(path) in message and info.value.path == str(path)
    for part in parts:
        assert part in message, (part, message)
    return info.value


def test_error_unknown_extension(tmp_path: Path, tok: OPTTokenizer) -> None:
    _raises(DataFormatError, "classification", write(tmp_path / "t.csv", "text,label\n"), tok,
            "unknown extension '.csv'", ".jsonl")


def test_error_unknown_task(tmp_path: Path, tok: OPTTokenizer) -> None:
    with pytest.raises(UnknownTaskError, match="task='ner'; expected one of lm, classification"):
        load_task_data("ner", tmp_path / "x.txt", tok)


def test_error_missing_file(tmp_path: Path, tok: OPTTokenizer) -> None:
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        load_task_data("lm", tmp_path / "absent.txt", tok)


def test_error_bad_json_line(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = write(tmp_path / "t.jsonl", '{"text": "ok", "label": 1}\n\n{"text": "oops", \n')
    err = _raises(DataFormatError, "classification", path, tok, "line 3", "not valid JSON")
    assert err.where == "line 3"


def test_error_bad_json_file(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = write(tmp_path / "s.json", '{"data": [\n  {"paragraphs": [}\n]}')
    _raises(DataFormatError, "qa", path, tok, "line 2", "not valid JSON")


def test_error_not_utf8(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"fine line\nbad \xff byte\n")
    _raises(DataFormatError, "lm", path, tok, "line 2", "not UTF-8")


def test_error_empty_jsonl(tmp_path: Path, tok: OPTTokenizer) -> None:
    _raises(DataFormatError, "classification", write(tmp_path / "t.jsonl", "\n\n"), tok,
            "no JSON records")


def test_error_empty_txt(tmp_path: Path, tok: OPTTokenizer) -> None:
    _raises(EmptyFieldError, "lm", write(tmp_path / "c.txt", "\n  \n"), tok, "no text")


def test_error_record_not_an_object(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = jsonl(tmp_path / "c.jsonl", {"text": "ok"}, ["not", "an", "object"])
    _raises(FieldTypeError, "lm", path, tok, "line 2", "a list; expected a JSON object")


def test_error_lm_missing_text(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = jsonl(tmp_path / "c.jsonl", {"text": "ok"}, {"body": "no text field"})
    err = _raises(MissingFieldError, "lm", path, tok, "line 2", "field 'text' is missing",
                  "['body']")
    assert (err.where, err.field) == ("line 2", "text")


def test_error_lm_text_wrong_type(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = jsonl(tmp_path / "c.jsonl", {"text": 42})
    _raises(FieldTypeError, "lm", path, tok, "line 1", "field 'text' is a number",
            "expected a string")


def test_error_lm_empty_text(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = jsonl(tmp_path / "c.jsonl", {"text": "ok"}, {"text": "ok"}, {"text": "   "})
    _raises(EmptyFieldError, "lm", path, tok, "line 3", "field 'text' is empty")


def test_error_classification_missing_label(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = jsonl(tmp_path / "t.jsonl", {"text": "a", "label": 0}, {"text": "b"})
    _raises(MissingFieldError, "classification", path, tok, "line 2", "field 'label'")


def test_error_classification_label_wrong_type(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = jsonl(tmp_path / "t.jsonl", {"text": "a", "label": 0.5})
    _raises(FieldTypeError, "classification", path, tok, "line 1", "field 'label' is 0.5",
            "expected an int or a string")


def test_error_classification_negative_label(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = jsonl(tmp_path / "t.jsonl", {"text": "a", "label": -1})
    _raises(FieldTypeError, "classification", path, tok, "line 1", "field 'label' is -1")


def test_error_classification_mixed_label_types(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = jsonl(tmp_path / "t.jsonl", {"text": "a", "label": "pos"}, {"text": "b", "label": 1})
    _raises(FieldTypeError, "classification", path, tok, "line 2", "line 1 has 'pos'",
            "all ints or all strings")


def test_error_classification_unknown_label(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = jsonl(tmp_path / "v.jsonl", {"text": "a", "label": "pos"},
                 {"text": "b", "label": "meh"})
    err = _raises(UnknownLabelError, "classification", path, tok, "line 2",
                  "field 'label' is 'meh'", "'neg', 'pos'", label2id={"neg": 0, "pos": 1})
    assert err.field == "label"


def test_error_classification_unknown_int_label(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = jsonl(tmp_path / "v.jsonl", {"text": "a", "label": 5})
    _raises(UnknownLabelError, "classification", path, tok, "line 1", "field 'label' is 5",
            "ids [0, 1]", label2id={"LABEL_0": 0, "LABEL_1": 1})


def test_error_qa_missing_question(tmp_path: Path, tok: OPTTokenizer) -> None:
    record = qa_record(*CONTEXTS["ascii"])
    del record["question"]
    _raises(MissingFieldError, "qa", jsonl(tmp_path / "q.jsonl", record), tok, "line 1",
            "field 'question' is missing")


def test_error_qa_empty_context(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = squad(tmp_path / "s.json", "", [{"id": "x", "question": "Why?", "answers": []}])
    _raises(EmptyFieldError, "qa", path, tok, "data[0].paragraphs[0]", "field 'context'")


def test_error_qa_answers_wrong_type(tmp_path: Path, tok: OPTTokenizer) -> None:
    record = {**qa_record(*CONTEXTS["ascii"]), "answers": ["Denver Broncos"]}
    _raises(FieldTypeError, "qa", jsonl(tmp_path / "q.jsonl", record), tok, "line 1",
            "field 'answers' is a list")


def test_error_qa_answers_unequal_lists(tmp_path: Path, tok: OPTTokenizer) -> None:
    record = qa_record(*CONTEXTS["ascii"])
    record["answers"]["answer_start"].append(4)
    _raises(FieldTypeError, "qa", jsonl(tmp_path / "q.jsonl", record), tok, "line 1",
            "1 texts but 2 answer_start")


def test_error_qa_answer_start_wrong_type(tmp_path: Path, tok: OPTTokenizer) -> None:
    record = qa_record(*CONTEXTS["ascii"])
    record["answers"]["answer_start"] = ["4"]
    _raises(FieldTypeError, "qa", jsonl(tmp_path / "q.jsonl", record), tok, "line 1",
            "field 'answers.answer_start[0]' is '4'")


def test_error_qa_missing_answer_start_in_squad_json(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = squad(tmp_path / "s.json", "Some context here.",
                 [{"id": "ok", "question": "Q?", "answers": [{"text": "Some",
                                                              "answer_start": 0}]},
                  {"id": "bad", "question": "Q?", "answers": [{"text": "context"}]}])
    err = _raises(MissingFieldError, "qa", path, tok,
                  "data[0].paragraphs[0].qas[1].answers[0]", "field 'answer_start' is missing")
    assert err.where == "data[0].paragraphs[0].qas[1].answers[0]"


def test_error_qa_empty_answer_text(tmp_path: Path, tok: OPTTokenizer) -> None:
    path = squad(tmp_path / "s.json", "Some context.",
                 [{"id": "x", "question": "Q?", "answers": [{"text": "", "answer_start": 0}]}])
    _raises(EmptyFieldError, "qa", path, tok, "qas[0].answers[0]", "field 'text' is empty")


def test_error_qa_answer_start_off_the_text(tmp_path: Path, tok: OPTTokenizer) -> None:
    context, question, answer = CONTEXTS["ascii"]
    path = jsonl(tmp_path / "q.jsonl", qa_record(context, question, answer),
                 qa_record(context, question, answer, start=context.index(answer) + 1))
    err = _raises(AnswerSpanError, "qa", path, tok, "line 2", "'answers.text[0]'",
                  "answer_start=5 points at 'enver Broncos '")
    assert err.field == "answers.text[0]"


def test_error_qa_answer_start_off_the_text_in_squad_json(tmp_path: Path,
                                                          tok: OPTTokenizer) -> None:
    path = squad(tmp_path / "s.json", "Some context.",
                 [{"id": "x", "question": "Q?",
                   "answers": [{"text": "context", "answer_start": 99}]}])
    _raises(AnswerSpanError, "qa", path, tok, "data[0].paragraphs[0].qas[0]", "'answers[0]'",
            "answer_start=99")


def test_error_qa_missing_data(tmp_path: Path, tok: OPTTokenizer) -> None:
    _raises(MissingFieldError, "qa", write(tmp_path / "s.json", '{"version": "2"}'), tok,
            "the top level", "field 'data' is missing")


def test_error_qa_question_leaves_no_room(tmp_path: Path, tok: OPTTokenizer) -> None:
    question = "why " * 20
    path = jsonl(tmp_path / "q.jsonl", qa_record("Short.", question, "Short"))
    n = len(tok.encode(question))
    _raises(DataError, "qa", path, tok, "line 1", f"field 'question' takes {n} tokens",
            "max_length=16", max_length=16)


def test_label_mapping_is_the_one_the_dataset_uses(tmp_path):
    from flagopt.train.data import label_mapping

    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'
                    '{"text": "fine", "label": "pos"}\n', encoding="utf-8")
    mapping = label_mapping(path)
    assert mapping == {"neg": 0, "pos": 1}
    dataset = load_task_data("classification", path, OPTTokenizer.default())
    assert dataset.label2id == mapping
    with pytest.raises(DataFormatError, match="extension"):
        label_mapping(tmp_path / "train.csv")
