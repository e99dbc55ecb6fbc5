"""Tests of zoscale.data.formats: the task suite's readers on the fixtures and on malformed files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from zoscale.data.formats import (
    DATASETS,
    read_drop,
    read_jsonl,
    read_split,
    read_squad,
    read_superglue,
    read_tsv,
    read_winogrande,
    split_file,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FOLDERS = {
    "sst2": "SST-2", "rte": "RTE", "cb": "CB", "boolq": "BoolQ", "wsc": "WSC", "wic": "WiC", "multirc": "MultiRC",
    "copa": "COPA", "record": "ReCoRD", "squad": "squad", "drop": "drop", "winogrande": "winogrande",
}  # fmt: skip


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list[Any]) -> Path:
    return _write(path, "".join(json.dumps(row) + "\n" for row in rows))


# ---------------------------------------------------------------------------------------------
# Every reader on its fixture

FIRST_FIELDS = {  # dataset: (training file, {field: type} of the first record, its where suffix)
    "sst2": ("train.tsv", {"sentence": str, "label": str}, " line 2"),
    "rte": ("train.jsonl", {"premise": str, "hypothesis": str, "label": str, "idx": int}, " line 1"),
    "cb": ("train.jsonl", {"premise": str, "hypothesis": str, "label": str}, " line 1"),
    "boolq": ("train.jsonl", {"question": str, "passage": str, "label": bool}, " line 1"),
    "wsc": ("train.jsonl", {"text": str, "span1_text": str, "span2_text": str, "span1_index": int, "label": bool},
            " line 1"),
    "wic": ("train.jsonl", {"word": str, "sentence1": str, "sentence2": str, "label": bool}, " line 1"),
    "multirc": ("train.jsonl", {"paragraph": str, "question": str, "answer": str, "label": int, "question_id": str},
                " line 1: passage.questions[0].answers[0]"),
    "copa": ("train.jsonl", {"premise": str, "choice1": str, "choice2": str, "question": str, "label": int}, " line 1"),
    "record": ("train.jsonl", {"passage": str, "query": str, "entities": list, "answers": list}, " line 1: qas[0]"),
    "squad": ("train-v1.1.json", {"title": str, "context": str, "question": str, "answers": list, "id": str},
              ": data[0].paragraphs[0].qas[0]"),
    "drop": ("drop_dataset_train.json", {"passage": str, "question": str, "answers": list, "query_id": str},
             ": nfl_100.qa_pairs[0]"),
    "winogrande": ("train_xl.jsonl", {"sentence": str, "option1": str, "option2": str, "answer": str}, " line 1"),
}  # fmt: skip
LABELS = {
    "sst2": {"0", "1"}, "rte": {"entailment", "not_entailment"}, "cb": {"entailment", "contradiction", "neutral"},
    "boolq": {True, False}, "wsc": {True, False}, "wic": {True, False}, "multirc": {0, 1}, "copa": {0, 1},
}  # fmt: skip


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize(("split", "count"), [("train", 32), ("validation", 16)])
def test_fixture_splits(dataset: str, split: str, count: int) -> None:
    records = read_split(FIXTURES / FOLDERS[dataset], dataset, split)
    assert len(records) == count
    if dataset in LABELS:
        labels = [row["label"] for row, _ in records]
        assert set(labels) == LABELS[dataset]
        assert max(map(labels.count, set(labels))) - min(map(labels.count, set(labels))) <= 1  # balanced
        assert all(type(label) is type(labels[0]) for label in labels)


@pytest.mark.parametrize("dataset", DATASETS)
def test_first_record_fields_and_where(dataset: str) -> None:
    name, types, suffix = FIRST_FIELDS[dataset]
    path = FIXTURES / FOLDERS[dataset] / name
    row, where = read_split(path.parent, dataset, "train")[0]
    assert where == f"{path}{suffix}"
    for field, kind in types.items():
        assert type(row[field]) is kind, (field, row[field])


def test_where_counts_physical_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", '{"x": 1}\n\n  \n{"x": 2}\n')
    assert read_jsonl(path) == [({"x": 1}, f"{path} line 1"), ({"x": 2}, f"{path} line 4")]
    tsv = _write(tmp_path / "a.tsv", "sentence\tlabel\n\na fine film .\t1\n")
    assert read_tsv(tsv) == [({"sentence": "a fine film .", "label": "1"}, f"{tsv} line 3")]


def test_sst2_tsv_keeps_quotes_and_strings(tmp_path: Path) -> None:
    path = _write(tmp_path / "dev.tsv", 'sentence\tlabel\nit \'s a "charming" film .\t1\n')
    assert read_tsv(path, ("sentence", "label"))[0][0] == {"sentence": 'it \'s a "charming" film .', "label": "1"}


def test_sst2_jsonl_variant_keeps_json_types(tmp_path: Path) -> None:
    _jsonl(tmp_path / "validation.jsonl", [{"sentence": "a fine film .", "label": 1}])
    assert read_split(tmp_path, "sst2", "validation")[0][0] == {"sentence": "a fine film .", "label": 1}


def test_wsc_target_flattened() -> None:
    row, _ = read_superglue(FIXTURES / "WSC" / "train.jsonl", "wsc")[0]
    assert "target" not in row
    words = row["text"].split()
    assert words[row["span1_index"]] == row["span1_text"] and words[row["span2_index"]] == row["span2_text"]


# ---------------------------------------------------------------------------------------------
# MultiRC, ReCoRD


def test_multirc_one_record_per_answer() -> None:
    path = FIXTURES / "MultiRC" / "train.jsonl"
    records = read_superglue(path, "multirc")
    raw = json.loads(path.read_text().splitlines()[0])
    n_answers = sum(len(q["answers"]) for q in raw["passage"]["questions"])
    first = records[:n_answers]
    assert n_answers == 4 and {row["paragraph"] for row, _ in first} == {raw["passage"]["text"]}
    assert [row["answer"] for row, _ in first] == [a["text"] for q in raw["passage"]["questions"] for a in q["answers"]]
    assert [row["question_id"] for row, _ in first] == ["0-0", "0-0", "0-1", "0-1"]
    assert first[3][1] == f"{path} line 1: passage.questions[1].answers[1]"
    assert records[4][1] == f"{path} line 2: passage.questions[0].answers[0]"


def test_record_entities_inclusive_offsets_and_answers(tmp_path: Path) -> None:
    text = "Ann met Bob in Rome.\n@highlight\nBob saw Ann"
    entities = [{"start": 0, "end": 2}, {"start": 8, "end": 10}, {"start": 15, "end": 18}, {"start": 32, "end": 34},
                {"start": 40, "end": 42}]  # fmt: skip
    qas = [{"query": "@placeholder met Bob.", "idx": 0,
            "answers": [{"start": 0, "end": 2, "text": "Ann"}, {"start": 40, "end": 42, "text": "Ann"}]},
           {"query": "They met in @placeholder.", "idx": 1}]  # fmt: skip
    path = _jsonl(tmp_path / "val.jsonl", [{"idx": 0, "passage": {"text": text, "entities": entities}, "qas": qas}])
    (first, where), (second, _) = read_superglue(path, "record")
    assert first["entities"] == ["Ann", "Bob", "Rome"]
    assert first["answers"] == ["Ann"] and second["answers"] == []  # deduplicated; missing -> empty
    assert first["passage"] == text and first["query"] == "@placeholder met Bob."
    assert where == f"{path} line 1: qas[0]"


def test_record_fixture_entities() -> None:
    records = read_superglue(FIXTURES / "ReCoRD" / "train.jsonl", "record")
    assert records[0][0]["entities"] == ["Anna", "Paris", "Red Cross"]
    assert records[2][0]["entities"] == ["Ben", "Liam", "Oslo", "Prague"]
    assert all(3 <= len(row["entities"]) <= 4 and "@placeholder" in row["query"] for row, _ in records)
    assert all(set(row["answers"]) <= set(row["entities"]) and row["answers"] for row, _ in records)


# ---------------------------------------------------------------------------------------------
# SQuAD, DROP, WinoGrande


def test_squad_answers_in_order_with_duplicates() -> None:
    records = read_squad(FIXTURES / "squad" / "dev-v1.1.json")
    by_question = {row["question"]: row["answers"] for row, _ in records}
    assert by_question["Where does Billy sleep?"] == ["the kitchen", "kitchen", "the kitchen"]
    assert by_question["Where does Iris live?"] == ["Lisbon"] * 3
    assert records[3][1] == f"{FIXTURES / 'squad' / 'dev-v1.1.json'}: data[0].paragraphs[1].qas[1]"


def _drop_answer(number: str = "", date: tuple[str, str, str] = ("", "", ""), spans: list[str] | None = None) -> dict:
    return {"number": number, "date": dict(zip(("day", "month", "year"), date)), "spans": spans or []}


def test_drop_answer_rules(tmp_path: Path) -> None:
    qas = [
        {"question": "n", "query_id": "q0", "answer": _drop_answer("14", spans=["ignored"])},
        {"question": "d", "query_id": "q1", "answer": _drop_answer(date=("12", "May", "1998"))},
        {"question": "y", "query_id": "q2", "answer": _drop_answer(date=("", "", "1998"))},
        {"question": "s", "query_id": "q3", "answer": _drop_answer(spans=["Bears", "Lions"])},
        {"question": "v", "query_id": "q4", "answer": _drop_answer(spans=["Tom Reed"]),
         "validated_answers": [_drop_answer(spans=["Tom Reed"]), _drop_answer(spans=["Reed"]), _drop_answer()]},
        {"question": "e", "query_id": "q5", "answer": _drop_answer(), "validated_answers": [_drop_answer("3")]},
    ]  # fmt: skip
    path = tmp_path / "drop_dataset_dev.json"
    path.write_text(json.dumps({"nfl_1": {"passage": "P", "qa_pairs": qas}}))
    records = read_drop(path)
    assert [row["answers"] for row, _ in records] == [
        ["14"], ["May 12 1998"], ["1998"], ["Bears, Lions"], ["Tom Reed", "Reed"], ["3"]]  # fmt: skip
    assert records[4] == ({"passage": "P", "question": "v", "answers": ["Tom Reed", "Reed"], "query_id": "q4",
                           "passage_id": "nfl_1"}, f"{path}: nfl_1.qa_pairs[4]")  # fmt: skip


def test_drop_fixture_validated_answers() -> None:
    records = read_drop(FIXTURES / "drop" / "drop_dataset_dev.json")
    assert [row["answers"] for row, _ in records[:4]] == [
        ["18"], ["January 25 1998"], ["Ben Ford", "Ford"], ["Bears, Falcons", "Falcons, Bears"]]  # fmt: skip


def test_winogrande_answer_kept_or_missing(tmp_path: Path) -> None:
    row, where = read_winogrande(FIXTURES / "winogrande" / "dev.jsonl")[0]
    assert row["answer"] in ("1", "2") and row["sentence"].count("_") == 1 and where.endswith("dev.jsonl line 1")
    path = _jsonl(tmp_path / "test.jsonl", [{"qID": "X-1", "sentence": "_ won.", "option1": "A", "option2": "B"}])
    assert "answer" not in read_winogrande(path)[0][0]


# ---------------------------------------------------------------------------------------------
# Split files


def test_split_file_names(tmp_path: Path) -> None:
    for name in ("validation.jsonl", "val.jsonl", "train_l.jsonl", "train_s.jsonl", "train.jsonl", "dev.jsonl"):
        (tmp_path / name).write_text("{}\n")
    assert split_file(tmp_path, "rte", "validation") == tmp_path / "val.jsonl"  # SuperGLUE's own name first
    assert split_file(tmp_path, "winogrande", "train") == tmp_path / "train_l.jsonl"
    assert split_file(tmp_path, "sst2", "train") == tmp_path / "train.jsonl"
    assert split_file(FIXTURES / "SST-2", "sst2", "validation") == FIXTURES / "SST-2" / "dev.tsv"
    assert split_file(FIXTURES / "squad", "squad", "validation").name == "dev-v1.1.json"
    assert split_file(FIXTURES / "drop", "drop", "train").name == "drop_dataset_train.json"


def test_split_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*train_xl.jsonl, train_l.jsonl, .*train_debiased.jsonl"):
        split_file(tmp_path, "winogrande", "train")
    with pytest.raises(FileNotFoundError, match="tried val.jsonl, validation.jsonl"):
        split_file(tmp_path, "copa", "validation")
    with pytest.raises(ValueError, match="Unknown data set 'mnli'"):
        split_file(tmp_path, "mnli", "train")
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        split_file(tmp_path, "rte", "test")


# ---------------------------------------------------------------------------------------------
# Errors

READERS = [read_jsonl, read_tsv, read_squad, read_drop, read_winogrande, lambda p: read_superglue(p, "rte")]


@pytest.mark.parametrize("reader", READERS)
def test_missing_file(tmp_path: Path, reader: Any) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        reader(tmp_path / "nope.json")


@pytest.mark.parametrize("reader", [read_jsonl, read_tsv, read_winogrande, lambda p: read_superglue(p, "record")])
def test_empty_file(tmp_path: Path, reader: Any) -> None:
    path = _write(tmp_path / "empty.jsonl", "\n\n")
    with pytest.raises(ValueError, match=r"empty.jsonl: no records"):
        reader(path)


def test_malformed_json_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl", '{"premise": "a", "hypothesis": "b"}\n\n{"premise": "a",\n')
    with pytest.raises(ValueError, match=r"train.jsonl line 3: malformed JSON"):
        read_superglue(path, "rte")


def test_non_object_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl", '{"x": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"train.jsonl line 2: expected a JSON object, got list"):
        read_jsonl(path)


def test_tsv_errors(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.tsv", "sentence\tlabel\ngood .\t1\nbad\t0\textra\n")
    with pytest.raises(ValueError, match=r"train.tsv line 3: expected 2 tab-separated fields, got 3"):
        read_tsv(path)
    path = _write(tmp_path / "dev.tsv", "index\tsentence\n0\tgood .\n")
    with pytest.raises(ValueError, match=r"dev.tsv line 1 \(header\): missing field\(s\) 'label'"):
        read_tsv(path, ("sentence", "label"))


def test_superglue_missing_fields(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "val.jsonl", [{"premise": "p", "choice1": "a", "choice2": "b", "label": 0}])
    with pytest.raises(ValueError, match=r"val.jsonl line 1: missing field\(s\) 'question'"):
        read_superglue(path, "copa")
    path = _jsonl(tmp_path / "wsc.jsonl", [{"text": "t", "target": {"span1_text": "a"}}])
    with pytest.raises(ValueError, match=r"line 1: target: missing field\(s\) 'span2_text'"):
        read_superglue(path, "wsc")
    with pytest.raises(ValueError, match="Unknown SuperGLUE task 'mnli'"):
        read_superglue(path, "mnli")


def test_multirc_without_questions(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "val.jsonl", [{"idx": 0, "passage": {"text": "t"}}])
    with pytest.raises(ValueError, match=r"val.jsonl line 1: passage: missing field 'questions'"):
        read_superglue(path, "multirc")


def test_record_entity_offset_out_of_range(tmp_path: Path) -> None:
    passage = {"text": "Ann met Bob.", "entities": [{"start": 0, "end": 2}, {"start": 8, "end": 12}]}
    path = _jsonl(tmp_path / "val.jsonl", [{"idx": 0, "passage": passage, "qas": []}])
    with pytest.raises(ValueError, match=r"line 1: passage.entities\[1\]: entity offsets start=8, end=12 outside"):
        read_superglue(path, "record")


def test_squad_structure_errors(tmp_path: Path) -> None:
    path = _write(tmp_path / "dev-v1.1.json", json.dumps({"version": "1.1"}))
    with pytest.raises(ValueError, match=r"dev-v1.1.json: top level: missing field 'data'"):
        read_squad(path)
    article = {"title": "T", "paragraphs": [{"context": "c", "qas": [{"question": "q", "answers": [{"x": 1}]}]}]}
    _write(path, json.dumps({"data": [article]}))
    with pytest.raises(ValueError, match=r"data\[0\].paragraphs\[0\].qas\[0\].answers\[0\]: missing field 'text'"):
        read_squad(path)
    _write(path, '{"data": [\n  {"title": ]}')
    with pytest.raises(ValueError, match=r"dev-v1.1.json line 2 column \d+: malformed JSON"):
        read_squad(path)


def test_drop_qa_without_answer(tmp_path: Path) -> None:
    qa = {"question": "q", "query_id": "q0", "answer": _drop_answer(), "validated_answers": []}
    path = _write(tmp_path / "drop_dataset_dev.json", json.dumps({"nfl_7": {"passage": "P", "qa_pairs": [qa]}}))
    with pytest.raises(ValueError, match=r"drop_dataset_dev.json: nfl_7.qa_pairs\[0\]: no answer"):
        read_drop(path)


# ---------------------------------------------------------------------------------------------
# Fixtures


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_reproduces_fixtures(tmp_path: Path) -> None:
    written = _generator().write_fixtures(tmp_path)
    names = sorted(str(path.relative_to(tmp_path)) for path in written)
    committed = sorted(str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*") if p.is_file() and p.suffix != ".py")
    assert names == committed
    for name in names:
        assert (tmp_path / name).read_bytes() == (FIXTURES / name).read_bytes(), name


def test_fixture_offsets_are_real() -> None:
    for article in json.loads((FIXTURES / "squad" / "train-v1.1.json").read_text())["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                for answer in qa["answers"]:
                    start = answer["answer_start"]
                    assert paragraph["context"][start : start + len(answer["text"])] == answer["text"]
    for line in (FIXTURES / "ReCoRD" / "val.jsonl").read_text().splitlines():
        row = json.loads(line)
        text = row["passage"]["text"]
        assert all(text[a["start"] : a["end"] + 1] == a["text"] for qa in row["qas"] for a in qa["answers"])
    for line in (FIXTURES / "WiC" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["sentence1"][row["start1"] : row["end1"]] == row["word"]
        assert row["sentence2"][row["start2"] : row["end2"]] == row["word"]
