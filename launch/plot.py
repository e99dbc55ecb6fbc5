"""Plot training runs: loss, held-out metrics, step time split and lr, against step and wall-clock time.

    python launch/plot.py runs/a                                    # -> metrics.png
    python launch/plot.py runs/a/metrics.jsonl runs/b/metrics.jsonl --out compare.png
    python launch/plot.py runs/a runs/b --x time --out compare.pdf

Each argument is a run's metrics.jsonl or its folder; every run gets a colour, labelled by the
folder's name. ``--x``: ``step``, ``time`` (seconds since the run started) or ``both`` (two rows,
the default). The figure comes from ``zoscale.plots``; this file only parses arguments.
A missing or empty file or a malformed line exits with code 2, naming the file and line.
"""

import argparse
import sys

from zoscale.plots import X_AXES, MetricsError, plot_runs, save_figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="metrics.jsonl files or run folders")
    parser.add_argument("--out", default="metrics.png", help="the figure file, .png/.pdf/.svg (default metrics.png)")
    parser.add_argument("--x", choices=X_AXES, default="both", help="x axis: step, time (elapsed seconds) or both rows")
    args = parser.parse_args(argv)
    try:
        path = save_figure(plot_runs(args.runs, x=args.x), args.out)
    except MetricsError as e:
        parser.exit(2, f"error: {e}\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
