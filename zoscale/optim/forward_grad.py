"""Forward-Grad: SGD along a random direction scaled by the exact directional derivative.

ZO-Bench (Zhang et al., 2024, arXiv 2402.11592) benchmarks it as the BP-free method between
ZO and first order; the estimator is from "Gradients without Backpropagation" (Baydin et al.,
2022, arXiv 2202.08587).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from zoscale import noise
from zoscale.optim import options as opts
from zoscale.optim.base import NonFiniteLossError, ZOOptimizer
from zoscale.optim.registry import register
from zoscale.optim.replay import replay_updates
from zoscale.optim.schedules import Averaged
from zoscale.shards import ShardProvider

__all__ = ["ForwardGrad"]

# The root name under which the model is reparametrised (see _Caller).
_ROOT = "model"


class _Caller(torch.nn.Module):
    """Holds the model so that ``functional_call`` can swap dual tensors into it around an
    opaque closure: ``functional_call(_Caller(model), duals, (closure,))`` runs ``closure()``
    while ``model``'s parameters are the duals, and puts the originals back afterwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.add_module(_ROOT, model)

    def forward(self, closure: Callable[[], Any]) -> Any:
        return closure()


class _ContiguousLinearInputs(TorchFunctionMode):
    """Make a non-contiguous batched input of ``F.linear`` contiguous during the JVP.

    Under forward-mode AD, ``linear`` on a non-contiguous 3-D input (transformers'
    ``logits_to_keep=1`` slices ``hidden[:, -1:]``) is not folded into one matrix product: the
    weight is expanded per batch element and multiplied by ``bmm``, for the primal and both
    tangent terms. For SmolLM2's 49152 x 576 head that made the JVP ~2x slower (measured on CPU:
    1.7 s -> 0.8 s for a 2-layer model, batch 16). The copy is of one activation, and the
    result is the same product.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is F.linear and args and args[0].dim() > 2 and not args[0].is_contiguous():
            args = (args[0].contiguous(), *args[1:])
        return func(*args, **(kwargs or {}))


@register("forward_grad")
class ForwardGrad(ZOOptimizer):
    r"""Forward-gradient SGD: one forward-mode JVP per query, no backward pass.

    .. math::
        d_k = \nabla L(\theta)\cdot v_k, \qquad
        \theta \leftarrow \theta - \frac{\eta}{q}\sum_{k=0}^{q-1}\big(d_k v_k + \lambda\theta\big)

    Pseudo-code of one step (``t`` the step counter)::

        for k in 0..q-1:                                   (all queries at theta_t)
            v_k = noise(seed, t, k, tensor id)             (one tangent per trainable tensor)
            with dual tensors theta + v_k * dtheta swapped into the module:
                loss, d_k = closure()                      (primal and tangent of the loss)
            [loss, d_k] <- all_reduce_mean([loss, d_k])    (one all-reduce of 2 floats)
            drop the tangents
        for k in 0..q-1:                                   (one fused pass per query)
            theta <- (1 - lr/q wd) theta - lr/q d_k v_k    (v_k regenerated, never stored)

    ``d_k`` is the exact directional derivative (no finite difference, no ``eps``): ``d_k v_k``
    is an unbiased gradient estimate with ``E|d v - g|^2 = (n + 1)|g|^2`` for Gaussian ``v`` in
    ``n`` dimensions (``(n - 1)|g|^2`` for Rademacher): the variance of SPSA's ``eps -> 0`` limit.
    The JVP runs the closure with forward-mode AD (``torch.autograd.forward_ad``): the trainable
    parameters are replaced, for the duration of the closure, by dual tensors whose primal is the
    parameter itself (a view, no copy) and whose tangent is ``v_k``, through
    ``torch.func.functional_call`` (which also keeps tied weights tied). The loss the closure
    returns carries ``d_k`` as its tangent.

    Memory: the tangents are one buffer the size of the trainable parameters (in their dtype),
    alive only during the JVP; the forward carries a tangent next to every activation (about
    twice an inference forward's activation memory), and stores nothing for a backward.
    MeZO needs neither. Cost: a linear layer's JVP does three matrix products instead of one;
    measured on a loaded 2-core CPU a step was ~3x a plain forward (noisy; MeZO: 2 forwards)
    (benchmarks/bench_forward_grad_blockwise.py).

    Choices the paper (and ZO-Bench's code, which asserts ``q == 1``) leave open:
        * ``q > 1``: every query is evaluated at ``theta_t`` and the ``q`` updates are applied
          after the last JVP (forward-grad never perturbs the weights, so this is free, unlike
          n-SPSA in the base class). A non-finite loss or ``d`` therefore aborts the step with
          the parameters untouched.
        * Weight decay applies to every trainable tensor (ZO-Bench skips names containing
          "bias"/"layer_norm"); use param groups to exempt tensors.
        * The JVP forward runs with the math SDPA backend (``sdpa_kernel(SDPBackend.MATH)``):
          the fused attention kernels have no forward-AD formula. Attention then materialises
          its score matrix, as eager attention does. A non-contiguous batched input of a linear
          layer is made contiguous during the JVP (``_ContiguousLinearInputs``: torch's forward-AD
          path would otherwise expand the weight per batch element, 2x slower on the default
          job's last-token head).
        * The noise is the run's kind (``gaussian`` or ``rademacher``), as for every zoscale
          optimizer. The tangent is rounded to the parameter's dtype; the update regenerates
          ``v`` in fp32, so for bf16 parameters the applied direction and the measured one
          differ by that rounding (relative 2^-9).

    Step log: one record per query, ``grad`` = ``[d_k]`` for every group (the directional
    derivative is along the whole ``v_k``), ``lr`` = ``lr / q`` per group, ``loss`` = ``[loss]``
    (one evaluation). :meth:`replay` reproduces the run bitwise, with or without master weights
    (there is no +-eps round trip: the run's update pass and the replay's are the same pass).

    Engines: one process, or data-parallel replicas (every rank a full copy, the pair
    ``[loss, d]`` averaged over the loss group, the replicas stay identical). Not DeepSpeed
    ZeRO-3 or FSDP2: their forward hooks all-gather shards into plain tensors (ZeRO-3 into
    ``p.data``, FSDP2 into new unsharded parameters) and use those, so the dual tensors swapped
    into the module would be bypassed and no tangent would reach the loss; and a tangent
    would have to be materialised full-size on every rank. Construction raises ``ValueError``.

    Args:
        params: ``model.named_parameters()`` (recommended), parameters, or param groups.
        lr: learning rate.
        weight_decay: L2 term ``lambda`` above.
        module: the model whose forward the closure runs (``engine.module``); required. Every
            optimised parameter must be one of its parameters.
        q: JVPs (directions) per step, averaged.
        noise: ``"gaussian"`` (the paper) or ``"rademacher"``.
        seed: run seed; must be the same on every rank.
        master_weights: keep an fp32 copy of every trainable tensor (for bf16/fp16 models).
        shards: shard provider (default: every parameter local). Must give replica views.

    Raises:
        ValueError: invalid hyperparameters, ``eps`` or ``one_sided`` given (there is no
            finite difference), no ``module``, a parameter that is not the module's, or
            parameters sharded by DeepSpeed ZeRO-3, FSDP2 or any provider whose views are not
            full replicas; all before any parameter is touched.

    Example:
        >>> opt = ForwardGrad(model.named_parameters(), lr=1e-5, module=model)
        >>> loss = opt.step(lambda: loss_fn(model(batch)))
    """

    OPTIONS = (opts.LR, opts.WEIGHT_DECAY, opts.Q, opts.NOISE, opts.SEED, opts.MASTER_WEIGHTS)
    schedule = Averaged()
    #: ``build_optimizer`` hands it the model (``module``).
    NEEDS_MODULE = True

    def __init__(self, params: Iterable[Any], *, module: torch.nn.Module | None = None,
                 shards: ShardProvider | None = None, **options: Any) -> None:
        super().__init__(params, shards=shards, **options)
        if not isinstance(module, torch.nn.Module):
            raise ValueError(
                f"Invalid module: {module!r} (ForwardGrad runs the closure with dual tensors swapped into the "
                "model and needs it: pass module=model, or module=engine.module under an engine)"
            )
        self._check_engine()
        self.module = module
        self._module_names()  # every optimised parameter must be the module's

    # ----------------------------------------------------------------- validation
    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Validate constructor options without the model (a config check before loading it).

        Builds the optimizer on a one-weight probe module, so names and values are checked as
        the constructor checks them; ``module`` and ``shards`` come from the engine, not a config.

        Raises:
            ValueError: an unknown or invalid option, named.
        """
        unknown = opts.unknown_options(cls.OPTIONS, options)
        if unknown:
            raise ValueError(f"Unknown parameter(s) {unknown} for optimizer 'forward_grad'; accepted: "
                             f"{cls.accepted_options()}")
        probe = torch.nn.Linear(1, 1, bias=False)
        cls(probe.named_parameters(), module=probe, **options)

    def _validate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        for key in ("eps", "one_sided"):
            if key in group:
                raise ValueError(
                    f"Invalid {key}: {group[key]!r} (ForwardGrad computes the directional derivative exactly "
                    f"with forward-mode AD; it has no {key})"
                )
        return super()._validate_group(group)

    _REFUSED = {
        "deepspeed": ("is DeepSpeed ZeRO-3 (partitioned parameters). ForwardGrad cannot run on ZeRO-3: its "
                      "forward hooks gather the partitions into plain tensors, which bypass the dual tensors "
                      "forward-mode AD needs. Use ZeRO stage 0-2 (replicas) or an SPSA optimizer (MeZO, LeZO, "
                      "BlockwiseZO) on ZeRO-3"),
        "fsdp": ("gives FSDP2 DTensor shards. ForwardGrad cannot run on FSDP2: its forward hooks all-gather the "
                 "shards into new unsharded parameters, which bypass the dual tensors forward-mode AD needs. Use "
                 "data-parallel replicas or an SPSA optimizer (MeZO, LeZO, BlockwiseZO) on FSDP2"),
    }

    def _check_provider(self, provider: ShardProvider) -> None:
        """Refuse a provider whose parameters are not whole (its capabilities say so; no view is asked)."""
        caps = getattr(provider, "capabilities", None)
        if caps is not None and not caps.whole_parameters:
            why = self._REFUSED.get(caps.engine, "gives sharded parameters. ForwardGrad needs every rank to hold "
                                                 "its parameters whole (one process or data-parallel replicas)")
            raise ValueError(f"Invalid shards: the shard provider {type(provider).__name__} ({caps.engine}) {why}")

    def _check_engine(self) -> None:
        """Reject a provider without whole parameters, then any view that is not the whole parameter."""
        self._check_provider(self.shards)
        for e in self._entries():
            v = e.view
            if not v.replicated or v.local.numel() != v.numel or v.local.data_ptr() != e.param.data_ptr():
                raise ValueError(
                    f"Invalid shards: {type(self.shards).__name__} gives parameter {e.stable_id!r} a sharded "
                    "view. ForwardGrad needs every rank to hold its parameters whole (one process or "
                    "data-parallel replicas): forward-mode AD differentiates the module's own tensors"
                )

    def _module_names(self) -> dict[int, str]:
        """``id(param) -> name in the module`` for every trainable optimised parameter."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.requires_grad and id(p) not in names:
                    raise ValueError(
                        f"Invalid module: parameter {self._stable_id(group, i, p)!r} (shape {tuple(p.shape)}) is "
                        "not a parameter of the module given to ForwardGrad; build the optimizer on "
                        "module.named_parameters()"
                    )
        return names

    # ----------------------------------------------------------------- the JVP
    def _tangents(self, dirs: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Dual tensors (primal: the parameter, tangent: ``v``) keyed by name under the caller."""
        names = self._module_names()
        duals = {}
        for d in dirs:
            p = d.entry.param  # a replica view (checked): offset 0, every element
            v = d.values(0, d.entry.view.local.numel()).to(p.dtype).view(p.shape)
            duals[f"{_ROOT}.{names[id(p)]}"] = fwAD.make_dual(p.detach(), v)
        return duals

    def _jvp(self, closure: Callable[[], Any], dirs: Sequence[Any]) -> tuple[Any, Any]:
        """Run the closure with the tangents ``v``; return (loss, d) on this rank."""
        with fwAD.dual_level():
            duals = self.timed("perturb", self._tangents, dirs)
            with sdpa_kernel([SDPBackend.MATH]), _ContiguousLinearInputs():
                loss = self.call(lambda: functional_call(_Caller(self.module), duals, (closure,),
                                                          tie_weights=True, strict=False))
            if not isinstance(loss, torch.Tensor):
                raise ValueError(f"the closure returned {type(loss).__name__}; ForwardGrad needs the loss tensor")
            primal, tangent = fwAD.unpack_dual(loss)
            if tangent is None:
                raise ValueError(
                    "the closure's loss carries no tangent: it must compute the loss from the module's "
                    "parameters without detaching it (no .item(), no torch.inference_mode())"
                )
            return primal.detach().reshape(()), tangent.detach().reshape(())

    # ----------------------------------------------------------------- the estimate
    def estimate(self, closure: Callable[[], Any], dirs: Sequence[Any], step: int,
                 query: int) -> tuple[list[float], tuple[float, ...], None]:
        """The exact directional derivative ``d`` by one JVP: ``([d] per group, (loss,), None)``.

        Nothing is perturbed (offset ``None``: the weights stay at theta). A non-finite loss or
        ``d`` raises :class:`NonFiniteLossError` before anything of the step is applied.
        """
        device = dirs[0].entry.view.local.device if dirs else torch.device("cpu")
        loss, d = self._jvp(closure, dirs)
        loss, d = self.timed("communication", self.mean_over_ranks, [loss, d], device)
        if not (math.isfinite(loss) and math.isfinite(d)):
            self._zo["nonfinite"] += 1
            raise NonFiniteLossError(step, query, (loss, d))
        return [d] * len(self.param_groups), (loss,), None

    @torch.no_grad()
    def replay(self, log: list[dict[str, Any]]) -> None:
        """Apply the logged updates ``theta <- (1 - lr wd) theta - lr d v`` (a JVP needs real
        forwards; Forward-Grad perturbs nothing, so applying the updates is the run, bitwise)."""
        replay_updates(self, self._steps_of(log))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> float:  # type: ignore[override]
        """Take one forward-gradient step.

        Args:
            closure: runs the forward pass on this rank's micro-batch through ``module`` and
                returns its mean loss as a tensor. Called ``q`` times, under ``torch.no_grad()``
                and forward-mode AD.

        Returns:
            The loss at the current point, averaged over queries and ranks.

        Raises:
            ValueError: no closure, or a loss without a tangent.
            NonFiniteLossError: a loss or directional derivative was NaN/inf; nothing was
                updated and the step counter did not advance.
        """
        self._closure_required(closure)
        # Again here: an instance handed to an engine after construction (zero3_engine's
        # optimizer=) sees its parameters partitioned only now.
        self._check_engine()
        return super().step(closure)
