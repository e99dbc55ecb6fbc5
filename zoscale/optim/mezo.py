"""MeZO: memory-efficient zeroth-order SGD (Malladi et al., 2023, arXiv 2305.17333)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from zoscale.optim.base import ZOOptimizer
from zoscale.shards import ShardProvider

__all__ = ["MeZO"]


class MeZO(ZOOptimizer):
    r"""ZO-SGD with the SPSA gradient estimate, on this rank's parameter shards.

    .. math::
        g = \frac{L(\theta + \epsilon z) - L(\theta - \epsilon z)}{2\epsilon}, \qquad
        \theta \leftarrow \theta - \eta\,(g z + \lambda \theta)

    with ``z`` regenerated from ``(seed, step, query, tensor id)`` (never stored) and the loss
    pair averaged over the data-parallel group. ``q > 1`` averages ``q`` such estimates
    (n-SPSA), each applied with ``lr / q`` right after its forwards. ``one_sided=True`` uses
    ``g = (L(\theta + \epsilon z) - L(\theta)) / \epsilon`` (two forwards, two noise passes).
    Three regeneration passes per two-sided query: ``+eps``, ``-2eps``, and the fused
    restore + update ``theta <- (1 - lr wd)(theta + eps z) - lr g z``.

    Where the public MeZO code differs: it regenerates ``z`` four times (restore and update
    are separate passes), seeds torch's global generator (so every shard would draw the same
    ``z``), and allocates a new tensor per parameter per pass. See ``zoscale.optim.base`` for
    the choices the paper left open (n-SPSA order, per-group eps).

    Args:
        params: ``model.named_parameters()`` (recommended), parameters, or param groups.
        lr: learning rate (MeZO: 1e-6 / 1e-7 full-parameter on OPT-13B).
        eps: perturbation scale (MeZO: 1e-3).
        weight_decay: decoupled-from-nothing L2 term ``lambda`` above, applied to theta.
        q: queries per step (n-SPSA); >= 1.
        one_sided: use the one-sided estimate.
        noise: ``"gaussian"`` (MeZO) or ``"rademacher"`` (SPSA's classic choice; cheaper).
        seed: run seed; must be the same on every rank.
        master_weights: keep an fp32 copy of every local shard (use for bf16/fp16 models).
        shards: shard provider (default: every parameter local; engines supply their own).

    Example:
        >>> opt = MeZO(model.named_parameters(), lr=1e-6, eps=1e-3)
        >>> def closure():
        ...     return loss_fn(model(batch))
        >>> loss = opt.step(closure)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        q: int = 1,
        one_sided: bool = False,
        noise: str = "gaussian",
        seed: int = 0,
        master_weights: bool = False,
        shards: ShardProvider | None = None,
    ) -> None:
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, q=q, one_sided=one_sided, noise=noise,
                        seed=seed, master_weights=master_weights)
        super().__init__(params, defaults, shards)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> float:  # type: ignore[override]
        """Take one ZO step.

        Args:
            closure: runs the forward pass on this rank's micro-batch and returns its mean loss
                (a tensor or float). Called ``2 q`` times, under ``torch.no_grad()``.

        Returns:
            The loss at the unperturbed point, estimated as the mean of each query's pair and
            averaged over ranks.

        Raises:
            ValueError: no closure.
            NonFiniteLossError: a loss was NaN/inf; parameters are restored, no step is taken.
        """
        if closure is None:
            raise ValueError("MeZO.step requires a closure that returns the mean loss of this rank's micro-batch")
        self._begin_step()
        entries = self._select(self._entries(), self._zo["step"])
        self._ensure_masters(entries)
        step, q = self._zo["step"], self.param_groups[0]["q"]
        total = 0.0
        try:
            for k in range(q):
                grads, losses = self._spsa_query(closure, entries, step, k, 1.0 / q)
                self._log(step, k, grads, 1.0 / q, losses)
                total += 0.5 * (losses[0] + losses[1])
        finally:
            self._end_step()
        self._zo["step"] = step + 1
        return total / q
