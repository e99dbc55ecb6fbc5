"""LOZO: low-rank zeroth-order SGD with lazy sampling (Chen et al., 2024, arXiv 2410.07698).

The direction (``U V^T`` of each matrix, on the rows a shard touches) is in
``zoscale.optim.lowrank``; LOZO-M (momentum on the low-rank factor) in ``zoscale.optim.lozo_m``.
"""

from __future__ import annotations

from zoscale.optim import options as opts
from zoscale.optim.base import ZOOptimizer
from zoscale.optim.lowrank import ROW_CHUNK, U_SUFFIX, V_SUFFIX, LowRank, LowRankDirection, lowrank_axpb_, row_range
from zoscale.optim.registry import register

__all__ = ["LOZO", "LOWRANK_OPTIONS", "LowRankDirection", "lowrank_axpb_", "row_range", "U_SUFFIX", "V_SUFFIX",
           "ROW_CHUNK"]

#: The options of the low-rank direction.
LOWRANK_OPTIONS = (
    opts.Option("rank", 2, opts.integer(1), is_global=True),
    opts.Option("nu", 50, opts.integer(1), is_global=True),
)


@register("lozo")
class LOZO(ZOOptimizer):
    r"""Low-rank ZO-SGD with lazy sampling of the right factor, on this rank's parameter shards.

    For every trainable 2-D tensor ``W`` (``m x n``; its global shape, whatever the sharding)::

        V  ~ N(0, I)  (n x r)   drawn at steps t = 0, nu, 2 nu, ...; fixed in between
        U  ~ N(0, I)  (m x r)   drawn at every step (and query)
        W <- W + eps U V^T ; l+ = L()   ;   W <- W - 2 eps U V^T ; l- = L()
        g  = (l+ - l-) / (2 eps)                       (all-reduced over data-parallel ranks)
        W <- (1 - lr wd) (W + eps U V^T) - lr g U V^T / r      (restore + update, one pass)

    Tensors that are not 2-D (biases, norms; conv kernels) take the ordinary MeZO step with a
    full ``z``, bit for bit as :class:`~zoscale.optim.mezo.MeZO` does.

    Scale (the paper's low-rank gradient estimator): the perturbation is ``eps U V^T`` and the
    gradient estimate ``g U V^T / r``. With ``E[U V^T <G, U V^T>] = r G`` the ``1/r``
    makes it unbiased (for eps -> 0), like MeZO's ``g z``. The public LOZO code omits the
    ``1/r`` in its update: its learning rate equals ours divided by ``r`` (identical at r = 1).

    The update moves along exactly the ``U V^T`` the step perturbed with, on every step. The
    public code draws ``V`` inside its perturbation function and re-seeds torch's global
    generator for the update, so on the steps where ``V`` is resampled its update regenerates a
    different ``U`` (the RNG stream was advanced by the ``V`` draw) than its perturbation used;
    here both are pure functions of their keys.

    Noise (a documented choice; part of the run's configuration like MeZO's noise kind):
        * ``U`` rows: ``noise.generate`` of flat indices ``[i r, (i + 1) r)`` for row ``i`` with key
          ``noise_key(seed, step, query, id + "/lozo.U")``: row-major ``m x r``.
        * ``V``: flat ``n x r`` with key ``noise_key(seed, step // nu, 0, id + "/lozo.V")``: all
          queries of a step and all steps of a window share it.
        * ``z`` of other tensors: ``noise_key(seed, step, query, id)``, as MeZO.
        * ``noise="rademacher"`` draws ``U``, ``V`` and ``z`` as random signs (the paper uses
          Gaussians; ``E[U V^T <G, U V^T>] = r G`` holds for both).

    Sharding: a rank holding flat ``[a, b)`` of ``W`` generates rows ``a // n .. (b - 1) // n`` of
    ``U`` and all of ``V``, builds that block of ``U V^T`` ``ROW_CHUNK`` elements at a time and
    slices it to ``[a, b)``: transient memory ``O(shard / n * r + n * r + max(ROW_CHUNK, n))``.
    Each element is ``sum_k U[i, k] V[j, k]`` summed in a fixed order, so the bits do not depend
    on the layout. Three passes per two-sided query, as MeZO; the factors are generated once per
    query and reused by the three passes. With ``master_weights`` the compute copy is written as
    ``cast(master +- eps U V^T)`` and the master updated once, as in the base class.

    Other choices the paper leaves open: ``q > 1`` (n-SPSA) draws a ``U`` per query, shares
    ``V``, and applies each query's update with ``lr / q`` as MeZO does; weight decay applies to
    every tensor of a group with ``weight_decay > 0`` (no name rules); ``rank`` larger than
    ``min(m, n)`` is allowed (the perturbation's rank is then at most ``min(m, n)``).

    Args:
        params: ``model.named_parameters()`` (recommended), parameters, or param groups.
        lr: learning rate (the update is ``lr g U V^T / r``).
        eps: perturbation scale.
        weight_decay: L2 term applied to theta, as MeZO.
        rank: ``r``, the rank of the perturbation (paper: 1 or 2).
        nu: lazy-sampling interval: ``V`` is redrawn every ``nu`` steps (paper: 50 or 100).
        q: queries per step (n-SPSA).
        one_sided: use ``g = (L(W + eps U V^T) - L(W)) / eps``.
        noise: ``"gaussian"`` (the paper) or ``"rademacher"``.
        seed: run seed; the same on every rank.
        master_weights: keep an fp32 copy of every local shard (use for bf16/fp16 models).
        shards: shard provider (default: every parameter local; engines supply their own).
    """

    OPTIONS = (*opts.SPSA_OPTIONS[:3], *LOWRANK_OPTIONS, *opts.SPSA_OPTIONS[3:])
    direction = LowRank

    def window(self, step: int) -> int:
        """The lazy-sampling window of ``step``: ``V`` is the same for all steps of a window."""
        return step // self.param_groups[0]["nu"]
