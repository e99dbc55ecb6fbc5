"""Peak torch tensor bytes allocated while a function runs, from the profiler's memory events.

Shared by the planner's validation (``test_plan.py``) and ``benchmarks/bench_memory.py``: the peak
of live tensor bytes allocated during ``fn()`` over those alive before it (what a GPU's
``max_memory_allocated`` minus the memory before would show).
"""

from __future__ import annotations

from typing import Any, Callable


def tensor_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of live torch CPU tensor bytes allocated during ``fn()`` (torch.profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Raw kineto records: every allocation/free (prof.events() folds those made inside ops
    # into the ops' inclusive totals).
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
