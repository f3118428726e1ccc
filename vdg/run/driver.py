"""Pretraining driver behind `scripts/pretrain.py`: config -> data, method, Trainer -> run directory.

Run directory layout: config.yaml (resolved), checkpoints/{last.ckpt, epoch=XXXX.ckpt}, metrics.csv,
summary.json. The science lives in `vdg.methods`; this module only wires, resumes and records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from vdg.data import PretrainDataModule
from vdg.data.module import eval_loader
from vdg.methods import METHODS, BaseMethod, build_method
from vdg.methods.base import sync_batchnorm_scope
from vdg.models import Branch
from vdg.run.callbacks import FAULT_ENV, EpochTimer, FaultInjection, NonFiniteGuard, RNGState
from vdg.run.checkpoint import CheckpointError, config_differences, read_checkpoint
from vdg.run.checkpoint_io import AtomicCheckpointIO
from vdg.run.config import ConfigError, validate_pretrain_config
from vdg.run.logging import build_loggers
from vdg.run.progress import progress_callbacks
from vdg.run.student import resolve_student_widths, save_student_record

# Keys of `trainer:` that are vdg's own switches rather than Lightning Trainer arguments.
VDG_TRAINER_KEYS = ("channels_last", "compile", "progress", "progress_every_n_steps", "sync_batchnorm")


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Lightning Trainer arguments from `trainer:`, with vdg's `auto` values resolved.

    precision=auto: bf16-mixed when training on a GPU, else 32-true. benchmark=null: cuDNN autotuning on unless
    deterministic (inputs have a fixed size). sync_batchnorm is vdg's own (`BaseMethod.configure_model`
    synchronises the BatchNorms it names), so Lightning's is left off.
    """
    container = OmegaConf.to_container(cfg.trainer, resolve=True)
    try:
        sync_batchnorm_scope(container.get("sync_batchnorm"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    kwargs = {k: v for k, v in container.items() if k not in VDG_TRAINER_KEYS}
    accelerator = kwargs["accelerator"]
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if kwargs["precision"] == "auto":
        kwargs["precision"] = "bf16-mixed" if on_gpu else "32-true"
    if kwargs.get("benchmark") is None:
        kwargs["benchmark"] = not kwargs.get("deterministic")
    return {k: v for k, v in kwargs.items() if v is not None}


def find_resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The newest of checkpoints/last.ckpt and a SLURM-requeue hpc_ckpt_*.ckpt in the run directory.

    resume=auto continues from it (after checking the config still describes the same experiment);
    resume=never refuses to touch a run directory that already holds one.
    """
    candidates = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.exists()]
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    if cfg.resume == "never":
        raise ConfigError(
            f"{newest} already exists and resume=never: refusing to overwrite a run; pass resume=auto to "
            f"continue it or choose another run_dir"
        )
    saved = read_checkpoint(newest)["hyper_parameters"]["cfg"]
    diffs = config_differences(saved, OmegaConf.to_container(cfg, resolve=True))
    if diffs:
        raise CheckpointError(
            f"refusing to resume {newest}: the config changed in keys that define the experiment "
            f"({'; '.join(diffs)}). Use another run_dir for a new experiment, or restore these values."
        )
    return newest


def checkpoint_callbacks(cfg: DictConfig, checkpoint_dir: Path) -> list[ModelCheckpoint]:
    every = int(cfg.checkpoint.every_n_epochs)
    periodic = dict(filename="epoch={epoch:04d}", auto_insert_metric_name=False, save_top_k=-1)
    if every == 1:  # one callback can do both; two with the same period would clash in Lightning's state
        return [ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, every_n_epochs=1, **periodic)]
    return [
        # monitor=None + save_top_k=1 keeps exactly the newest checkpoint, under the fixed name last.ckpt
        ModelCheckpoint(dirpath=checkpoint_dir, filename="last", every_n_epochs=1, enable_version_counter=False),
        ModelCheckpoint(dirpath=checkpoint_dir, every_n_epochs=every, **periodic),
    ]


def final_knn(model: BaseMethod, cfg: DictConfig) -> dict[str, Any]:
    """k-NN accuracy of every branch on the test split (train split as the bank) + the gated FLOPs report.

    Runs on the device the model trained on (`evaluation_device`): Lightning moves the model to the CPU at the
    end of `fit`, where CIFAR's features would take ~130 TFLOP of CPU time and ImageNet-100's hours. The
    backbone goes back where it was afterwards.
    """
    from vdg.eval.features import extract_features, gate_report, module_device
    from vdg.eval.knn import knn_accuracy

    k, distance = int(cfg.final_knn.k), str(cfg.final_knn.distance)
    train_loader, test_loader = eval_loader(cfg, "train"), eval_loader(cfg, "test")
    device, previous = evaluation_device(model), module_device(model.backbone)
    result: dict[str, Any] = {"k": k, "distance": distance}
    try:
        for branch in model.branches:
            train = extract_features(model.backbone, train_loader, branch, device)
            test = extract_features(model.backbone, test_loader, branch, device)
            result[branch.value] = knn_accuracy(
                train.features.to(device), train.labels, test.features, test.labels, k=k, distance=distance
            )
            if branch is Branch.GATED:
                report = gate_report(test.active_channels, model.cost)
                result["flops_ratio"] = report["flops_ratio"]
                result["flops_reduction"] = report["flops_reduction"]
    finally:
        model.backbone.to(previous)
    return result


def evaluation_device(model: BaseMethod) -> torch.device:
    """The device of the Trainer that fitted `model` (its root device), else where the backbone is."""
    trainer = model._trainer
    if trainer is not None:
        return trainer.strategy.root_device
    return next(model.backbone.parameters()).device


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Train one method on one dataset (resuming its run directory when possible); returns the summary."""
    validate_pretrain_config(cfg)
    # values read from files (a slim student's widths, a teacher's record) join the config before it is
    # compared with a resumed run's and saved
    METHODS[cfg.method.name].prepare_config(cfg)  # first: a missing teacher file is the likeliest gap
    student = resolve_student_widths(cfg)
    run_dir = Path(cfg.run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    ckpt_path = find_resume_checkpoint(cfg, run_dir)
    resume_state = None
    if ckpt_path is not None:
        saved = read_checkpoint(ckpt_path)
        resume_state = (int(saved["epoch"]) + 1, int(saved["global_step"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # under torchrun/srun every process runs this function
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if student is not None:
            save_student_record(run_dir, student)

    pl.seed_everything(int(cfg.seed), workers=True)
    datamodule = PretrainDataModule(cfg)
    model = build_method(cfg)
    timer = EpochTimer()
    progress, show_progress_bar = progress_callbacks(cfg.trainer)
    callbacks: list[pl.Callback] = [
        NonFiniteGuard(int(cfg.guard.check_every_n_steps)),  # first: it must run before any checkpoint save
        timer,
        RNGState(),
        *checkpoint_callbacks(cfg, checkpoint_dir),
        LearningRateMonitor(logging_interval="epoch"),
        *progress,
    ]
    if os.environ.get(FAULT_ENV):
        callbacks.append(FaultInjection(int(os.environ[FAULT_ENV])))
    trainer = pl.Trainer(
        **{**trainer_kwargs(cfg), "enable_progress_bar": show_progress_bar},
        callbacks=callbacks,
        logger=build_loggers(cfg, run_dir, *(resume_state or (None, None))),
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)

    summary = training_summary(cfg, model, trainer, timer, ckpt_path)
    if not trainer.is_global_zero:
        return summary
    if cfg.checkpoint.get("export_backbone", True):
        from vdg.deploy.export import export_backbone

        # backbone-only weights beside the checkpoints, for downstream use (vdg.load_backbone)
        last = checkpoint_dir / "last.ckpt"
        summary["exports"] = {
            b.value: str(export_backbone(last, b, overwrite=True)["safetensors"]) for b in model.branches
        }
    if cfg.final_knn.enabled:
        summary["knn"] = final_knn(model, cfg)
    if cfg.evaluate:
        from vdg.eval.api import evaluate_checkpoint

        summary["evaluations"] = [
            record
            for spec in OmegaConf.to_container(cfg.evaluate, resolve=True)
            for record in evaluate_checkpoint(checkpoint_dir / "last.ckpt", **spec)
        ]
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def training_summary(
    cfg: DictConfig, model: BaseMethod, trainer: pl.Trainer, timer: EpochTimer, ckpt_path: Path | None
) -> dict[str, Any]:
    """What the run achieved. Re-running a finished run (e.g. a sweep that only adds evaluations) trains
    nothing, so its training figures are taken from the previous summary instead of being blanked.

    Every path in the summary (run_dir, checkpoint, resumed_from, and the exports and evaluation records the
    driver adds) is absolute, so summary.json means the same from any working directory.
    """
    run_dir = Path(cfg.run_dir).resolve()
    resumed_from = str(Path(ckpt_path).resolve()) if ckpt_path else None
    previous = run_dir / "summary.json"
    if ckpt_path is not None and not timer.durations and previous.exists():
        kept = {k: v for k, v in json.loads(previous.read_text()).items() if k not in ("knn", "evaluations")}
        return {**kept, "resumed_from": resumed_from}
    metrics = dict(trainer.callback_metrics.items())
    ratio = _metric(metrics, "val/flops_ratio")
    return {
        "method": cfg.method.name,
        "dataset": cfg.dataset.name,
        "budget": float(cfg.budget),
        "seed": int(cfg.seed),
        "epochs": int(trainer.current_epoch),
        "steps": int(trainer.global_step),
        "run_dir": str(run_dir),
        "resumed_from": resumed_from,
        "mean_seconds_per_epoch": sum(timer.durations) / len(timer.durations) if timer.durations else None,
        # online probes: a training monitor, fit on augmented views while the encoder changes (see describe_summary)
        "probe_acc": {b.value: _metric(metrics, f"val/acc_{b.value}") for b in model.branches},
        "flops_ratio_train": _metric(metrics, "train/flops_ratio"),
        "flops_ratio_val": ratio,
        "flops_reduction_val": None if ratio is None else 1 - ratio,
        "dense_macs": model.cost.dense_macs,
        "width": int(cfg.backbone.width),
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
    }


# A probe this far below k-NN gets an explanation in the printed summary rather than standing unexplained.
PROBE_GAP_EXPLAINED = 10.0  # points of top-1


def _shown_path(path: str) -> str:
    """`path` relative to the working directory when it lies inside it (what a user types), else as stored."""
    try:
        return str(Path(path).relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def describe_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines about a finished run: what ran, its accuracy and cost, and what to run next."""
    steps = f" ({summary['steps']} steps)" if summary.get("steps") else ""
    lines = [f"{summary['method']} on {summary['dataset']}: {summary['epochs']} epochs{steps}"]
    if summary.get("mean_seconds_per_epoch"):
        lines[0] += f", {summary['mean_seconds_per_epoch']:.1f} s/epoch"
    if summary.get("width") != 64:
        lines.append(
            f"backbone width {summary['width']}: a narrow ResNet-18 ({(summary['width'] / 64) ** 2:.4g} of the "
            "paper's MACs) so that it trains on a CPU; the paper's network is backbone.width=64"
        )
    knn = summary.get("knn")
    if knn:
        accs = ", ".join(f"{b} {knn[b]:.2f}%" for b in ("dense", "gated") if b in knn)
        lines.append(f"k-NN (k={knn['k']}, {knn['distance']}) top-1 on the test split: {accs}")
        if "flops_reduction" in knn:
            lines.append(
                f"gated network: {100 * knn['flops_ratio']:.1f}% of the dense MACs (FLOPs reduction "
                f"{100 * knn['flops_reduction']:.1f}%, target t_d = {summary['budget']})"
            )
    probes = {k: v for k, v in (summary.get("probe_acc") or {}).items() if v is not None}
    if probes:
        trained = f" over {summary['steps']} steps" if summary.get("steps") else ""
        lines.append(
            "online linear probes (a training monitor, fit on the augmented training views" + trained + "): "
            + ", ".join(f"{k} {v:.2f}%" for k, v in probes.items())
        )
        if knn and any(knn.get(b, v) - v > PROBE_GAP_EXPLAINED for b, v in probes.items()):
            lines.append(
                "  they trail k-NN here: they learn while the encoder still changes, from heavily augmented views "
                "(and sampled gates), and a short run gives them too few steps to settle (solo-learn's probe, the "
                "same design, tracks the offline linear accuracy over hundreds of epochs). Report k-NN or "
                "scripts/linear_eval.py, not the probes."
            )
    if summary.get("evaluations"):
        from vdg.eval.summary import record_line

        lines += [f"{r['protocol']} on {r['dataset']}: {record_line(r)}" for r in summary["evaluations"]]
    if summary.get("checkpoint"):
        ckpt = _shown_path(summary["checkpoint"])
        lines.append(f"checkpoint: {ckpt}; next: python scripts/linear_eval.py ckpt={ckpt}")
    return "\n".join(lines)
