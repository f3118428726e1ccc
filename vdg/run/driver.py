"""Pretraining driver behind `scripts/pretrain.py`: config -> data, method, Trainer -> run directory.

Run directory layout: config.yaml (resolved), .hydra/ (the command's Hydra record), checkpoints/{last.ckpt,
epochNNNN.ckpt}, metrics.csv, summary.json, pretrain.log. The science lives in `vdg.methods`; this module only
validates, wires, resumes and records. Everything a run needs is checked before the run directory is created or
touched; one process at a time owns it (`vdg.core.rundir.RunDirLock`); a refused run leaves it as it was; every
record is replaced atomically, never deleted first.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerStatus
from pytorch_lightning.utilities import rank_zero_only

from vdg.core.atomic import atomic_write_text, remove_orphans, storage_error
from vdg.core.errors import ConfigError, Interrupted, StorageError
from vdg.core.rundir import RunDirLock, check_writable, create_dirs, remove_created
from vdg.data import PretrainDataModule
from vdg.data.datasets import build_dataset
from vdg.data.module import eval_loader
from vdg.deploy.export import export_backbone
from vdg.eval.features import extract_features, gate_report, module_device
from vdg.eval.knn import knn_accuracy
from vdg.eval.protocols import check_eval_data, run_evaluation
from vdg.eval.reference import random_init_knn, reference_fields
from vdg.eval.summary import record_line
from vdg.methods import METHODS, BaseMethod, build_method
from vdg.methods.base import sync_batchnorm_scope
from vdg.models import Branch
from vdg.run.callbacks import FAULT_ENV, EpochTimer, FaultInjection, NonFiniteGuard, RNGState
from vdg.run.checkpoint_io import AtomicCheckpointIO
from vdg.run.config import validate_pretrain_config
from vdg.run.hardstop import hard_stop
from vdg.run.logging import build_loggers, check_logger
from vdg.run.progress import progress_callbacks
from vdg.run.resume import ExtendedSchedule, ResumePoint, find_resume_point
from vdg.run.student import resolve_student_widths, save_student_record

log = logging.getLogger(__name__)


class RunInterrupted(Interrupted):
    """Training stopped on SIGINT/SIGTERM before max_epochs; the last checkpoint resumes it."""


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


def checkpoint_callbacks(cfg: DictConfig, checkpoint_dir: Path) -> list[ModelCheckpoint]:
    every = int(cfg.checkpoint.every_n_epochs)
    # "epoch0009.ckpt": no "=", so the path is a plain Hydra value (ckpt=.../epoch0009.ckpt needs no quoting)
    periodic = dict(filename="epoch{epoch:04d}", auto_insert_metric_name=False, save_top_k=-1)
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
        seeds = [int(s) for s in cfg.final_knn.get("random_init_seeds", [])]
        if seeds:
            reference = random_init_knn(model, model.branches, train_loader, test_loader, device, seeds, k=k,
                                        distance=distance)
            result["random_init"] = {}  # per branch: top1_mean, top1_runs, seeds, over_random_init
            for branch, runs in reference.items():
                fields = reference_fields(result[branch.value], runs, seeds)
                result["random_init"][branch.value] = {**fields["random_init"], "over": fields["over_random_init"]}
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


def check_evaluation_data(cfg: DictConfig, evaluations: list[DictConfig]) -> None:
    """The data every chained evaluation (final_knn, evaluate:) will read exists and fits its k, now.

    A k-NN with k larger than its bank, or a transfer target missing on this machine, would otherwise fail
    only after the whole pretraining.
    """
    if cfg.final_knn.enabled:
        bank = len(build_dataset(cfg.dataset, cfg.data, "train"))
        if int(cfg.final_knn.k) > bank:
            raise ConfigError(
                f"final_knn.k={int(cfg.final_knn.k)} is larger than the k-NN bank: the {cfg.dataset.name} train "
                f"split has {bank} images"
            )
    pretrain_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for i, eval_cfg in enumerate(evaluations):
        try:
            check_eval_data(eval_cfg, pretrain_cfg)
        except ConfigError as err:
            raise ConfigError(f"evaluate[{i}]: {err}") from err


def check_trainer_settings(cfg: DictConfig) -> None:
    """Build (and drop) a bare Trainer from the trainer: settings, so that a combination Lightning refuses (fsdp
    on a CPU, a strategy the devices cannot run) fails now, in one line, not after the run directory is written."""
    quiet = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the "GPU available: ..." lines come once, from the real Trainer
    try:
        kwargs = {**trainer_kwargs(cfg), "logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
        pl.Trainer(**kwargs)
    except (ValueError, TypeError) as err:  # Lightning's MisconfigurationException is a user error already
        raise ConfigError(f"trainer settings refused by Lightning: {err}") from err
    finally:
        quiet.setLevel(level)


def prepare(cfg: DictConfig) -> tuple[PretrainDataModule, list[DictConfig], dict[str, Any] | None]:
    """Everything a run needs, checked before anything is created: config, teacher and student files, logger,
    trainer, data, evaluations, run_dir. Returns the data module, the chained evaluations' configs and the slim
    student's width record (None for other runs)."""
    evaluations = validate_pretrain_config(cfg)
    # values read from files (a slim student's widths, a teacher's record) join the config before it is
    # compared with a resumed run's and saved
    METHODS[cfg.method.name].prepare_config(cfg)  # first: a missing teacher file is the likeliest gap
    student = resolve_student_widths(cfg)
    check_logger(cfg)
    check_trainer_settings(cfg)
    check_writable(cfg.run_dir, "run_dir")
    datamodule = PretrainDataModule(cfg)
    datamodule.load_splits()
    check_evaluation_data(cfg, evaluations)
    return datamodule, evaluations, student


def write_run_record(
    cfg: DictConfig, run_dir: Path, hydra_files: dict[str, str] | None, student: dict[str, Any] | None
) -> None:
    """config.yaml (resolved), .hydra/*.yaml (the command as Hydra composed it) and a slim student's width
    record, written atomically once the run is accepted: a refused run must not rewrite the record of the run
    it refused to touch."""
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    for name, text in (hydra_files or {}).items():
        atomic_write_text(run_dir / ".hydra" / name, text)
    if student is not None:
        save_student_record(run_dir, student)


def _log_file(run_dir: Path) -> logging.Handler:
    """Log records of the run (Lightning's and vdg's) also go to run_dir/pretrain.log, appended across resumes."""
    handler = logging.FileHandler(run_dir / "pretrain.log", delay=True)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def pretrain(cfg: DictConfig, hydra_files: dict[str, str] | None = None) -> dict[str, Any]:
    """Train one method on one dataset (resuming its run directory when possible); returns the summary.

    hydra_files: name -> YAML text of the command's Hydra record, written to run_dir/.hydra/ once the run is
    accepted (scripts/pretrain.py passes them; Hydra itself writes nothing into the run directory).
    """
    try:
        datamodule, evaluations, student = prepare(cfg)
    except KeyboardInterrupt:
        raise Interrupted("interrupted before training started; nothing was written") from None
    run_dir = Path(cfg.run_dir)
    if rank_zero_only.rank != 0:  # under torchrun/srun every process runs this; rank 0 owns the directory
        return _train(cfg, run_dir, datamodule, evaluations, find_resume_point(cfg, run_dir))
    created = create_dirs(run_dir)
    lock = RunDirLock(run_dir)
    try:
        lock.acquire()
    except BaseException:
        remove_created(created)
        raise
    try:
        resume = find_resume_point(cfg, run_dir)
    except BaseException:
        lock.release(restore=True)  # a refused run leaves the directory as it found it
        remove_created(created)
        raise
    handler = None
    try:
        # nobody else writes here while we hold the lock: every temp file is an orphan of a killed write
        for folder in (run_dir, run_dir / ".hydra", run_dir / "checkpoints"):
            remove_orphans(folder, any_writer=True)
        for folder in (run_dir / "checkpoints" / "export", run_dir / "checkpoints" / "results"):
            remove_orphans(folder)  # exports and evaluations of this run's checkpoints may run beside it
        write_run_record(cfg, run_dir, hydra_files, student)
        handler = _log_file(run_dir)
        return _train(cfg, run_dir, datamodule, evaluations, resume)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        lock.release()


def _train(
    cfg: DictConfig,
    run_dir: Path,
    datamodule: PretrainDataModule,
    evaluations: list[DictConfig],
    resume: ResumePoint | None,
) -> dict[str, Any]:
    checkpoint_dir = run_dir / "checkpoints"
    pl.seed_everything(int(cfg.seed), workers=True)
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
    if resume is not None and resume.extend:
        callbacks.append(ExtendedSchedule())
    if os.environ.get(FAULT_ENV):
        callbacks.append(FaultInjection(int(os.environ[FAULT_ENV])))
    resume_state = (resume.next_epoch, resume.global_step) if resume else (None, None)
    trainer = pl.Trainer(
        **{**trainer_kwargs(cfg), "enable_progress_bar": show_progress_bar},
        callbacks=callbacks,
        logger=build_loggers(cfg, run_dir, *resume_state),
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
    )
    ckpt_path = resume.path if resume else None
    fit(trainer, model, datamodule, ckpt_path)

    try:
        return after_training(cfg, run_dir, model, trainer, timer, ckpt_path, evaluations)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted after training; {checkpoint_dir / 'last.ckpt'} is complete. Rerun the same command to "
            f"redo the export and evaluations (nothing is trained again)"
        ) from None


def after_training(
    cfg: DictConfig,
    run_dir: Path,
    model: BaseMethod,
    trainer: pl.Trainer,
    timer: EpochTimer,
    ckpt_path: Path | None,
    evaluations: list[DictConfig],
) -> dict[str, Any]:
    """Summary, backbone exports, final k-NN and chained evaluations of a trained run; summary.json last."""
    checkpoint_dir = run_dir / "checkpoints"
    summary = training_summary(cfg, model, trainer, timer, ckpt_path)
    if not trainer.is_global_zero:
        return summary
    if cfg.checkpoint.get("export_backbone", True):
        # backbone-only weights beside the checkpoints, for downstream use (vdg.load_backbone)
        last = checkpoint_dir / "last.ckpt"
        summary["exports"] = {
            b.value: str(export_backbone(last, b, overwrite=True)["safetensors"]) for b in model.branches
        }
    if cfg.final_knn.enabled:
        summary["knn"] = final_knn(model, cfg)
    if evaluations:
        summary["evaluations"] = []
        for eval_cfg in evaluations:
            eval_cfg = eval_cfg.copy()
            eval_cfg.ckpt = str(checkpoint_dir / "last.ckpt")
            summary["evaluations"].extend(run_evaluation(eval_cfg))
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def fit(trainer: pl.Trainer, model: BaseMethod, datamodule: PretrainDataModule, ckpt_path: Path | None) -> None:
    """trainer.fit, with the ways it can stop early made explicit: a signal (SIGINT, SIGTERM of a pre-empted
    job) is a `RunInterrupted` naming the checkpoint to resume from, never a silent exit status 0; a full
    disk or a read-only file system under Lightning's own writers is a one-line `StorageError`. A signal whose
    graceful stop does not begin within seconds (a native op that never returns), or a second one, ends the
    process (`hard_stop`), so `timeout` and a scheduler's SIGTERM always work."""
    try:
        with hard_stop():
            trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except SystemExit as err:  # Lightning turns SIGINT into sys.exit(1) and SIGTERM into SIGTERMException
        sigterm = getattr(trainer, "received_sigterm", False)
        if trainer.state.status == TrainerStatus.INTERRUPTED or sigterm:
            raise interrupted(trainer, "SIGTERM" if sigterm else "SIGINT") from err
        raise
    except OSError as err:
        problem = storage_error(getattr(err, "filename", None) or trainer.default_root_dir, err)
        if problem is not None and not isinstance(err, StorageError):
            raise problem from err
        raise
    if trainer.state.status == TrainerStatus.INTERRUPTED or getattr(trainer, "received_sigterm", False):
        raise interrupted(trainer, "a signal")


def interrupted(trainer: pl.Trainer, what: str) -> RunInterrupted:
    last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    where = f"{last} holds the last completed epoch" if last.exists() else "no checkpoint was written yet"
    return RunInterrupted(
        f"training stopped by {what} at epoch {trainer.current_epoch}, step {trainer.global_step}, before "
        f"trainer.max_epochs={trainer.max_epochs}: {where}; rerun the same command to resume"
    )


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
        try:
            kept = {k: v for k, v in json.loads(previous.read_text()).items() if k not in ("knn", "evaluations")}
            return {**kept, "resumed_from": resumed_from}
        except (OSError, ValueError, AttributeError) as err:  # unreadable: recompute what the trainer knows
            log.warning("ignoring the unreadable %s (%s)", previous, err)
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
        # RankMe of each branch's backbone features on the validation images: label-free, 1 = collapsed
        "rankme": {b.value: _metric(metrics, f"val/rankme_{b.value}") for b in model.branches},
        "feature_dim": int(model.backbone.feature_dim),
        "flops_ratio_train": _metric(metrics, "train/flops_ratio"),
        "flops_ratio_val": ratio,
        "flops_reduction_val": None if ratio is None else 1 - ratio,
        "dense_macs": model.cost.dense_macs,
        "width": int(cfg.backbone.width),
        "subset_per_class": cfg.dataset.get("subset_per_class"),
        "test_subset_per_class": cfg.dataset.get("test_subset_per_class"),
        "subset_seed": cfg.dataset.get("subset_seed"),
        "validation_split": cfg.dataset.get("validation_split"),  # set: evaluated on held-out train images
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


def over_random_init(reference: dict[str, Any] | None) -> str:
    """' (+12.3 over random init 75.0%)', or '' without a reference."""
    if not reference:
        return ""
    seeds = len(reference["seeds"])
    return f" ({reference['over']:+.2f} over random init {reference['top1_mean']:.2f}%, {seeds} init seeds)"


def describe_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines about a finished run: what ran, its accuracy and cost, and what to run next."""
    steps = f" ({summary['steps']} steps)" if summary.get("steps") else ""
    data = summary["dataset"]
    if summary.get("subset_per_class"):
        data += f" ({summary['subset_per_class']} train images per class, subset_seed {summary.get('subset_seed')})"
    lines = [f"{summary['method']} on {data}: {summary['epochs']} epochs{steps}"]
    if summary.get("mean_seconds_per_epoch"):
        lines[0] += f", {summary['mean_seconds_per_epoch']:.1f} s/epoch"
    if summary.get("width") != 64:
        lines.append(
            f"backbone width {summary['width']}: a narrow ResNet-18 ({(summary['width'] / 64) ** 2:.4g} of the "
            "paper's MACs) so that it trains on a CPU; the paper's network is backbone.width=64"
        )
    knn = summary.get("knn")
    if knn:
        reference = knn.get("random_init") or {}
        accs = ", ".join(
            f"{b} {knn[b]:.2f}%{over_random_init(reference.get(b))}" for b in ("dense", "gated") if b in knn
        )
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
    ranks = {k: v for k, v in (summary.get("rankme") or {}).items() if v is not None}
    if ranks:
        lines.append(
            "effective rank (RankMe) of the backbone features on the validation images, of "
            f"{summary.get('feature_dim', 'the')} dimensions; 1 = collapsed: "
            + ", ".join(f"{k} {v:.1f}" for k, v in ranks.items())
        )
    if summary.get("evaluations"):
        lines += [f"{r['protocol']} on {r['dataset']}: {record_line(r)}" for r in summary["evaluations"]]
    if summary.get("checkpoint"):
        ckpt = _shown_path(summary["checkpoint"])
        lines.append(f"checkpoint: {ckpt}; next: python scripts/linear_eval.py ckpt={ckpt}")
    return "\n".join(lines)
