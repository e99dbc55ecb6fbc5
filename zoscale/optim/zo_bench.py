"""ZO-Bench's ZO-SGD variants and ZO-Adam (Zhang et al., 2024, arXiv 2402.11592).

Four optimizers that share MeZO's SPSA estimate ``g = (L(theta + eps z) - L(theta - eps z)) /
(2 eps)`` (``zoscale.optim.base``) and differ in what they do with ``g z``:

    ZOSGDSign   theta <- theta - lr (sign(g) z + wd theta)          stateless, MeZO's 3 passes
    ZOSGDMMT    m <- beta m + (g z + wd theta);  theta <- theta - lr m     (torch SGD, momentum)
    ZOSGDCons   keep the best of {theta, theta -+ lr (g z + wd theta)} on the step's batch
    ZOAdam      torch.optim.Adam / AdamW fed the gradient g z; moments sharded

``z`` is never stored: the stateful updates regenerate it chunk by chunk
(:func:`zoscale.noise.generate` on at most ``chunk_size`` elements, then eager torch ops), so
transient memory is O(chunk) on top of the state (a momentum buffer, two Adam moments: each
shaped like the rank's local shard, in at least fp32). The update ops are, chunk by chunk, the
ones ``torch.optim.SGD`` / ``torch.optim.Adam`` run (``_single_tensor_sgd`` /
``_single_tensor_adam``), so a run equals torch's optimizer fed ``p.grad = g z``; elementwise
ops make the result independent of how the tensor is sharded or chunked.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from zoscale import noise
from zoscale.optim.base import NonFiniteLossError, ShardEntry, ZOOptimizer, _written
from zoscale.optim.mezo import MeZO
from zoscale.shards import ShardProvider

__all__ = ["ZOSGDSign", "ZOSGDMMT", "ZOSGDCons", "ZOAdam", "CHUNK"]

#: Elements per chunk of the eager (generate + torch ops) passes: 1 MiB of fp32 per transient.
CHUNK = 1 << 18

Closure = Callable[[], Any]
# One query as the update sees it: the noise key of every entry, and g per group.
Query = tuple[list[int], list[float]]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _spans(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, chunk):
        yield lo, min(n, lo + chunk)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_momentum(momentum: Any) -> None:
    if not _is_real(momentum) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum: {momentum!r} (must be a number in [0, 1))")


def _check_betas(betas: Any) -> None:
    ok = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)
    if not ok:
        raise ValueError(f"Invalid betas: {betas!r} (must be two numbers in [0, 1), e.g. (0.9, 0.999))")


def _check_adam(group: dict[str, Any]) -> None:
    _check_betas(group["betas"])
    if not _is_real(group["adam_eps"]) or group["adam_eps"] < 0:
        raise ValueError(f"Invalid adam_eps: {group['adam_eps']!r} (must be a finite number >= 0)")
    if not isinstance(group["decoupled_weight_decay"], bool):
        raise ValueError(f"Invalid decoupled_weight_decay: {group['decoupled_weight_decay']!r} (must be True or False)")


def _by_step(log: Sequence[dict[str, Any]], groups: int) -> list[list[dict[str, Any]]]:
    """Split a step log into steps (consecutive records with one step number), checked."""
    steps: list[list[dict[str, Any]]] = []
    for rec in log:
        if len(rec["grad"]) != groups or len(rec["lr"]) != groups:
            raise ValueError(f"log record for step {rec['step']} has {len(rec['grad'])} groups, "
                             f"this optimizer has {groups}")
        if steps and steps[-1][0]["step"] == rec["step"]:
            steps[-1].append(rec)
        else:
            steps.append([rec])
    for recs in steps:
        if [r["query"] for r in recs] != list(range(len(recs))):
            raise ValueError(f"log records of step {recs[0]['step']} have queries {[r['query'] for r in recs]}, "
                             "expected 0, 1, ...: pass whole steps, in order")
    return steps


def _query_keys(recs: list[dict[str, Any]], entries: list[ShardEntry]) -> list[list[int]]:
    return [[noise.noise_key(r["seed"], r["step"], r["query"], e.stable_id) for e in entries] for r in recs]


# ============================================================================ ZO-SGD-Sign
class ZOSGDSign(MeZO):
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
          applies ``sign(g)``, so replaying reproduces the run (bitwise with master weights).
        * Weight decay is MeZO's L2 term ``lr wd theta`` (ZO-Bench applies it through its
          optimizer the same way).

    Args:
        As :class:`~zoscale.optim.MeZO`. ``lr`` is now the per-element step along ``z``
        (MeZO's ``lr |g|``): start from MeZO's lr times a typical ``|g|`` (the trainer logs
        ``g``).
    """

    def _direction_scale(self, grads: list[float]) -> list[float]:
        return [0.0 if g == 0 else math.copysign(1.0, g) for g in grads]


# ============================================================================ stateful (MMT, Adam)
class _StatefulZO(ZOOptimizer):
    """Shared step of ZO-SGD-MMT and ZO-Adam: ``q`` queries at theta, one stateful update.

    Subclasses define :meth:`_begin_update` (per-tensor scalars, lazy state) and
    :meth:`_update_chunk` (torch's update ops on one chunk of the parameter, its gradient and
    its state).
    """

    #: Elements per chunk of the fused restore + update pass (tests make it small).
    chunk_size: int = CHUNK

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        """Take one step: ``q`` SPSA queries at theta, then one update of theta and the state.

        Args:
            closure: runs the forward pass on this rank's micro-batch and returns its mean loss.
                Called ``2 q`` times, under ``torch.no_grad()``.

        Returns:
            The loss at theta, estimated as the mean of the queries' pairs, averaged over ranks.

        Raises:
            ValueError: no closure.
            NonFiniteLossError: a loss was NaN/inf; the parameters are restored, the state is
                unchanged, nothing is logged and the step counter does not advance.
        """
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step requires a closure that returns the mean loss of "
                             "this rank's micro-batch")
        self._begin_step()
        try:
            step, q = self._zo["step"], self.param_groups[0]["q"]
            entries = self._select(self._entries(), step)
            self._ensure_masters(entries)
            queries: list[tuple[list[int], list[float], tuple[float, float]]] = []
            offset: list[float] = []
            for k in range(q):
                if k:  # every query is taken at theta_t: restore the previous one first
                    self._timed("perturb", self._restore, entries, queries[-1][0], offset)
                keys, grads, losses, offset = self._spsa_estimate(closure, entries, step, k)
                queries.append((keys, grads, losses))
            lrs = [g["lr"] for g in self.param_groups]
            self._timed("update", self._apply, entries, [(k, g) for k, g, _ in queries], lrs, offset)
        finally:
            self._end_step()
        for k, (_, grads, losses) in enumerate(queries):
            self._log(step, k, grads, 1.0, losses)
        self._zo["step"] = step + 1
        return sum(0.5 * (lp + lm) for _, _, (lp, lm) in queries) / q

    def _apply(self, entries: list[ShardEntry], queries: list[Query], lrs: list[float], offset: list[float]) -> None:
        """Restore and update in one pass per chunk.

        The gradient fed to the update rule is ``sum_k (g_k / q) z_k`` (for ``q = 1`` exactly
        ``z * g``, torch's ``p.grad``). ``offset[g]``: where the compute copy sits along the last
        query's ``z`` (ignored with master weights, whose master holds theta exactly).
        """
        groups = self.param_groups
        kind = groups[0]["noise"]
        masters = groups[0]["master_weights"]
        q = len(queries)
        for i, e in enumerate(entries):
            v, gi = e.view, e.group_index
            group = groups[gi]
            acc = _acc(v.local.dtype)
            keys = [qk[i] for qk, _ in queries]
            coefs = [grads[gi] / q for _, grads in queries]
            back = -offset[gi]
            ctx = self._begin_update(e, group, lrs[gi])
            for lo, hi in _spans(v.local.numel(), self.chunk_size):
                zs = [noise.generate(v.offset + lo, hi - lo, key, kind, device=v.local.device).to(acc) for key in keys]
                if masters:
                    param = e.state["master"][lo:hi]
                else:
                    param = v.local[lo:hi].to(acc)
                    if back != 0.0:  # theta = x - offset z (within the +-eps round-trip drift)
                        param = param + zs[-1] * back
                grad = zs[0] * coefs[0]
                for z, c in zip(zs[1:], coefs[1:]):
                    grad.add_(z * c)
                self._update_chunk(e, group, ctx, lrs[gi], param, grad, lo, hi)
                v.local[lo:hi].copy_(param)
            _written(v)

    def _begin_update(self, e: ShardEntry, group: dict[str, Any], lr: float) -> Any:
        raise NotImplementedError

    def _update_chunk(self, e: ShardEntry, group: dict[str, Any], ctx: Any, lr: float, param: torch.Tensor,
                      grad: torch.Tensor, lo: int, hi: int) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def replay(self, log: list[dict[str, Any]]) -> None:
        """Re-run logged steps through this optimizer's update rule, state included.

        Unlike MeZO's replay (stateless: any log onto any weights), the momentum / moments
        must be those of the run at the log's first step. So the log must hold whole,
        consecutive steps starting at this optimizer's :attr:`step_count`: build a fresh
        optimizer on the base weights (step 0) with the run's param groups and hyperparameters,
        or load the run's ``state_dict()`` saved at the log's first step. Each step's
        gradient ``sum_k (g_k / q) z_k`` is rebuilt from the logged seed, step, queries and
        ``g``, and applied with the logged lr; no forward pass is run. Afterwards the optimizer
        is where the run was: parameters, state, step counter and log (bitwise with master
        weights; without, within the run's +-eps round-trip drift, as MeZO's replay).

        Raises:
            ValueError: the log does not continue from this optimizer's step, has partial steps,
                or another number of param groups. Nothing is changed then.
        """
        steps = _by_step(log, len(self.param_groups))
        why = (f"{type(self).__name__} carries state (momentum / moments), so a replay must run the run's "
               "steps in order from this optimizer's step (a fresh optimizer starts at step 0; or load the "
               "state_dict saved at the log's first step)")
        if steps and steps[0][0]["step"] != self._zo["step"]:
            raise ValueError(f"cannot replay step {steps[0][0]['step']} onto an optimizer at step "
                             f"{self._zo['step']}: {why}")
        for prev, recs in zip(steps, steps[1:]):
            if recs[0]["step"] != prev[0]["step"] + 1:
                raise ValueError(f"cannot replay: the log jumps from step {prev[0]['step']} to step "
                                 f"{recs[0]['step']}: {why}")
        all_entries = self._entries()
        self._ensure_masters(all_entries)
        zeros = [0.0] * len(self.param_groups)
        for recs in steps:
            step = recs[0]["step"]
            entries = self._select(all_entries, step)
            keys = _query_keys(recs, entries)
            self._apply(entries, [(k, r["grad"]) for k, r in zip(keys, recs)], list(recs[0]["lr"]), zeros)
            self._zo["step"] = step + 1
            self._zo["log"].extend(copy.deepcopy(recs))


class ZOSGDMMT(_StatefulZO):
    r"""ZO-SGD with momentum: torch's SGD(momentum) fed the SPSA gradient ``g z``.

    .. math::
        d = g z + \lambda\theta, \qquad m \leftarrow \beta m + d \ (m_0 = d), \qquad
        \theta \leftarrow \theta - \eta m

    exactly ``torch.optim.SGD(lr, momentum=beta, dampening=0, nesterov=False,
    weight_decay=lambda)`` with ``p.grad = g z`` (the same ops in the same order, chunk by
    chunk). ``m`` is ``self.state[p]["momentum_buffer"]``, shaped like the rank's local shard, in
    at least fp32: one extra shard of memory. Per step: ``q`` queries (2 perturbation passes
    each, ``q - 1`` restores) and one fused pass that restores theta from the last query,
    regenerates the ``q`` noises and updates ``m`` and theta.

    Choices the paper leaves open, and departures:
        * n-SPSA (``q > 1``): all queries are taken at theta_t and averaged into one gradient
          ``sum_k (g_k / q) z_k``, then one momentum step (so the run is still torch's SGD fed a
          gradient); MeZO instead applies each query as it completes.
        * The step log records each query's ``g`` and the group's lr (not ``lr / q``).
        * :meth:`replay` re-runs the rule with its state (see there).

    Args:
        params: ``model.named_parameters()`` (recommended), parameters, or param groups.
        lr: learning rate (MeZO-scale: the update is ``lr`` times a sum of past ``g z``, about
            ``1 / (1 - momentum)`` times MeZO's step for the same lr).
        eps: perturbation scale.
        weight_decay: L2 term added to the gradient (torch SGD's ``weight_decay``).
        momentum: ``beta`` in [0, 1) (ZO-Bench: 0.9).
        q, one_sided, noise, seed, master_weights, shards: as :class:`~zoscale.optim.MeZO`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        momentum: float = 0.9,
        q: int = 1,
        one_sided: bool = False,
        noise: str = "gaussian",
        seed: int = 0,
        master_weights: bool = False,
        shards: ShardProvider | None = None,
    ) -> None:
        _check_momentum(momentum)
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, momentum=momentum, q=q, one_sided=one_sided,
                        noise=noise, seed=seed, master_weights=master_weights)
        super().__init__(params, defaults, shards)

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        ZOOptimizer._validate_group(group)
        _check_momentum(group["momentum"])

    def _begin_update(self, e: ShardEntry, group: dict[str, Any], lr: float) -> bool:
        first = "momentum_buffer" not in e.state
        if first:  # torch: buf = clone(grad) on the first step; filled chunk by chunk below
            local = e.view.local
            e.state["momentum_buffer"] = torch.empty(local.numel(), dtype=_acc(local.dtype), device=local.device)
        return first

    def _update_chunk(self, e: ShardEntry, group: dict[str, Any], ctx: bool, lr: float, param: torch.Tensor,
                      grad: torch.Tensor, lo: int, hi: int) -> None:
        # torch.optim.sgd._single_tensor_sgd, dampening 0, no nesterov.
        wd = group["weight_decay"]
        if wd != 0:
            grad = grad.add(param, alpha=wd)
        buf = e.state["momentum_buffer"][lo:hi]
        if ctx:
            buf.copy_(grad)
        else:
            buf.mul_(group["momentum"]).add_(grad, alpha=1)
        param.add_(buf, alpha=-lr)


class ZOAdam(_StatefulZO):
    r"""ZO-Adam: torch's Adam (or AdamW) fed the SPSA gradient ``g z``; moments sharded.

    .. math::
        d = g z\ (+\lambda\theta), \quad m \leftarrow \beta_1 m + (1-\beta_1) d, \quad
        v \leftarrow \beta_2 v + (1-\beta_2) d^2, \quad
        \theta \leftarrow \theta - \frac{\eta}{1-\beta_1^t}\,
            \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon_{adam}}

    exactly ``torch.optim.Adam(lr, betas, eps=adam_eps, weight_decay)`` (with
    ``decoupled_weight_decay=True``: ``torch.optim.AdamW``, ``theta <- (1 - lr wd) theta``
    first) with ``p.grad = g z``: the same ops in the same order, chunk by chunk. ``m``, ``v``
    (``self.state[p]["exp_avg"]``, ``["exp_avg_sq"]``, at least fp32) and the per-tensor step
    count ``["step"]`` live on the rank's shard: two extra shards of memory. Passes as
    :class:`ZOSGDMMT`.

    Adam normalises the step: the first update moves every element by ``lr`` (``m / sqrt(v)``
    is ``sign(g z)``), later ones by about ``lr |m| / sqrt(v) <= lr``, whatever the scale of
    ``g``. Since ``v`` is about ``g^2`` for every element (``z_i^2`` averages to 1), ZO-Adam
    moves like MeZO with ``lr_mezo = lr / rms(g)``: pick lr as a working MeZO lr times the
    typical ``|g|`` (the trainer logs ``g``). ZO-Bench (OPT-13B) uses 1e-5 .. 1e-4; on
    zoscale's default job (SmolLM2-135M, MeZO lr 5e-5, ``|g|`` ~ 5-30) lr 1e-3 took the
    held-out accuracy from 0.50 to 0.62 in 40 steps, while 1e-4 had not moved it after 30.

    Choices the paper leaves open, and departures:
        * ``eps`` is the SPSA perturbation (as in every zoscale optimizer); Adam's own epsilon
          is ``adam_eps``.
        * n-SPSA (``q > 1``): the ``q`` queries at theta_t are averaged into one gradient, then
          one Adam step (not ``q`` Adam steps).
        * The step log records each query's ``g`` and the group's lr; :meth:`replay` re-runs
          the rule with its state.

    Args:
        params: ``model.named_parameters()`` (recommended), parameters, or param groups.
        lr: learning rate (see above: ZO-Bench 1e-5 .. 1e-4; zoscale's default job 1e-3).
        eps: SPSA perturbation scale.
        weight_decay: L2 term added to the gradient (Adam), or decoupled decay (AdamW).
        betas: ``(beta1, beta2)``, each in [0, 1).
        adam_eps: Adam's denominator epsilon (torch's ``eps``), >= 0.
        decoupled_weight_decay: AdamW's decay instead of Adam's L2 term.
        q, one_sided, noise, seed, master_weights, shards: as :class:`~zoscale.optim.MeZO`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-5,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        betas: Sequence[float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        decoupled_weight_decay: bool = False,
        q: int = 1,
        one_sided: bool = False,
        noise: str = "gaussian",
        seed: int = 0,
        master_weights: bool = False,
        shards: ShardProvider | None = None,
    ) -> None:
        _check_adam(dict(betas=betas, adam_eps=adam_eps, decoupled_weight_decay=decoupled_weight_decay))
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, betas=tuple(float(b) for b in betas),
                        adam_eps=adam_eps, decoupled_weight_decay=decoupled_weight_decay, q=q,
                        one_sided=one_sided, noise=noise, seed=seed, master_weights=master_weights)
        super().__init__(params, defaults, shards)

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        ZOOptimizer._validate_group(group)
        _check_adam(group)

    def _begin_update(self, e: ShardEntry, group: dict[str, Any], lr: float) -> tuple[float, float]:
        st = e.state
        if "step" not in st:
            local = e.view.local
            st["step"] = 0
            st["exp_avg"] = torch.zeros(local.numel(), dtype=_acc(local.dtype), device=local.device)
            st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
        st["step"] += 1
        # torch.optim.adam._single_tensor_adam (not capturable): Python-float bias corrections.
        beta1, beta2 = group["betas"]
        step = float(st["step"])
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        return lr / bias_correction1, bias_correction2**0.5

    def _update_chunk(self, e: ShardEntry, group: dict[str, Any], ctx: tuple[float, float], lr: float,
                      param: torch.Tensor, grad: torch.Tensor, lo: int, hi: int) -> None:
        step_size, bias_correction2_sqrt = ctx
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        if wd != 0:
            if group["decoupled_weight_decay"]:
                param.mul_(1 - lr * wd)
            else:
                grad = grad.add(param, alpha=wd)
        exp_avg = e.state["exp_avg"][lo:hi]
        exp_avg_sq = e.state["exp_avg_sq"][lo:hi]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["adam_eps"])
        param.addcdiv_(exp_avg, denom, value=-step_size)


# ============================================================================ ZO-SGD-Cons
class ZOSGDCons(ZOOptimizer):
    r"""Conservative ZO-SGD: move only if a candidate lowers the loss on the step's batch.

    .. code-block:: text

        L0 = L(theta)                                  (an explicit forward: compared honestly)
        g  = SPSA estimate (2 forwards; q > 1: g_k for q queries, each at theta)
        d  = sum_k (g_k / q) z_k
        c- = (1 - lr wd) theta - lr d                  ZO-SGD's step   ("descent")
        c+ = (1 - lr wd) theta + lr d                  the opposite    ("ascent")
        theta <- argmin over {theta: L0, c-: L(c-), c+: L(c+)}   (ties keep theta, then c-)

    Because the estimate ``g`` is noisy, ``c+`` is sometimes the better point; keeping theta
    when neither candidate helps makes the loss on the step's batch non-increasing -- exactly,
    not up to rounding: the loss compared is the loss at the very bits the step leaves.

    Exactness. Moving theta -> candidate -> back by noise passes is not bitwise reversible in
    floating point, so every point of the step is written from an *anchor* holding theta
    exactly: ``cast(anchor * (1 - lr wd) + sum_k b_k z_k)``, the same eager chunked ops each
    time (so re-writing a candidate gives the same bits). The anchor is the fp32 master with
    ``master_weights=True`` (accepting a candidate then updates the master with those ops and
    writes the compute copy from it); without master weights it is a copy of the rank's local
    shards taken at the start of the step and freed at its end (transient: one shard in the
    compute dtype -- the price of the guarantee; use master weights to make it persistent
    instead). Either way the +-eps passes leave no drift.

    Cost per step (q = 1, two-sided): 5 forwards -- ``L(theta)``, ``L(theta +- eps z)``,
    ``L(c-)``, ``L(c+)`` -- (one-sided: 4, the estimate's ``L(theta)`` is reused), 2
    all-reduces (the SPSA pair; then ``[L0, L(c-), L(c+)]`` in one call), and 4-5 passes over
    the shards (2 perturbations, 2 candidates, then re-writing ``c-`` or theta unless ``c+``
    was kept, or one master update).

    Choices the paper leaves open, and departures:
        * Weight decay is part of both candidate moves (torch SGD with ``weight_decay`` fed
          ``+-g z``, as ZO-Bench's optimizer does); keeping theta applies none. The comparison
          is on the closure's loss (without the L2 term).
        * A candidate whose (rank-averaged) loss is NaN/inf is never chosen; a non-finite
          ``L(theta)`` or SPSA loss raises :class:`~zoscale.optim.NonFiniteLossError` with the
          parameters restored bitwise.
        * ``q > 1``: all queries at theta, one candidate pair along their average.
        * The losses are means over the data-parallel group, so the guarantee is for the
          global batch.
        * :meth:`step` returns ``L(theta)`` (the exact loss before the step). Each step-log
          record also has ``"choice"`` (``"keep"``, ``"descent"``, ``"ascent"``) and
          ``"cons_losses"`` ``[L0, L(c-), L(c+)]``; :meth:`replay` applies the chosen move.

    Args:
        params: ``model.named_parameters()`` (recommended), parameters, or param groups.
        lr: learning rate: the candidates are ``-+ lr g z`` from theta (MeZO-scale).
        eps, weight_decay, q, one_sided, noise, seed, master_weights, shards: as
            :class:`~zoscale.optim.MeZO`.
    """

    #: Elements per chunk of the candidate passes.
    chunk_size: int = CHUNK

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        q: int = 1,
        one_sided: bool = False,
        noise: str = "gaussian",
        seed: int = 0,
        master_weights: bool = False,
        shards: ShardProvider | None = None,
    ) -> None:
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, q=q, one_sided=one_sided, noise=noise,
                        seed=seed, master_weights=master_weights)
        super().__init__(params, defaults, shards)

    # ----------------------------------------------------------------- passes
    def _moves(self, queries: list[Query], lrs: list[float], sign: float) -> list[tuple[float, list[float]]]:
        """Per group: ``(a, [b_k])`` of the candidate ``a theta + sum_k b_k z_k``."""
        q = len(queries)
        return [(1.0 - lr * g["weight_decay"], [sign * lr * grads[gi] / q for _, grads in queries])
                for gi, (lr, g) in enumerate(zip(lrs, self.param_groups))]

    def _point(self, anchor: torch.Tensor, e: ShardEntry, lo: int, hi: int, keys: list[int],
               move: tuple[float, list[float]]) -> torch.Tensor:
        """``anchor * a + sum_k b_k z_k`` on ``[lo, hi)``, in at least fp32 (one function for
        every write of a candidate, so the same candidate always has the same bits)."""
        kind = self.param_groups[0]["noise"]
        acc = _acc(anchor.dtype)
        a, bs = move
        out = anchor[lo:hi].to(acc) * a
        for key, b in zip(keys, bs):
            out.add_(noise.generate(e.view.offset + lo, hi - lo, key, kind, device=anchor.device).to(acc), alpha=b)
        return out

    def _write(self, entries: list[ShardEntry], anchors: list[torch.Tensor], queries: list[Query] | None,
               moves: list[tuple[float, list[float]]] | None) -> None:
        """Compute copy <- theta (``moves`` None) or <- the candidate; the anchors are untouched."""
        for i, (e, anchor) in enumerate(zip(entries, anchors)):
            v = e.view
            if moves is None or queries is None:
                v.local.copy_(anchor)
            else:
                keys = [qk[i] for qk, _ in queries]
                for lo, hi in _spans(v.local.numel(), self.chunk_size):
                    v.local[lo:hi].copy_(self._point(anchor, e, lo, hi, keys, moves[e.group_index]))
            _written(v)

    def _commit(self, entries: list[ShardEntry], queries: list[Query], moves: list[tuple[float, list[float]]]) -> None:
        """Master weights: master <- the candidate, compute copy <- cast(master)."""
        for i, e in enumerate(entries):
            v, master = e.view, e.state["master"]
            keys = [qk[i] for qk, _ in queries]
            for lo, hi in _spans(v.local.numel(), self.chunk_size):
                new = self._point(master, e, lo, hi, keys, moves[e.group_index])
                master[lo:hi].copy_(new)
                v.local[lo:hi].copy_(new)
            _written(v)

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        """Take one conservative step.

        Args:
            closure: runs the forward pass on this rank's micro-batch and returns its mean loss.
                Called ``2 q + 3`` times two-sided, ``2 q + 2`` one-sided.

        Returns:
            ``L(theta)`` before the step, averaged over ranks (after the step the loss on this
            batch is at most that).

        Raises:
            ValueError: no closure.
            NonFiniteLossError: ``L(theta)`` or an SPSA loss was NaN/inf; the parameters are
                restored bitwise, nothing is logged and the step counter does not advance.
        """
        if closure is None:
            raise ValueError("ZOSGDCons.step requires a closure that returns the mean loss of this rank's micro-batch")
        self._begin_step()
        try:
            return self._step(closure)
        finally:
            self._end_step()

    def _step(self, closure: Closure) -> float:
        groups = self.param_groups
        step, q = self._zo["step"], groups[0]["q"]
        one_sided, masters = groups[0]["one_sided"], groups[0]["master_weights"]
        entries = self._select(self._entries(), step)
        self._ensure_masters(entries)
        if masters:
            anchors = [e.state["master"] for e in entries]
        else:
            anchors = self._timed("perturb", lambda: [e.view.local.detach().clone() for e in entries])
        device = entries[0].view.local.device if entries else torch.device("cpu")
        restore = lambda: self._timed("perturb", self._write, entries, anchors, None, None)  # noqa: E731

        l0 = None if one_sided else self._call(closure)
        queries: list[Query] = []
        pairs: list[tuple[float, float]] = []
        for k in range(q):
            try:
                keys, grads, losses, _ = self._spsa_estimate(closure, entries, step, k)
            except NonFiniteLossError:
                restore()  # bitwise, whatever the estimate's own restore left
                raise
            queries.append((keys, grads))
            pairs.append(losses)
            if k < q - 1:
                restore()
        lrs = [g["lr"] for g in groups]
        moves = {s: self._moves(queries, lrs, s) for s in (-1.0, 1.0)}
        cand = []
        for s in (-1.0, 1.0):
            self._timed("update", self._write, entries, anchors, queries, moves[s])
            cand.append(self._call(closure))
        if one_sided:
            loss0 = pairs[0][1]  # L(theta), already averaged over ranks
            l_desc, l_asc = self._timed("communication", self._mean_over_ranks, cand, device)
        else:
            loss0, l_desc, l_asc = self._timed("communication", self._mean_over_ranks, [l0, *cand], device)
        if not math.isfinite(loss0):
            restore()
            self._zo["nonfinite"] += 1
            raise NonFiniteLossError(step, 0, (loss0, l_desc, l_asc))

        choice, best = "keep", loss0
        if math.isfinite(l_desc) and l_desc < best:
            choice, best = "descent", l_desc
        if math.isfinite(l_asc) and l_asc < best:
            choice, best = "ascent", l_asc
        if choice == "keep":
            restore()
        elif masters:
            self._timed("update", self._commit, entries, queries, moves[-1.0 if choice == "descent" else 1.0])
        elif choice == "descent":  # c+ was written last; c- again, from the same anchor
            self._timed("update", self._write, entries, anchors, queries, moves[-1.0])
        for k, ((_, grads), losses) in enumerate(zip(queries, pairs)):
            self._log(step, k, grads, 1.0, losses)
            self._zo["log"][-1].update(choice=choice, cons_losses=[loss0, l_desc, l_asc])
        self._zo["step"] = step + 1
        return loss0

    @torch.no_grad()
    def replay(self, log: list[dict[str, Any]]) -> None:
        """Apply the moves recorded in a step log to this optimizer's (base) parameters.

        As :meth:`ZOOptimizer.replay` (any log, onto weights with the run's param groups; no
        forward pass): each step's recorded ``"choice"`` is applied with the logged lr. The run
        wrote every accepted point from an exact anchor, so the replay is bitwise, with or
        without master weights.
        """
        steps = _by_step(log, len(self.param_groups))
        for recs in steps:
            if recs[0].get("choice") not in ("keep", "descent", "ascent"):
                raise ValueError(f"log record for step {recs[0]['step']} has no conservative choice: "
                                 "it was not written by ZOSGDCons")
        all_entries = self._entries()
        self._ensure_masters(all_entries)
        masters = self.param_groups[0]["master_weights"]
        for recs in steps:
            if recs[0]["choice"] == "keep":
                continue
            entries = self._select(all_entries, recs[0]["step"])
            queries = [(k, r["grad"]) for k, r in zip(_query_keys(recs, entries), recs)]
            moves = self._moves(queries, list(recs[0]["lr"]), -1.0 if recs[0]["choice"] == "descent" else 1.0)
            if masters:
                self._commit(entries, queries, moves)
            else:
                self._write(entries, [e.view.local for e in entries], queries, moves)
