"""Directions: what a query moves one tensor's shard along, and the passes that move it.

A *direction* belongs to one trainable tensor (a :class:`ShardEntry`: its param group, shard view,
stable id and state) for one query of one step. It is never stored as a tensor: every pass
regenerates it from its key for the rank's own elements. Every direction has the same three
passes, each one read-modify-write of the shard:

    perturb_(scale, delta)        x <- x + scale d            (with master weights: x <- cast(master + delta d))
    update_(decay, coef, offset)  theta <- decay theta + coef d, from x = theta + offset d  (restore + update)
    restore_(offset)              theta <- x - offset d       (bitwise with master weights)

``offset`` is how far the compute copy sits from theta along ``d`` when the pass starts (``-eps``
after a two-sided query, ``+eps`` after a one-sided one, ``0`` at theta). With master weights the
fp32 master holds theta exactly, passes write the compute copy from it and only ``update_`` moves it.

Kinds here: :class:`Dense` (MeZO's ``z``) and :class:`Masked` (Sparse MeZO's ``m * z``, the mask
``|theta| <= h`` of the point where the query starts). The low-rank ``U V^T`` of LOZO is in
``zoscale.optim.lowrank``. A kind builds the directions of a query with ``for_query``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from zoscale import noise
from zoscale.shards import ShardView

if TYPE_CHECKING:
    from zoscale.optim.base import ZOOptimizer

__all__ = ["ShardEntry", "Passes", "Dense", "Masked", "written"]


@dataclass
class ShardEntry:
    """A trainable tensor as the step sees it: its group, view, stable id and state."""

    group_index: int
    param: torch.Tensor
    view: ShardView
    stable_id: str
    state: dict


def written(view: ShardView) -> None:
    """Run the view's ``after_write`` hook (providers that mirror ``local`` elsewhere)."""
    if view.after_write is not None:
        view.after_write()


class Passes:
    """The passes of one tensor's direction for one query (see the module docstring), and what
    every direction kind shares: the restore, and no fusion by default."""

    entry: ShardEntry
    masters: bool

    def perturb_(self, scale: float, delta: float) -> None:
        raise NotImplementedError

    def update_(self, decay: float, coef: float, offset: float) -> None:
        raise NotImplementedError

    def restore_(self, offset: float) -> None:
        if self.masters:
            self.entry.view.local.copy_(self.entry.state["master"])
            written(self.entry.view)
        else:
            self.update_(1.0, 0.0, offset)

    def fuses_with(self, previous: Any) -> bool:
        """Whether a two-stream pass can apply ``previous``'s update with this perturbation."""
        return False


class Dense(Passes):
    """MeZO's direction ``z``: the noise of ``(seed, step, query, stable id)`` at each global index."""

    def __init__(self, entry: ShardEntry, key: int, kind: str, masters: bool) -> None:
        self.entry, self.key, self.kind, self.masters = entry, key, kind, masters

    @classmethod
    def for_query(cls, opt: "ZOOptimizer", entries: Sequence[ShardEntry], step: int, query: int,
                  seed: int | None = None) -> list["Dense"]:
        g = opt.param_groups[0]
        seed = g["seed"] if seed is None else seed
        return [cls(e, noise.noise_key(seed, step, query, e.stable_id), g["noise"], g["master_weights"])
                for e in entries]

    def perturb_(self, scale: float, delta: float) -> None:
        v = self.entry.view
        if self.masters:
            noise.perturb_from_master_(v.local, self.entry.state["master"], v.offset, self.key, delta, self.kind)
        else:
            noise.axpbz_(v.local, v.offset, self.key, 1.0, scale, self.kind)
        written(v)

    def update_(self, decay: float, coef: float, offset: float) -> None:
        v = self.entry.view
        if self.masters:
            noise.update_master_(v.local, self.entry.state["master"], v.offset, self.key, decay, coef, self.kind)
        else:
            # theta = x - off*z  =>  decay*theta + c*z = decay*x + (c - decay*off)*z
            noise.axpbz_(v.local, v.offset, self.key, decay, coef - decay * offset, self.kind)
        written(v)

    def fuses_with(self, previous: Any) -> bool:
        """Whether :meth:`update_perturb_` can apply ``previous``'s update (same tensor, both plain z)."""
        return type(self) is Dense and type(previous) is Dense and previous.entry.param is self.entry.param

    def update_perturb_(self, previous: "Dense", decay: float, coef: float, offset: float, scale: float,
                        delta: float) -> None:
        """``previous.update_(decay, coef, offset)`` then ``self.perturb_(scale, delta)``, in one pass."""
        v = self.entry.view
        if self.masters:
            noise.update_master_perturb_(v.local, self.entry.state["master"], v.offset, previous.key, self.key,
                                         decay, coef, delta, self.kind)
        else:
            noise.axpbz2_(v.local, v.offset, previous.key, self.key, decay, coef - decay * offset, scale, self.kind)
        written(v)

    def values(self, lo: int, hi: int) -> torch.Tensor:
        """The fp32 ``z`` of local elements ``[lo, hi)`` (allocates ``hi - lo``)."""
        v = self.entry.view
        return noise.generate(v.offset + lo, hi - lo, self.key, self.kind, device=v.local.device)


def packed_buffers(entries: Sequence[ShardEntry]) -> list[torch.Tensor]:
    """One packed mask per entry: slices of one int32 buffer per device (1 bit per element).

    One allocation (instead of one per tensor, interleaved with the forward's activations)
    leaves no holes in the host heap when it is freed.
    """
    sizes: dict[torch.device, int] = {}
    for e in entries:
        dev = e.view.local.device
        sizes[dev] = sizes.get(dev, 0) + noise.mask_words(e.view.offset, e.view.local.numel())
    buffers = {dev: torch.empty(n, dtype=torch.int32, device=dev) for dev, n in sizes.items()}
    used = dict.fromkeys(sizes, 0)
    out = []
    for e in entries:
        dev, n = e.view.local.device, noise.mask_words(e.view.offset, e.view.local.numel())
        out.append(buffers[dev][used[dev]:used[dev] + n])
        used[dev] += n
    return out


class Masked(Dense):
    """Sparse MeZO's direction ``m * z`` with ``m = |theta| <= h`` (``h``: ``state["threshold"]``).

    Elements outside the mask are never written (bitwise unchanged). The mask is that of the
    point where the query starts, in every pass:

    * with master weights it is recomputed in each pass from the fp32 master (which only
      ``update_`` moves);
    * without, the first pass (``perturb_`` from theta) packs it into ``words`` (1 bit per
      element, see ``zoscale.noise``) and later passes read it; ``words`` is dropped by
      ``update_``. An ``update_`` with no packed mask (a replay, from theta) packs from theta.
    """

    def __init__(self, entry: ShardEntry, key: int, kind: str, masters: bool, words: torch.Tensor | None) -> None:
        super().__init__(entry, key, kind, masters)
        self.threshold: float = entry.state["threshold"]
        self.words = words
        self.packed = False

    @classmethod
    def for_query(cls, opt: "ZOOptimizer", entries: Sequence[ShardEntry], step: int, query: int,
                  seed: int | None = None) -> list["Masked"]:  # type: ignore[override]
        g = opt.param_groups[0]
        seed = g["seed"] if seed is None else seed
        words: list[Any] = [None] * len(entries) if g["master_weights"] else packed_buffers(entries)
        return [cls(e, noise.noise_key(seed, step, query, e.stable_id), g["noise"], g["master_weights"], w)
                for e, w in zip(entries, words)]

    def perturb_(self, scale: float, delta: float) -> None:
        v, h = self.entry.view, self.threshold
        if self.masters:
            noise.masked_perturb_from_master_(v.local, self.entry.state["master"], v.offset, self.key, delta, h,
                                              self.kind)
        elif not self.packed:
            if scale != delta:
                raise RuntimeError(f"SparseMeZO: the first pass of a query must start from theta (scale == delta), "
                                   f"got scale {scale} and delta {delta} for {self.entry.stable_id!r}")
            noise.masked_axpbz_pack_(v.local, self._words(), v.offset, self.key, 1.0, scale, h, self.kind)
            self.packed = True
        else:
            noise.masked_axpbz_(v.local, self._words(), v.offset, self.key, 1.0, scale, self.kind)
        written(v)

    def update_(self, decay: float, coef: float, offset: float) -> None:
        v, h = self.entry.view, self.threshold
        if self.masters:
            noise.masked_update_master_(v.local, self.entry.state["master"], v.offset, self.key, decay, coef, h,
                                        self.kind)
        elif self.packed:
            # theta = x - off*z on the mask  =>  decay*theta + c*z = decay*x + (c - decay*off)*z
            noise.masked_axpbz_(v.local, self._words(), v.offset, self.key, decay, coef - decay * offset, self.kind)
        else:  # no pass of this query ran: the shard holds theta, the mask is |x| <= h
            if offset != 0.0:
                raise RuntimeError(f"SparseMeZO: an update of {self.entry.stable_id!r} without a packed mask must "
                                   f"start from theta (offset 0), got offset {offset}")
            noise.masked_axpbz_pack_(v.local, self._words(), v.offset, self.key, decay, coef, h, self.kind)
        self.words, self.packed = None, False
        written(v)

    def _words(self) -> torch.Tensor:
        if self.words is None:
            self.words = torch.empty(noise.mask_words(self.entry.view.offset, self.entry.view.local.numel()),
                                     dtype=torch.int32, device=self.entry.view.local.device)
        return self.words
