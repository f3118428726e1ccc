"""Evaluation result records: the JSON schema `vdg.report.tables` reads, file names, config hash, atomic writes.

It only builds, names and writes records; it never evaluates a model.

A record is one JSON object per file in `<checkpoint dir>/results/` (one file per protocol, dataset, branch):

    protocol         "linear" | "knn" | "transfer" (| "flops" for the gate report of scripts/flops.py)
    method           the pretraining method.name ("vdg", "vicreg", ...); method_config: its method: block
    pretrain_dataset the dataset the checkpoint was pretrained on; dataset: the one evaluated (the target)
    budget, seed     t_d and the pretraining seed of the checkpoint
    branch           "dense" | "gated"
    metric, value    "top1", in percent: the mean over `runs`
    std, runs, seeds sample std (ddof 1; 0.0 for one run), every run's top-1, the seed of each run
                     (k-NN is deterministic: one run, seeds [])
    k, distance      k-NN only ("cosine" = Table 3's l2-normalised 1-NN), plus weighting and normalize
    flops_reduction  1 - gated/dense MACs on the evaluated test split, a fraction (0.0 for the dense branch)
    dense_macs, gated_macs   MACs per image of the dense network and (mean) of the evaluated branch
    ckpt, config_hash        the checkpoint and `config_hash(pretraining config, eval config)`
    backbone_width, pretrain_epochs   the pretraining run's backbone.width and trainer.max_epochs
    subset_per_class, test_subset_per_class, subset_seed   the pretraining dataset's class-balanced subsets
                     (null: whole splits); evaluating that same dataset reads the same subsets
    validation_split a fraction: evaluated on images held out of the train split, not on the test split (null)
    teacher          distilled students (simreg, seed) only: the pretraining config's teacher block (path, format,
                     sha256, pretrain_dataset: the teacher's D_Pretrain, ...)

    description      the protocol in words (linear or k-NN, augmentation, runs and what each run owns, k,
                     distance, the number of train and test images)

Also: image_size, num_train, num_test, eval_config (the whole eval config); linear/transfer: top5 (mean),
final_train_loss (per run), augment, and with augment also augment_backend ("batched" | "workers") and
share_views; gated branch: density_per_block (rho_b on the test split).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vdg.core.atomic import atomic_write_text, remove_orphans

# Keys that say where things are on one machine, not what was computed: left out of `config_hash`, so the
# same checkpoint evaluated the same way hashes the same on any machine.
LOCATION_KEYS = (
    "ckpt",
    "run_dir",
    "results_dir",
    "device",
    "resume",
    "dry_run",
    "json",
    "evaluate",
    "data.root",
    "data.download",
    "data.num_workers",
    "data.pin_memory",
    "data.cache_dir",
    "trainer.enable_progress_bar",
    "trainer.progress",
    "trainer.progress_every_n_steps",
    "logger",
)


def _plain(cfg: Any) -> Any:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _without_location(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(cfg, default=str))  # a deep copy
    for key in LOCATION_KEYS:
        *parents, leaf = key.split(".")
        node = cfg
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    cfg.pop("hydra", None)
    return cfg


def config_hash(pretrain_cfg: Any, eval_cfg: Any) -> str:
    """12 hex digits of sha256 over both resolved configs (sorted JSON), `LOCATION_KEYS` left out."""
    payload = {"pretrain": _without_location(_plain(pretrain_cfg)), "eval": _without_location(_plain(eval_cfg))}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def accuracy_fields(top1_runs: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
    """metric/value/std/runs/seeds of one or more evaluation runs (top-1 in percent; std with ddof 1)."""
    if not top1_runs:
        # not user input: the protocols always pass runs
        raise ValueError("a result needs at least one run")
    runs = [float(v) for v in top1_runs]
    return {
        "metric": "top1",
        "value": statistics.fmean(runs),
        "std": statistics.stdev(runs) if len(runs) > 1 else 0.0,
        "runs": runs,
        "seeds": [int(s) for s in seeds],
    }


def base_record(
    protocol: str, pretrain_cfg: Any, dataset: str, branch: str, ckpt: str | Path, eval_cfg: Any
) -> dict[str, Any]:
    """The fields every record carries, from the checkpoint's pretraining config and the eval config."""
    pre = _plain(pretrain_cfg)
    record = {
        "protocol": protocol,
        "method": pre["method"]["name"],
        "method_config": pre["method"],
        "pretrain_dataset": pre["dataset"]["name"],
        "dataset": dataset,
        "budget": float(pre["budget"]),
        "seed": int(pre["seed"]),
        "branch": branch,
        "ckpt": str(Path(ckpt).resolve()),
        "config_hash": config_hash(pre, eval_cfg),
        # the scale of the pretraining run: a width-8 network or a class-balanced subset is not the paper's
        "backbone_width": (pre.get("backbone") or {}).get("width"),
        "pretrain_epochs": (pre.get("trainer") or {}).get("max_epochs"),
    }
    for key in ("subset_per_class", "test_subset_per_class", "subset_seed", "validation_split"):
        record[key] = pre["dataset"].get(key)
    teacher = pre.get("teacher") or {}
    if teacher.get("path") is not None:  # a distilled student: which teacher (Table 3's D_Pretrain is the teacher's)
        record["teacher"] = teacher
    return record


def result_filename(
    protocol: str,
    dataset: str,
    branch: str,
    pretrain_dataset: str | None = None,
    k: int | None = None,
    distance: str | None = None,
    weighting: str | None = None,
    normalize: bool = False,
    tag: str | None = None,
) -> str:
    """`linear-cifar10-gated.json`, `transfer-cifar100-to-cifar10-dense.json`, `knn-k1-euclidean-cifar10-dense.json`.

    k-NN names carry `-l2` for l2-normalised euclidean features and the vote weighting when k > 1 (at k = 1
    it cannot change a prediction); `tag` is appended last, to keep variants of one protocol side by side
    (the evaluation gives linear records on unaugmented features the tag `cached`).
    """
    if protocol == "transfer":
        stem = f"transfer-{pretrain_dataset}-to-{dataset}-{branch}"
    elif protocol == "knn":
        variant = f"k{k}-{distance}" + ("-l2" if normalize and distance == "euclidean" else "")
        variant += f"-{weighting}" if k is not None and k > 1 and weighting else ""
        stem = f"knn-{variant}-{dataset}-{branch}"
    else:
        stem = f"{protocol}-{dataset}-{branch}"
    return f"{stem}-{tag}.json" if tag else f"{stem}.json"


def results_dir(ckpt: str | Path, override: str | Path | None = None) -> Path:
    """Where a checkpoint's results go: `override`, else `<checkpoint dir>/results`."""
    return Path(override) if override else Path(ckpt).resolve().parent / "results"


def write_json(obj: Any, path: str | Path) -> Path:
    """Write `obj` as indented JSON atomically (`vdg.core.atomic.atomic_write`): a reader, or a crash, sees
    the old file or the new one, never half of one. The file's mode follows the umask; temp files of killed
    writers in the folder are removed; a full disk or a read-only folder is a one-line StorageError."""
    path = Path(path)
    remove_orphans(path.parent)
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
