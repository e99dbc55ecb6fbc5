"""Every optimizer reproduces, bit for bit, the trajectory recorded before the redesign (issue 11).

``tests/reference/trajectories.<capability>.json`` holds, per conformance record and variant, the
losses of 4 steps, and digests of the final weights, optimizer state and step log, as written
by the optimizers of commit 8a58536 (``tests/reference/trajectories.py``) on a CPU of that
capability (AVX2, AVX512: the bits of a matmul depend on it). A refactor of ``zoscale/optim``
must leave every one of them unchanged. On a CPU with no recorded file the comparison is
skipped, naming the capability (record one with the script at commit 8a58536).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.reference import trajectories as record

REFERENCE = json.loads(record.REFERENCE.read_text()) if record.REFERENCE.is_file() else None
needs_reference = pytest.mark.skipif(REFERENCE is None, reason=f"no reference trajectories for CPU capability "
                                     f"{record.CAPABILITY}: {record.REFERENCE.name} is not recorded")


def test_the_references_of_every_capability_hold_the_same_cases() -> None:
    files = sorted(record.HERE.glob("trajectories.*.json"))
    assert len(files) >= 2
    keys = [sorted(json.loads(f.read_text())) for f in files]
    assert all(k == keys[0] for k in keys)


@needs_reference
def test_every_case_has_a_reference() -> None:
    assert sorted(f"{n}/{v}" for n, v in record.cases()) == sorted(REFERENCE)


@needs_reference
@pytest.mark.parametrize("name,variant", record.cases(), ids=[f"{n}-{v}" for n, v in record.cases()])
def test_trajectory_equals_the_reference(name: str, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = record.trajectory(name, variant)
    finally:
        torch.set_num_threads(threads)
    want = REFERENCE[f"{name}/{variant}"]
    assert got["losses"] == want["losses"]
    assert got["weights"] == want["weights"], "final weights differ from the reference"
    assert got["state"] == want["state"], "optimizer state differs from the reference"
    assert got["log"] == want["log"], "step log differs from the reference"
