"""LeZO: layer-wise sparse zeroth-order optimisation (Wang et al., 2024, arXiv 2410.09823)."""

from __future__ import annotations

import hashlib
import random
import re
import struct
from typing import Any, Iterable

from zoscale.optim.base import ShardEntry, ZOOptimizer
from zoscale.optim.mezo import MeZO
from zoscale.shards import ShardProvider, canonical_name

__all__ = ["LeZO", "unit_of"]

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
REST = "rest"


def unit_of(name: str) -> str:
    """The LeZO unit of a parameter: ``"block.<i>"`` for transformer block i, else ``"rest"``."""
    m = _BLOCK.search(canonical_name(name))
    return f"block.{int(m.group(1))}" if m else REST


class LeZO(MeZO):
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

    GLOBAL_KEYS: tuple[str, ...] = MeZO.GLOBAL_KEYS + ("sparsity",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        sparsity: float = 0.75,
        q: int = 1,
        one_sided: bool = False,
        noise: str = "gaussian",
        seed: int = 0,
        master_weights: bool = False,
        shards: ShardProvider | None = None,
    ) -> None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"Invalid sparsity: {sparsity!r} (must be in [0, 1))")
        #: LeZO units in draw order (transformer blocks by index, then ``"rest"``).
        self.units: list[str] = []
        # sparsity is global (GLOBAL_KEYS): in the defaults, so every group holds the optimizer's.
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, q=q, one_sided=one_sided, noise=noise,
                        seed=seed, master_weights=master_weights, sparsity=float(sparsity))
        ZOOptimizer.__init__(self, params, defaults, shards)  # MeZO.__init__ only builds MeZO's defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see the base class); its blocks join :attr:`units` (from the next step)."""
        super().add_param_group(param_group)
        # Units from every trainable parameter's name (not this rank's non-empty shards), so
        # every rank enumerates the same list.
        names = [self._stable_id(g, i, p) for g in self.param_groups for i, p in enumerate(g["params"])
                 if p.requires_grad]
        blocks = sorted({u for u in map(unit_of, names) if u != REST}, key=lambda u: int(u.split(".")[1]))
        self.units = blocks + ([REST] if any(unit_of(n) == REST for n in names) else [])

    @property
    def active_count(self) -> int:
        """Units drawn per step: ``max(1, round((1 - sparsity) * units))``."""
        return max(1, round((1.0 - self.param_groups[0]["sparsity"]) * len(self.units)))

    def active_units(self, step: int) -> list[str]:
        """The units drawn for ``step`` (sorted as in :attr:`units`)."""
        digest = hashlib.blake2b(struct.pack("<qq", self.param_groups[0]["seed"], step) + b"lezo", digest_size=8)
        rng = random.Random(int.from_bytes(digest.digest(), "little"))
        chosen = set(rng.sample(range(len(self.units)), self.active_count))
        return [u for i, u in enumerate(self.units) if i in chosen]

    def _select(self, entries: list[ShardEntry], step: int) -> list[ShardEntry]:
        active = set(self.active_units(step))
        return [e for e in entries if unit_of(e.stable_id) in active]
