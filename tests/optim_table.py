"""One record per registered optimizer, driven through the generic conformance tests.

In the style of torch's ``optim_db``: each record gives sample hyperparameters for the tiny
Llama, the engines it runs on (elsewhere its construction must fail with an error naming the
engine), and its error inputs. ``tests/unit/test_conformance.py`` (one process) and
``tests/distributed/test_conformance.py`` (ZeRO-3 and FSDP2 on 2 ranks) run every record; a
registered optimizer without a record fails ``test_every_registered_optimizer_has_a_record``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from zoscale.models import tiny_llama
from zoscale.optim import build_optimizer

ENGINES = ("local", "zero3", "fsdp")
STEPS, BATCH, SEQ = 4, 8, 12


@dataclass(frozen=True)
class OptimRecord:
    """How the generic tests drive one optimizer.

    Attributes:
        name: registry name.
        kwargs: sample hyperparameters. The lr is large enough that 4 steps move the tiny
            Llama's weights far more than the engines' fp32 tolerance.
        engines: engines it runs on; on the others construction raises ``ValueError`` naming
            the engine.
        errors: ``(options, regex)``: building with these options raises ``ValueError`` matching
            the regex, before any parameter is touched.
    """

    name: str
    kwargs: dict[str, Any]
    engines: tuple[str, ...] = ENGINES
    errors: tuple[tuple[dict[str, Any], str], ...] = field(default_factory=tuple)
    peft_kwargs: dict[str, Any] = field(default_factory=dict)
    """Options that replace ``kwargs``' for a LoRA-wrapped model (names that must match adapters)."""


# Errors every ZO optimizer must reject (the SPSA hyperparameters of the shared base).
COMMON_ERRORS: tuple[tuple[dict[str, Any], str], ...] = (
    ({"lr": -1.0}, "learning rate"),
    ({"eps": 0.0}, "eps"),
    ({"q": 0}, "q"),
    ({"noise": "uniform"}, "noise"),
    ({"no_such_option": 1}, "no_such_option"),
)

RECORDS: tuple[OptimRecord, ...] = (
    OptimRecord("mezo", dict(lr=2e-3, eps=1e-3, weight_decay=0.01, seed=11)),
    OptimRecord("lezo", dict(lr=2e-3, eps=1e-3, sparsity=0.5, seed=11),
                errors=(({"sparsity": 1.0}, "sparsity"),)),
    OptimRecord("lozo", dict(lr=2e-3, eps=1e-3, weight_decay=0.01, seed=11, rank=2, nu=2),
                errors=(({"rank": 0}, "rank"), ({"nu": 0}, "nu"))),
    OptimRecord("lozo_m", dict(lr=2e-3, eps=1e-3, weight_decay=0.01, seed=11, rank=2, nu=2, beta=0.9),
                errors=(({"beta": 1.0}, "beta"),)),
    OptimRecord("sparse_mezo", dict(lr=2e-3, eps=1e-3, weight_decay=0.01, seed=11, sparsity=0.5),
                errors=(({"sparsity": 1.0}, "sparsity"),)),
    OptimRecord("zo_sgd_sign", dict(lr=2e-3, eps=1e-3, weight_decay=0.01, seed=11)),
    OptimRecord("zo_sgd_mmt", dict(lr=1e-3, eps=1e-3, weight_decay=0.01, seed=11, momentum=0.9),
                errors=(({"momentum": 1.0}, "momentum"),)),
    OptimRecord("zo_sgd_cons", dict(lr=2e-3, eps=1e-3, weight_decay=0.01, seed=11)),
    OptimRecord("zo_adam", dict(lr=1e-3, eps=1e-3, weight_decay=0.01, seed=11),
                errors=(({"betas": (0.9, 1.0)}, "betas"), ({"adam_eps": -1.0}, "adam_eps"))),
    OptimRecord("blockwise", dict(lr=2e-3, eps=1e-3, weight_decay=0.01, seed=11),
                errors=(({"layers_per_block": 0}, "layers_per_block"),)),
    # Forward-mode AD needs whole parameters: the engines' hooks gather shards into plain tensors.
    OptimRecord("forward_grad", dict(lr=2e-3, weight_decay=0.01, seed=11), engines=("local",),
                errors=(({"one_sided": True}, "one_sided"),)),
    # Backprop needs gradients DeepSpeed's ZeRO-3 only reduces inside its own optimizer. The FO
    # part uses SGD here: AdamW divides by sqrt(v), so where a gradient is near zero the fp32
    # difference between half-batch and whole-batch gradients moves a weight by up to ~lr
    # (measured 5.2e-5 on FSDP2 with AdamW at lr 2e-3), beyond the engines' SPSA tolerance;
    # tests/distributed/test_hybrid.py checks AdamW on FSDP2 with its own bound.
    OptimRecord("hybrid", dict(lr=2e-3, eps=1e-3, weight_decay=0.01, seed=11,
                               fo_params=["layers.1.", "model.norm"], fo_optimizer="sgd", fo_lr=2e-2),
                engines=("local", "fsdp"), peft_kwargs=dict(fo_params=["layers.1."]),
                errors=(({"fo_params": ["layers.9."]}, "layers.9."), ({"fo_optimizer": "adam"}, "fo_optimizer"))),
)


def record(name: str) -> OptimRecord:
    return next(r for r in RECORDS if r.name == name)


def model() -> torch.nn.Module:
    """The conformance model: a 2-layer tiny Llama (3 LeZO units), fixed weights."""
    return tiny_llama(seed=0)


def data() -> torch.Tensor:
    """The global batch (token ids, also the labels)."""
    return torch.randint(2, 262, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


def closure(forward: Any, ids: torch.Tensor) -> Any:
    return lambda: forward(input_ids=ids, labels=ids).loss


def build(rec: OptimRecord, named_params: Any, **extra: Any) -> Any:
    return build_optimizer(rec.name, named_params, dict(rec.kwargs), **extra)


def run_local(rec: OptimRecord, steps: int = STEPS, ids: torch.Tensor | None = None,
              **options: Any) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    """One process, the whole batch: (losses, final parameters, optimizer)."""
    m = model()
    ids = data() if ids is None else ids
    opt = build_optimizer(rec.name, m.named_parameters(), {**rec.kwargs, **options}, module=m)
    losses = [opt.step(closure(m, ids)) for _ in range(steps)]
    return losses, {n: p.detach().clone() for n, p in m.named_parameters()}, opt
