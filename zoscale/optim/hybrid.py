"""Hybrid ZO-FO: backprop for a named part of the model, MeZO's SPSA for the rest (ZO-Bench, arXiv 2402.11592)."""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from zoscale.optim.agreement import ids_digest
from zoscale.optim.base import NonFiniteLossError, ShardEntry, ZOOptimizer
from zoscale.optim.registry import register
from zoscale.optim.replay import replay_updates
from zoscale.optim.selection import REST, unit_of
from zoscale.shards import LocalShards, ShardProvider, canonical_name

__all__ = ["HybridZOFO", "FO_OPTIMIZERS"]

#: First-order optimizers the FO part can use, by case-insensitive name.
FO_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
#: The constructor's options of the FO part (not param-group options).
FO_KEYS = ("fo_params", "fo_fraction", "fo_optimizer", "fo_lr", "fo_weight_decay", "fo_options")
# Set through their own options (fo_lr, fo_weight_decay) or meaningless here.
_RESERVED_FO_KEYS = ("params", "self", "lr", "weight_decay")

Named = list[tuple[str, torch.nn.Parameter]]


def _is_dtensor(t: torch.Tensor) -> bool:
    # Only a DTensor can be one; importing DTensor is cheap but not needed to ask.
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _zero3_rejection(provider: ShardProvider | None) -> str | None:
    """Why the hybrid cannot run on this provider's parameters, or None.

    Backprop needs gradients an engine reduces, or whole replicas whose gradients the hybrid
    all-reduces itself: a provider whose parameters are sharded and whose engine does not reduce
    gradients (DeepSpeed ZeRO-3 outside its own optimizer) is refused, from its capabilities.
    """
    caps = (provider if provider is not None else LocalShards()).capabilities
    if caps.whole_parameters or caps.reduces_gradients:
        return None
    return (
        f"Invalid engine: DeepSpeed ZeRO-3 (shard provider {type(provider).__name__}: sharded parameters whose "
        "gradients the engine does not reduce). HybridZOFO backpropagates into its FO part, and under ZeRO-3 "
        "gradients are reduced and partitioned only by hooks that DeepSpeed's own stage-3 optimizer installs "
        "(DeepSpeedZeroOptimizer_Stage3.create_reduce_and_remove_grad_hooks in deepspeed/runtime/zero/stage3.py); "
        "without it every rank keeps an unreduced, full-size .grad next to a released parameter. Use FSDP2 "
        "(--engine fsdp), ZeRO stage 0-2 (replicas), or a purely zeroth-order optimizer such as MeZO"
    )


def _named_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """The param groups with ``params`` as ``(name, parameter)`` lists; ValueError without names."""
    items = list(params)
    if not items:
        raise ValueError("Invalid params: empty parameter list")
    groups = [dict(g) for g in items] if isinstance(items[0], dict) else [{"params": items}]
    for gi, group in enumerate(groups):
        if "params" not in group:
            raise ValueError(f"Invalid params: param group {gi} has no 'params'")
        ps = group["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        for item in ps:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], torch.Tensor)):
                raise ValueError(
                    "Invalid params: HybridZOFO chooses its FO part by parameter name, so pass "
                    "model.named_parameters() (or param groups of (name, parameter) pairs), "
                    f"got an item of type {type(item).__name__} in group {gi}"
                )
        group["params"] = ps
    return groups


@register("hybrid")
class HybridZOFO(ZOOptimizer):
    r"""Train a named part of the model by backprop (a torch optimizer), the rest by MeZO's SPSA.

    ZO-Bench's hybrid scheme: the *FO part* (by default nothing; typically the last blocks,
    the final norm and the head) gets exact gradients from one backward pass and is updated by
    ``torch.optim.AdamW`` or ``SGD``; the *ZO part* (everything else that was passed) is updated
    by ZO-SGD along a seeded random direction, exactly as :class:`~zoscale.optim.MeZO`. During
    the backward pass the ZO parameters have ``requires_grad=False``, so autograd records no
    graph for them and they never get a ``.grad``: with the FO part at the output end of the
    network, only the FO blocks keep activations, and gradients and optimizer state exist only
    for FO parameters. The paper reports ZO on the first third of the layers and FO on the rest
    reaching FO accuracy at lower memory.

    One step, with ``theta = (theta_zo, theta_fo)`` the parameters at the start of the step::

        1. FO pass at theta (ZO parameters' requires_grad off, restored afterwards):
               l0 = closure()                          forward with grad        (forward 1)
               l0 <- mean over data-parallel ranks     (all-reduce of 1 float)
               l0.backward()                           grads of the FO part only
               replicas: all-reduce-mean each FO grad  (FSDP2 reduce-scatters them in backward)
        2. ZO estimate and update of theta_zo, FO part held at theta_fo (under no_grad):
               for k in 0..q-1: MeZO's SPSA query     (+eps z_k, -2eps z_k, fused restore +
                                                       update; 2 forwards, 1 all-reduce of 2
                                                       floats; as MeZO)
        3. FO update: fo_optimizer.step(); fo_optimizer.zero_grad(set_to_none=True)

    So ``1 + 2q`` forwards (the first with grad) and one backward per step, and both parts are
    estimated at the same point theta: one step of the joint update
    ``theta_zo -= lr g z``, ``theta_fo <- FO-optimizer(theta_fo, grad_fo L(theta))``. Doing the
    FO pass first keeps MeZO's three noise passes per query (estimating ZO first and then
    backpropagating at the unperturbed point would need a fourth, to restore before updating);
    the price is that the FO gradients are held during the two ZO forwards, when activations
    are gone. ``step`` returns ``l0``, the exact loss at theta averaged over ranks.

    Choosing the FO part (``fo_params`` and ``fo_fraction``, whose union is taken):
        * ``fo_params``: substrings of the wrapper-independent parameter names
          (:func:`~zoscale.shards.canonical_name`), e.g. ``["layers.2.", "layers.3.",
          "model.norm", "lm_head"]``. Every pattern must match at least one passed parameter.
          A tied weight appears once, under its first name (Llama's tied ``lm_head.weight`` is
          ``model.embed_tokens.weight``).
        * ``fo_fraction``: the last ``max(1, round(fraction * blocks))`` transformer blocks
          (blocks found by name as in :class:`~zoscale.optim.LeZO`: ``layers.<i>``, ``h.<i>``,
          ...). Non-block parameters (embeddings, final norm, head) are not included: add them
          with ``fo_params``.
        Keep the FO part at the output end: a ZO block *after* an FO block must keep its
        activations for the gradient to flow through it (it still gets no gradient), and FO
        embeddings (or a head tied to them) make every block keep its activations.

    Choices the paper leaves open, and where the code departs from it:
        * Order: FO pass first, both parts estimated at theta (above). ``one_sided`` queries
          run their own unperturbed forward (as MeZO's), not reusing ``l0``.
        * The ZO part's options (``lr``, ``eps``, ``weight_decay``, ``q``, ``noise``,
          ``master_weights``, param groups) are MeZO's and apply to ZO parameters only; the FO
          part has its own ``fo_optimizer``, ``fo_lr``, ``fo_weight_decay`` and ``fo_options``
          (other keyword arguments of the torch optimizer, e.g. ``{"betas": [0.9, 0.95]}`` or
          ``{"momentum": 0.9}``). A param group left with no ZO parameter is dropped (warning).
          ``master_weights`` concerns the ZO part; the FO part is updated in the parameters'
          dtype (compute in bf16 over fp32 shards with FSDP2's ``MixedPrecisionPolicy``).
        * Data-parallel replicas (one process per rank holding whole parameters, no DDP):
          the FO gradients are all-reduced (mean) over the loss group after backward, so
          replicas follow the single-process trajectory. Under FSDP2, backward reduce-scatters
          them already. Under DDP they would be averaged twice (same values, more traffic).
          Either way the optimizer's traffic is no longer just the loss scalars: the FO part
          costs what first-order training of that part costs.
        * The step log has MeZO's records (one per query) plus ``fo_loss``; it replays only
          the ZO part (FO updates depend on gradients that are not logged), so
          :meth:`replay` refuses unless ``zo_only=True``. Checkpoints save FO shards too
          (:meth:`shard_entries`), and :meth:`state_dict` nests the torch optimizer's state.
        * Non-finite losses: in the FO pass nothing has changed (no backward runs, every rank
          agrees through the all-reduce) and :class:`NonFiniteLossError` is raised with query
          ``-1``; in a ZO query the base policy applies and the FO gradients are dropped, so
          the FO part is not updated. Either way the step counter does not advance.

    Engines: one process, data-parallel replicas, DeepSpeed ZeRO 0-2 (replicas) and FSDP2 /
    HSDP (parameters and the torch optimizer's state are sharded DTensors). DeepSpeed ZeRO-3 is
    rejected at construction (ValueError), before any parameter is touched: without
    DeepSpeed's own optimizer a backward pass leaves unreduced full-size gradients.

    The closure must build the autograd graph: do not wrap it in ``torch.no_grad()`` (the
    optimizer switches grad mode itself). Model parameters not passed to the optimizer should
    be frozen (``requires_grad=False``), or autograd tracks them too.

    Args:
        params: ``model.named_parameters()`` or param groups of ``(name, parameter)`` pairs
            (names are required: they select the FO part and give noise ids).
        lr, eps, weight_decay, q, one_sided, noise, seed, master_weights: the ZO part's
            options, as :class:`~zoscale.optim.MeZO`.
        fo_params: name patterns (substrings) of the FO part.
        fo_fraction: fraction in (0, 1] of transformer blocks, the last ones, in the FO part.
        fo_optimizer: ``"adamw"`` or ``"sgd"`` (case-insensitive).
        fo_lr: the FO optimizer's learning rate.
        fo_weight_decay: the FO optimizer's weight decay (AdamW: decoupled).
        fo_options: further keyword arguments of the FO optimizer (JSON-friendly dict).
        shards: shard provider (default: every parameter local).

    Raises:
        ValueError: invalid options (named), a pattern that matches no parameter, an empty FO
            or ZO part, parameters without names, or DeepSpeed ZeRO-3.

    Example:
        >>> opt = HybridZOFO(model.named_parameters(), lr=1e-6, eps=1e-3,
        ...                  fo_params=["layers.2.", "layers.3.", "model.norm"], fo_lr=1e-5)
        >>> loss = opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        fo_params: Sequence[str] | None = None,
        fo_fraction: float | None = None,
        fo_optimizer: str = "adamw",
        fo_lr: float = 1e-5,
        fo_weight_decay: float = 0.0,
        fo_options: dict[str, Any] | None = None,
        shards: ShardProvider | None = None,
        **options: Any,
    ) -> None:
        fo_cls, fo_kwargs, patterns = self._check_fo_options(fo_params, fo_fraction, fo_optimizer, fo_lr,
                                                             fo_weight_decay, fo_options)
        groups = _named_groups(params)
        named = [item for g in groups for item in g["params"]]
        reason = _zero3_rejection(shards)
        if reason:
            raise ValueError(reason)

        fo_ids = self._select_fo(named, patterns, fo_fraction)
        zo_groups: list[dict[str, Any]] = []
        fo_named: Named = []
        for gi, group in enumerate(groups):
            zo = [(n, p) for n, p in group["params"] if id(p) not in fo_ids]
            fo_named += [(n, p) for n, p in group["params"] if id(p) in fo_ids]
            if zo:
                zo_groups.append({**group, "params": zo})
            else:
                extra = sorted(set(group) - {"params"})
                if extra:
                    warnings.warn(f"param group {gi} holds only FO parameters: its options {extra} have no effect "
                                  "(the FO part uses fo_lr, fo_weight_decay and fo_options)", stacklevel=2)
        if not any(p.requires_grad for _, p in fo_named):
            raise ValueError("Invalid fo_params/fo_fraction: the FO part has no parameter with requires_grad=True")
        if not any(p.requires_grad for g in zo_groups for _, p in g["params"]):
            raise ValueError("Invalid fo_params/fo_fraction: every trainable parameter is in the FO part, nothing "
                             f"is left for ZO (use torch.optim.{fo_cls.__name__} directly)")
        #: The torch optimizer of the FO part (an LR scheduler can drive it).
        self.fo_optimizer: torch.optim.Optimizer = fo_cls(fo_named, **fo_kwargs)
        self._fo_named: Named = fo_named
        #: Stable ids of the FO parameters (checked when a state dict is loaded).
        self.fo_names: list[str] = [canonical_name(n) for n, _ in fo_named]
        self._fo_optimizer_name = fo_optimizer.lower()
        self._fo_patterns = patterns
        super().__init__(zo_groups, shards=shards, **options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a ZO param group (see the base class); also after construction.

        The FO part is chosen at construction: a group added later is ZO, and one holding a
        parameter whose name matches an ``fo_params`` pattern is refused (build the optimizer
        with it instead). Names are required, as at construction.

        Raises:
            ValueError: a parameter without a name or matching ``fo_params``, or as the base class.
        """
        (group,) = _named_groups([param_group])
        for name, _ in group["params"]:
            hit = next((pat for pat in self._fo_patterns if pat in canonical_name(name)), None)
            if hit is not None:
                raise ValueError(f"Invalid param group: parameter {name!r} matches fo_params pattern {hit!r}, but the "
                                 "FO part is fixed at construction (a group added later is zeroth-order); pass it "
                                 "when building HybridZOFO")
        super().add_param_group(group)

    def _shared_options(self) -> dict[str, Any]:
        """The base class's, plus the FO part: its optimizer, tensors and hyperparameters."""
        out = super()._shared_options()
        out["fo_optimizer"] = self._fo_optimizer_name
        out["fo tensors"] = ids_digest(self.fo_names)
        fo_groups = self.fo_optimizer.param_groups
        for gi, group in enumerate(fo_groups):
            suffix = "" if len(fo_groups) == 1 else f" (group {gi})"
            for key, value in group.items():
                if key not in ("params", "param_names"):
                    out[f"fo_optimizer {key}{suffix}"] = value
        return out

    # ----------------------------------------------------------------- options
    @staticmethod
    def _check_fo_options(fo_params: Any, fo_fraction: Any, fo_optimizer: Any, fo_lr: Any, fo_weight_decay: Any,
                          fo_options: Any) -> tuple[type[torch.optim.Optimizer], dict[str, Any], list[str]]:
        """Validate the FO options; return (optimizer class, its kwargs, patterns)."""
        if fo_params is not None:
            if isinstance(fo_params, str) or not isinstance(fo_params, (list, tuple)):
                raise ValueError(f"Invalid fo_params: {fo_params!r} (expected a list of parameter-name patterns)")
            for pat in fo_params:
                if not isinstance(pat, str) or not pat:
                    raise ValueError(f"Invalid fo_params: pattern {pat!r} (patterns are non-empty strings)")
        if fo_fraction is not None and (not _finite_number(fo_fraction) or not 0.0 < fo_fraction <= 1.0):
            raise ValueError(f"Invalid fo_fraction: {fo_fraction!r} (fraction of blocks in the FO part, in (0, 1])")
        if not fo_params and fo_fraction is None:
            raise ValueError(f"Invalid fo_params: {fo_params!r} (HybridZOFO needs an FO part: set fo_params and/or "
                             "fo_fraction)")
        fo_cls = FO_OPTIMIZERS.get(fo_optimizer.lower()) if isinstance(fo_optimizer, str) else None
        if fo_cls is None:
            raise ValueError(f"Invalid fo_optimizer: {fo_optimizer!r} (known: {', '.join(sorted(FO_OPTIMIZERS))})")
        if not _finite_number(fo_lr) or fo_lr < 0:
            raise ValueError(f"Invalid fo_lr: {fo_lr!r} (must be a finite number >= 0)")
        if not _finite_number(fo_weight_decay) or fo_weight_decay < 0:
            raise ValueError(f"Invalid fo_weight_decay: {fo_weight_decay!r} (must be a finite number >= 0)")
        options = {} if fo_options is None else fo_options
        if not isinstance(options, dict):
            raise ValueError(f"Invalid fo_options: {fo_options!r} (expected a dict of {fo_cls.__name__} arguments)")
        accepted = set(inspect.signature(fo_cls.__init__).parameters) - set(_RESERVED_FO_KEYS)
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ValueError(f"Invalid fo_options: unknown {fo_cls.__name__} argument(s) {unknown}; accepted: "
                             f"{sorted(accepted)} (lr and weight_decay are fo_lr and fo_weight_decay)")
        kwargs = {"lr": float(fo_lr), "weight_decay": float(fo_weight_decay), **options}
        if "betas" in kwargs and isinstance(kwargs["betas"], list):
            kwargs["betas"] = tuple(kwargs["betas"])  # JSON has no tuples
        try:  # the torch optimizer validates its own values; on a probe, not on the model
            fo_cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
        except (ValueError, TypeError) as e:
            raise ValueError(f"Invalid fo_options: {fo_options!r} ({fo_cls.__name__}: {e})") from None
        return fo_cls, kwargs, list(fo_params or [])

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Validate constructor options without a model (for config checks before loading).

        Everything but the name matching is checked; the latter needs the parameters.

        Raises:
            ValueError: an unknown or invalid option, named.
        """
        accepted = cls.accepted_options()
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"Unknown parameter(s) {unknown} for optimizer 'hybrid'; accepted: {accepted}")
        defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items() if k in FO_KEYS}
        cls._check_fo_options(**{**defaults, **{k: v for k, v in options.items() if k in FO_KEYS}})
        super().check_options({k: v for k, v in options.items() if k not in FO_KEYS})

    @classmethod
    def accepted_options(cls) -> list[str]:
        """The SPSA options and the FO part's (``FO_KEYS``)."""
        return sorted([*super().accepted_options(), *FO_KEYS])

    @staticmethod
    def _select_fo(named: Named, patterns: list[str], fraction: float | None) -> set[int]:
        """ids of the FO parameters: names matching a pattern, plus the last blocks' parameters."""
        canon = [(canonical_name(n), p) for n, p in named]
        chosen: set[int] = set()
        for pat in patterns:
            hits = [p for c, p in canon if pat in c]
            if not hits:
                sample = ", ".join(repr(c) for c, _ in canon[:4])
                raise ValueError(f"Invalid fo_params: pattern {pat!r} matches no parameter (names look like {sample}, "
                                 "...; a tied weight appears once, under its first name)")
            chosen.update(id(p) for p in hits)
        if fraction is not None:
            blocks = sorted({u for u in (unit_of(c) for c, _ in canon) if u != REST}, key=lambda u: int(u.split(".")[1]))
            if not blocks:
                raise ValueError(f"Invalid fo_fraction: {fraction!r} (no transformer blocks among the parameter names, "
                                 "e.g. 'model.layers.<i>.'; use fo_params)")
            last = set(blocks[len(blocks) - max(1, math.floor(fraction * len(blocks) + 0.5)):])
            chosen.update(id(p) for c, p in canon if unit_of(c) in last)
        return chosen

    # ----------------------------------------------------------------- engine check
    def _check_provider(self, provider: ShardProvider) -> None:
        reason = _zero3_rejection(provider)
        if reason:
            raise ValueError(reason)

    # ----------------------------------------------------------------- the step
    @contextlib.contextmanager
    def _zo_frozen(self) -> Iterator[None]:
        """ZO parameters have requires_grad=False inside (so autograd records nothing for them)."""
        flipped = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        for p in flipped:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in flipped:
                p.requires_grad_(True)

    def _reduce_replica_grads(self) -> None:
        """Average FO gradients over data-parallel replicas (FSDP2's DTensor grads are reduced already)."""
        world = self._world()
        if world == 1 or self.shards.capabilities.reduces_gradients:
            return
        group = self._loss_group()
        for _, p in self._fo_named:
            g = p.grad
            if g is None:
                continue
            dist.all_reduce(g, op=dist.ReduceOp.SUM, group=group)
            g.div_(world)

    def _fo_pass(self, closure: Callable[[], Any], step: int) -> float:
        """Forward with grad and backward for the FO part at theta; returns the rank-mean loss."""
        self.fo_optimizer.zero_grad(set_to_none=True)
        with self._zo_frozen(), torch.enable_grad():
            loss = self.timed("fo_forward", closure)
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                raise ValueError(
                    "the closure's loss does not require grad: HybridZOFO backpropagates it into the FO part, so "
                    "the closure must not run under torch.no_grad() and must return the loss tensor"
                    + (" (it returned None)" if loss is None else "")
                )
            (l0,) = self.timed("communication", self.mean_over_ranks, [loss], loss.device)
            if not math.isfinite(l0):
                # Every rank sees the same mean, so every rank skips backward (no FSDP collective waits).
                del loss  # free the graph now, not when the traceback goes
                self._zo["nonfinite"] += 1
                raise NonFiniteLossError(step, -1, (l0,))
            self.timed("backward", loss.backward)
        del loss
        self.timed("communication", self._reduce_replica_grads)
        return l0

    def step(self, closure: Callable[[], Any] | None = None) -> float:  # type: ignore[override]
        """Take one hybrid step (see the class docstring for the order).

        Args:
            closure: runs the forward pass on this rank's micro-batch and returns its mean loss
                tensor. Called ``1 + 2 q`` times: first with grad enabled (then backward), then
                ``2 q`` times under ``torch.no_grad()``.

        Returns:
            The loss at the start of the step (first forward), averaged over ranks.

        Raises:
            ValueError: no closure, or its loss does not require grad.
            NonFiniteLossError: a loss was NaN/inf; nothing of the step is applied (earlier
                queries of an n-SPSA step excepted, as in MeZO) and the counter does not advance.
        """
        if closure is None:
            raise ValueError("HybridZOFO.step requires a closure that returns the mean loss of this rank's "
                             "micro-batch (a tensor with grad)")
        self.check_options_agree()
        self._timing = defaultdict(float)
        step = self._zo["step"]
        try:
            self.flush()  # the backward pass reads the weights at theta
            l0 = self._fo_pass(closure, step)
            first = len(self._zo["log"])
            try:
                with torch.no_grad():
                    self._run_step(closure)
            except BaseException:
                for record in self._zo["log"][first:]:  # queries applied before a non-finite one
                    record["fo_loss"] = l0
                self.fo_optimizer.zero_grad(set_to_none=True)  # no FO update without the ZO one
                raise
            for record in self._zo["log"][first:]:
                record["fo_loss"] = l0
            self.timed("fo_update", self.fo_optimizer.step)
            self.fo_optimizer.zero_grad(set_to_none=True)
        finally:
            self.last_step_timing = dict(self._timing)
        self.last_step["loss"] = l0
        return l0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of both parts."""
        super().zero_grad(set_to_none)
        self.fo_optimizer.zero_grad(set_to_none)

    # ----------------------------------------------------------------- checkpoints and replay
    def shard_entries(self) -> list[ShardEntry]:
        """ZO shards (as the base class), then FO shards (``group_index`` -1, empty state).

        Checkpoints save and restore every entry's ``view.local``, so FO weights resume too.
        """
        entries = self._entries()
        for name, p in self._fo_named:
            if not p.requires_grad:
                continue
            view = self.shards.view(p)
            if view.local.numel():
                entries.append(ShardEntry(-1, p, view, canonical_name(name), {}))
        return entries

    def replay(self, log: list[dict[str, Any]], *, zo_only: bool = False) -> None:
        """Apply the ZO updates of a step log; refuses unless ``zo_only`` (FO updates are not logged).

        Raises:
            NotImplementedError: ``zo_only`` is False.
        """
        if not zo_only:
            raise NotImplementedError(
                "HybridZOFO's step log holds only the ZO part's updates (the FO part's depend on gradients): "
                "resume from a checkpoint, or call replay(log, zo_only=True) to apply the ZO part alone"
            )
        replay_updates(self, self._steps_of(log))

    def state_dict(self) -> dict[str, Any]:
        """The base state dict plus ``"fo"``: the FO split and the torch optimizer's state dict.

        The torch optimizer's state tensors are cloned; DTensor ones (FSDP2) are stored as their
        local shards, so the dict holds plain per-rank tensors like the rest of the state.
        """
        sd = super().state_dict()
        inner = self.fo_optimizer.state_dict()
        inner["state"] = {
            k: {kk: (vv.to_local().detach().clone() if _is_dtensor(vv) else vv.detach().clone())
                if isinstance(vv, torch.Tensor) else copy.deepcopy(vv) for kk, vv in v.items()}
            for k, v in inner["state"].items()
        }
        inner["param_groups"] = copy.deepcopy(inner["param_groups"])
        sd["fo"] = {"optimizer": self._fo_optimizer_name, "names": list(self.fo_names), "state_dict": inner}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict` (the argument is not modified).

        Raises:
            ValueError: not a HybridZOFO state dict, or saved with another FO part or optimizer.
        """
        fo = state_dict.get("fo")
        if not isinstance(fo, dict) or "state_dict" not in fo:
            raise ValueError("state dict has no 'fo' entry: it was not saved by HybridZOFO")
        if fo["optimizer"] != self._fo_optimizer_name:
            raise ValueError(f"state dict was saved with fo_optimizer {fo['optimizer']!r}, this optimizer uses "
                             f"{self._fo_optimizer_name!r}")
        if list(fo["names"]) != self.fo_names:
            missing = sorted(set(self.fo_names) - set(fo["names"]))[:3]
            extra = sorted(set(fo["names"]) - set(self.fo_names))[:3]
            raise ValueError(f"state dict was saved with another FO part: missing {missing}, unexpected {extra}")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "fo"})
        inner = copy.deepcopy(fo["state_dict"])  # torch may alias tensors it does not need to cast
        self.fo_optimizer.load_state_dict(inner)
        # torch casts each value to its parameter's device and dtype, but a local shard stays a plain
        # tensor: rewrap the ones saved from DTensor state (same shape as the parameter's local shard).
        for p, st in self.fo_optimizer.state.items():
            if not _is_dtensor(p):
                continue
            from torch.distributed.tensor import DTensor

            local_shape = p.to_local().shape
            for key, value in list(st.items()):
                if isinstance(value, torch.Tensor) and not _is_dtensor(value) and key != "step" \
                        and value.shape == local_shape:
                    st[key] = DTensor.from_local(value, p.device_mesh, p.placements, run_check=False,
                                                 shape=p.shape, stride=p.stride())
