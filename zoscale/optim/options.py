"""The options of a ZO optimizer: one table per optimizer, one validator for all.

An optimizer declares its options as a tuple of :class:`Option` (``OPTIONS``); the constructor,
:meth:`~zoscale.optim.base.ZOOptimizer.add_param_group`, ``build_optimizer`` and the config check
that runs before a model is loaded all validate through :func:`validate`, so a wrong name or value
gets the same error everywhere (``Invalid sparsity: 1.0 (must be in [0, 1))``,
``Unknown parameter(s) ['sparsty'] for optimizer 'lezo'; accepted: [...]``).

Scope: a *global* option (``seed``, ``noise``, ``q``, ``sparsity``, ...) holds for the whole
optimizer; it lives in every param group, always with the optimizer's value, and a param group
that sets another value is refused. Every other option is per group (``lr``, ``eps``, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

from zoscale import noise

__all__ = ["Option", "validate", "unknown_options", "real", "integer", "boolean", "noise_kind", "betas",
           "SPSA_OPTIONS", "LR", "EPS", "WEIGHT_DECAY", "Q", "ONE_SIDED", "NOISE", "SEED", "MASTER_WEIGHTS",
           "TWO_PASS"]

#: A check: returns the value, normalised (``0.8`` for ``sparsity=0.8``), or raises ``ValueError``.
Check = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Option:
    """One option of an optimizer.

    Attributes:
        name: the keyword (and param-group key).
        default: its value when not given.
        check: validates and normalises a value (see the checks below).
        is_global: one value for the whole optimizer (see the module docstring).
    """

    name: str
    default: Any
    check: Check
    is_global: bool = False

    def with_default(self, default: Any) -> "Option":
        return replace(self, default=default)


def _invalid(label: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"Invalid {label}: {value!r} ({rule})")


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def real(low: float, *, low_open: bool = False, high: float | None = None, rule: str | None = None,
         label: str | None = None, to_float: bool = False) -> Check:
    """A finite number ``>= low`` (``> low`` with ``low_open``), ``< high`` if given."""
    if rule is None:
        rule = f"must be a finite number {'>' if low_open else '>='} {low:g}"
        if high is not None:
            rule = f"must be in [{low:g}, {high:g})"

    def check(name: str, value: Any) -> Any:
        ok = _is_real(value) and (value > low if low_open else value >= low) and (high is None or value < high)
        if not ok:
            raise _invalid(label or name, value, rule)
        return float(value) if to_float else value

    return check


def integer(low: int, rule: str | None = None) -> Check:
    """An integer (not a bool) ``>= low``."""

    def check(name: str, value: Any) -> Any:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise _invalid(name, value, rule or f"must be an integer >= {low}")
        return value

    return check


def any_integer(name: str, value: Any) -> Any:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _invalid(name, value, "must be an integer")
    return value


def boolean(name: str, value: Any) -> Any:
    if not isinstance(value, bool):
        raise _invalid(name, value, "must be True or False")
    return value


def noise_kind(name: str, value: Any) -> Any:
    noise.check_kind(value)
    return value


def betas(name: str, value: Any) -> Any:
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_real(b) and 0.0 <= b < 1.0 for b in value)
    if not ok:
        raise _invalid(name, value, "must be two numbers in [0, 1), e.g. (0.9, 0.999)")
    return tuple(float(b) for b in value)


LR = Option("lr", 1e-6, real(0.0, label="learning rate"))
EPS = Option("eps", 1e-3, real(0.0, low_open=True))
WEIGHT_DECAY = Option("weight_decay", 0.0, real(0.0))
Q = Option("q", 1, integer(1, "number of queries per step must be an integer >= 1"), is_global=True)
ONE_SIDED = Option("one_sided", False, boolean, is_global=True)
NOISE = Option("noise", "gaussian", noise_kind, is_global=True)
SEED = Option("seed", 0, any_integer, is_global=True)
MASTER_WEIGHTS = Option("master_weights", False, boolean, is_global=True)
TWO_PASS = Option("two_pass", False, boolean, is_global=True)

#: The options of every SPSA optimizer (MeZO's), in the order of its signature.
SPSA_OPTIONS: tuple[Option, ...] = (LR, EPS, WEIGHT_DECAY, Q, ONE_SIDED, NOISE, SEED, MASTER_WEIGHTS, TWO_PASS)


def unknown_options(spec: Iterable[Option], given: Iterable[str]) -> list[str]:
    names = {o.name for o in spec}
    return sorted(k for k in given if k not in names)


def validate(spec: Iterable[Option], values: dict[str, Any]) -> dict[str, Any]:
    """Check every option of ``spec`` present in ``values``; return them normalised (a new dict).

    Keys of ``values`` that are not options (``params``, ``param_names``) are passed through.
    """
    out = dict(values)
    for opt in spec:
        if opt.name in out:
            out[opt.name] = opt.check(opt.name, out[opt.name])
    return out
