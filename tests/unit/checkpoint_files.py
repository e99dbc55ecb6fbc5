"""Test helper: rewrite a checkpoint's manifest after a test edited its files on purpose."""

from __future__ import annotations

import json
from pathlib import Path

from zoscale.train.checkpoint import MANIFEST, _sha256


def reseal(path: Path) -> None:
    """Record every rank file's current size and sha256 in ``path``'s manifest."""
    manifest = json.loads((path / MANIFEST).read_text())
    for entry in manifest["files"]:
        file = path / entry["file"]
        entry["bytes"], entry["sha256"] = file.stat().st_size, _sha256(file)
    (path / MANIFEST).write_text(json.dumps(manifest))
