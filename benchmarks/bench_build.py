"""Per-rank host memory to build the real SmolLM2-135M on each engine, against the rank's shard.

For each ``--world`` (fresh gloo processes) and each way of building:

* ``fsdp_whole``: every rank loads the whole model (``from_pretrained``), then ``fully_shard``;
* ``fsdp_meta``: built on the meta device, ``fully_shard``, each rank reads its rows from the
  safetensors file (``zoscale.engines.meta_init``), what the trainer does for such a model;
* ``zero3_whole``: DeepSpeed ZeRO-3 through ``HfDeepSpeedConfig`` (``zero.Init`` partitions
  while ``from_pretrained`` loads the state dict on every rank);
* ``zero3_files``: built from the config under ``zero.Init``, each rank filling its partitions
  from the file (``partitioned_causal_lm``), what the trainer does for such a model;

it records the rank's build peak (``VmHWM`` growth from just before loading to the built engine,
after the high-water mark was reset; the modules the build needs are imported before, their
resident growth recorded apart as ``imports_mib``), what stays resident, and the rank's shard
bytes. JSON on
stdout::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_build.py --world 1 2 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _harness import free_port, progress, spawn_records  # noqa: E402
from bench_memory import proc_status_mib, shard_mib, trim_and_reset_hwm  # noqa: E402

MODEL = "smollm2-135m"
WAYS = ("fsdp_whole", "fsdp_meta", "zero3_whole", "zero3_files")
log = progress("bench_build")


def _build(way: str) -> Any:
    from zoscale.models import load_causal_lm, weights_folder

    if way == "fsdp_whole":
        from zoscale.engines import FSDPEngine

        return FSDPEngine(load_causal_lm(MODEL)[0])
    if way == "fsdp_meta":
        from zoscale.engines import FSDPEngine
        from zoscale.engines.meta_init import meta_causal_lm

        return FSDPEngine(meta_causal_lm(weights_folder(MODEL), torch.float32))
    from zoscale.engines.deepspeed import DeepSpeedBuilder

    builder = DeepSpeedBuilder({"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
                                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    if way == "zero3_files":
        return builder.build(builder.model_from_files(weights_folder(MODEL), torch.float32))
    with builder.loading():
        model = load_causal_lm(MODEL)[0]
    return builder.build(model)


def _worker(rank: int, world: int, port: int, way: str) -> dict[str, Any]:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    if way.startswith("zero3"):
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    import transformers  # noqa: F401  (imports before the baseline)

    import zoscale.engines  # noqa: F401

    try:
        # The modules the build imports, before the baseline too: zoscale.models alone (its model
        # classes pull in torch._dynamo, scipy, ...) adds ~133 MiB of resident code and data,
        # which is no part of the model and once counted as a "constant" in every way's peak.
        trim_and_reset_hwm()
        start = proc_status_mib("VmRSS")
        import zoscale.engines.deepspeed  # noqa: F401
        import zoscale.engines.meta_init  # noqa: F401
        import zoscale.models  # noqa: F401

        reset = trim_and_reset_hwm()
        before = proc_status_mib("VmRSS")
        imports = before - start
        engine = _build(way)
        peak, resident = proc_status_mib("VmHWM") - before, proc_status_mib("VmRSS") - before
        shard, n_params = shard_mib(engine.module)
        return {"way": way, "world": world, "rank": rank, "build_peak_rss_mib": round(peak, 1),
                "build_resident_mib": round(resident, 1), "shard_mib": round(shard, 1), "params": n_params,
                "imports_mib": round(imports, 1), "hwm_reset": reset}
    finally:
        gc.collect()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    args = parser.parse_args(argv)
    from zoscale.models import prepare_model

    prepare_model(MODEL)
    records = []
    for world in args.world:
        for way in args.ways:
            ranks = spawn_records(_worker, world, world, free_port(), way)
            log(f"{way} x {world}: peak {max(r['build_peak_rss_mib'] for r in ranks):.0f} MiB per rank, "
                f"shard {max(r['shard_mib'] for r in ranks):.0f} MiB")
            records.append({"way": way, "world": world,
                            "build_peak_rss_mib_max_rank": max(r["build_peak_rss_mib"] for r in ranks),
                            "shard_mib_max_rank": max(r["shard_mib"] for r in ranks), "ranks": ranks})
    out = {"model": MODEL, "records": records}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
