"""Plot top-1 against FLOPs reduction across budgets t_d (dense and gated, ours and the paper's) as PNGs.

A thin entry point over `vdg.report.pareto.plot_pareto`; it must hold no plotting logic of its own.

    python scripts/plot_pareto.py RESULTS_DIR [--out DIR]

RESULTS_DIR is searched recursively for evaluation result JSONs (e.g. `runs`); one figure per protocol and
dataset, pareto-<protocol>-<dataset>.png, goes to --out (default: RESULTS_DIR/plots).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without `pip install -e .`

from vdg.report.pareto import plot_pareto  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot top-1 vs FLOPs reduction from evaluation result JSONs.")
    parser.add_argument("results_dir", type=Path, help="folder searched recursively for result *.json")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RESULTS_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_pareto(args.results_dir, args.out)
    except (ValueError, OSError) as err:  # OSError: an unwritable --out, a full disk, an unreadable file
        parser.error(str(err))
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
