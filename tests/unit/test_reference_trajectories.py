"""Every optimizer reproduces, bit for bit, the trajectory recorded before the redesign (issue 11).

``tests/reference/trajectories.json`` holds, per conformance record and variant, the
losses of 4 steps, and digests of the final weights, optimizer state and step log, as written
by the optimizers of commit 8a58536 (``tests/reference/trajectories.py``). A refactor of ``zoscale/optim`` must
leave every one of them unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.reference import trajectories as record

REFERENCE = json.loads(record.REFERENCE.read_text())


def test_every_case_has_a_reference() -> None:
    assert sorted(f"{n}/{v}" for n, v in record.cases()) == sorted(REFERENCE)


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
