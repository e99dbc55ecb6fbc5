"""Per-GPU memory of a ZO run before renting the GPUs: ``zoscale plan`` (see ``zoscale/plan_cli.py``).

    python launch/plan.py --model opt-66b --engine zero3 fsdp hsdp --world 8 16
    python launch/plan.py --model all --world 16 --gpu-memory 80
"""

import sys

from zoscale.plan_cli import main

if __name__ == "__main__":
    sys.exit(main())
