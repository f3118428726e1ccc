"""PNG figures of evaluation results: per-block channel usage of the gated network, 2-D embeddings per branch.

Drawing only (matplotlib's object API on the Agg canvas, so importing it never switches a global backend);
the numbers come from `vdg.eval.features` and `vdg.report.umap`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

USAGE_COLOURS = {"always_on": "#2a9d8f", "data_dependent": "#e9c46a", "always_off": "#b0b0b0"}
USAGE_LABELS = {"always_on": "always on", "data_dependent": "data-dependent", "always_off": "always off"}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_channel_usage(blocks: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Stacked bars per block: channels always on / data-dependent / always off over a dataset, with the
    mean number of active channels as a dot (the paper's supplementary channel-distribution figure).

    blocks: one mapping per block with label, channels, always_on, data_dependent, always_off, mean_active
    (`vdg.report.flops.block_usage`). Writes a PNG to `path` and returns it.
    """
    labels = [str(b["label"]) for b in blocks]
    x = np.arange(len(blocks))
    fig = Figure(figsize=(max(6.0, 0.8 * len(blocks) + 2), 4.0))
    ax = fig.subplots()
    bottom = np.zeros(len(blocks))
    for key in ("always_on", "data_dependent", "always_off"):
        counts = np.array([float(b[key]) for b in blocks])
        ax.bar(x, counts, bottom=bottom, color=USAGE_COLOURS[key], label=USAGE_LABELS[key], width=0.7)
        bottom += counts
    ax.plot(x, [float(b["mean_active"]) for b in blocks], "ko", markersize=4, label="mean active")
    ax.set_xticks(x, labels, rotation=45, ha="right")
    ax.set_xlabel("block (stage, block in stage)")
    ax.set_ylabel("gated channels")
    ax.legend(fontsize=8, loc="upper left")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_embeddings(
    embeddings: Mapping[str, np.ndarray],
    labels: np.ndarray,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """One scatter panel per entry of `embeddings` (name -> [N, 2]), side by side, coloured by class label.

    A legend names the classes when there are at most 20 of them. Writes a PNG to `path` and returns it.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    fig = Figure(figsize=(5.0 * len(embeddings), 5.0))
    axes = np.atleast_1d(fig.subplots(1, len(embeddings)))
    colours = _class_colours(len(classes))
    size = float(np.clip(4000 / max(len(labels), 1), 3, 20))  # bigger dots for small samples
    for ax, (name, points) in zip(axes, embeddings.items(), strict=True):
        points = np.asarray(points)
        for colour, cls in zip(colours, classes, strict=True):
            chosen = labels == cls
            name_of = class_names[int(cls)] if class_names is not None and int(cls) < len(class_names) else str(cls)
            ax.scatter(points[chosen, 0], points[chosen, 1], s=size, color=colour, label=name_of, linewidths=0)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 20:
        axes[-1].legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _class_colours(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]
