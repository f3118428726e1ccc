"""The paper's Tables 1-6 rendered from evaluation result JSONs: per cell ours (mean ± std), paper, Δ.

Only full-scale records enter them; reduced-scale runs (a class-balanced subset, a narrow network) fill the
reduced-scale tables of `vdg.report.mini_table` instead, which show no Δ.

It only reads result records and writes Markdown/CSV; it must not evaluate models or edit any number.

A record (one JSON object per file, written by the evaluation scripts) enters a table when its protocol
matches (Table 1 "linear", Table 2 "transfer", Tables 3-6 "knn" with k = 1 and the paper's distance), and a
cell when its model, branch, datasets and t_d match (t_d within `BUDGET_TOL`). Table 3's distilled
students (simreg, seed) are dense networks whose D_Pretrain is their teacher's (`teacher.pretrain_dataset`).
Ours pools every evaluation run (`runs`, else `value`) of every matching record: mean ± sample std (ddof 1),
± omitted for a single run.
Δ = ours - paper, computed from the two numbers as displayed.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vdg.core.errors import ConfigError
from vdg.report.mini_table import (
    MINI_SPECS,
    MINI_TABLE_NAMES,
    MiniTable,
    build_mini_table,
    reduced_scale,
    render_mini_markdown,
)
from vdg.report.paper_results import (
    DATASET_NAMES,
    DENSE_FLOPS,
    KD_MODELS,
    PAPER_TABLES,
    TABLE3_TEACHERS,
    TABLE_NAMES,
    CellKey,
    PaperValue,
)
from vdg.report.records import BUDGET_TOL, MISSING, Record, load_results

# Every table make_tables renders: the paper's (full-scale records only) and the reduced-scale ones (mini_table)
ALL_TABLES: tuple[str, ...] = (*TABLE_NAMES, *MINI_TABLE_NAMES)



@dataclass(frozen=True)
class Row:
    """A table row: its label cells and the part of the CellKey it fixes (model and branch only in Table 3)."""

    labels: tuple[str, ...]
    pretrain_dataset: str
    dataset: str
    budget: float | None = None
    model: str | None = None
    branch: str | None = None  # overrides the column's: Table 3's KD students are dense networks


@dataclass(frozen=True)
class Column:
    """A column group (ours, paper, Δ). kind: "top1", "flops_reduction" (F_R in %) or "dense_flops"."""

    title: str
    model: str | None
    branch: str
    kind: str = "top1"
    budget: float | None = None  # Table 2 puts t_d in the columns


@dataclass(frozen=True)
class TableSpec:
    """One paper table: which records it reads (protocol, k-NN distance) and its rows x column groups."""

    title: str
    protocol: str
    label_header: tuple[str, ...]
    rows: tuple[Row, ...]
    columns: tuple[Column, ...]
    # k-NN tables (k is always 1): Table 3 l2-normalises features ("cosine"), Tables 4-6 do not ("euclidean")
    knn_distance: str | None = None


@dataclass
class Table:
    """A rendered table: `header` and `rows` hold display strings, the CSV form (one column per ours, paper, Δ).

    label_columns: how many leading columns are row labels; the rest come in (ours, paper, Δ) triples.
    matched: how many result records fill at least one cell.
    """

    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    label_columns: int = 0
    matched: int = 0


CAPTION = (
    f"ours = mean ± std over all matching evaluation runs (± omitted for one run); Δ = ours − paper "
    f"(points; FLOPs R. in percentage points, FLOPs in % of the paper's); {MISSING} = no run / not printed. "
    "A setting without any run of ours shows the paper's row only."
)
NO_MATCH = "No result record matched this table: it shows the paper's numbers only."


def _td(budget: float) -> str:
    return f"{budget:.0%}"


def _same_data_rows(datasets: Sequence[tuple[str, Sequence[float]]]) -> tuple[Row, ...]:
    return tuple(Row((DATASET_NAMES[ds], _td(td)), ds, ds, td) for ds, budgets in datasets for td in budgets)


def _dual_columns(model: str, label: str) -> tuple[Column, ...]:
    return (
        Column(f"{label} dense", model, "dense"),
        Column(f"{label} gated", model, "gated"),
        Column(f"{label} FLOPs R.", model, "gated", "flops_reduction"),
    )


def _table3_rows() -> tuple[Row, ...]:
    """One row per printed student: the KD students (SimReg, SEED, dense) and our gated network."""
    method = {"simreg": "SimReg", "seed": "SEED", "vdg": "Ours (Gated)"}
    return tuple(
        Row(
            (
                method[key.model],
                DATASET_NAMES[key.pretrain_dataset],
                DATASET_NAMES[key.dataset],
                TABLE3_TEACHERS[key.model],
                f"R18 ({_td(key.budget or 0.0)})",
            ),
            key.pretrain_dataset,
            key.dataset,
            key.budget,
            key.model,
            key.branch,
        )
        for key in PAPER_TABLES["table3"]
    )


_KNN_ROWS = _same_data_rows([("cifar100", (0.1, 0.3, 0.5)), ("stl10", (0.1, 0.3, 0.5))])
_T2_PAIRS = [
    ("cifar100", "stl10"),
    ("cifar100", "cifar10"),
    ("cifar100", "imagenet100"),
    ("imagenet100", "stl10"),
    ("imagenet100", "cifar10"),
    ("imagenet100", "cifar100"),
]

SPECS: dict[str, TableSpec] = {
    "table1": TableSpec(
        "Table 1: linear evaluation, top-1 (%)",
        "linear",
        ("Dataset", "t_d"),
        _same_data_rows(
            [
                ("cifar10", (0.1, 0.3, 0.5)),
                ("stl10", (0.1, 0.3, 0.5)),
                ("cifar100", (0.1, 0.3, 0.5)),
                ("imagenet100", (0.3, 0.5)),
            ]
        ),
        (
            Column("VICReg dense", "vicreg", "dense"),
            Column("VICReg FLOPs", "vicreg", "dense", "dense_flops"),
            Column("VICReg-Gating gated", "vicreg_gating", "gated"),
            Column("VICReg-Gating FLOPs R.", "vicreg_gating", "gated", "flops_reduction"),
            *_dual_columns("vdg", "VDG"),
        ),
    ),
    "table2": TableSpec(
        "Table 2: transfer, linear top-1 (%)",
        "transfer",
        ("From → To",),
        tuple(Row((f"{DATASET_NAMES[a]} → {DATASET_NAMES[b]}",), a, b) for a, b in _T2_PAIRS),
        (
            Column("VICReg dense", "vicreg", "dense"),
            *(
                Column(f"VDG {_td(td)} {branch}", "vdg", branch, budget=td)
                for td in (0.1, 0.3, 0.5)
                for branch in ("dense", "gated")
            ),
        ),
    ),
    "table3": TableSpec(
        "Table 3: KD students vs our gated network, 1-NN top-1 (%), l2-normalised features",
        "knn",
        ("Method", "D_Pretrain", "D_Target", "Teacher", "Student"),
        _table3_rows(),
        (Column("1-NN", None, "gated"),),
        knn_distance="cosine",
    ),
    "table4": TableSpec(
        "Table 4: BT vs VICReg in the dual setting, 1-NN top-1 (%)",
        "knn",
        ("Dataset", "t_d"),
        _KNN_ROWS,
        (*_dual_columns("bt_dual", "BT-Dual"), *_dual_columns("vdg", "VICReg-Dual")),
        knn_distance="euclidean",
    ),
    "table5": TableSpec(
        "Table 5: one vs two base encoders, 1-NN top-1 (%)",
        "knn",
        ("Dataset", "t_d"),
        _KNN_ROWS,
        (*_dual_columns("vdg", "1×ResNet-18"), *_dual_columns("vdg_2x", "2×ResNet-18")),
        knn_distance="euclidean",
    ),
    "table6": TableSpec(
        "Table 6: role of the invariance (MSE) term, 1-NN top-1 (%)",
        "knn",
        ("Dataset", "t_d"),
        _KNN_ROWS,
        (*_dual_columns("vdg", "w/ invariance"), *_dual_columns("vdg_no_invariance", "w/o invariance")),
        knn_distance="euclidean",
    ),
}


def record_key(record: Record) -> CellKey:
    """The cell a record belongs to; vdg trained with invariance weight 0 is the "vdg_no_invariance" model."""
    model = record.get("method", "")
    if model == "vdg" and (record.get("method_config") or {}).get("invariance_weight") == 0:
        model = "vdg_no_invariance"
    budget = record.get("budget")
    pretrain = record.get("pretrain_dataset", "")
    if model in KD_MODELS:  # a student's D_Pretrain is its teacher's; it was distilled on D_Target
        pretrain = (record.get("teacher") or {}).get("pretrain_dataset") or ""
    return CellKey(
        model,
        record.get("branch", ""),
        pretrain,
        record.get("dataset", ""),
        None if model == "vicreg" or budget is None else float(budget),
    )


def _same_cell(a: CellKey, b: CellKey) -> bool:
    if replace(a, budget=None) != replace(b, budget=None):
        return False
    if a.budget is None or b.budget is None:
        return a.budget is None and b.budget is None
    return math.isclose(a.budget, b.budget, abs_tol=BUDGET_TOL)


def _augmented(record: Record) -> bool:
    """Whether a linear/transfer record used the paper's augmented protocol (not `augment=false`)."""
    return bool(record.get("augment", (record.get("eval_config") or {}).get("augment", True)))


def _in_table(record: Record, spec: TableSpec) -> bool:
    if record.get("protocol") != spec.protocol or record.get("metric", "top1") != "top1":
        return False
    if reduced_scale(record):  # a subset or a narrow network: only the reduced-scale tables, never next to a Δ
        return False
    if spec.protocol in ("linear", "transfer") and not _augmented(record):  # the paper's protocol only
        return False
    return spec.protocol != "knn" or (record.get("k") == 1 and record.get("distance") == spec.knn_distance)


def _cell_key(row: Row, col: Column) -> CellKey:
    model = col.model or row.model or ""
    budget = col.budget if col.budget is not None else row.budget
    if model == "vicreg":  # the dense baseline has no budget
        budget = None
    return CellKey(model, row.branch or col.branch, row.pretrain_dataset, row.dataset, budget)


def _pooled(records: list[Record]) -> tuple[float, float, int] | None:
    """(mean, std, number of runs) over every evaluation run of `records`."""
    samples = [float(v) for r in records for v in (r.get("runs") or [r["value"]])]
    if not samples:
        return None
    if len(samples) == 1:
        return samples[0], float(records[0].get("std") or 0.0), 1
    return float(np.mean(samples)), float(np.std(samples, ddof=1)), len(samples)


def _diff(ours: float | None, paper: float | None, unit: str = "") -> str:
    """ours - paper from the two numbers as displayed (2 decimals), so the three cells agree."""
    if ours is None or paper is None:
        return MISSING
    return f"{round(round(ours, 2) - paper, 2) + 0.0:+.2f}{unit}"  # + 0.0 turns -0.00 into +0.00


def _top1_cells(key: CellKey, records: list[Record], paper: PaperValue | None) -> list[str]:
    if paper is None:
        paper_text = MISSING
    else:
        paper_text = f"{paper.top1:.2f}" + ("" if paper.std is None else f" ± {paper.std:.2f}")
    pooled = _pooled(records)
    if pooled is None:
        return [MISSING, paper_text, MISSING]
    mean, std, n = pooled
    ours = f"{mean:.2f} ± {std:.2f}" if n > 1 or std > 0 else f"{mean:.2f}"
    return [ours, paper_text, _diff(mean, None if paper is None else paper.top1)]


def _flops_reduction_cells(key: CellKey, records: list[Record], paper: PaperValue | None) -> list[str]:
    """F_R = 1 - gated/dense FLOPs: records hold a fraction, the table shows percent (Δ in points)."""
    values = [100.0 * float(r["flops_reduction"]) for r in records if r.get("flops_reduction") is not None]
    ours = float(np.mean(values)) if values else None
    reference = None if paper is None else paper.flops_reduction
    return [
        MISSING if ours is None else f"{ours:.2f}%",
        MISSING if reference is None else f"{reference:.2f}%",
        _diff(ours, reference),
    ]


def _sci(flops: float) -> str:
    """7.0356e8 -> "7.04E8", the paper's notation."""
    exponent = math.floor(math.log10(flops))
    return f"{flops / 10**exponent:.2f}E{exponent}"


def _dense_flops_cells(key: CellKey, records: list[Record], paper: PaperValue | None) -> list[str]:
    """The dense network's FLOPs per image (records: `dense_macs`); Δ in percent of the paper's count."""
    values = [float(r["dense_macs"]) for r in records if r.get("dense_macs")]
    ours = float(np.mean(values)) if values else None
    reference = DENSE_FLOPS.get(key.dataset)
    return [
        MISSING if ours is None else _sci(ours),
        MISSING if reference is None else _sci(reference),
        MISSING if ours is None or reference is None else f"{100.0 * (ours / reference - 1.0):+.2f}%",
    ]


_CELLS: dict[str, Callable[[CellKey, list[Record], PaperValue | None], list[str]]] = {
    "top1": _top1_cells,
    "flops_reduction": _flops_reduction_cells,
    "dense_flops": _dense_flops_cells,
}


def _check_names(names: Iterable[str]) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in SPECS and n not in MINI_SPECS]
    if unknown:
        raise ConfigError(f"unknown table(s) {', '.join(unknown)}; allowed: {', '.join(ALL_TABLES)}")
    return names


def build_table(name: str, records: Iterable[Record]) -> Table:
    """Table `name` ("table1".."table6") in the paper's layout, filled from the records of its protocol."""
    spec = SPECS[_check_names([name])[0]]
    paper = PAPER_TABLES[name]
    keyed = [(record_key(r), r) for r in records if _in_table(r, spec)]
    parts = ("ours", "paper", "Δ")
    header = [*spec.label_header] + [f"{col.title}: {part}" for col in spec.columns for part in parts]
    rows, used = [], set()
    for row in spec.rows:
        cells = list(row.labels)
        for col in spec.columns:
            key = _cell_key(row, col)
            matched = [r for k, r in keyed if _same_cell(k, key)]
            used.update(id(r) for r in matched)
            cells += _CELLS[col.kind](key, matched, paper.get(key))
        rows.append(cells)
    return Table(name, spec.title, header, rows, len(spec.label_header), len(used))


def unmatched_records(records: Iterable[Record], names: Iterable[str] = ALL_TABLES) -> list[Record]:
    """The records that fill no cell of the named tables (another dataset, protocol, k, budget, scale...)."""
    names = _check_names(names)
    records = list(records)
    specs = [SPECS[name] for name in names if name in SPECS]
    cells = [(spec, [_cell_key(row, col) for row in spec.rows for col in spec.columns]) for spec in specs]
    in_mini: set[int] = set()
    for name in names:
        if name in MINI_SPECS:
            in_mini.update(build_mini_table(name, records).used)
    return [
        r
        for r in records
        if id(r) not in in_mini
        and not any(_in_table(r, spec) and any(_same_cell(record_key(r), k) for k in keys) for spec, keys in cells)
    ]


def describe_record(record: Record) -> str:
    """`knn k=1 euclidean, vdg t_d 0.5 gated, digits` (what a record is, for the no-match message)."""
    protocol = str(record.get("protocol", "?"))
    if protocol in ("linear", "transfer") and not _augmented(record):
        protocol += " (augment=false)"
    if protocol == "knn":
        protocol += f" k={record.get('k')} {record.get('distance')}"
    budget = record.get("budget")
    model = f"{record.get('method', '?')}" + ("" if budget is None else f" t_d {float(budget):g}")
    data = record.get("dataset", "?")
    if record.get("pretrain_dataset") not in (None, data):
        data = f"{record['pretrain_dataset']} → {data}"
    scale = ", reduced scale" if reduced_scale(record) else ""
    return f"{protocol}, {model} {record.get('branch', '?')}, {data}{scale}"


def render_markdown(table: Table) -> str:
    """The table in the paper's layout, one column per network or FLOPs figure: each setting's row gives the
    paper's numbers, preceded by ours and followed by Δ when some run of ours exists for that setting."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    n = table.label_columns
    groups = [title.rsplit(": ", 1)[0] for title in table.header[n::3]]
    body = [line([*table.header[:n], "", *groups]), line(["---"] * (n + 1 + len(groups)))]
    for row in table.rows:
        labels, values = row[:n], row[n:]
        ours, paper, delta = values[0::3], values[1::3], values[2::3]
        has_ours = any(v != MISSING for v in ours)
        if has_ours:
            body.append(line([*labels, "ours", *ours]))
        body.append(line([*([""] * n if has_ours else labels), "paper", *paper]))
        if has_ours:
            body.append(line([*([""] * n), "Δ", *delta]))
    note = [] if table.matched else ["", f"_{NO_MATCH}_"]
    return "\n".join([f"### {table.title}", "", CAPTION, "", *body, *note]) + "\n"


def render_csv(table: Table | MiniTable) -> str:
    """The header row and the rows, as CSV (both kinds of table)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.header)
    writer.writerows(table.rows)
    return buffer.getvalue()


def make_tables(
    results_dir: str | Path, out_dir: str | Path | None = None, names: Iterable[str] = ALL_TABLES
) -> dict[str, Path]:
    """Write `<name>.md` and `<name>.csv` per table (default out_dir: results_dir/tables); name -> path."""
    names = _check_names(names)
    records = load_results(results_dir)
    out = Path(out_dir) if out_dir is not None else Path(results_dir) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name in names:
        if name in MINI_SPECS:
            mini = build_mini_table(name, records)
            texts = {".md": render_mini_markdown(mini), ".csv": render_csv(mini)}
        else:
            table = build_table(name, records)
            texts = {".md": render_markdown(table), ".csv": render_csv(table)}
        for suffix, text in texts.items():
            path = out / f"{name}{suffix}"
            path.write_text(text, encoding="utf-8")
            paths[path.name] = path
    return paths
