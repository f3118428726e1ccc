"""Reduced-scale tables: our numbers from a laptop-scale sweep (configs/sweep/table1_mini.yaml) shown next to the
paper's full-scale numbers, without any Δ: the two come from different scales and are not comparable.

A record is *reduced scale* when its pretraining ran on a class-balanced subset (`subset_per_class`) or at a
backbone width other than the paper's 64. Those records fill only these tables; the paper's tables
(`vdg.report.tables`) take only full-scale records. It reads records and writes text; it never evaluates.

Ours per cell: each pretraining seed contributes one number (a linear record's mean over its head runs, a 1-NN
record's value); the cell shows the mean ± sample std over pretraining seeds (± omitted for one seed), so the
spread is the one between pretrainings.
"""

from __future__ import annotations

import math
import shutil
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vdg.report.paper_results import PAPER_TABLES, CellKey
from vdg.report.records import BUDGET_TOL, MISSING, Record, load_results

PAPER_WIDTH = 64


def reduced_scale(record: Record) -> bool:
    """Pretrained on a class-balanced subset or at a width other than the paper's (a laptop-scale run)."""
    width = record.get("backbone_width")
    return record.get("subset_per_class") is not None or (width is not None and int(width) != PAPER_WIDTH)


@dataclass(frozen=True)
class MiniColumn:
    title: str
    model: str
    branch: str
    kind: str = "top1"  # top1 | flops_reduction


@dataclass(frozen=True)
class MiniSpec:
    """A reduced-scale table: the paper table and dataset whose row it mirrors, its budgets and columns."""

    title: str
    paper_table: str
    paper_dataset: str
    budgets: tuple[float, ...]
    columns: tuple[MiniColumn, ...]
    # (label, protocol, k-NN distance): the evaluations shown as "ours" rows; the paper row is its protocol's
    evaluations: tuple[tuple[str, str, str | None], ...] = (("linear", "linear", None), ("1-NN", "knn", "euclidean"))


MINI_SPECS: dict[str, MiniSpec] = {
    "table1_mini": MiniSpec(
        "Table 1 at laptop scale: CIFAR-10, top-1 (%)",
        "table1",
        "cifar10",
        (0.1, 0.3, 0.5),
        (
            MiniColumn("VICReg dense", "vicreg", "dense"),
            MiniColumn("VICReg-Gating gated", "vicreg_gating", "gated"),
            MiniColumn("VICReg-Gating FLOPs R.", "vicreg_gating", "gated", "flops_reduction"),
            MiniColumn("VDG dense", "vdg", "dense"),
            MiniColumn("VDG gated", "vdg", "gated"),
            MiniColumn("VDG FLOPs R.", "vdg", "gated", "flops_reduction"),
        ),
    ),
}
MINI_TABLE_NAMES = tuple(MINI_SPECS)


@dataclass
class MiniTable:
    name: str
    title: str
    scale_lines: list[str]
    header: list[str]
    rows: list[list[str]]
    matched: int
    used: set[int]  # id() of the records that fill a cell


def _matches(record: Record, protocol: str, distance: str | None) -> bool:
    if record.get("protocol") != protocol or record.get("metric", "top1") != "top1":
        return False
    return protocol != "knn" or (record.get("k") == 1 and record.get("distance") == distance)


def _same_budget(record: Record, col: MiniColumn, budget: float) -> bool:
    if col.model == "vicreg":  # the dense baseline has no budget: the same run fills every row
        return True
    value = record.get("budget")
    return value is not None and math.isclose(float(value), budget, abs_tol=BUDGET_TOL)


def _per_seed(records: list[Record], field: str) -> list[float]:
    """One number per pretraining seed (records of one seed averaged), in seed order."""
    by_seed: dict[Any, list[float]] = {}
    for r in records:
        if r.get(field) is None:
            continue
        value = float(r[field]) * (100.0 if field == "flops_reduction" else 1.0)
        by_seed.setdefault(r.get("seed"), []).append(value)
    return [statistics.fmean(v) for _, v in sorted(by_seed.items(), key=lambda kv: str(kv[0]))]


def _format(values: Sequence[float], unit: str = "") -> str:
    if not values:
        return MISSING
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}{unit}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}{unit} (n={len(values)})"


def _values(spread: Iterable[Any]) -> str:
    values = sorted({str(v) for v in spread if v is not None})
    return "/".join(values) if values else "?"


def _scale_lines(records: list[Record], spec: MiniSpec) -> list[str]:
    """What ours and the paper's rows are, in words, from the records themselves."""
    paper_note = (
        f"**paper (full scale)**: all 50,000 {spec.paper_dataset.upper().replace('CIFAR', 'CIFAR-')} train images, "
        "ResNet-18 width 64, 500 epochs, batch 512, the augmented 100-epoch linear protocol (on GPUs)"
    )
    if not records:
        return [paper_note]
    seeds = sorted({r.get("seed") for r in records}, key=str)
    linear = [r for r in records if r.get("protocol") == "linear"]
    augment = {bool(r.get("augment", True)) for r in linear}
    probe = (
        "linear = head on frozen unaugmented features (augment=false)" if augment == {False}
        else "linear = the augmented protocol" if augment == {True} else "linear = mixed protocols"
    )
    ours = (
        f"**ours (reduced scale)**: data {_values(r.get('dataset') for r in records)}, "
        f"{_values(r.get('subset_per_class') for r in records)} train images per class "
        f"({_values(r.get('num_train') for r in records)} images), {_values(r.get('num_test') for r in records)} "
        f"test images; ResNet-18 width {_values(r.get('backbone_width') for r in records)}, "
        f"{_values(r.get('pretrain_epochs') for r in records)} epochs; {probe}; 1-NN = euclidean, k = 1; "
        f"pretraining seed(s) {', '.join(str(s) for s in seeds)} (mean ± std over seeds when several)"
    )
    return [
        ours,
        paper_note,
        "The scales differ by orders of magnitude in data, width and epochs, so there is no Δ column: compare the "
        "pattern across columns within each source (gated vs dense, VDG vs VICReg-Gating), not ours with the paper.",
    ]


def build_mini_table(name: str, records: Iterable[Record]) -> MiniTable:
    spec = MINI_SPECS[name]
    paper = PAPER_TABLES[spec.paper_table]
    models = {c.model for c in spec.columns}
    # the paper's dataset, or an image folder holding it (dataset=folder, e.g. CIFAR-10 as JPEGs)
    datasets = (spec.paper_dataset, "folder")
    pool = [r for r in records if reduced_scale(r) and r.get("method") in models
            and r.get("pretrain_dataset") == r.get("dataset") and r.get("dataset") in datasets]
    header = ["t_d", "", *(c.title for c in spec.columns)]
    rows, used = [], set()
    for budget in spec.budgets:
        for i, (label, protocol, distance) in enumerate(spec.evaluations):
            cells = [f"{budget:.0%}" if i == 0 else "", f"ours, {label}"]
            for col in spec.columns:
                matched = [r for r in pool if _matches(r, protocol, distance) and r.get("method") == col.model
                           and r.get("branch") == col.branch and _same_budget(r, col, budget)]
                used.update(id(r) for r in matched)
                field = "flops_reduction" if col.kind == "flops_reduction" else "value"
                cells.append(_format(_per_seed(matched, field), "%" if col.kind == "flops_reduction" else ""))
            rows.append(cells)
        cells = ["", "paper (full scale), linear"]
        for col in spec.columns:
            key = CellKey(col.model, col.branch, spec.paper_dataset, spec.paper_dataset,
                          None if col.model == "vicreg" else budget)
            value = paper.get(key)
            if value is None:
                cells.append(MISSING)
            elif col.kind == "flops_reduction":
                cells.append(MISSING if value.flops_reduction is None else f"{value.flops_reduction:.2f}%")
            else:
                cells.append(f"{value.top1:.2f}" + ("" if value.std is None else f" ± {value.std:.2f}"))
        rows.append(cells)
    rows.extend(_reference_rows(spec, pool))
    matched_records = [r for r in pool if id(r) in used]
    return MiniTable(name, spec.title, _scale_lines(matched_records, spec), header, rows, len(used), used)


def _reference_rows(spec: MiniSpec, pool: list[Record]) -> list[list[str]]:
    """"Better than what?": the same evaluations of randomly initialised networks of each column's architecture and
    branch (the records' `random_init` means) and of the raw pixels (`features=pixels` records, branch "pixels"),
    mean ± std over pretraining seeds (each seed draws its own subset). A row appears only when records hold it."""
    rows = []
    for label, protocol, distance in spec.evaluations:
        evaluated = [r for r in pool if _matches(r, protocol, distance)]
        cells, found = ["", f"random init, {label}"], False
        for col in spec.columns:
            if col.kind != "top1":
                cells.append("")
                continue
            refs = [{"seed": r.get("seed"), "value": r["random_init"]["top1_mean"]} for r in evaluated
                    if r.get("method") == col.model and r.get("branch") == col.branch and r.get("random_init")]
            found = found or bool(refs)
            cells.append(_format(_per_seed(refs, "value")))
        if found:
            rows.append(cells)
        pixels = _per_seed([r for r in evaluated if r.get("branch") == "pixels"], "value")
        if pixels:
            rows.append(["", f"raw pixels (no network), {label}",
                         *(_format(pixels) if col.kind == "top1" else "" for col in spec.columns)])
    return rows


def render_mini_markdown(table: MiniTable) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    body = [line(table.header), line(["---"] * len(table.header)), *(line(r) for r in table.rows)]
    note = [] if table.matched else ["", "_No reduced-scale result record matched this table: it shows the paper's "
                                         "numbers only (run configs/sweep/table1_mini.yaml)._"]
    scale = [f"- {s}" for s in table.scale_lines]
    return "\n".join([f"### {table.title}: ours at reduced scale, the paper at full scale", "", *scale, "", *body,
                      *note]) + "\n"


# ----- the README's mini table: rendered from the records the sweep wrote, kept in docs/results/table1_mini/ -----
README_BEGIN = "<!-- table1_mini: written by scripts/readme_figures.py --mini from docs/results/table1_mini/ -->"
README_END = "<!-- /table1_mini -->"


def collect_sweep(sweep_dir: str | Path, figures_dir: str | Path) -> list[Path]:
    """Copy every evaluation record and run summary under `sweep_dir` into `figures_dir` (same relative paths;
    the folder is emptied first, so it holds exactly one sweep)."""
    sweep_dir, figures_dir = Path(sweep_dir), Path(figures_dir)
    sources = [p for p in sorted(sweep_dir.rglob("*.json"))
               if p.name == "summary.json" or (p.parent.name == "results" and "export" not in p.parts)]
    if not any(p.parent.name == "results" for p in sources):
        raise FileNotFoundError(f"no evaluation records under {sweep_dir}: run the sweep first")
    if figures_dir.exists():
        shutil.rmtree(figures_dir)
    copied = []
    for source in sources:
        target = figures_dir / source.relative_to(sweep_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        copied.append(Path(shutil.copyfile(source, target)))
    return copied


def readme_block(figures_dir: str | Path, name: str = "table1_mini", compact: bool = False) -> str:
    """A page's block: the reduced-scale table rendered from the records in `figures_dir`, between markers.
    compact (the README's): ours and the reference rows only, without the scale notes and the paper's rows."""
    table = build_mini_table(name, load_results(figures_dir))
    if compact:
        rows = [row for row in table.rows if not row[1].startswith("paper (full scale)")]
        table = MiniTable(table.name, table.title, [], table.header, rows, table.matched, table.used)
    text = render_mini_markdown(table)
    body = text.split("\n", 2)[2].strip("\n")  # without the "### title" line: the page gives its own heading
    return f"{README_BEGIN}\n{body}\n{README_END}"


def replace_readme_block(readme: str, block: str) -> str:
    start, end = readme.find(README_BEGIN), readme.find(README_END)
    if start < 0 or end < start:
        # not user input: the maintainers' README tooling
        raise ValueError(f"the README has no table1_mini block ({README_BEGIN} ... {README_END})")
    return readme[:start] + block + readme[end + len(README_END):]
