"""Fine-tune a causal LM with a zeroth-order optimizer.

    python launch/train.py                                            # default job, one process
    deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero3_mezo.json
    torchrun --nproc_per_node 2 launch/train.py                       # data-parallel replicas
    torchrun --nproc_per_node 2 launch/train.py --engine fsdp --ds_config ds_configs/zero3_mezo.json
    torchrun --nproc_per_node 4 launch/train.py --engine fsdp --hsdp 2,2 --ds_config ds_configs/zero3_mezo.json
    accelerate launch --config_file launch/accelerate_zero3.yaml launch/train.py
    python launch/train.py --config run.json steps=500 optimizer.params.lr=1e-5

With ``--ds_config`` the DeepSpeed JSON names the optimizer (its "optimizer" section), the
per-rank micro-batch (train_micro_batch_size_per_gpu) and the precision (bf16 / fp16).
Everything else is ``zoscale.train``; this file only parses arguments and starts the processes.
"""

import os
import sys

# Before torch is imported: one OpenMP pool per rank, sized to this machine's share.
_local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _local_world)))

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import signal  # noqa: E402

from zoscale.engines.registry import engine_names  # noqa: E402
from zoscale.train.launch import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    # `kill -USR2 <pid>` prints every thread's Python stack to stderr: where a hung rank waits.
    # (SIGUSR1 is SLURM's time-limit warning: a preemption request, zoscale.train.preemption.)
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON run configuration (fields: zoscale/train/config.py)")
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", help="DeepSpeed JSON (engine: deepspeed)")
    parser.add_argument("--engine", choices=engine_names(),
                        help="default: deepspeed with --ds_config, else local (one process or replicas)")
    parser.add_argument("--hsdp", help="FSDP2 hybrid sharding mesh REPLICAS,SHARDS (e.g. 2,2)")
    parser.add_argument("--model", help="local HF folder, hub name, smollm2-135m (default), tiny-llama, tiny-opt")
    parser.add_argument("--data", help="local JSONL/CSV with sentence,label (default: bundled Rotten Tomatoes)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--eval_every", type=int)
    parser.add_argument("--checkpoint_every", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output_dir")
    parser.add_argument("--report_to", help="jsonl (default; metrics.jsonl is always written), none, or "
                        "tensorboard: also event files in <output_dir>/tensorboard/")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in output_dir: its newest checkpoint, then its step log")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir that holds checkpoints (deletes them)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dist_timeout", type=float, default=None,
                        help="seconds before a collective gives up (default 600)")
    parser.add_argument("--heartbeat_timeout", type=float, default=None,
                        help="seconds of silence after which another rank counts as dead and this one exits "
                             "naming it, with code 75 (default 60; 0: no watchdog)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=200 data.n_eval=400")
    args = parser.parse_intermixed_args(argv)
    return run_cli(parser, args)


if __name__ == "__main__":
    sys.exit(main())
