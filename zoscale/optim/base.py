"""The one ZO step driver that every zoscale optimizer runs.

A ZO optimizer is a ``torch.optim.Optimizer`` whose ``step(closure)`` estimates directional
derivatives from forward passes and moves along the same random directions. An optimizer is
assembled from four parts, each a class attribute:

    direction   what a query moves each tensor along     Dense z, Masked m*z, LowRank U V^T
                (``zoscale.optim.directions``, ``lowrank``)
    selection   which tensors each query moves            AllTensors, RandomUnits, Blocks
                (``zoscale.optim.selection``)
    rule        the update math                            SGD, sign, momentum, Adam
                (``zoscale.optim.rules``, applied by ``zoscale.optim.updates``)
    schedule    estimates and updates in which order       EachQuery, Averaged
                (``zoscale.optim.schedules``)

and a table of its options (``OPTIONS``, ``zoscale.optim.options``). The step, for MeZO::

    for each query k in 0..q-1:                       (q = 1 is MeZO; q > 1 is n-SPSA)
        theta <- theta + eps z_k          ; l+ = closure()         (pass 1)
        theta <- theta - 2 eps z_k        ; l- = closure()         (pass 2)
        [l+, l-] <- all_reduce_mean([l+, l-])                      (the only communication)
        g_k = (l+ - l-) / (2 eps)                                  (projected gradient)
        theta <- (1 - lr/q wd)(theta + eps z_k) - lr/q g_k z_k     (pass 3: restore + update)

At the first step, before any pass, the ranks also check once that they agree on the options
(one all-reduce of a hash: ``zoscale.optim.agreement``).

``z_k`` is never stored: every pass regenerates it from ``(seed, step, k, tensor id)`` for the
rank's own shard (``zoscale.noise``), so each rank touches only the elements it holds. With
``master_weights=True`` an fp32 copy of each local shard is kept; passes then write the compute
copy as ``cast(master +- eps z)`` and update the master once, so the +-eps round trip leaves no
drift and no update is lost to bf16 rounding.

Departures from the papers, all documented and tested:
    * n-SPSA (``EachQuery``) applies each query's update right after its two forwards (lr/q per
      query), so later queries are evaluated at the partly updated point. Holding every query at
      theta_t needs a restore pass per query (``Averaged``, which the stateful rules use); for ZO
      step sizes the difference is O(lr^2).
    * Per-group ``eps``: the projected gradient of group j is ``(l+ - l-) / (2 eps_j)``, which
      keeps ``g_j z_j`` an unbiased estimate of the gradient of group j.
    * Parameters with ``requires_grad=False`` in a group are left untouched (as a first-order
      optimizer would, having no gradient for them).
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from zoscale.optim import options as opts
from zoscale.optim.agreement import OPTION_CHECK_SHAPE, check_agreement, ids_digest
from zoscale.optim.directions import Dense, ShardEntry
from zoscale.optim.pending import PendingUpdates
from zoscale.optim.replay import LoggedStep, replay_step
from zoscale.optim.rules import sgd
from zoscale.optim.schedules import EachQuery
from zoscale.optim.selection import AllTensors
from zoscale.optim.step_log import group_steps
from zoscale.optim.updates import CHUNK, FusedRule
from zoscale.shards import LocalShards, ShardProvider, canonical_name

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


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. tensors of other shapes: not the same option
        return False


class ZOOptimizer(torch.optim.Optimizer):
    """The driver: param groups, shard views, the step, its log, replay and state.

    Subclasses declare their parts (see the module docstring) and ``OPTIONS``; most need no
    method of their own. Construct with ``Optimizer(params, lr=..., eps=..., ...)``: every
    keyword is an option of ``OPTIONS`` (an unknown one raises ``ValueError`` listing the
    accepted ones) except ``shards``.

    Global options (``is_global`` in ``OPTIONS``: ``q``, ``one_sided``, ``noise``, ``seed``,
    ``master_weights`` and a subclass's, e.g. LeZO's ``sparsity``) hold for the whole optimizer.
    They live in every param group, so that they round-trip with ``state_dict()``, always with
    the optimizer's value: a param group (at construction or through :meth:`add_param_group`)
    that sets one to another value is refused with a ``ValueError`` naming the key and the
    group. Every other option is per group.

    Ranks: the first step (and the first after :meth:`add_param_group` or
    :meth:`load_state_dict`) checks, before any parameter moves, that every rank of the loss
    group has the same options (:meth:`check_options_agree`), with one all-reduce of
    :data:`OPTION_CHECK_SHAPE` int64; a disagreement raises ``ValueError`` naming the options and
    the ranks. Later steps issue no extra collective.

    Args:
        params: parameters, ``named_parameters()`` (recommended: names give noise ids that do
            not change when the model is wrapped by DeepSpeed, FSDP or peft), or param groups.
        shards: shard provider (default :class:`~zoscale.shards.LocalShards`).
        **options: the optimizer's options (``OPTIONS``).
    """

    #: The registry name (set by ``zoscale.optim.registry.register``).
    name: str = ""
    OPTIONS: tuple[opts.Option, ...] = opts.SPSA_OPTIONS
    direction: Any = Dense
    selection: Callable[[], Any] = AllTensors
    rule: Any = FusedRule(sgd)
    schedule: Any = EachQuery()
    #: Elements per chunk of the eager passes (stateful rules, ZO-SGD-Cons's candidates).
    chunk_size: int = CHUNK
    #: The names of the global options (from ``OPTIONS``).
    GLOBAL_KEYS: tuple[str, ...] = tuple(o.name for o in opts.SPSA_OPTIONS if o.is_global)

    def __init__(self, params: Iterable[Any], *, shards: ShardProvider | None = None, **options: Any) -> None:
        unknown = opts.unknown_options(self.OPTIONS, options)
        if unknown:
            raise ValueError(f"Unknown parameter(s) {unknown} for optimizer {self.name or type(self).__name__!r}; "
                             f"accepted: {sorted(o.name for o in self.OPTIONS)}")
        defaults = opts.validate(self.OPTIONS, {o.name: options.get(o.name, o.default) for o in self.OPTIONS})
        self.shards: ShardProvider = shards if shards is not None else LocalShards()
        self._zo: dict[str, Any] = {"step": 0, "log": [], "nonfinite": 0}
        #: Seconds spent in each phase of the last step: perturb, forward, communication, update.
        self.last_step_timing: dict[str, float] = {}
        #: What the last step did, for a trainer to log: loss, lr (group 0), projected_grad
        #: (group 0, mean over the step's queries), queries, timing.
        self.last_step: dict[str, Any] = {}
        self._timing: defaultdict[str, float] = defaultdict(float)
        # Positional noise ids ("#i": i-th parameter over all groups, in order) of parameters
        # passed without names; extended by every add_param_group, also after construction.
        self._positional_ids: dict[int, str] = {}
        self._options_agreed = False
        self._logged: LoggedStep | None = None  # the losses and lrs of a step being replayed
        self.policy = self.selection()
        #: Updates held by the two-pass step (``two_pass=True``): ``zoscale.optim.pending``.
        self.pending = PendingUpdates()
        if defaults.get("two_pass") and not self.supports_two_pass():
            raise ValueError(f"Invalid two_pass: True ({type(self).__name__} updates once from all of a step's "
                             "queries; the two-pass step defers the update of one query into the next one's "
                             "perturbation, which only the optimizers that update after each query have)")
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- the shard provider
    @property
    def shards(self) -> ShardProvider:
        """The shard provider; an engine may set its own after construction (checked when set)."""
        return self._shards

    @shards.setter
    def shards(self, provider: ShardProvider) -> None:
        self._check_provider(provider)
        self._shards = provider

    def _check_provider(self, provider: ShardProvider) -> None:
        """Refuse a provider whose capabilities (``ShardCapabilities``) this optimizer cannot run on."""

    # ----------------------------------------------------------------- options
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.GLOBAL_KEYS = tuple(o.name for o in cls.OPTIONS if o.is_global)

    @classmethod
    def supports_two_pass(cls) -> bool:
        """Whether ``two_pass=True`` applies: an SGD-family rule applied after each query."""
        return isinstance(cls.schedule, EachQuery) and isinstance(cls.rule, FusedRule) and \
            any(o.name == "two_pass" for o in cls.OPTIONS)

    @classmethod
    def accepted_options(cls) -> list[str]:
        """The option names a config may give (``build_optimizer`` refuses others)."""
        return sorted(o.name for o in cls.OPTIONS)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Validate options without a model (a config check before loading it)."""
        unknown = opts.unknown_options(cls.OPTIONS, options)
        if unknown:
            raise ValueError(f"Unknown parameter(s) {unknown} for optimizer {cls.name or cls.__name__!r}; "
                             f"accepted: {cls.accepted_options()}")
        opts.validate(cls.OPTIONS, options)

    def _validate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        return opts.validate(self.OPTIONS, group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after validating its options and that no parameter is shared.

        Works at construction and afterwards alike: a group added later is perturbed and
        updated from the next step on, with the noise ids it would have had at construction
        (its names, or positions continuing after the existing parameters).

        Raises:
            ValueError: an invalid option; a global option set to another value than the
                optimizer's (named, with the group); a parameter that is already in a group.
        """
        group = dict(param_group)
        self._validate_group({**self.defaults, **group})
        index = len(self.param_groups)
        for key in self.GLOBAL_KEYS:
            if key in group and key in self.defaults and not _equal(group[key], self.defaults[key]):
                raise ValueError(
                    f"Invalid {key}: must be the same in every param group; param group {index} sets "
                    f"{group[key]!r}, the optimizer's is {self.defaults[key]!r} ({key} is a global option "
                    f"of {type(self).__name__}: set it on the optimizer, not in a param group)"
                )
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        self._refuse_shared(group["params"])
        super().add_param_group(group)
        added = self.param_groups[-1]
        added.update(self._validate_group({k: v for k, v in added.items() if k not in self.GLOBAL_KEYS}))
        for key in self.GLOBAL_KEYS:  # the optimizer's own value (an equal 0 and 0.0 become one)
            added[key] = self.defaults[key]
        for p in added["params"]:
            self._positional_ids[id(p)] = f"#{len(self._positional_ids)}"
        self.policy.refresh(self._trainable_ids())
        self._options_agreed = False  # the new group's options are checked at the next step

    def _refuse_shared(self, params: list[Any]) -> None:
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

    # ----------------------------------------------------------------- entries
    def _stable_id(self, group: dict[str, Any], index: int, param: torch.Tensor) -> str:
        names = group.get("param_names")
        if names is not None:
            return canonical_name(names[index])
        return self._positional_ids[id(param)]

    def _trainable_ids(self) -> list[str]:
        return [self._stable_id(g, i, p) for g in self.param_groups for i, p in enumerate(g["params"])
                if p.requires_grad]

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

    def shard_entries(self) -> list[ShardEntry]:
        """This rank's trainable shards (what it perturbs, updates and checkpoints), with every
        deferred update applied (:meth:`flush`)."""
        self.flush()
        return self._entries()

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the update the two-pass step holds (``two_pass=True``); a no-op otherwise.

        Call before reading the weights between steps (evaluation, saving): with ``two_pass``
        the last query's update waits for the next step's first pass. ``state_dict``,
        ``shard_entries`` and the trainer call it.
        """
        if self.pending:
            self.timed("update", self.pending.flush)

    def _ensure_masters(self, entries: Iterable[ShardEntry]) -> None:
        if not self.param_groups[0]["master_weights"]:
            return
        for e in entries:
            if "master" not in e.state:
                e.state["master"] = e.view.local.detach().to(torch.promote_types(e.view.local.dtype, torch.float32)).clone()

    def directions(self, entries: Sequence[ShardEntry], step: int, query: int, seed: int | None = None) -> list[Any]:
        """The directions of ``entries`` for one query (the class's ``direction`` kind)."""
        return self.direction.for_query(self, entries, step, query, seed=seed)

    def restore(self, dirs: Sequence[Any], offset: Sequence[float]) -> None:
        """Return the compute copy to theta (bitwise with master weights)."""
        for d in dirs:
            d.restore_(offset[d.entry.group_index])

    # ----------------------------------------------------------------- communication
    def _loss_group(self) -> Any:
        group = getattr(self.shards, "loss_group", None)
        return group if group is not None else dist.group.WORLD

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self._loss_group())

    def _device(self) -> torch.device:
        entries = self._entries()
        return entries[0].view.local.device if entries else torch.device("cpu")

    def _shared_options(self) -> dict[str, Any]:
        """What every rank must agree on for the ranks' steps to be one run, by label.

        The optimizer class; the number of param groups; the global options; every per-group
        option; the stable ids of each group's trainable tensors (they key the noise); and the
        step counter (a rank resumed from another step would draw other noise).
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
            out["trainable tensors" + suffix] = ids_digest(ids)
        return out

    def check_options_agree(self) -> None:
        """Refuse to run when the ranks of the loss group disagree on an option (collective).

        Called by ``step`` before any parameter moves, once (again after
        :meth:`add_param_group` or :meth:`load_state_dict`); a no-op without a process group or
        on one rank. See ``zoscale.optim.agreement``.

        Raises:
            ValueError: ``ranks disagree on optimizer option 'seed': rank 0 has 0, rank 1 has 1``.
        """
        if self._options_agreed:
            return
        if self._world() > 1:
            check_agreement(type(self).__name__, self._shared_options(), self._loss_group(), self._device())
        self._options_agreed = True

    def mean_over_ranks(self, losses: list[Any], device: torch.device) -> list[float]:
        """Average the closure's losses over the data-parallel group: one all-reduce (during a
        :meth:`replay`, the logged values instead)."""
        if self._logged is not None:
            return self._logged.take(len(losses))
        vals = torch.stack([torch.as_tensor(l).detach().to(device=device, dtype=torch.float64).reshape(()) for l in losses])
        world = self._world()
        if world > 1:
            dist.all_reduce(vals, op=dist.ReduceOp.SUM, group=self._loss_group())
            vals /= world
        return vals.tolist()

    def timed(self, phase: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._timing[phase] += time.perf_counter() - t0

    def call(self, closure: Closure) -> Any:
        loss = self.timed("forward", closure)
        if loss is None:
            raise ValueError("the closure returned None; it must return this rank's mean loss")
        return loss

    # ----------------------------------------------------------------- the estimate
    def estimate(self, closure: Closure, dirs: Sequence[Any], step: int,
                 query: int) -> tuple[list[float], tuple[float, ...], list[float] | None]:
        """SPSA: perturb, two forwards, one all-reduce; ``(g per group, losses, offset)``.

        Leaves the compute copy at ``theta + offset d`` (``-eps`` two-sided, ``+eps`` one-sided)
        for the update to restore from. On a non-finite loss the parameters are restored and
        :class:`NonFiniteLossError` is raised. One-sided, the second loss is ``L(theta)``.
        """
        groups = self.param_groups
        eps = [g["eps"] for g in groups]
        device = dirs[0].entry.view.local.device if dirs else torch.device("cpu")

        def perturb(scale: list[float], delta: list[float]) -> None:
            for d in dirs:
                d.perturb_(scale[d.entry.group_index], delta[d.entry.group_index])

        if groups[0]["one_sided"]:
            self.flush()  # its first forward is at theta
            l0 = self.call(closure)
            self.timed("perturb", perturb, eps, eps)
            l1 = self.call(closure)
            offset = eps
            lp, lm = self.timed("communication", self.mean_over_ranks, [l1, l0], device)
            diff = [(lp - lm) / e for e in eps]
        else:
            self.timed("perturb", self.pending.perturb, dirs, eps, eps)  # with a held update fused in
            l1 = self.call(closure)
            self.timed("perturb", perturb, [-2.0 * e for e in eps], [-e for e in eps])
            l2 = self.call(closure)
            offset = [-e for e in eps]
            lp, lm = self.timed("communication", self.mean_over_ranks, [l1, l2], device)
            diff = [(lp - lm) / (2.0 * e) for e in eps]
        if not (math.isfinite(lp) and math.isfinite(lm)):
            self.restore(dirs, offset)
            self._zo["nonfinite"] += 1
            raise NonFiniteLossError(step, query, (lp, lm))
        return diff, (lp, lm), offset

    def applied_lrs(self, count: int, query: int) -> list[float]:
        """The lr per group query ``query`` of this step is applied with (the rule's ``logged_lr``
        of the group's lr; during a :meth:`replay`, the logged one)."""
        if self._logged is not None:
            return self._logged.lrs(query)
        return [self.rule.logged_lr(g["lr"], count) for g in self.param_groups]

    def update(self, step: int, queries: Sequence[Any], lrs: Sequence[float], count: int,
               offset: Sequence[float]) -> None:
        """Apply the rule to the queries' directions, or (``two_pass``) hold it for the next pass."""
        if self.param_groups[0].get("two_pass"):
            (dirs, grads), = queries
            self.pending.hold(dirs, self.rule.pairs(self, grads, lrs), offset)
        else:
            self.rule.apply(self, step, queries, lrs, count, offset)

    def log_query(self, step: int, query: int, grads: Sequence[float], lrs: Sequence[float],
                  losses: Sequence[float]) -> dict[str, Any]:
        """Append one step-log record (``zoscale.optim.step_log``) and return it."""
        record = {"seed": self.param_groups[0]["seed"], "step": step, "query": query, "grad": list(grads),
                  "lr": list(lrs), "loss": list(losses)}
        self._zo["log"].append(record)
        return record

    # ----------------------------------------------------------------- the step
    def _closure_required(self, closure: Closure | None) -> Closure:
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step requires a closure that returns the mean loss of this "
                             "rank's micro-batch: a zeroth-order optimizer evaluates the loss itself, at perturbed "
                             "weights. A loop that calls optimizer.step() after a backward pass (transformers.Trainer, "
                             "accelerate) cannot drive it: use zoscale.hf.ZOTrainer, or launch/train.py")
        return closure

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        """Take one ZO step.

        Args:
            closure: runs the forward pass on this rank's micro-batch and returns its mean loss
                (a tensor or float). Called twice per query, under ``torch.no_grad()``.

        Returns:
            The loss at the unperturbed point, estimated as the mean of the queries' pairs and
            averaged over ranks.

        Raises:
            ValueError: no closure.
            NonFiniteLossError: a loss was NaN/inf; parameters are restored, no step is taken.
        """
        closure = self._closure_required(closure)
        self.check_options_agree()
        self._timing = defaultdict(float)
        try:
            return self._run_step(closure)
        finally:
            self.last_step_timing = dict(self._timing)

    def _run_step(self, closure: Closure) -> float:
        step = self._zo["step"]
        plan = self.policy.plan(self._entries(), step, self.param_groups[0])
        self._ensure_masters(e for _, entries in plan.queries for e in entries)
        first = len(self._zo["log"])
        loss = self.schedule.run(self, closure, step, plan)
        self._zo["step"] = step + 1
        self._finish_step(loss, self._zo["log"][first:])
        return loss

    def _finish_step(self, loss: float, records: list[dict[str, Any]]) -> None:
        grads = [r["grad"][0] for r in records]
        self.last_step = {
            "loss": loss,
            "lr": self.param_groups[0]["lr"],
            "projected_grad": sum(grads) / len(grads) if grads else 0.0,
            "queries": len(records),
        }

    # ----------------------------------------------------------------- replay
    def replay(self, log: list[dict[str, Any]]) -> None:
        """Re-run the steps recorded in a step log on this optimizer's parameters and state.

        Build the optimizer on the base model with the same param groups and options as the
        run that wrote ``log`` (``step_log`` or ``state_dict()["zo"]["log"]``), or load the
        run's ``state_dict()`` saved at the log's first step, then call this: every logged step
        runs again, its passes, rule and state included, with each loss all-reduce answered
        from the log instead of a forward (``zoscale.optim.replay``). Afterwards the optimizer
        is where the run was (parameters, state, step counter, log), bit for bit, with or
        without master weights, on any shard layout: each rank replays onto its own shards
        (collective, as a step). Costs the run's noise passes, not its forwards.

        Raises:
            ValueError: the log does not continue from this optimizer's step, has partial or
                out-of-order steps, another number of param groups, or a record the replay does
                not reproduce (other options than the run's). Nothing is changed by the checks
                made before the first step; a record that does not reproduce stops the replay
                after its step.
        """
        for records in self._steps_of(log):
            replay_step(self, records)

    def _steps_of(self, log: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        return group_steps(log, len(self.param_groups), self._zo["step"], type(self).__name__, self._check_record)

    def _check_record(self, record: dict[str, Any]) -> None:
        """Refuse a record this optimizer cannot replay (before anything changes)."""
        self.policy.entries_for([], record["step"], record["query"], self.param_groups[0])

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

        Tensors are cloned, so the returned dict stays unchanged while training continues. A
        deferred update is applied first (:meth:`flush`).
        """
        self.flush()
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
        self.flush()
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
