"""Write a fine-tuned model from its base and its step log, on one process or any engine.

    python launch/replay.py --log runs/default/steps.jsonl --output_dir runs/replayed
    deepspeed --num_gpus 2 launch/replay.py --ds_config ds_configs/zero3_mezo.json \\
        --log runs/default/steps.jsonl --output_dir runs/replayed

The run's config comes from the log's header (``--config`` replaces it; ``key=value`` overrides
apply on top, e.g. ``model.name=/path/to/base``). Writes ``<output_dir>/final`` (a Hugging Face
folder, or a peft adapter folder), the same weights as the run's own ``final/``, bit for bit.
Everything else is ``zoscale.train.materialize``; this file only parses arguments.
"""

import os
import sys

_local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _local_world)))

import argparse  # noqa: E402
import functools  # noqa: E402
from pathlib import Path  # noqa: E402

from zoscale.engines.registry import engine_names  # noqa: E402
from zoscale.train.launch import run_cli  # noqa: E402
from zoscale.train.materialize import config_from_log, materialize  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", required=True, help="the run's step log (<run>/steps.jsonl)")
    parser.add_argument("--output_dir", required=True, help="where final/ goes")
    parser.add_argument("--config", help="JSON run configuration (default: the log header's)")
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", help="DeepSpeed JSON (engine: deepspeed)")
    parser.add_argument("--engine", choices=engine_names())
    parser.add_argument("--hsdp", help="FSDP2 hybrid sharding mesh REPLICAS,SHARDS")
    parser.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dist_timeout", type=float, default=None)
    parser.add_argument("--heartbeat_timeout", type=float, default=None)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.name=/path/to/base")
    args = parser.parse_intermixed_args(argv)
    log = Path(args.log)
    try:
        if args.config is None:
            args.config = str(config_from_log(log, Path(args.output_dir), args.ds_config is not None))
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    return run_cli(parser, args, functools.partial(materialize, log=log))


if __name__ == "__main__":
    sys.exit(main())
