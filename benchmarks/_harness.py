"""What the benchmark scripts share: progress lines, a free port, and measurements in fresh processes.

Every script prints its JSON result on stdout and its progress on stderr (``progress``). A
measurement that must own its process (its peak RSS, its gloo ranks) runs in fresh ``spawn``
processes: ``spawn_records`` starts them and returns the record each one's function returned.
``free_port`` is tests/distributed/spawn.py's, so that tests and benchmarks share one copy.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for tests.distributed (zoscale is installed)

from tests.distributed.spawn import free_port  # noqa: E402

__all__ = ["free_port", "progress", "spawn_records"]


def progress(script: str) -> Callable[[str], None]:
    """A ``log(msg)`` that writes ``[script HH:MM:SS] msg`` to stderr (stdout carries only the JSON)."""

    def log(msg: str) -> None:
        print(f"[{script} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


def spawn_records(fn: Callable[..., dict[str, Any]], nprocs: int, *args: Any) -> list[dict[str, Any]]:
    """Run ``fn(index, *args)`` in ``nprocs`` fresh processes; the dicts they return, by index.

    ``fn`` must be a module-level function and its record JSON-serialisable (it comes back
    through a file). A process that raises fails the call (``torch.multiprocessing.spawn``).
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="zoscale_bench_") as out:
        mp.spawn(_write_record, args=(fn, out, args), nprocs=nprocs, join=True)
        return [json.loads((Path(out) / f"{i}.json").read_text()) for i in range(nprocs)]


def _write_record(index: int, fn: Callable[..., dict[str, Any]], out: str, args: tuple) -> None:
    (Path(out) / f"{index}.json").write_text(json.dumps(fn(index, *args)))
