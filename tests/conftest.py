"""Shared test set-up: markers and thread count."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: slow tests (real pretrained model, long runs); run with -m slow")
    config.addinivalue_line("markers", "distributed: spawns several gloo processes")
    config.addinivalue_line("markers", "slurm: starts a local SLURM cluster (root, apt); deselect with -m 'not slurm'")
    config.addinivalue_line("markers", "extended: slower launcher suites kept out of the default run to hold it under "
                                       "25 min; .ci/run runs them after it (-m extended)")


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
