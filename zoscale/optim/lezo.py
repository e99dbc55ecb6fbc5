"""LeZO: layer-wise sparse zeroth-order optimisation (Wang et al., 2024, arXiv 2410.09823)."""

from __future__ import annotations

from zoscale.optim import options as opts
from zoscale.optim.base import ZOOptimizer
from zoscale.optim.registry import register
from zoscale.optim.selection import REST, RandomUnits, unit_of

__all__ = ["LeZO", "unit_of", "REST"]

SPARSITY = opts.Option("sparsity", 0.75, opts.real(0.0, high=1.0, to_float=True), is_global=True)


@register("lezo")
class LeZO(ZOOptimizer):
    r"""MeZO that perturbs and updates only a random subset of layers each step.

    Units are the transformer blocks (parameters named ``...layers.<i>...``, ``h.<i>``,
    ``blocks.<i>``) plus one unit for everything else (embeddings, final norm, head). Each step
    draws ``max(1, round((1 - sparsity) * units))`` units without replacement from a generator
    seeded by ``(seed, step)`` -- identical on every rank, independent of sharding, never
    torch's global RNG. Only the drawn units are perturbed (both SPSA forwards see the others
    unperturbed) and updated; the others are skipped entirely: no noise, no memory pass, no
    weight decay. Over T steps each unit is drawn ``T * k / units`` times on average.

    Choices the paper leaves open: the draw is per step (all ``q`` queries of a step share it);
    units come from parameter names (so they survive wrapping and sharding); weight decay
    applies only to drawn units; ``eps`` is not rescaled for the smaller perturbation.
    ``sparsity=0`` is exactly MeZO.

    Args:
        sparsity: fraction of units skipped per step (the paper's rho; ~0.75 recommended). A
            global option (:attr:`GLOBAL_KEYS`): a param group may not set another value.
        Other arguments as :class:`~zoscale.optim.MeZO`.
    """

    OPTIONS = opts.SPSA_OPTIONS + (SPARSITY,)
    selection = RandomUnits

    @property
    def units(self) -> list[str]:
        """LeZO units in draw order (transformer blocks by index, then ``"rest"``)."""
        return self.policy.units

    @property
    def active_count(self) -> int:
        """Units drawn per step: ``max(1, round((1 - sparsity) * units))``."""
        return self.policy.active_count(self.param_groups[0]["sparsity"])

    def active_units(self, step: int) -> list[str]:
        """The units drawn for ``step`` (sorted as in :attr:`units`)."""
        return self.policy.active_units(step, self.param_groups[0])
