"""The ranks agree on stopping from one all-reduce of what each had seen before it (issue 12): a
request that arrives during the collective (a signal handler or the launcher watch runs between
two bytecodes) is acted on at the next step by every rank, never at this one by one rank only.

Found in CI: a rank that read its flag again after the all-reduce stopped a step before the other,
which then waited in the next step's collectives forever (SIGTERM to the deepspeed launcher left
both ranks running)."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import torch

from zoscale.train.preemption import PreemptionFlag


class _TwoRanks:
    """An engine of 2 ranks whose peer has seen nothing; ``during`` runs inside the all-reduce."""

    world_size = 2

    def __init__(self, during=lambda: None) -> None:
        self.module = torch.nn.Linear(1, 1)
        self.during = during

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.during()
        return tensor  # + the peer's 0


def test_a_request_during_the_collective_waits_for_the_next_step() -> None:
    flag = PreemptionFlag()
    engine = _TwoRanks(lambda: flag.request(int(signal.SIGTERM), "the launcher is gone"))
    assert flag.agreed(engine) == 0  # what the peer, which saw 0 from both, decides too
    engine.during = lambda: None
    assert flag.agreed(engine) == int(signal.SIGTERM)  # both see it in the next all-reduce


def test_a_request_before_the_collective_stops_every_rank_now() -> None:
    flag = PreemptionFlag()
    flag.request(int(signal.SIGUSR1), "received SIGUSR1")
    assert flag.agreed(_TwoRanks()) == int(signal.SIGUSR1)
    peer = PreemptionFlag()  # the other rank: nothing seen, the all-reduce brings this rank's flag
    engine = SimpleNamespace(world_size=2, module=torch.nn.Linear(1, 1),
                             all_reduce_sum=lambda t: t + float(signal.SIGUSR1))
    assert peer.agreed(engine) == int(signal.SIGTERM)
