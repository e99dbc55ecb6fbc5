"""MeZO: memory-efficient zeroth-order SGD (Malladi et al., 2023, arXiv 2305.17333)."""

from __future__ import annotations

from zoscale.optim.base import ZOOptimizer
from zoscale.optim.registry import register

__all__ = ["MeZO"]


@register("mezo")
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

    The parts (``zoscale.optim.base``): dense ``z``, every tensor, ZO-SGD, each query at once.

    Example:
        >>> opt = MeZO(model.named_parameters(), lr=1e-6, eps=1e-3)
        >>> def closure():
        ...     return loss_fn(model(batch))
        >>> loss = opt.step(closure)
    """
