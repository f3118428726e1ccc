"""Render the paper's Tables 1-6 (Markdown + CSV) from a folder of evaluation result JSONs and print them.

A thin entry point over `vdg.report.tables.make_tables`; it must hold no table logic of its own.

    python scripts/make_tables.py RESULTS_DIR [--out DIR] [--tables table1,table4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without `pip install -e .`

from vdg.report.tables import (  # noqa: E402
    ALL_TABLES,
    describe_record,
    load_results,
    make_tables,
    unmatched_records,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the paper's tables from evaluation result JSONs.")
    parser.add_argument("results_dir", type=Path, help="folder searched recursively for result *.json")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RESULTS_DIR/tables)")
    parser.add_argument("--tables", default=",".join(ALL_TABLES),
                        help="comma-separated, e.g. table1,table4,table1_mini")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.tables.split(",") if name.strip()]
    try:
        paths = make_tables(args.results_dir, args.out, names)
        records = load_results(args.results_dir)
        unmatched = unmatched_records(records, names)
    except (ValueError, OSError) as err:  # OSError: an unwritable --out, a full disk, an unreadable file
        parser.error(str(err))
    for file_name, path in paths.items():
        if file_name.endswith(".md"):
            print(path.read_text(encoding="utf-8"))
    print(f"{len(records)} result records under {args.results_dir}; {len(records) - len(unmatched)} fill a cell above")
    if unmatched:
        kinds = sorted({describe_record(r) for r in unmatched})
        shown = "; ".join(kinds[:6]) + (f"; ... ({len(kinds) - 6} more)" if len(kinds) > 6 else "")
        print(
            f"{len(unmatched)} matched no cell of {', '.join(names)} (the paper's tables hold full-scale CIFAR-10, "
            f"CIFAR-100, STL-10 and ImageNet-100 runs at its t_d and protocols; table1_mini holds reduced-scale "
            f"CIFAR-10 runs): {shown}"
        )
    print(f"wrote {len(paths)} files (Markdown and CSV) to {next(iter(paths.values())).parent}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
