"""Refresh the README's quickstart figures from a quickstart run (for maintainers, after the commands it names).

    python scripts/readme_figures.py [--run runs/quickstart] [--check]
    python scripts/readme_figures.py --mini runs/table1_mini/folder   # the reduced-scale Table 1 (docs/results.md)

Copies the run's summary.json and evaluation records into docs/results/quickstart/ and rewrites the README's
quickstart table from them; --check only reports whether the pages (README.md, docs/*.md) match the files
already there. Each table is rewritten in the page that holds its markers. Run the commands first, in this order
(the table names each one next to its figures):

    python scripts/pretrain.py experiment=quickstart
    python scripts/knn_eval.py ckpt=runs/quickstart/checkpoints/last.ckpt
    python scripts/linear_eval.py ckpt=runs/quickstart/checkpoints/last.ckpt
    python scripts/linear_eval.py ckpt=runs/quickstart/checkpoints/last.ckpt augment=false

--mini copies a finished table1_mini sweep's records (configs/sweep/table1_mini.yaml) into
docs/results/table1_mini/ and rewrites the mini table (docs/results.md) from them instead.

A thin entry point over `vdg.report.quickstart` and `vdg.report.mini_table`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a clone without `pip install -e .`

from vdg.report.mini_table import README_BEGIN, collect_sweep, readme_block, replace_readme_block  # noqa: E402
from vdg.report.quickstart import BEGIN, collect, figures_table, replace_table  # noqa: E402

FIGURES = REPO / "docs" / "results" / "quickstart"
MINI_FIGURES = REPO / "docs" / "results" / "table1_mini"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def page_with(marker: str) -> Path:
    """The one page (README.md or docs/*.md) that holds a table's begin marker."""
    (page,) = pages_with(marker)
    return page


def mini_block(page: Path) -> str:
    """The mini table as `page` shows it: compact in the README (ours and the references), whole elsewhere."""
    return readme_block(MINI_FIGURES, compact=page.name == "README.md")


def pages_with(marker: str) -> list[Path]:
    """Every page (README.md, docs/*.md) that holds a table's begin marker."""
    return [p for p in PAGES if marker in p.read_text(encoding="utf-8")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Refresh the README's quickstart figures from a quickstart run.")
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"), help="the quickstart's run_dir")
    parser.add_argument("--mini", type=Path, default=None, help="a finished table1_mini sweep's folder")
    parser.add_argument("--check", action="store_true", help="only check the pages against docs/results/")
    args = parser.parse_args(argv)
    quickstart, minis = page_with(BEGIN), pages_with(README_BEGIN)
    if args.check:
        quickstart_text = quickstart.read_text(encoding="utf-8")
        same = replace_table(quickstart_text, figures_table(FIGURES)) == quickstart_text and all(
            replace_readme_block(text, mini_block(page)) == text
            for page, text in ((page, page.read_text(encoding="utf-8")) for page in minis))
        print("the pages match docs/results/" if same else "the pages differ from docs/results/")
        return 0 if same else 1
    if args.mini is not None:
        try:
            copied = collect_sweep(args.mini, MINI_FIGURES)
        except FileNotFoundError as err:
            parser.error(str(err))
        for page in minis:
            page.write_text(replace_readme_block(page.read_text(encoding="utf-8"), mini_block(page)), encoding="utf-8")
        print(f"copied {len(copied)} files to {MINI_FIGURES.relative_to(REPO)}/ and rewrote the mini table in "
              f"{', '.join(str(page.relative_to(REPO)) for page in minis)}")
        return 0
    try:
        copied = collect(args.run, FIGURES)
    except FileNotFoundError as err:
        parser.error(str(err))
    text = replace_table(quickstart.read_text(encoding="utf-8"), figures_table(FIGURES))
    quickstart.write_text(text, encoding="utf-8")
    print(f"copied {len(copied)} files to {FIGURES.relative_to(REPO)}/ and rewrote the quickstart table in "
          f"{quickstart.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
