"""Readers for the MeZO task suite's public data sets, each in its own distributed file format.

Every reader returns raw :data:`Record` pairs ``(fields, where)``: ``fields`` holds the file's
values with their JSON (or TSV string) types untouched -- labels are not converted -- and
``where`` locates the example for error messages: ``"<path> line N"`` (1-based physical line)
for line-oriented files, ``"<path> line N: <json path>"`` for an example nested inside a JSON
line, and ``"<path>: <json path>"`` for whole-file JSON (e.g.
``"dev-v1.1.json: data[0].paragraphs[2].qas[1]"``). ``<path>`` is the path as given.

Formats, and the distributions their layouts come from:

* :func:`read_jsonl` -- JSON Lines, one object per line (SuperGLUE, WinoGrande).
* :func:`read_tsv` -- GLUE's tab-separated files with a header row, no quoting (SST-2's
  ``train.tsv`` / ``dev.tsv``, header ``sentence<TAB>label``).
* :func:`read_superglue` -- the SuperGLUE v2 zip's ``train.jsonl`` / ``val.jsonl`` for RTE, CB,
  BoolQ, WSC, WiC, MultiRC, COPA and ReCoRD. WSC's ``target`` spans are flattened; MultiRC's
  nested passages yield one record per answer, ReCoRD's one record per query.
* :func:`read_squad` -- SQuAD v1.1's ``train-v1.1.json`` / ``dev-v1.1.json``
  (``data[].paragraphs[].qas[]``), one record per question.
* :func:`read_drop` -- DROP's ``drop_dataset_{train,dev}.json`` (a passage-id keyed object of
  ``qa_pairs``), one record per question.
* :func:`read_winogrande` -- WinoGrande 1.1's ``train_{xs,s,m,l,xl,debiased}.jsonl`` /
  ``dev.jsonl`` (label in ``answer``, ``"1"`` or ``"2"``).

:func:`split_file` finds a split's file in a data set's folder under its distributed name;
:func:`read_split` reads it with the right reader. Malformed input raises ``ValueError`` naming
the ``where``; no row is ever skipped silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DATASETS",
    "SPLIT_FILES",
    "SUPERGLUE_TASKS",
    "Record",
    "read_drop",
    "read_jsonl",
    "read_split",
    "read_squad",
    "read_superglue",
    "read_tsv",
    "read_winogrande",
    "split_file",
]

#: ``(raw fields, where)``: one example's values as read and its location in the file.
Record = tuple[dict[str, Any], str]
PathLike = str | os.PathLike[str]

#: Tasks :func:`read_superglue` reads, each SuperGLUE v2 zip folder's ``*.jsonl`` layout.
SUPERGLUE_TASKS = ("rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record")
#: Every data set name :func:`split_file` and :func:`read_split` accept.
DATASETS = ("sst2", *SUPERGLUE_TASKS, "squad", "drop", "winogrande")

_SUPERGLUE_FILES = {"train": ("train.jsonl",), "validation": ("val.jsonl", "validation.jsonl")}
_WINOGRANDE_TRAIN = tuple(f"train_{size}.jsonl" for size in ("xl", "l", "m", "s", "xs", "debiased"))
#: Candidate file names per data set and split, tried in order; the first that exists wins.
SPLIT_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "sst2": {"train": ("train.tsv", "train.jsonl"), "validation": ("dev.tsv", "validation.jsonl")},
    **{task: _SUPERGLUE_FILES for task in SUPERGLUE_TASKS},
    "squad": {"train": ("train-v1.1.json",), "validation": ("dev-v1.1.json",)},
    "drop": {"train": ("drop_dataset_train.json",), "validation": ("drop_dataset_dev.json",)},
    "winogrande": {"train": _WINOGRANDE_TRAIN, "validation": ("dev.jsonl",)},
}

#: Fields each flat SuperGLUE task's line must have (labels are absent from test files).
_FLAT_FIELDS = {
    "rte": ("premise", "hypothesis"),
    "cb": ("premise", "hypothesis"),
    "boolq": ("question", "passage"),
    "wic": ("word", "sentence1", "sentence2"),
    "copa": ("premise", "choice1", "choice2", "question"),
    "wsc": ("text", "target"),
}
_WSC_SPANS = ("span1_text", "span2_text")
_WINOGRANDE_FIELDS = ("sentence", "option1", "option2")

# ---------------------------------------------------------------------------------------------
# Shared helpers


def _checked(records: list[Record], path: PathLike) -> list[Record]:
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _require_fields(row: dict[str, Any], fields: Iterable[str], where: str) -> None:
    missing = [field for field in fields if field not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")


def _get(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``obj[key]``, raising ``ValueError`` at ``where`` unless ``obj`` is an object holding a ``kind``."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: field {key!r} should be {names}, got {type(value).__name__}")
    return value


def _load_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8-sig") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {err.lineno} column {err.colno}: malformed JSON ({err.msg})") from None


def _dedup(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------------------------------
# Line-oriented formats


def read_jsonl(path: PathLike) -> list[Record]:
    """Read a JSON Lines file: one JSON object per non-blank line.

    Args:
        path: the ``.jsonl`` file.

    Returns:
        One ``(object, "<path> line N")`` per non-blank line; blank lines are skipped but
        counted, so ``N`` is the physical line.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a line is not valid JSON or not an object, or the file has no records.
    """
    records: list[Record] = []
    with open(path, encoding="utf-8-sig") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: malformed JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            records.append((row, where))
    return _checked(records, path)


def read_tsv(path: PathLike, fields: Sequence[str] | None = None) -> list[Record]:
    """Read a GLUE-style TSV file: a header row, then tab-separated rows, no quoting.

    Args:
        path: the ``.tsv`` file.
        fields: column names the header must contain (all columns are kept either way).

    Returns:
        One ``({column: str}, "<path> line N")`` per non-blank data row, values as raw strings.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the header lacks one of ``fields``, a row's field count differs from the
            header's, or the file has no data rows.
    """
    records: list[Record] = []
    header: list[str] | None = None
    with open(path, encoding="utf-8-sig") as handle:
        for lineno, line in enumerate(handle, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            values = line.split("\t")
            where = f"{path} line {lineno}"
            if header is None:
                header = values
                _require_fields(dict.fromkeys(header), fields or (), f"{where} (header)")
            elif len(values) != len(header):
                raise ValueError(f"{where}: expected {len(header)} tab-separated fields, got {len(values)}")
            else:
                records.append((dict(zip(header, values)), where))
    return _checked(records, path)


# ---------------------------------------------------------------------------------------------
# SuperGLUE


def read_superglue(path: PathLike, task: str) -> list[Record]:
    """Read a SuperGLUE v2 ``*.jsonl`` file of ``task``.

    Flat tasks keep each line's object (all fields, e.g. ``idx``); WSC's ``target`` object is
    replaced by its ``span1_text``/``span2_text``/``span1_index``/``span2_index`` fields.
    MultiRC yields one record per answer, ReCoRD one per query (see :func:`_multirc_records`
    and :func:`_record_records`). ``label`` is kept when present (test files lack it).

    Args:
        path: the task's ``train.jsonl`` / ``val.jsonl``.
        task: one of :data:`SUPERGLUE_TASKS`.

    Returns:
        The task's records.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown ``task``, malformed JSON, or a line lacking the task's structure.
    """
    if task not in SUPERGLUE_TASKS:
        raise ValueError(f"Unknown SuperGLUE task {task!r}; expected one of {', '.join(SUPERGLUE_TASKS)}")
    rows = read_jsonl(path)
    if task == "multirc":
        return _checked([rec for row, where in rows for rec in _multirc_records(row, where)], path)
    if task == "record":
        return _checked([rec for row, where in rows for rec in _record_records(row, where)], path)
    for row, where in rows:
        _require_fields(row, _FLAT_FIELDS[task], where)
    if task == "wsc":
        return [(_flatten_wsc(row, where), where) for row, where in rows]
    return rows


def _flatten_wsc(row: dict[str, Any], where: str) -> dict[str, Any]:
    target = _get(row, "target", dict, where)
    _require_fields(target, _WSC_SPANS, f"{where}: target")
    flat = {key: value for key, value in row.items() if key != "target"}
    flat.update(target)
    return flat


def _multirc_records(row: dict[str, Any], where: str) -> list[Record]:
    """One record per answer: ``paragraph, question, answer, label, question_id`` (+ ``idx`` fields)."""
    passage = _get(row, "passage", dict, where)
    text = _get(passage, "text", str, f"{where}: passage")
    records: list[Record] = []
    for i, question in enumerate(_get(passage, "questions", list, f"{where}: passage")):
        q_where = f"{where}: passage.questions[{i}]"
        q_text = _get(question, "question", str, q_where)
        for j, answer in enumerate(_get(question, "answers", list, q_where)):
            a_where = f"{q_where}.answers[{j}]"
            fields = {
                "paragraph": text,
                "question": q_text,
                "answer": _get(answer, "text", str, a_where),
                "question_id": f"{row.get('idx')}-{question.get('idx')}",
                "passage_idx": row.get("idx"),
                "question_idx": question.get("idx"),
                "answer_idx": answer.get("idx"),
            }
            if "label" in answer:
                fields["label"] = answer["label"]
            records.append((fields, a_where))
    return records


def _record_records(row: dict[str, Any], where: str) -> list[Record]:
    """One record per query: ``passage, query, entities, answers`` (+ ``idx``, ``passage_idx``)."""
    passage = _get(row, "passage", dict, where)
    text = _get(passage, "text", str, f"{where}: passage")
    spans = _get(passage, "entities", list, f"{where}: passage")
    entities = _dedup(_span_text(text, span, f"{where}: passage.entities[{k}]") for k, span in enumerate(spans))
    records: list[Record] = []
    for k, qa in enumerate(_get(row, "qas", list, where)):
        qa_where = f"{where}: qas[{k}]"
        query = _get(qa, "query", str, qa_where)
        answers = _get(qa, "answers", list, qa_where) if "answers" in qa else []
        fields = {
            "passage": text,
            "query": query,
            "entities": entities,
            "answers": _dedup(_get(a, "text", str, f"{qa_where}.answers[{n}]") for n, a in enumerate(answers)),
            "idx": qa.get("idx"),
            "passage_idx": row.get("idx"),
        }
        records.append((fields, qa_where))
    return records


def _span_text(text: str, span: Any, where: str) -> str:
    """``text[start:end + 1]``: ReCoRD's entity ``end`` offsets are inclusive."""
    start, end = _get(span, "start", int, where), _get(span, "end", int, where)
    if not 0 <= start <= end < len(text):
        raise ValueError(f"{where}: entity offsets start={start}, end={end} outside the passage (length {len(text)})")
    return text[start : end + 1]


# ---------------------------------------------------------------------------------------------
# Whole-file JSON: SQuAD, DROP


def read_squad(path: PathLike) -> list[Record]:
    """Read SQuAD v1.1 JSON (``{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}``).

    Args:
        path: ``train-v1.1.json`` or ``dev-v1.1.json``.

    Returns:
        One record per question: ``title, context, question, answers, id``; ``answers`` lists
        every annotator's answer text in file order, duplicates kept.
        ``where`` is ``"<path>: data[i].paragraphs[j].qas[k]"``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: malformed JSON, a missing or mistyped level, or no questions.
    """
    root = _load_json(path)
    records: list[Record] = []
    for i, article in enumerate(_get(root, "data", list, f"{path}: top level")):
        a_where = f"{path}: data[{i}]"
        title = _get(article, "title", str, a_where)
        for j, paragraph in enumerate(_get(article, "paragraphs", list, a_where)):
            p_where = f"{a_where}.paragraphs[{j}]"
            context = _get(paragraph, "context", str, p_where)
            for k, qa in enumerate(_get(paragraph, "qas", list, p_where)):
                where = f"{p_where}.qas[{k}]"
                answers = _get(qa, "answers", list, where)
                fields = {
                    "title": title,
                    "context": context,
                    "question": _get(qa, "question", str, where),
                    "answers": [_get(a, "text", str, f"{where}.answers[{n}]") for n, a in enumerate(answers)],
                    "id": qa.get("id"),
                }
                records.append((fields, where))
    return _checked(records, path)


def read_drop(path: PathLike) -> list[Record]:
    """Read DROP JSON (``{passage_id: {"passage", "qa_pairs": [...]}}``).

    Each answer object (``answer``, then every ``validated_answers`` entry) contributes one
    string: its ``number`` if non-empty; else its non-empty ``date`` parts joined by spaces in
    the order month, day, year; else its ``spans`` joined by ``", "``. The strings are
    deduplicated in order.

    Args:
        path: ``drop_dataset_train.json`` or ``drop_dataset_dev.json``.

    Returns:
        One record per question: ``passage, question, answers, query_id, passage_id``.
        ``where`` is ``"<path>: <passage_id>.qa_pairs[k]"``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: malformed JSON or structure, a question with no answer, or no questions.
    """
    root = _load_json(path)
    if not isinstance(root, dict):
        raise ValueError(f"{path}: top level: expected a JSON object keyed by passage id, got {type(root).__name__}")
    records: list[Record] = []
    for passage_id, entry in root.items():
        p_where = f"{path}: {passage_id}"
        passage = _get(entry, "passage", str, p_where)
        for k, qa in enumerate(_get(entry, "qa_pairs", list, p_where)):
            where = f"{p_where}.qa_pairs[{k}]"
            fields = {
                "passage": passage,
                "question": _get(qa, "question", str, where),
                "answers": _drop_answers(qa, where),
                "query_id": qa.get("query_id"),
                "passage_id": passage_id,
            }
            records.append((fields, where))
    return _checked(records, path)


def _drop_answers(qa: dict[str, Any], where: str) -> list[str]:
    objects = [(f"{where}.answer", qa["answer"])] if "answer" in qa else []
    validated = qa.get("validated_answers", [])
    if not isinstance(validated, list):
        raise ValueError(f"{where}: field 'validated_answers' should be list, got {type(validated).__name__}")
    objects += [(f"{where}.validated_answers[{n}]", answer) for n, answer in enumerate(validated)]
    answers = _dedup(text for at, answer in objects if (text := _drop_answer_text(answer, at)))
    if not answers:
        raise ValueError(f"{where}: no answer (empty 'answer' and 'validated_answers')")
    return answers


def _drop_answer_text(answer: Any, where: str) -> str:
    if not isinstance(answer, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(answer).__name__}")
    number = answer.get("number", "")
    date = answer.get("date", {})
    spans = answer.get("spans", [])
    if not (isinstance(number, str) and isinstance(date, dict) and isinstance(spans, list)):
        raise ValueError(f"{where}: expected 'number' str, 'date' object and 'spans' list")
    parts = [date.get(part, "") for part in ("month", "day", "year")]
    if not all(isinstance(value, str) for value in [*parts, *spans]):
        raise ValueError(f"{where}: date parts and spans should be strings")
    if number:
        return number
    if any(parts):
        return " ".join(part for part in parts if part)
    return ", ".join(span for span in spans if span)


# ---------------------------------------------------------------------------------------------
# WinoGrande


def read_winogrande(path: PathLike) -> list[Record]:
    """Read a WinoGrande 1.1 ``*.jsonl`` file.

    Args:
        path: e.g. ``train_xl.jsonl`` or ``dev.jsonl``.

    Returns:
        Each line's object (``qID, sentence, option1, option2`` and, except in test files,
        ``answer`` -- the string ``"1"`` or ``"2"``, left as is).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: malformed JSON, or a line lacking ``sentence``/``option1``/``option2``.
    """
    rows = read_jsonl(path)
    for row, where in rows:
        _require_fields(row, _WINOGRANDE_FIELDS, where)
    return rows


# ---------------------------------------------------------------------------------------------
# Splits


def split_file(folder: PathLike, dataset: str, split: str) -> Path:
    """Find ``split`` of ``dataset`` in ``folder`` under its distributed file name.

    Args:
        folder: the data set's folder as distributed (e.g. SuperGLUE's ``RTE/``).
        dataset: one of :data:`DATASETS`.
        split: ``"train"`` or ``"validation"``.

    Returns:
        The first existing candidate of :data:`SPLIT_FILES` ``[dataset][split]``.

    Raises:
        ValueError: unknown ``dataset`` or ``split``.
        FileNotFoundError: none of the candidates exists (the message lists them and ``folder``).
    """
    if dataset not in SPLIT_FILES:
        raise ValueError(f"Unknown data set {dataset!r}; expected one of {', '.join(DATASETS)}")
    if split not in ("train", "validation"):
        raise ValueError(f"Unknown split {split!r}; expected 'train' or 'validation'")
    names = SPLIT_FILES[dataset][split]
    for name in names:
        if (candidate := Path(folder) / name).is_file():
            return candidate
    raise FileNotFoundError(f"No {dataset} {split} file in {folder}: tried {', '.join(names)}")


def read_split(folder: PathLike, dataset: str, split: str) -> list[Record]:
    """Read ``split`` of ``dataset`` from ``folder``: :func:`split_file`, then the right reader.

    Args:
        folder: the data set's folder as distributed.
        dataset: one of :data:`DATASETS`.
        split: ``"train"`` or ``"validation"``.

    Returns:
        The split's records (SST-2's TSV gives string values, its JSONL variant JSON types).

    Raises:
        ValueError: unknown ``dataset``/``split`` or malformed file.
        FileNotFoundError: no candidate file exists.
    """
    path = split_file(folder, dataset, split)
    return _reader(dataset, path)(path)


def _reader(dataset: str, path: Path) -> Callable[[Path], list[Record]]:
    if dataset in SUPERGLUE_TASKS:
        return lambda p: read_superglue(p, dataset)
    if dataset == "sst2":
        return (lambda p: read_tsv(p, ("sentence", "label"))) if path.suffix == ".tsv" else read_jsonl
    return {"squad": read_squad, "drop": read_drop, "winogrande": read_winogrande}[dataset]
