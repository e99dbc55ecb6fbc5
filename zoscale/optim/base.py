"""The SPSA step shared by zoscale's zeroth-order optimizers.

A ZO optimizer is a ``torch.optim.Optimizer`` whose ``step(closure)`` estimates a directional
derivative from two forward passes and moves along the same random direction:

    for each query k in 0..q-1:                       (q = 1 is MeZO; q > 1 is n-SPSA)
        theta <- theta + eps z_k          ; l+ = closure()         (pass 1)
        theta <- theta - 2 eps z_k        ; l- = closure()         (pass 2)
        [l+, l-] <- all_reduce_mean([l+, l-])                      (the only communication)
        g_k = (l+ - l-) / (2 eps)                                  (projected gradient)
        theta <- (1 - lr/q wd)(theta + eps z_k) - lr/q g_k z_k     (pass 3: restore + update)

At the first step, before any pass, the ranks also check once that they agree on the options
(one all-reduce of a hash: :meth:`ZOOptimizer.check_options_agree`).

``z_k`` is never stored: every pass regenerates it from ``(seed, step, k, tensor id)`` for the
rank's own shard (``zoscale.noise``), so each rank touches only the elements it holds. With
``master_weights=True`` an fp32 copy of each local shard is kept; passes then write the compute
copy as ``cast(master +- eps z)`` and update the master once, so the +-eps round trip leaves no
drift and no update is lost to bf16 rounding.

Departures from the papers, all documented and tested:
    * n-SPSA applies each query's update right after its two forwards (lr/q per query), so later
      queries are evaluated at the partly updated point. Holding every query at theta_t would
      need a fourth regeneration pass per query (or q buffers); for ZO step sizes the difference
      is O(lr^2).
    * Per-group ``eps``: the projected gradient of group j is ``(l+ - l-) / (2 eps_j)``, which
      keeps ``g_j z_j`` an unbiased estimate of the gradient of group j.
    * Parameters with ``requires_grad=False`` in a group are left untouched (as a first-order
      optimizer would, having no gradient for them).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from zoscale import noise
from zoscale.shards import LocalShards, ShardProvider, ShardView, canonical_name

__all__ = ["ZOOptimizer", "NonFiniteLossError", "ShardEntry", "OPTION_CHECK_SHAPE"]

Closure = Callable[[], Any]


class NonFiniteLossError(FloatingPointError):
    """The closure returned a NaN or infinite loss.

    Raised after the parameters were restored to their values before the query (bitwise with
    master weights; within the documented +-eps round-trip drift without). The step counter
    does not advance, so the step can be retried on another batch.
    """

    def __init__(self, step: int, query: int, losses: tuple[float, ...]) -> None:
        self.step, self.query, self.losses = step, query, losses
        super().__init__(
            f"non-finite loss at step {step}, query {query}: losses {losses} (averaged over the "
            "data-parallel group); parameters were restored and the step was not taken"
        )


@dataclass
class ShardEntry:
    """A trainable tensor as the step sees it: its group, view, stable id and state."""

    group_index: int
    param: torch.Tensor
    view: ShardView
    stable_id: str
    state: dict


def _written(view: ShardView) -> None:
    """Run the view's ``after_write`` hook (providers that mirror ``local`` elsewhere)."""
    if view.after_write is not None:
        view.after_write()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. tensors of other shapes: not the same option
        return False


#: Shape of the one all-reduce (int64, MAX) that checks, at the first step, that every rank of the
#: loss group has the same options: two 62-bit hashes of them and their negations. The MAX of a
#: hash equals minus the MAX of its negation (its MIN) exactly when every rank has that hash.
OPTION_CHECK_SHAPE = (4,)
_HASH_MASK = (1 << 62) - 1


def _canonical(value: Any) -> Any:
    """A rank-independent, hashable description of an option value (no addresses, no devices)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), value.detach().cpu().tolist())
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), _canonical(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_canonical(v) for v in value))
    if isinstance(value, (bool, int, float, str, type(None))):
        return (type(value).__name__, repr(value))
    if callable(value) and hasattr(value, "__qualname__"):  # a class or function: by name, not address
        return ("callable", getattr(value, "__module__", ""), value.__qualname__)
    return (type(value).__name__, repr(value))


def _ids_digest(ids: list[str]) -> str:
    """A short description of a list of stable ids (the options hold many names)."""
    digest = hashlib.blake2b("\n".join(ids).encode("utf-8"), digest_size=6).hexdigest()
    return f"{len(ids)} tensors, ids digest {digest}"


def _disagreement(label: str, values: list[Any], ranks: list[int]) -> str:
    """``'seed': rank 0 has 0, rank 1 has 1`` (ranks with equal values named together)."""
    order: list[Any] = []
    holders: dict[Any, list[int]] = {}
    shown: dict[Any, str] = {}
    for rank, (canon, text) in zip(ranks, values):
        if canon not in holders:
            order.append(canon)
            holders[canon] = []
            shown[canon] = text
        holders[canon].append(rank)
    parts = []
    for canon in order:
        rs = holders[canon]
        who = f"rank {rs[0]}" if len(rs) == 1 else "ranks " + ", ".join(map(str, rs))
        parts.append(f"{who} {'has' if len(rs) == 1 else 'have'} {shown[canon]}")
    return f"{label!r}: " + ", ".join(parts)


class ZOOptimizer(torch.optim.Optimizer):
    """Base class: param groups, shard views, the SPSA query, state and the step log.

    Subclasses set their defaults and implement :meth:`step`; the SPSA query is
    :meth:`_spsa_query`.

    Global options: the keys of :attr:`GLOBAL_KEYS` (here ``q``, ``one_sided``, ``noise``,
    ``seed``, ``master_weights``; subclasses add theirs, e.g. LeZO's ``sparsity``) hold for the
    whole optimizer. They live in every param group, so that they round-trip with
    ``state_dict()``, always with the optimizer's value: a param group (at construction or
    through :meth:`add_param_group`) that sets one to another value is refused with a
    ``ValueError`` naming the key and the group. Every other option is per group.

    Ranks: the first step (and the first after :meth:`add_param_group` or
    :meth:`load_state_dict`) checks, before any parameter moves, that every rank of the loss
    group has the same options (see :meth:`check_options_agree`), with one all-reduce of
    :data:`OPTION_CHECK_SHAPE` int64; a disagreement raises ``ValueError`` naming the options and
    the ranks. Later steps issue no extra collective.

    Args:
        params: parameters, ``named_parameters()`` (recommended: names give noise ids that do
            not change when the model is wrapped by DeepSpeed, FSDP or peft), or param groups.
        defaults: per-group defaults.
        shards: shard provider (default :class:`~zoscale.shards.LocalShards`).
    """

    GLOBAL_KEYS: tuple[str, ...] = ("q", "one_sided", "noise", "seed", "master_weights")

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], shards: ShardProvider | None = None) -> None:
        self.shards: ShardProvider = shards if shards is not None else LocalShards()
        self._zo: dict[str, Any] = {"step": 0, "log": [], "nonfinite": 0}
        #: Seconds spent in each phase of the last step: perturb, forward, communication, update.
        self.last_step_timing: dict[str, float] = {}
        self._timing: defaultdict[str, float] = defaultdict(float)
        # Positional noise ids ("#i": i-th parameter over all groups, in order) of parameters
        # passed without names; extended by every add_param_group, also after construction.
        self._positional_ids: dict[int, str] = {}
        # Whether the ranks were found to agree on the options (checked at the first step).
        self._options_agreed = False
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- validation
    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"Invalid learning rate: {lr!r} (must be a finite number >= 0)")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"Invalid eps: {eps!r} (must be a finite number > 0)")
        if not isinstance(wd, (int, float)) or isinstance(wd, bool) or not math.isfinite(wd) or wd < 0:
            raise ValueError(f"Invalid weight_decay: {wd!r} (must be a finite number >= 0)")
        q = group["q"]
        if not _is_int(q) or q < 1:
            raise ValueError(f"Invalid q: {q!r} (number of queries per step must be an integer >= 1)")
        noise.check_kind(group["noise"])
        if not _is_int(group["seed"]):
            raise ValueError(f"Invalid seed: {group['seed']!r} (must be an integer)")
        for key in ("one_sided", "master_weights"):
            if not isinstance(group[key], bool):
                raise ValueError(f"Invalid {key}: {group[key]!r} (must be True or False)")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after validating its hyperparameters and that no parameter is shared.

        Works at construction and afterwards alike: a group added later is perturbed and
        updated from the next step on, with the noise ids it would have had at construction
        (its names, or positions continuing after the existing parameters).

        Raises:
            ValueError: an invalid hyperparameter; a global option (:attr:`GLOBAL_KEYS`) set to
                another value than the optimizer's (named, with the group); a parameter that is
                already in a group.
        """
        group = dict(param_group)
        merged = {**self.defaults, **group}
        self._validate_group(merged)
        index = len(self.param_groups)
        for key in self.GLOBAL_KEYS:
            if key in group and key in self.defaults and not _equal(group[key], self.defaults[key]):
                raise ValueError(
                    f"Invalid {key}: must be the same in every param group; param group {index} sets "
                    f"{group[key]!r}, the optimizer's is {self.defaults[key]!r} ({key} is a global option "
                    f"of {type(self).__name__}: set it on the optimizer, not in a param group)"
                )
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        group["params"] = params
        existing = {id(p): (gi, pi) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])}
        for i, item in enumerate(params):
            name, p = item if isinstance(item, tuple) else (None, item)
            if id(p) in existing:
                gi, pi = existing[id(p)]
                label = f"parameter {name!r}" if name else f"parameter {i} (shape {tuple(p.shape)})"
                raise ValueError(
                    f"Invalid param groups: {label} of group {len(self.param_groups)} is already "
                    f"parameter {pi} of group {gi}; a parameter may appear in one group only"
                )
        super().add_param_group(group)
        added = self.param_groups[-1]
        for key in self.GLOBAL_KEYS:  # the optimizer's own value (an equal 0 and 0.0 become one)
            if key in self.defaults:
                added[key] = self.defaults[key]
        for p in added["params"]:
            self._positional_ids[id(p)] = f"#{len(self._positional_ids)}"
        self._options_agreed = False  # the new group's options are checked at the next step

    # ----------------------------------------------------------------- views
    def _stable_id(self, group: dict[str, Any], index: int, param: torch.Tensor) -> str:
        names = group.get("param_names")
        if names is not None:
            return canonical_name(names[index])
        return self._positional_ids[id(param)]

    def _entries(self) -> list[ShardEntry]:
        """Trainable tensors with a non-empty local shard, in a rank-independent order."""
        entries = []
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if not p.requires_grad:
                    continue
                view = self.shards.view(p)
                if view.local.numel() == 0:
                    continue
                entries.append(ShardEntry(gi, p, view, self._stable_id(group, i, p), self.state[p]))
        return entries

    def _select(self, entries: list[ShardEntry], step: int) -> list[ShardEntry]:
        """The entries a step perturbs and updates (all; LeZO-style optimizers choose a subset)."""
        return entries

    def shard_entries(self) -> list[ShardEntry]:
        """This rank's trainable shards (what it perturbs, updates and checkpoints)."""
        return self._entries()

    def _ensure_masters(self, entries: list[ShardEntry]) -> None:
        if not self.param_groups[0]["master_weights"]:
            return
        for e in entries:
            if "master" not in e.state:
                e.state["master"] = e.view.local.detach().to(torch.promote_types(e.view.local.dtype, torch.float32)).clone()

    # ----------------------------------------------------------------- passes
    def _keys(self, entries: list[ShardEntry], step: int, query: int) -> list[int]:
        seed = self.param_groups[0]["seed"]
        return [noise.noise_key(seed, step, query, e.stable_id) for e in entries]

    def _perturb(self, entries: list[ShardEntry], keys: list[int], scale: list[float], *, delta: list[float]) -> None:
        """Move every shard by ``scale[g] * z``; ``delta[g]`` is the offset from theta afterwards.

        Without master weights the shard is edited in place (``x += scale z``); with them the
        compute copy is rewritten as ``cast(master + delta z)``, exact whatever came before.
        """
        kind = self.param_groups[0]["noise"]
        masters = self.param_groups[0]["master_weights"]
        for e, key in zip(entries, keys):
            v = e.view
            if masters:
                noise.perturb_from_master_(v.local, e.state["master"], v.offset, key, delta[e.group_index], kind)
            else:
                noise.axpbz_(v.local, v.offset, key, 1.0, scale[e.group_index], kind)
            _written(v)

    def _update(self, entries: list[ShardEntry], keys: list[int], decay: list[float],
                z_coef: list[float], current_offset: list[float]) -> None:
        """Restore and update in one pass: ``theta <- decay*theta + z_coef*z``.

        ``current_offset[g]`` is how far the compute copy currently sits from theta along z
        (``-eps`` after a two-sided query, ``+eps`` after a one-sided one).
        """
        kind = self.param_groups[0]["noise"]
        masters = self.param_groups[0]["master_weights"]
        for e, key in zip(entries, keys):
            v, gi = e.view, e.group_index
            if masters:
                noise.update_master_(v.local, e.state["master"], v.offset, key, decay[gi], z_coef[gi], kind)
            else:
                # theta = x - off*z  =>  decay*theta + c*z = decay*x + (c - decay*off)*z
                noise.axpbz_(v.local, v.offset, key, decay[gi], z_coef[gi] - decay[gi] * current_offset[gi], kind)
            _written(v)

    def _restore(self, entries: list[ShardEntry], keys: list[int], current_offset: list[float]) -> None:
        """Return the compute copy to theta (bitwise with master weights)."""
        masters = self.param_groups[0]["master_weights"]
        if masters:
            for e in entries:
                e.view.local.copy_(e.state["master"])
                _written(e.view)
        else:
            self._update(entries, keys, [1.0] * len(self.param_groups), [0.0] * len(self.param_groups), current_offset)

    # ----------------------------------------------------------------- communication
    def _loss_group(self) -> Any:
        group = getattr(self.shards, "loss_group", None)
        return group if group is not None else dist.group.WORLD

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self._loss_group())

    def _shared_options(self) -> dict[str, Any]:
        """What every rank must agree on for the ranks' steps to be one run, by label.

        The optimizer class; the number of param groups; the global options
        (:attr:`GLOBAL_KEYS`: ``seed``, ``noise``, ``q``, ``one_sided``, ``master_weights`` and a
        subclass's, such as ``sparsity``, ``rank``, ``nu``, ``beta``, ``layers_per_block``); every
        per-group option (``lr``, ``eps``, ``weight_decay`` and a subclass's, such as
        ``momentum``, ``betas``, ``adam_eps``); the stable ids of each group's trainable tensors
        (they key the noise); and the step counter (a rank resumed from another step would
        draw other noise). Subclasses add theirs (the hybrid's FO part).
        """
        groups = self.param_groups
        out: dict[str, Any] = {
            "optimizer": f"{type(self).__module__}.{type(self).__qualname__}",
            "param groups": len(groups),
            "step": self._zo["step"],
        }
        for key in self.GLOBAL_KEYS:
            if key in groups[0]:
                out[key] = groups[0][key]
        for gi, group in enumerate(groups):
            suffix = "" if len(groups) == 1 else f" (param group {gi})"
            for key, value in group.items():
                if key not in ("params", "param_names") and key not in self.GLOBAL_KEYS:
                    out[key + suffix] = value
            ids = [self._stable_id(group, i, p) for i, p in enumerate(group["params"]) if p.requires_grad]
            out["trainable tensors" + suffix] = _ids_digest(ids)
        return out

    def check_options_agree(self) -> None:
        """Refuse to run when the ranks of the loss group disagree on an option (collective).

        Every rank hashes :meth:`_shared_options`; one all-reduce (MAX) of the hashes and their
        negations tells every rank alike whether all agree. Only then, on the failure path, the
        options themselves are all-gathered to name what differs. Called by ``step`` before any
        parameter moves, once (again after :meth:`add_param_group` or :meth:`load_state_dict`);
        a no-op without a process group or on one rank.

        Raises:
            ValueError: ``ranks disagree on optimizer option 'seed': rank 0 has 0, rank 1 has 1``
                (every differing option), on every rank.
        """
        if self._options_agreed:
            return
        if self._world() > 1:
            options = {label: (_canonical(v), repr(v)) for label, v in self._shared_options().items()}
            digest = hashlib.blake2b(repr(sorted((k, c) for k, (c, _) in options.items())).encode("utf-8"),
                                     digest_size=16).digest()
            h = [int.from_bytes(digest[:8], "little") & _HASH_MASK, int.from_bytes(digest[8:], "little") & _HASH_MASK]
            entries = self._entries()
            device = entries[0].view.local.device if entries else torch.device("cpu")  # as the loss all-reduce
            vals = torch.tensor([h[0], h[1], -h[0], -h[1]], dtype=torch.int64, device=device)
            group = self._loss_group()
            dist.all_reduce(vals, op=dist.ReduceOp.MAX, group=group)
            top = vals.tolist()
            if top[0] != -top[2] or top[1] != -top[3]:  # the max and the min of some hash differ
                self._raise_disagreement(options, group)
        self._options_agreed = True

    def _raise_disagreement(self, options: dict[str, tuple[Any, str]], group: Any) -> None:
        world = dist.get_world_size(group)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, options, group=group)
        ranks = dist.get_process_group_ranks(group) if group is not dist.group.WORLD else list(range(world))
        labels = list(dict.fromkeys(label for opts in gathered for label in opts))
        missing = (("unset",), "<not set>")
        differ = []
        for label in labels:
            values = [opts.get(label, missing) for opts in gathered]
            if any(v[0] != values[0][0] for v in values):
                differ.append(_disagreement(label, values, ranks))
        what = (f"option{'s' if len(differ) > 1 else ''} " + "; ".join(differ) if differ
                else "options (their hashes differ, their printed values do not)")
        raise ValueError(
            f"{type(self).__name__}: ranks disagree on optimizer {what}. "
            "Every rank must build the optimizer with the same options, or the ranks' runs diverge; "
            "nothing was changed (checked before the first step moved any parameter)"
        )

    def _mean_over_ranks(self, losses: list[Any], device: torch.device) -> list[float]:
        """Average the closure's losses over the data-parallel group: one all-reduce."""
        vals = torch.stack([torch.as_tensor(l).detach().to(device=device, dtype=torch.float64).reshape(()) for l in losses])
        world = self._world()
        if world > 1:
            dist.all_reduce(vals, op=dist.ReduceOp.SUM, group=self._loss_group())
            vals /= world
        return vals.tolist()

    def _timed(self, phase: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._timing[phase] += time.perf_counter() - t0

    def _begin_step(self) -> None:
        """Start a step: the ranks' option check (first step only), then a fresh timing."""
        self.check_options_agree()
        self._timing = defaultdict(float)

    def _end_step(self) -> None:
        self.last_step_timing = dict(self._timing)

    def _call(self, closure: Closure) -> Any:
        loss = self._timed("forward", closure)
        if loss is None:
            raise ValueError("the closure returned None; it must return this rank's mean loss")
        return loss

    # ----------------------------------------------------------------- the SPSA query
    def _spsa_estimate(self, closure: Closure, entries: list[ShardEntry], step: int,
                       query: int) -> tuple[list[int], list[float], tuple[float, float], list[float]]:
        """The estimate half of an SPSA query: perturb, two forwards, one all-reduce, g.

        Leaves the compute copy at ``theta + offset z`` (``-eps`` two-sided, ``+eps`` one-sided)
        for the caller's update pass to restore from. On a non-finite loss the parameters are
        restored and :class:`NonFiniteLossError` is raised.

        Returns:
            ``(keys, g per group, (loss_plus, loss_minus), offset per group)``; one-sided, the
            second loss is ``L(theta)``.
        """
        groups = self.param_groups
        eps = [g["eps"] for g in groups]
        one_sided = groups[0]["one_sided"]
        keys = self._keys(entries, step, query)
        device = entries[0].view.local.device if entries else torch.device("cpu")
        perturb = lambda scale, delta: self._timed("perturb", self._perturb, entries, keys, scale, delta=delta)  # noqa: E731
        if one_sided:
            l0 = self._call(closure)
            perturb(eps, eps)
            l1 = self._call(closure)
            offset = eps
            lp, lm = self._timed("communication", self._mean_over_ranks, [l1, l0], device)
            diff = [(lp - lm) / e for e in eps]
        else:
            perturb(eps, eps)
            l1 = self._call(closure)
            perturb([-2.0 * e for e in eps], [-e for e in eps])
            l2 = self._call(closure)
            offset = [-e for e in eps]
            lp, lm = self._timed("communication", self._mean_over_ranks, [l1, l2], device)
            diff = [(lp - lm) / (2.0 * e) for e in eps]
        if not (math.isfinite(lp) and math.isfinite(lm)):
            self._restore(entries, keys, offset)
            self._zo["nonfinite"] += 1
            raise NonFiniteLossError(step, query, (lp, lm))
        return keys, diff, (lp, lm), offset

    def _direction_scale(self, grads: list[float]) -> list[float]:
        """What multiplies ``-lr z`` in the ZO-SGD update, per group: ``g`` (sign-SGD: ``sign(g)``)."""
        return grads

    def _spsa_query(self, closure: Closure, entries: list[ShardEntry], step: int, query: int,
                    lr_scale: float) -> tuple[list[float], tuple[float, float]]:
        """One SPSA query with its fused restore + ZO-SGD update; returns (g per group, losses).

        ``lr_scale`` multiplies each group's lr (``1/q`` for n-SPSA).
        """
        groups = self.param_groups
        keys, diff, (lp, lm), offset = self._spsa_estimate(closure, entries, step, query)
        lrs = [g["lr"] * lr_scale for g in groups]
        decay = [1.0 - lr * g["weight_decay"] for lr, g in zip(lrs, groups)]
        coef = [-lr * gk for lr, gk in zip(lrs, self._direction_scale(diff))]
        self._timed("update", self._update, entries, keys, decay, coef, offset)
        return diff, (lp, lm)

    def _log(self, step: int, query: int, grads: list[float], lr_scale: float, losses: tuple[float, float]) -> None:
        self._zo["log"].append(
            {
                "seed": self.param_groups[0]["seed"],
                "step": step,
                "query": query,
                "grad": list(grads),
                "lr": [g["lr"] * lr_scale for g in self.param_groups],
                "loss": list(losses),
            }
        )

    # ----------------------------------------------------------------- replay
    @torch.no_grad()
    def replay(self, log: list[dict[str, Any]]) -> None:
        """Apply the updates recorded in a step log to this optimizer's (base) parameters.

        Build the optimizer on the base model with the same param groups (and weight decay) as
        the run that wrote ``log`` (``step_log`` or ``state_dict()["zo"]["log"]``), then call
        this: every logged query's ``theta <- (1 - lr wd) theta - lr g z`` is applied, with ``z``
        regenerated from the logged seed, step and query. No forward pass is run. With master
        weights this repeats the run's master updates exactly (bitwise); without, it omits the
        run's +eps/-2eps/+eps round trips, so it agrees within their drift (README, Precision).
        Works on any shard layout: each rank replays onto its own shards.
        """
        all_entries = self._entries()
        self._ensure_masters(all_entries)
        groups = self.param_groups
        for rec in log:
            entries = self._select(all_entries, rec["step"])
            if len(rec["grad"]) != len(groups) or len(rec["lr"]) != len(groups):
                raise ValueError(f"log record for step {rec['step']} has {len(rec['grad'])} groups, "
                                 f"this optimizer has {len(groups)}")
            keys = [noise.noise_key(rec["seed"], rec["step"], rec["query"], e.stable_id) for e in entries]
            decay = [1.0 - lr * g["weight_decay"] for lr, g in zip(rec["lr"], groups)]
            coef = [-lr * gk for lr, gk in zip(rec["lr"], self._direction_scale(rec["grad"]))]
            self._update(entries, keys, decay, coef, [0.0] * len(groups))

    # ----------------------------------------------------------------- state
    @property
    def step_count(self) -> int:
        """Number of completed steps (the ``t`` of the noise key)."""
        return self._zo["step"]

    @property
    def step_log(self) -> list[dict[str, Any]]:
        """One record per query: seed, step, query, projected gradient and lr per group, losses."""
        return self._zo["log"]

    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state dict plus ``"zo"`` (step counter, step log, counters).

        Tensors are cloned, so the returned dict stays unchanged while training continues.
        """
        sd = super().state_dict()
        sd["state"] = {
            k: {kk: (vv.detach().clone() if isinstance(vv, torch.Tensor) else copy.deepcopy(vv)) for kk, vv in v.items()}
            for k, v in sd["state"].items()
        }
        sd["zo"] = copy.deepcopy(self._zo)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict`; the argument is not modified.

        Per-parameter tensors keep their saved dtype (torch would cast an fp32 master shard to
        a bf16 parameter's dtype) and are copied, not aliased.
        """
        if "zo" not in state_dict:
            raise ValueError("state dict has no 'zo' entry: it was not saved by a zoscale optimizer")
        tensors: dict[int, dict[str, torch.Tensor]] = {}
        plain_state: dict[Any, Any] = {}
        for k, v in state_dict["state"].items():
            plain_state[k] = {kk: vv for kk, vv in v.items() if not isinstance(vv, torch.Tensor)}
            tensors[k] = {kk: vv for kk, vv in v.items() if isinstance(vv, torch.Tensor)}
        super().load_state_dict({**state_dict, "state": plain_state})
        params = [p for g in self.param_groups for p in g["params"]]
        for k, tmap in tensors.items():
            p = params[k]
            device = self.shards.view(p).local.device
            for name, t in tmap.items():
                self.state[p][name] = t.detach().to(device=device).clone()
        self._zo = copy.deepcopy(state_dict["zo"])
        self._options_agreed = False  # loaded options and step: checked across ranks at the next step
