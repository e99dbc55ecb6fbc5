"""ZO-SGD-MMT from ZO-Bench (Zhang et al., 2024, arXiv 2402.11592): torch's SGD with momentum
fed the SPSA gradient ``g z``."""

from __future__ import annotations

from typing import Any

import torch

from zoscale.optim import options as opts
from zoscale.optim.base import ZOOptimizer
from zoscale.optim.directions import ShardEntry
from zoscale.optim.registry import register
from zoscale.optim.rules import momentum_sgd_
from zoscale.optim.schedules import Averaged
from zoscale.optim.updates import ChunkedRule, acc_dtype

__all__ = ["ZOSGDMMT", "Momentum"]

MOMENTUM = opts.Option("momentum", 0.9, opts.real(0.0, high=1.0, rule="must be a number in [0, 1)"))


class Momentum(ChunkedRule):
    """Heavy-ball momentum: ``state["momentum_buffer"]``, shaped like the local shard, >= fp32."""

    def begin(self, e: ShardEntry, group: dict[str, Any], lr: float) -> bool:
        first = "momentum_buffer" not in e.state
        if first:  # torch: buf = clone(grad) on the first step; filled chunk by chunk
            local = e.view.local
            e.state["momentum_buffer"] = torch.empty(local.numel(), dtype=acc_dtype(local.dtype), device=local.device)
        return first

    def chunk(self, e: ShardEntry, group: dict[str, Any], first: bool, lr: float, param: torch.Tensor,
              grad: torch.Tensor, lo: int, hi: int) -> None:
        momentum_sgd_(param, grad, e.state["momentum_buffer"][lo:hi], first, lr, group["momentum"],
                      group["weight_decay"])


@register("zo_sgd_mmt")
class ZOSGDMMT(ZOOptimizer):
    r"""ZO-SGD with momentum: torch's SGD(momentum) fed the SPSA gradient ``g z``.

    .. math::
        d = g z + \lambda\theta, \qquad m \leftarrow \beta m + d \ (m_0 = d), \qquad
        \theta \leftarrow \theta - \eta m

    exactly ``torch.optim.SGD(lr, momentum=beta, dampening=0, nesterov=False,
    weight_decay=lambda)`` with ``p.grad = g z`` (the same ops in the same order, chunk by
    chunk). ``m`` is ``self.state[p]["momentum_buffer"]``, shaped like the rank's local shard, in
    at least fp32: one extra shard of memory. Per step: ``q`` queries (2 perturbation passes
    each, ``q - 1`` restores) and one fused pass that restores theta from the last query,
    regenerates the ``q`` noises and updates ``m`` and theta.

    Choices the paper leaves open, and departures:
        * n-SPSA (``q > 1``): all queries are taken at theta_t and averaged into one gradient
          ``sum_k (g_k / q) z_k``, then one momentum step (so the run is still torch's SGD fed a
          gradient); MeZO instead applies each query as it completes.
        * The step log records each query's ``g`` and the group's lr (not ``lr / q``).
        * :meth:`replay` re-runs the rule with its state (see there).

    Args:
        params: ``model.named_parameters()`` (recommended), parameters, or param groups.
        lr: learning rate (MeZO-scale: the update is ``lr`` times a sum of past ``g z``, about
            ``1 / (1 - momentum)`` times MeZO's step for the same lr).
        eps: perturbation scale.
        weight_decay: L2 term added to the gradient (torch SGD's ``weight_decay``).
        momentum: ``beta`` in [0, 1) (ZO-Bench: 0.9).
        q, one_sided, noise, seed, master_weights, shards: as :class:`~zoscale.optim.MeZO`.
    """

    OPTIONS = (opts.LR, opts.EPS, opts.WEIGHT_DECAY, MOMENTUM, *opts.SPSA_OPTIONS[3:])
    rule = Momentum()
    schedule = Averaged()
