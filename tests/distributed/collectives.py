"""Count the collectives a rank issues: which, on what tensor, over which group, inside a forward or not.

The distributed tests assert an optimizer's traffic (one all-reduce of the loss pair per query,
FSDP2's all-gathers inside the forwards only, ...) and benchmarks/bench_scaling.py counts its bytes
per step; both use :class:`Collectives`. It wraps the functions on the ``torch.distributed``
module, which FSDP2 and DeepSpeed look up at call time (``dist.all_gather_into_tensor`` in
``fsdp/_fully_shard/_fsdp_collectives.py``), so replacing the module's attributes sees their
calls. With ``deepspeed=True`` it also wraps ``deepspeed.comm`` and DeepSpeed's TorchBackend: the
backend caches ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` when it starts
(``comm/torch.py``, ``get_all_gather_function``), so ZeRO-3's parameter all-gathers only show up
as ``ds.allgather_fn`` and ``backend.all_gather_function``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

# Every collective of torch.distributed and deepspeed.comm (a name missing from one is skipped).
NAMES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_single",
         "all_gather_coalesced", "all_gather_object", "reduce_scatter", "reduce_scatter_tensor",
         "reduce_scatter_single", "_reduce_scatter_base", "all_to_all", "all_to_all_single", "send", "recv", "isend",
         "irecv", "barrier", "reduce", "gather", "scatter", "broadcast_object_list", "allgather_fn",
         "reduce_scatter_fn")
BACKEND_NAMES = ("all_gather_function", "reduce_scatter_function")


@dataclass
class Call:
    """One recorded call."""

    name: str  # the function's name: "all_reduce", "allgather_fn", ...
    origin: str  # where it was wrapped: "torch" (torch.distributed), "ds" (deepspeed.comm) or "backend"
    shape: tuple[int, ...]  # the first tensor argument's shape; () if none
    nbytes: int  # the largest tensor (or list of tensors) among the arguments
    group: Any  # the process group argument; None for the default group
    forward: int | None  # which closure() it ran inside (see Collectives.closure); None: outside all

    @property
    def qualified(self) -> str:
        return f"{self.origin}.{self.name}"

    @property
    def ranks(self) -> tuple[int, ...]:
        """The group's global ranks (read while the group exists)."""
        return tuple(dist.get_process_group_ranks(self.group if self.group is not None else dist.group.WORLD))


def _tensors(args: tuple, kwargs: dict) -> list[Any]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)
            or isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a)]


def _nbytes(arg: Any) -> int:
    if isinstance(arg, torch.Tensor):
        return arg.numel() * arg.element_size()
    return sum(t.numel() * t.element_size() for t in arg)


def _group(args: tuple, kwargs: dict) -> Any:
    group = kwargs.get("group")
    return group if group is not None else next((a for a in args if isinstance(a, dist.ProcessGroup)), None)


class Collectives:
    """Records every call of ``names`` while active (a context manager), in ``calls``.

    ``closure(fn)`` marks what ``fn`` issues as forward traffic; ``optimizer`` is the rest, what
    the optimizer's step issued itself. ``outermost``: a wrapped function called inside another
    (deepspeed.comm's over torch.distributed's) is not recorded again.
    """

    def __init__(self, names: tuple[str, ...] = NAMES, deepspeed: bool = False, outermost: bool = False) -> None:
        self.calls: list[Call] = []
        self._names, self._deepspeed, self._outermost = names, deepspeed, outermost
        self._saved: list[tuple[Any, str, Any]] = []
        self._closures = 0
        self._forward: int | None = None
        self._depth = threading.local()

    def __enter__(self) -> "Collectives":
        for name in self._names:
            self._wrap(dist, name, "torch")
        if self._deepspeed:
            import deepspeed

            for name in self._names:
                self._wrap(deepspeed.comm, name, "ds")
            backend = deepspeed.comm.comm.cdb
            for name in BACKEND_NAMES if backend is not None else ():
                self._wrap(backend, name, "backend")
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()

    def _wrap(self, module: Any, name: str, origin: str) -> None:
        original = getattr(module, name, None)
        if original is None or getattr(original, "_counted", False):
            return

        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._depth, "n", 0)
            if depth == 0 or not self._outermost:
                self._record(name, origin, args, kwargs)
            self._depth.n = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth.n = depth

        counted._counted = True  # type: ignore[attr-defined]
        self._saved.append((module, name, original))
        setattr(module, name, counted)

    def _record(self, name: str, origin: str, args: tuple, kwargs: dict) -> None:
        tensors = _tensors(args, kwargs)
        first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
        self.calls.append(Call(name, origin, tuple(first.shape) if first is not None else (),
                               max(map(_nbytes, tensors), default=0), _group(args, kwargs), self._forward))

    def closure(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn``, marking what it issues as forward traffic; each closure() gets its own index."""
        index = self._closures
        self._closures += 1

        def marked() -> Any:
            outer, self._forward = self._forward, index
            try:
                return fn()
            finally:
                self._forward = outer

        return marked

    @property
    def optimizer(self) -> list[Call]:
        """The calls made outside every closure."""
        return [c for c in self.calls if c.forward is None]

    @property
    def forward(self) -> list[Call]:
        """The calls made inside a closure."""
        return [c for c in self.calls if c.forward is not None]

    def forwards(self) -> list[list[Call]]:
        """The calls made inside each closure(), in the order the closures were made."""
        return [[c for c in self.calls if c.forward == i] for i in range(self._closures)]


def all_reduces() -> Collectives:
    """A counter of ``torch.distributed.all_reduce`` alone."""
    return Collectives(("all_reduce",))


def shapes(calls: list[Call]) -> list[tuple[int, ...]]:
    return [c.shape for c in calls]
