"""ZO-SGD-Sign from ZO-Bench (Zhang et al., 2024, arXiv 2402.11592): MeZO's step, sign of g."""

from __future__ import annotations

from zoscale.optim.base import ZOOptimizer
from zoscale.optim.registry import register
from zoscale.optim.rules import sign_sgd
from zoscale.optim.updates import FusedRule

__all__ = ["ZOSGDSign"]


@register("zo_sgd_sign")
class ZOSGDSign(ZOOptimizer):
    r"""ZO-SignSGD: MeZO's step with the projected gradient replaced by its sign.

    .. math::
        g = \frac{L(\theta + \epsilon z) - L(\theta - \epsilon z)}{2\epsilon}, \qquad
        \theta \leftarrow \theta - \eta\,(\mathrm{sign}(g)\, z + \lambda \theta)

    Every element moves by exactly ``lr |z|`` whatever the size of the loss difference, so the
    step no longer scales with noisy or outlying ``g`` (ZO-Bench, "ZO-SGD-Sign"). Same passes,
    memory and traffic as :class:`~zoscale.optim.MeZO` (3 regeneration passes per query,
    fused restore + update, no state). ``sign(0) = 0``: a query with no loss difference does
    not move the weights (weight decay still applies).

    Choices the paper leaves open, and departures:
        * The sign is of the scalar ``g`` (ZO-Bench's code, "signOpt_orig"), not the
          element-wise ``sign(g z)`` (its commented-out alternative, which for Rademacher ``z``
          would be the same and for Gaussian ``z`` would discard ``|z|``).
        * n-SPSA (``q > 1``) as MeZO: each query applies ``lr/q sign(g_k) z_k`` right after its
          forwards.
        * The step log records the projected gradient ``g`` itself (as MeZO's); :meth:`replay`
          re-runs the steps from it, so replaying reproduces the run bit for bit.
        * Weight decay is MeZO's L2 term ``lr wd theta`` (ZO-Bench applies it through its
          optimizer the same way).

    Args:
        As :class:`~zoscale.optim.MeZO`. ``lr`` is now the per-element step along ``z``
        (MeZO's ``lr |g|``): start from MeZO's lr times a typical ``|g|`` (the trainer logs
        ``g``).
    """

    rule = FusedRule(sign_sgd)
