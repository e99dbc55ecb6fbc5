"""Tests of zoscale.data: the Rotten Tomatoes reader, user files and splits (SST-2: test_classification.py)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
import torch

from zoscale.data import default_data_archive, load_rotten_tomatoes, split_train_eval
from zoscale.data.splits import read_records
from zoscale.data.tasks import Classification, Example, Task, task_spec
from zoscale.data.sources import RT_ARCHIVE_NAME

# ---------------------------------------------------------------------------------------------
# Rotten Tomatoes archive


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_vader_archive(folder: Path, ground_truth: bytes, include_movies: bool = True) -> Path:
    """A small stand-in for the vaderSentiment 3.3.2 sdist, with the same nested layout."""
    inner = {"hutto_ICWSM_2014/tweets_GroundTruth.txt": b"1\t3.0\tdecoy tweet\r\n"}
    if include_movies:
        inner["hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"] = ground_truth
    outer = {
        "vaderSentiment-3.3.2/setup.py": b"# not used\n",
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": _tar_bytes(inner),
    }
    path = folder / RT_ARCHIVE_NAME
    path.write_bytes(_tar_bytes(outer))
    return path


def _tsv(lines: list[str]) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


def test_rotten_tomatoes_parses_and_binarizes_like_sst2(tmp_path: Path) -> None:
    ratings = [2.3, -1.2, 0.49, -0.49, 0.5, -0.5, 0.0, 3.9]
    lines = [f"{i}\t{r}\tsentence {i} " for i, r in enumerate(ratings, start=1)]
    archive = make_vader_archive(tmp_path, _tsv(lines) + b"9\t-2.0\tcaf\xe9 bad\r\n")

    rows = load_rotten_tomatoes(archive)

    # |rating| < 0.5 is dropped (0.49, -0.49, 0.0); the sign of the rest gives the label.
    assert rows == [
        {"sentence": "sentence 1", "label": 1},
        {"sentence": "sentence 2", "label": 0},
        {"sentence": "sentence 5", "label": 1},
        {"sentence": "sentence 6", "label": 0},
        {"sentence": "sentence 8", "label": 1},
        {"sentence": "caf\ufffd bad", "label": 0},  # undecodable byte replaced, not fatal
    ]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("3\t1.0", "expected 3 tab-separated fields, got 2"),
        ("3\t1.0\ttext\textra", "expected 3 tab-separated fields, got 4"),
        ("3\tgood\ttext", "cannot parse rating"),
        ("3\tnan\ttext", "not finite"),
        ("3\t1.5\t   ", "empty text"),
        ("", "expected 3 tab-separated fields, got 1"),
    ],
)
def test_rotten_tomatoes_malformed_line_names_member_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    lines = ["1\t2.0\tfine", "2\t-2.0\talso fine", bad_line, "4\t1.0\tnever reached"]
    archive = make_vader_archive(tmp_path, _tsv(lines))
    with pytest.raises(ValueError, match=r"movieReviewSnippets_GroundTruth\.txt line 3: ") as info:
        load_rotten_tomatoes(archive)
    assert message in str(info.value)
    assert str(archive) in str(info.value)


def test_rotten_tomatoes_missing_archive_says_how_to_fetch(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / RT_ARCHIVE_NAME
    with pytest.raises(FileNotFoundError, match="launch/setup.sh") as info:
        load_rotten_tomatoes(missing)
    assert str(missing) in str(info.value)


def test_rotten_tomatoes_archive_without_member(tmp_path: Path) -> None:
    archive = make_vader_archive(tmp_path, b"", include_movies=False)
    with pytest.raises(ValueError, match="movieReviewSnippets_GroundTruth.txt"):
        load_rotten_tomatoes(archive)


def test_default_data_archive_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZOSCALE_DATA_DIR", str(tmp_path))
    assert default_data_archive() == tmp_path / "vaderSentiment-3.3.2.tar.gz"
    monkeypatch.delenv("ZOSCALE_DATA_DIR")
    assert default_data_archive() == Path.home() / ".cache" / "zoscale" / "vaderSentiment-3.3.2.tar.gz"


def test_real_rotten_tomatoes_archive() -> None:
    archive = default_data_archive()
    if not archive.is_file():
        pytest.skip(f"{archive} not downloaded (bash launch/setup.sh fetches it)")
    rows = load_rotten_tomatoes(archive)
    # 10,605 rated sentences, of which 533 have |rating| < 0.5.
    assert len(rows) == 10072
    assert sum(row["label"] for row in rows) == 4996  # 49.6% positive
    assert rows[0]["sentence"].startswith("The Rock is destined to be the 21st Century's new")


# ---------------------------------------------------------------------------------------------
# User files


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _sst2(path: Path) -> list[Example]:
    """A user's file through the SST-2 template, as the trainer reads it (``data.path=<file>``)."""
    return Task(task_spec("sst2"), Classification()).examples(read_records(path))


def test_load_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = _write_jsonl(
        tmp_path / "a.jsonl",
        [json.dumps({"sentence": " a fine film ", "label": 1}), "", json.dumps({"sentence": "dull", "label": 0})],
    )
    got = _sst2(jsonl)
    assert [(ex.prompt, ex.label, ex.where) for ex in got] == [
        ("a fine film It was", 1, f"{jsonl} line 1"), ("dull It was", 0, f"{jsonl} line 3")]

    csv_path = tmp_path / "b.csv"
    csv_path.write_text('sentence,label,extra\n"multi\nline, quoted",1,x\nok,0,y\n', encoding="utf-8")
    got = _sst2(csv_path)
    assert [(ex.prompt, ex.label, ex.where) for ex in got] == [
        ("multi\nline, quoted It was", 1, f"{csv_path} line 2"), ("ok It was", 0, f"{csv_path} line 4")]


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"label": 1}, "missing field 'sentence'"),
        ({"sentence": "x"}, "missing field 'label'"),
        ({"sentence": "   ", "label": 1}, "field 'sentence' is empty"),
        ({"sentence": 3, "label": 1}, "field 'sentence' must be text"),
        ({"sentence": "x", "label": 2}, "label 2 (int) in field 'label' is not one of"),
        ({"sentence": "x", "label": "1"}, "label '1' (str)"),
        ({"sentence": "x", "label": 1.0}, "label 1.0 (float)"),
        ({"sentence": "x", "label": True}, "label True (bool)"),
    ],
)
def test_jsonl_bad_row_names_file_and_line(tmp_path: Path, bad_row: dict, message: str) -> None:
    # Line 1 good, line 2 blank (counted, skipped), line 3 good, line 4 bad.
    good = json.dumps({"sentence": "good", "label": 1})
    path = _write_jsonl(tmp_path / "rows.jsonl", [good, "", good, json.dumps(bad_row)])
    with pytest.raises(ValueError, match=r"rows\.jsonl line 4: ") as info:
        _sst2(path)
    assert message in str(info.value)


def test_jsonl_invalid_json_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "rows.jsonl", [json.dumps({"sentence": "a", "label": 0}), "{not json"])
    with pytest.raises(ValueError, match=r"rows\.jsonl line 2: malformed JSON"):
        _sst2(path)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (",1", "field 'sentence' is empty"),
        ("text,", "label '' (str) in field 'label'"),
        ("  ,1", "field 'sentence' is empty"),
        ("text,5", "label 5 (int) in field 'label'"),
        ("text,1,extra", "expected 2 fields like the header, got 3"),
    ],
)
def test_csv_bad_row_names_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "rows.csv"
    path.write_text(f"sentence,label\n{bad_line}\nfine,0\n", encoding="utf-8")
    # The header is line 1, so the first data row is line 2.
    with pytest.raises(ValueError, match=r"rows\.csv line 2: ") as info:
        _sst2(path)
    assert message in str(info.value)


def test_csv_line_numbers_count_multiline_fields_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text('sentence,label\n"two\nlines",1\n\nbad,7\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows\.csv line 5: label 7"):
        _sst2(path)


def test_unknown_suffix_empty_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported file type '.parquet'"):
        _sst2(path)
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        _sst2(tmp_path / "absent.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no records"):
        _sst2(empty)


# ---------------------------------------------------------------------------------------------
# Splits


def _rows(n_pos: int, n_neg: int) -> list[dict]:
    return [{"sentence": f"s{i}", "label": int(i < n_pos)} for i in range(n_pos + n_neg)]


def test_split_is_deterministic_disjoint_and_balanced() -> None:
    rows = _rows(70, 30)
    random_state, torch_state = random.getstate(), torch.get_rng_state()

    train, evaluation = split_train_eval(rows, n_train=50, n_eval=20, seed=3)

    assert random.getstate() == random_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert len(train) == 50 and len(evaluation) == 20
    assert sum(row["label"] for row in evaluation) == 10
    assert not {id(row) for row in train} & {id(row) for row in evaluation}
    assert len({id(row) for row in train}) == 50
    assert split_train_eval(rows, 50, 20, seed=3) == (train, evaluation)
    assert split_train_eval(rows, 50, 20, seed=4) != (train, evaluation)


def test_split_odd_eval_size_and_whole_dataset() -> None:
    rows = _rows(6, 5)
    train, evaluation = split_train_eval(rows, n_train=6, n_eval=5, seed=0)
    # Sorted labels (0, 1): label 0 takes the extra row.
    assert sorted(row["label"] for row in evaluation) == [0, 0, 0, 1, 1]
    assert sorted(row["sentence"] for row in train + evaluation) == sorted(row["sentence"] for row in rows)


def test_split_errors() -> None:
    rows = _rows(3, 20)
    with pytest.raises(ValueError, match="label 1"):
        split_train_eval(rows, n_train=0, n_eval=10, seed=0)
    with pytest.raises(ValueError, match="need 20 for training"):
        split_train_eval(rows, n_train=20, n_eval=4, seed=0)
    with pytest.raises(ValueError, match="Invalid n_eval"):
        split_train_eval(rows, n_train=1, n_eval=-1, seed=0)
