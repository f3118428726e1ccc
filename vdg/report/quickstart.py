"""The README's quickstart figures: one Markdown table rendered from the files the quickstart's commands wrote.

Each row names the exact command whose output it shows. The files live in docs/results/quickstart/ (copied
there by scripts/readme_figures.py), so the README test can check every figure against them. It never runs
or evaluates anything.
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CKPT = "runs/quickstart/checkpoints/last.ckpt"
PRETRAIN = "python scripts/pretrain.py experiment=quickstart"
KNN = f"python scripts/knn_eval.py ckpt={CKPT}"
LINEAR = f"python scripts/linear_eval.py ckpt={CKPT}"
LINEAR_CACHED = f"{LINEAR} augment=false 'random_init_seeds=[0,1,2]'"
# the same command with other pretraining seeds (the default seed is 5): how much the figures move between runs
OTHER_SEEDS = (1, 2)


def seed_command(seed: int) -> str:
    return f"{PRETRAIN} seed={seed} run_dir=runs/quickstart_seed{seed}"


# (file in the figures folder, the command that writes it: run in this order after a fresh clone)
SOURCES = (
    ("summary.json", PRETRAIN),
    ("knn-k1-euclidean-digits-dense.json", KNN),
    ("knn-k1-euclidean-digits-gated.json", KNN),
    ("linear-digits-dense.json", LINEAR),
    ("linear-digits-gated.json", LINEAR),
    ("linear-digits-dense-cached.json", LINEAR_CACHED),
    ("linear-digits-gated-cached.json", LINEAR_CACHED),
    *((f"summary-seed{seed}.json", seed_command(seed)) for seed in OTHER_SEEDS),
)
BEGIN = "<!-- quickstart figures: written by scripts/readme_figures.py from docs/results/quickstart/ -->"
END = "<!-- /quickstart figures -->"


def source_path(run_dir: Path, name: str) -> Path:
    """Where a quickstart run (`run_dir`, and its sibling seed runs) keeps the file `name` of `SOURCES`."""
    if name.startswith("summary-seed"):
        return run_dir.parent / f"{run_dir.name}_{name[len('summary-'):-len('.json')]}" / "summary.json"
    return run_dir / name if name == "summary.json" else run_dir / "checkpoints/results" / name


def collect(run_dir: str | Path, figures_dir: str | Path) -> list[Path]:
    """Copy a quickstart run's summary.json, its evaluation records and the other seeds' summaries (`SOURCES`)
    into `figures_dir`."""
    run_dir, figures_dir = Path(run_dir), Path(figures_dir)
    missing = [f"{name} (from `{command}`)" for name, command in SOURCES if not source_path(run_dir, name).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir} lacks {'; '.join(missing)}: run those commands first")
    figures_dir.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(source_path(run_dir, name), figures_dir / name)) for name, _ in SOURCES]


def _load(figures_dir: Path, name: str) -> dict[str, Any]:
    return json.loads((figures_dir / name).read_text())


def _accuracy(record: dict[str, Any]) -> str:
    if len(record.get("runs") or []) > 1:
        return f"{record['value']:.2f} ± {record['std']:.2f}%"
    return f"{record['value']:.2f}%"


def _reference(record: dict[str, Any] | None) -> str:
    reference = (record or {}).get("random_init")
    return "—" if not reference else f"{reference['top1_mean']:.2f}%"


def _row(label: str, dense: str, gated: str, reference: str, command: str) -> str:
    return f"| {label} | {dense} | {gated} | {reference} | `{command}` |"


def _spread(values: Sequence[float], unit: str = "%") -> str:
    """`95.28 / 93.61 / 94.72 (94.54 ± 0.85%)`: each seed's figure, then mean ± sample std."""
    each = " / ".join(f"{v:.2f}" for v in values)
    return f"{each} ({statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}{unit})"


def _same(values: Sequence[float]) -> str:
    """One figure that every seed shares (refused when they differ: then the cell would hide a spread)."""
    if len({round(v, 6) for v in values}) != 1:
        # not user input: records written by the commands SOURCES names
        raise ValueError(f"the seeds' random-init references differ ({values}): show their spread instead")
    return f"{values[0]:.2f}%"


def figures_table(figures_dir: str | Path) -> str:
    """The Markdown table of the quickstart's figures, between the README markers `BEGIN` and `END`."""
    figures_dir = Path(figures_dir)
    summary = _load(figures_dir, "summary.json")
    seeds = [summary, *(_load(figures_dir, f"summary-seed{seed}.json") for seed in OTHER_SEEDS)]
    knn = summary["knn"]
    knn_records = [_load(figures_dir, f"knn-k1-euclidean-digits-{b}.json") for b in ("dense", "gated")]
    linear = [_load(figures_dir, f"linear-digits-{b}.json") for b in ("dense", "gated")]
    cached = [_load(figures_dir, f"linear-digits-{b}-cached.json") for b in ("dense", "gated")]
    epochs, runs = linear[0]["eval_config"]["epochs"], len(linear[0]["runs"])
    init_seeds = len(knn_records[0]["random_init"]["seeds"])
    ratio = knn["flops_ratio"]
    ratios = [s["knn"]["flops_ratio"] for s in seeds]
    title = (
        f"quickstart run ({summary['method'].upper()}, t_d = {summary['budget']:g}, {summary['dataset']}, width "
        f"{summary['width']}, {summary['epochs']} epochs, seed {summary['seed']})"
    )
    seed_list = " / ".join(str(s["seed"]) for s in seeds)
    lines = [
        BEGIN,
        f"| {title} | dense | gated | random init ({init_seeds} init seeds): dense / gated | command |",
        "|---|---|---|---|---|",
        _row(
            f"1-NN top-1, {knn['distance']} (the paper's k-NN protocol; also printed by the quickstart)",
            f"{knn['dense']:.2f}%",
            f"{knn['gated']:.2f}%",
            " / ".join(_reference(r) for r in knn_records),
            KNN,
        ),
        _row(
            f"1-NN top-1 of pretraining seeds {seed_list} (mean ± std)",
            _spread([s["knn"]["dense"] for s in seeds]),
            _spread([s["knn"]["gated"] for s in seeds]),
            # the reference does not depend on the pretraining seed (same architecture, same init seeds, same data)
            " / ".join(_same([s["knn"]["random_init"][b]["top1_mean"] for s in seeds]) for b in ("dense", "gated")),
            " ; ".join(seed_command(seed) for seed in OTHER_SEEDS),
        ),
        _row(
            f"linear top-1, the paper's protocol: {epochs} epochs of RandomResizedCrop + flip, {runs} runs",
            *(_accuracy(r) for r in linear),
            "—",
            LINEAR,
        ),
        _row(
            f"linear top-1 on unaugmented features computed once, {len(cached[0]['runs'])} runs",
            *(_accuracy(r) for r in cached),
            " / ".join(_reference(r) for r in cached),
            LINEAR_CACHED,
        ),
        _row(
            f"FLOPs over the {linear[1]['num_test']} test images (of dense; seeds {seed_list})",
            "100%",
            f"{100 * ratio:.1f}% (seeds: {' / '.join(f'{100 * r:.1f}' for r in ratios)}%)",
            "—",
            PRETRAIN,
        ),
        END,
    ]
    return "\n".join(lines)


def replace_table(readme: str, table: str) -> str:
    """`readme` with the text from `BEGIN` to `END` replaced by `table`."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        # not user input: the maintainers' README tooling
        raise ValueError(f"the README has no quickstart figures block ({BEGIN} ... {END})")
    return readme[:start] + table + readme[end + len(END) :]


def commands() -> Sequence[str]:
    """The commands behind the figures, in the order to run them."""
    return list(dict.fromkeys(command for _, command in SOURCES))
