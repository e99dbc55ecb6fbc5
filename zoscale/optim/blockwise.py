"""Block-wise ZO: one SPSA estimate per transformer block (ZO-Bench, Zhang et al., 2024,
arXiv 2402.11592, "block-wise ZO fine-tuning")."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from zoscale.optim.base import ShardEntry, ZOOptimizer
from zoscale.optim.lezo import REST, unit_of
from zoscale.shards import ShardProvider

__all__ = ["BlockwiseZO"]


class BlockwiseZO(ZOOptimizer):
    r"""ZO-SGD that estimates and applies the gradient one parameter block at a time.

    Blocks are the transformer blocks (parameters named ``...layers.<i>...``, ``h.<i>``,
    ``blocks.<i>``; see :func:`zoscale.optim.lezo.unit_of`) in index order, then one block for
    everything else (embeddings, final norm, head). Every step visits every block, in that fixed
    order::

        for b, block in enumerate(blocks):                 (block-coordinate ZO-SGD)
            z_b = noise(seed, t, query=b, tensor id)       (only block b's tensors)
            theta_b <- theta_b + eps z_b   ; l+ = closure()
            theta_b <- theta_b - 2 eps z_b ; l- = closure()
            [l+, l-] <- all_reduce_mean([l+, l-])
            g_b = (l+ - l-) / (2 eps)
            theta_b <- (1 - lr wd)(theta_b + eps z_b) - lr g_b z_b     (restore + update)

    so a step costs ``2 x blocks`` forwards and ``blocks`` all-reduces of two floats, and each
    block's estimate ``g_b z_b`` lives in that block's dimension only (lower variance than one
    whole-model SPSA estimate, the paper's motivation). Tensors of other blocks are neither
    perturbed nor updated during block ``b``'s query: no noise, no memory pass. Each block's
    noise uses its own query index ``b``, so no two blocks (and no block on two steps) share a
    noise pattern. The step log holds one record per block with ``query = b``.

    Choices the paper leaves open:
        * The update of block ``b`` is applied right after its two forwards (Gauss-Seidel /
          block-coordinate descent), so block ``b + 1`` is evaluated at the point where blocks
          ``0..b`` have already moved. This is also ZO-Bench's default
          (``coordinate_perturbation=True``) and needs 3 noise passes per block; deferring the
          updates to the end of the step (Jacobi) would need a fourth (restore, then update).
        * Block order: transformer blocks by layer index, then the rest (embeddings/head last).
        * Blocks are enumerated from the names of every trainable parameter (not this rank's
          non-empty shards), so every rank runs the same ``2 x blocks`` forwards, which sharded
          engines need (each forward is collective); a rank holding nothing of a block only
          runs the forwards.
        * One query per block (``q`` is fixed to 1, as ZO-Bench asserts); ``one_sided=True``
          uses ``(L(theta + eps z_b) - L(theta)) / eps`` per block, still two forwards.
        * ``layers_per_block=k`` merges k consecutive transformer blocks into one ZO block
          (``"block.0-3"``, ...; the rest stays one block), to trade variance for forwards: a
          30-layer model costs 62 forwards per step with k = 1, 8 with k = 10.
        * A model with no transformer blocks has one block: exactly MeZO.
        * A non-finite loss in block ``b`` restores that block and raises
          :class:`~zoscale.optim.base.NonFiniteLossError`; blocks ``0..b-1`` keep their update
          (as later n-SPSA queries do in the base class) and the step counter does not advance.

    Args:
        params: ``model.named_parameters()`` (recommended: blocks come from names; without
            names every tensor falls into the "rest" block), parameters, or param groups.
        lr: learning rate (per-block updates, so each tensor moves once per step, as in MeZO).
        eps: perturbation scale.
        weight_decay: L2 term, applied to a block when it is updated.
        layers_per_block: consecutive transformer blocks per ZO block (>= 1). A global option
            (:attr:`GLOBAL_KEYS`): a param group may not set another value.
        one_sided: use the one-sided estimate.
        noise: ``"gaussian"`` or ``"rademacher"``.
        seed: run seed; must be the same on every rank.
        master_weights: keep an fp32 copy of every local shard (use for bf16/fp16 models).
        shards: shard provider (default: every parameter local; engines supply their own).
    """

    GLOBAL_KEYS: tuple[str, ...] = ZOOptimizer.GLOBAL_KEYS + ("layers_per_block",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        layers_per_block: int = 1,
        one_sided: bool = False,
        noise: str = "gaussian",
        seed: int = 0,
        master_weights: bool = False,
        shards: ShardProvider | None = None,
    ) -> None:
        # layers_per_block is global (GLOBAL_KEYS): in the defaults, so every group holds the optimizer's.
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, q=1, one_sided=one_sided, noise=noise,
                        seed=seed, master_weights=master_weights, layers_per_block=layers_per_block)
        if isinstance(layers_per_block, bool) or not isinstance(layers_per_block, int) or layers_per_block < 1:
            raise ValueError(f"Invalid layers_per_block: {layers_per_block!r} (must be an integer >= 1)")
        self._units: set[str] = set()
        self._replay_block: str | None = None
        super().__init__(params, defaults, shards)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see the base class); its transformer blocks join :attr:`blocks`."""
        super().add_param_group(param_group)
        # From every trainable parameter's name (not this rank's non-empty shards), so that every
        # rank enumerates the same blocks.
        names = [self._stable_id(g, i, p) for g in self.param_groups for i, p in enumerate(g["params"])
                 if p.requires_grad]
        self._units = {unit_of(n) for n in names}

    @property
    def blocks(self) -> list[str]:
        """ZO block names in visiting order: ``"block.<i>"`` (``"block.<i>-<j>"`` with
        ``layers_per_block > 1``) by layer index, then ``"rest"``."""
        return self._layout()[0]

    def _layout(self) -> tuple[list[str], dict[str, str]]:
        """(block names in order, LeZO unit ``"block.<i>"`` / ``"rest"`` -> block name)."""
        k = self.param_groups[0]["layers_per_block"]
        layers = sorted(int(u.split(".")[1]) for u in self._units if u != REST)
        names, block_of = [], {}
        for start in range(0, len(layers), k):
            members = layers[start:start + k]
            name = f"block.{members[0]}" if len(members) == 1 else f"block.{members[0]}-{members[-1]}"
            names.append(name)
            block_of.update({f"block.{i}": name for i in members})
        if REST in self._units:
            names.append(REST)
            block_of[REST] = REST
        return names, block_of

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        ZOOptimizer._validate_group(group)
        if group["q"] != 1:
            raise ValueError(f"Invalid q: {group['q']!r} (BlockwiseZO runs one query per block; q must be 1)")

    def block_entries(self, entries: list[ShardEntry], block: str) -> list[ShardEntry]:
        """The entries of ``block`` (a name from :attr:`blocks`) among ``entries``."""
        block_of = self._layout()[1]
        return [e for e in entries if block_of.get(unit_of(e.stable_id)) == block]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> float:  # type: ignore[override]
        """Take one block-wise ZO step: two forwards and one update per block.

        Args:
            closure: runs the forward pass on this rank's micro-batch and returns its mean loss.
                Called ``2 x len(self.blocks)`` times, under ``torch.no_grad()``.

        Returns:
            The mean over blocks of each block's loss pair average, averaged over ranks.

        Raises:
            ValueError: no closure.
            NonFiniteLossError: a loss was NaN/inf (see the class docstring).
        """
        if closure is None:
            raise ValueError("BlockwiseZO.step requires a closure that returns the mean loss of this rank's micro-batch")
        self._begin_step()
        entries = self._entries()
        self._ensure_masters(entries)
        step, blocks = self._zo["step"], self.blocks
        total = 0.0
        try:
            for b, block in enumerate(blocks):
                grads, losses = self._spsa_query(closure, self.block_entries(entries, block), step, b, 1.0)
                self._log(step, b, grads, 1.0, losses)
                total += 0.5 * (losses[0] + losses[1])
        finally:
            self._end_step()
        self._zo["step"] = step + 1
        return total / len(blocks) if blocks else 0.0

    # ----------------------------------------------------------------- replay
    def _select(self, entries: list[ShardEntry], step: int) -> list[ShardEntry]:
        # Used by the base class's replay only (step() selects per block itself).
        return entries if self._replay_block is None else self.block_entries(entries, self._replay_block)

    @torch.no_grad()
    def replay(self, log: list[dict[str, Any]]) -> None:
        """Apply a step log to the base weights: each record updates only its block.

        Record ``query = b`` names block ``self.blocks[b]``; the base class's replay is run one
        record at a time with that block selected, so the arithmetic is the run's (bitwise with
        master weights). Build the replaying optimizer with the same parameters and groups as
        the run, so that the block list is the same.
        """
        blocks = self.blocks
        for rec in log:
            b = rec["query"]
            if not 0 <= b < len(blocks):
                raise ValueError(f"log record for step {rec['step']} names block {b}; this optimizer has "
                                 f"{len(blocks)} blocks {blocks}")
            self._replay_block = blocks[b]
            try:
                super().replay([rec])
            finally:
                self._replay_block = None
