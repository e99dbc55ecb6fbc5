"""Update rules: the math of a step, as plain functions (as ``torch/optim/sgd.py`` keeps its in
``_single_tensor_sgd``).

The SGD family is a pair of scalars per group, ``(lr, g, group) -> (decay, coef)`` (the group
holds the rule's own options), applied by a direction's fused restore + update
pass (``theta <- decay theta + coef d``); the stateful rules run torch's own ops on one chunk of a
shard, its gradient ``sum_k (g_k / q) z_k`` and its state, so a run equals torch's optimizer fed
``p.grad = g z``. ``zoscale.optim.updates`` applies them to a step's directions.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["sgd", "sign_sgd", "momentum_sgd_", "adam_", "adam_scalars", "conservative_choice"]


def sgd(lr: float, g: float, group: dict[str, Any]) -> tuple[float, float]:
    """ZO-SGD (MeZO): ``theta <- (1 - lr wd) theta - lr g z``; returns ``(decay, coef)``."""
    return 1.0 - lr * group["weight_decay"], -lr * g


def sign_sgd(lr: float, g: float, group: dict[str, Any]) -> tuple[float, float]:
    """ZO-SignSGD: ``theta <- (1 - lr wd) theta - lr sign(g) z`` (``sign(0) = 0``)."""
    return sgd(lr, 0.0 if g == 0 else math.copysign(1.0, g), group)


def momentum_sgd_(param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, first: bool, lr: float,
                  momentum: float, weight_decay: float) -> None:
    """``torch.optim.sgd._single_tensor_sgd`` (dampening 0, no nesterov) on one chunk, in place.

    ``first``: the buffer is new (torch: ``buf = clone(grad)``).
    """
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if first:
        buf.copy_(grad)
    else:
        buf.mul_(momentum).add_(grad, alpha=1)
    param.add_(buf, alpha=-lr)


def adam_scalars(step: int, lr: float, betas: tuple[float, float]) -> tuple[float, float]:
    """``(step_size, sqrt(bias_correction2))`` of torch's non-capturable Adam at ``step`` (1-based)."""
    beta1, beta2 = betas
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2 = 1 - beta2 ** float(step)
    return lr / bias_correction1, bias_correction2**0.5


def adam_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
          scalars: tuple[float, float], group: dict[str, Any], lr: float) -> None:
    """``torch.optim.adam._single_tensor_adam`` (Adam, or AdamW's decay) on one chunk, in place."""
    step_size, bias_correction2_sqrt = scalars
    beta1, beta2 = group["betas"]
    wd = group["weight_decay"]
    if wd != 0:
        if group["decoupled_weight_decay"]:
            param.mul_(1 - lr * wd)
        else:
            grad = grad.add(param, alpha=wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["adam_eps"])
    param.addcdiv_(exp_avg, denom, value=-step_size)


def conservative_choice(loss0: float, descent: float, ascent: float) -> str:
    """ZO-SGD-Cons: the point with the lowest finite loss, ``"keep"`` on ties, then ``"descent"``."""
    choice, best = "keep", loss0
    if math.isfinite(descent) and descent < best:
        choice, best = "descent", descent
    if math.isfinite(ascent) and ascent < best:
        choice = "ascent"
    return choice
