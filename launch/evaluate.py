"""Score a saved model or peft adapter on a task, without training, on one process or any engine.

    python launch/evaluate.py --model runs/default/final                       # the default job's task
    python launch/evaluate.py --model runs/rte/final data.task=rte data.path=RTE/ data.predictions=true
    python launch/evaluate.py --model smollm2-135m --adapter runs/lora/final data.task=tweets
    deepspeed --num_gpus 2 launch/evaluate.py --ds_config ds_configs/zero3_mezo.json --model runs/x/final

The held-out examples are those training uses for the same ``data.*`` settings and ``--seed``.
Writes ``<output_dir>/eval.json`` (and ``predictions.jsonl`` with ``data.predictions=true``).
Everything else is ``zoscale.train.score``; this file only parses arguments.
"""

import os
import sys

_local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _local_world)))

import argparse  # noqa: E402
import functools  # noqa: E402

from zoscale.engines.registry import engine_names  # noqa: E402
from zoscale.train.launch import run_cli  # noqa: E402
from zoscale.train.score import score  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hugging Face folder (e.g. a run's final/), or a built-in model name")
    parser.add_argument("--adapter", help="a peft adapter folder to put on --model (e.g. a LoRA run's final/)")
    parser.add_argument("--config", help="JSON run configuration (its data.* and model.* apply)")
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", help="DeepSpeed JSON (engine: deepspeed)")
    parser.add_argument("--engine", choices=engine_names())
    parser.add_argument("--hsdp", help="FSDP2 hybrid sharding mesh REPLICAS,SHARDS")
    parser.add_argument("--data", help="the task's data: a data set folder or a file")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output_dir", default=None, help="where eval.json goes (default runs/eval)")
    parser.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dist_timeout", type=float, default=None)
    parser.add_argument("--heartbeat_timeout", type=float, default=None)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.task=rte data.n_eval=500")
    args = parser.parse_intermixed_args(argv)
    if args.output_dir is None:
        args.output_dir = "runs/eval"
    return run_cli(parser, args, functools.partial(score, adapter=args.adapter))


if __name__ == "__main__":
    sys.exit(main())
