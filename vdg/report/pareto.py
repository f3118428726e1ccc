"""Accuracy against FLOPs reduction across budgets t_d, dense and gated, ours next to the paper's: PNG figures.

It reads result records (`vdg.report.tables.load_results`) and the paper's numbers (`vdg.report.paper_results`);
it evaluates nothing and never edits a number.

One figure per protocol and dataset: x = FLOPs reduction F_R = 1 - gated/dense MACs on the test split (%),
y = top-1 (%). Gated points sit at their realised F_R, one per t_d, joined in budget order; dense networks cost
all their FLOPs and sit at x = 0 (labelled with the t_d they were trained with). The paper's points of the same
models are drawn hollow with dashed lines.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vdg.core.errors import RecordError
from vdg.report.paper_results import DATASET_NAMES, PAPER_TABLES, CellKey, PaperValue
from vdg.report.records import BUDGET_TOL, load_results
from vdg.report.tables import record_key

# protocol panel -> the paper tables with its numbers (Table 3's gated rows print no FLOPs reduction)
PAPER_PANELS: dict[str, tuple[str, ...]] = {"linear": ("table1",), "knn-k1-euclidean": ("table4", "table5", "table6")}
PANEL_TITLES = {"linear": "linear evaluation", "knn-k1-euclidean": "1-NN, euclidean", "knn-k1-cosine": "1-NN, cosine"}
MODEL_NAMES = {
    "vicreg": "VICReg",
    "vicreg_gating": "VICReg-Gating",
    "vdg": "VDG",
    "bt_dual": "BT-Dual",
    "vdg_2x": "VDG 2×R18",
    "vdg_no_invariance": "VDG w/o inv.",
}


@dataclass(frozen=True)
class ParetoPoint:
    """One model branch at one budget: top-1 and FLOPs reduction in percent.

    source: "ours" | "paper"; panel: "linear" or "knn-k<k>-<distance>[-l2]"; budget: t_d (None for dense
    VICReg); runs: evaluation runs pooled into top1 (0 for the paper's points).
    """

    source: str
    panel: str
    dataset: str
    model: str
    branch: str
    budget: float | None
    top1: float
    flops_reduction: float
    runs: int


def record_panel(record: dict[str, Any]) -> str | None:
    """The panel a result record is drawn in, or None (transfer, FLOPs reports, other metrics)."""
    if record.get("metric", "top1") != "top1" or record.get("dataset") != record.get("pretrain_dataset"):
        return None
    if record.get("protocol") == "linear":
        return "linear"
    if record.get("protocol") == "knn":
        l2 = "-l2" if record.get("normalize") and record.get("distance") == "euclidean" else ""
        return f"knn-k{record.get('k')}-{record.get('distance')}{l2}"
    return None


def _budget_key(budget: float | None) -> float | None:
    """t_d rounded to the tables' tolerance, so that 0.3 and 0.30000001 are one budget."""
    return None if budget is None else round(float(budget), round(-math.log10(BUDGET_TOL)))


def ours_points(records: Iterable[dict[str, Any]]) -> list[ParetoPoint]:
    """Our points: records pooled per (panel, dataset, model, branch, t_d); top1 = mean over every
    evaluation run, flops_reduction = 100 x the mean of the records' `flops_reduction` (0 for dense)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        panel = record_panel(record)
        if panel is None:
            continue
        key = record_key(record)
        groups[(panel, key.dataset, key.model, key.branch, _budget_key(key.budget))].append(record)
    points = []
    for (panel, dataset, model, branch, budget), group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        runs = [float(v) for r in group for v in (r.get("runs") or [r["value"]])]
        reduction = [float(r.get("flops_reduction") or 0.0) for r in group]
        points.append(
            ParetoPoint(
                "ours",
                panel,
                dataset,
                model,
                branch,
                budget,
                float(np.mean(runs)),
                100 * float(np.mean(reduction)),
                len(runs),
            )
        )
    return points


def paper_points(panel: str, dataset: str, models: Iterable[str]) -> list[ParetoPoint]:
    """The paper's points of `models` on `dataset` for a panel (same-dataset cells; gated ones need a printed
    FLOPs reduction). Tables 4-6 repeat VDG's numbers: each cell is taken once."""
    wanted = set(models)
    cells: dict[CellKey, PaperValue] = {}
    for table in PAPER_PANELS.get(panel, ()):
        cells.update(PAPER_TABLES[table])
    points = []
    for key, value in cells.items():
        if key.model not in wanted or key.dataset != dataset or key.pretrain_dataset != dataset:
            continue
        if key.branch == "gated" and value.flops_reduction is None:
            continue
        reduction = value.flops_reduction if key.branch == "gated" else 0.0
        points.append(ParetoPoint("paper", panel, dataset, key.model, key.branch, key.budget, value.top1, reduction, 0))
    return sorted(points, key=lambda p: (p.model, p.branch, p.budget or 0.0))


def _colour(index: int) -> Any:
    return colormaps["tab10"](index % 10)


def _draw_series(ax: Any, points: Sequence[ParetoPoint], colour: Any, label: str, paper: bool) -> None:
    face = "none" if paper else colour
    style = "--" if paper else "-"
    gated = sorted((p for p in points if p.branch == "gated"), key=lambda p: p.budget or 0.0)
    dense = [p for p in points if p.branch == "dense"]
    if gated:
        ax.plot([p.flops_reduction for p in gated], [p.top1 for p in gated], style, color=colour, linewidth=1)
        ax.scatter(
            [p.flops_reduction for p in gated],
            [p.top1 for p in gated],
            marker="o",
            s=36,
            facecolors=face,
            edgecolors=colour,
            label=f"{label} gated",
        )
    if dense:
        ax.scatter(
            [p.flops_reduction for p in dense],
            [p.top1 for p in dense],
            marker="s",
            s=36,
            facecolors=face,
            edgecolors=colour,
            label=f"{label} dense",
        )
    if not paper:
        for p in gated + dense:
            if p.budget is not None:
                ax.annotate(
                    f"{p.budget:.0%}",
                    (p.flops_reduction, p.top1),
                    textcoords="offset points",
                    xytext=(4, 3),
                    fontsize=7,
                    color=colour,
                )


def plot_panel(points: Sequence[ParetoPoint], path: str | Path, title: str) -> Path:
    """One figure of our and the paper's points (one panel and dataset) as a PNG at `path`."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    models = sorted({p.model for p in points if p.source == "ours"})
    for index, model in enumerate(models):
        name = MODEL_NAMES.get(model, model)
        for source in ("ours", "paper"):
            series = [p for p in points if p.model == model and p.source == source]
            if series:
                _draw_series(
                    ax, series, _colour(index), name if source == "ours" else f"{name} (paper)", paper=source == "paper"
                )
    ax.set_xlabel("FLOPs reduction (%)  [dense = 0; labels: t_d]")
    ax.set_ylabel("top-1 (%)")
    ax.set_xlim(-5, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_pareto(results_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """pareto-<panel>-<dataset>.png for every panel and dataset with our linear or k-NN records under
    `results_dir` (searched recursively), the paper's points of the same models overlaid. Default out_dir:
    results_dir/plots. Raises ValueError when there is no such record."""
    ours = ours_points(load_results(results_dir))
    if not ours:
        raise RecordError(
            f"no linear or k-NN result records under {results_dir}: evaluate a checkpoint first "
            "(scripts/linear_eval.py, scripts/knn_eval.py, or evaluate=[...] in pretraining)"
        )
    out = Path(out_dir) if out_dir is not None else Path(results_dir) / "plots"
    paths = []
    for panel, dataset in sorted({(p.panel, p.dataset) for p in ours}):
        mine = [p for p in ours if p.panel == panel and p.dataset == dataset]
        points = mine + paper_points(panel, dataset, {p.model for p in mine})
        title = f"{DATASET_NAMES.get(dataset, dataset)}: {PANEL_TITLES.get(panel, panel)}, top-1 vs FLOPs reduction"
        paths.append(plot_panel(points, out / f"pareto-{panel}-{dataset}.png", title))
    return paths
