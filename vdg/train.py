"""Pretraining driver behind `scripts/pretrain.py`: config -> data, method, Trainer -> run directory.

Run directory layout: config.yaml (resolved), checkpoints/{last.ckpt, epoch=XXXX.ckpt}, metrics.csv,
summary.json. The science lives in `vdg.methods`; this module only wires and records.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from vdg.config import ConfigError, validate_pretrain_config
from vdg.data import PretrainDataModule
from vdg.data.module import eval_loader
from vdg.methods import BaseMethod, build_method
from vdg.models import Branch

# Keys of `trainer:` that are vdg's own switches rather than Lightning Trainer arguments.
VDG_TRAINER_KEYS = ("channels_last", "compile")


class EpochTimer(pl.Callback):
    """Wall-clock seconds of each training epoch (validation excluded)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.durations.append(time.perf_counter() - self._start)


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kwargs = {
        k: v
        for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
        if k not in VDG_TRAINER_KEYS
    }
    if kwargs["precision"] == "auto":
        kwargs["precision"] = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    devices, nodes = kwargs["devices"], kwargs["num_nodes"]
    several = (isinstance(devices, int) and devices > 1) or nodes > 1 or devices in (-1, "auto")
    kwargs["sync_batchnorm"] = bool(kwargs["sync_batchnorm"]) and several
    return {k: v for k, v in kwargs.items() if v is not None}


def resume_checkpoint(cfg: DictConfig, checkpoint_dir: Path) -> Path | None:
    last = checkpoint_dir / "last.ckpt"
    if not last.exists():
        return None
    if cfg.resume == "never":
        raise ConfigError(
            f"{last} already exists and resume=never: refusing to overwrite a run; pass resume=auto to "
            f"continue it or choose another run_dir"
        )
    return last


def final_knn(model: BaseMethod, cfg: DictConfig) -> dict[str, Any]:
    """k-NN accuracy of every branch on the test split (train split as the bank) + the gated FLOPs report."""
    from vdg.eval.features import extract_features, gate_report
    from vdg.eval.knn import knn_accuracy

    k, distance = int(cfg.final_knn.k), str(cfg.final_knn.distance)
    train_loader, test_loader = eval_loader(cfg, "train"), eval_loader(cfg, "test")
    result: dict[str, Any] = {"k": k, "distance": distance}
    for branch in model.branches:
        train = extract_features(model.backbone, train_loader, branch)
        test = extract_features(model.backbone, test_loader, branch)
        result[branch.value] = knn_accuracy(
            train.features, train.labels, test.features, test.labels, k=k, distance=distance
        )
        if branch is Branch.GATED:
            report = gate_report(test.active_channels, model.cost)
            result["flops_ratio"] = report["flops_ratio"]
            result["flops_reduction"] = report["flops_reduction"]
    return result


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Train one method on one dataset; returns (and writes) the run's summary."""
    validate_pretrain_config(cfg)
    run_dir = Path(cfg.run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    ckpt_path = resume_checkpoint(cfg, checkpoint_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    pl.seed_everything(int(cfg.seed), workers=True)
    datamodule = PretrainDataModule(cfg)
    model = build_method(cfg)
    timer = EpochTimer()
    callbacks = [
        timer,
        ModelCheckpoint(dirpath=checkpoint_dir, filename="last", save_top_k=0, save_last=True),
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename="epoch={epoch:04d}",
            auto_insert_metric_name=False,
            every_n_epochs=int(cfg.checkpoint.every_n_epochs),
            save_top_k=-1,
        ),
        LearningRateMonitor(logging_interval="epoch"),
    ]
    logger = CSVLogger(save_dir=str(run_dir), name="", version="")
    trainer = pl.Trainer(
        **trainer_kwargs(cfg), callbacks=callbacks, logger=logger, default_root_dir=str(run_dir)
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)

    metrics = {k: v for k, v in trainer.callback_metrics.items()}
    ratio = _metric(metrics, "val/flops_ratio")
    summary: dict[str, Any] = {
        "method": cfg.method.name,
        "dataset": cfg.dataset.name,
        "budget": float(cfg.budget),
        "seed": int(cfg.seed),
        "epochs": int(trainer.current_epoch),
        "mean_seconds_per_epoch": sum(timer.durations) / len(timer.durations) if timer.durations else None,
        "probe_acc": {b.value: _metric(metrics, f"val/acc_{b.value}") for b in model.branches},
        "flops_ratio_train": _metric(metrics, "train/flops_ratio"),
        "flops_ratio_val": ratio,
        "flops_reduction_val": None if ratio is None else 1 - ratio,
        "dense_macs": model.cost.dense_macs,
        "width": int(cfg.backbone.width),
        "checkpoint": str(checkpoint_dir / "last.ckpt"),
    }
    if cfg.final_knn.enabled:
        summary["knn"] = final_knn(model, cfg)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
