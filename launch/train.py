"""Fine-tune a causal LM with a zeroth-order optimizer.

    python launch/train.py                                   # the bundled default job
    python launch/train.py --config my.json steps=500 optimizer.params.lr=1e-5

Everything is in ``zoscale.train``; this file only parses arguments.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

from zoscale.train import load_config, train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON run configuration (see zoscale/train/config.py)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=200 model.dtype=bfloat16")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    summary = train(cfg, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
