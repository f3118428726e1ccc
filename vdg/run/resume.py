"""Resuming a run directory: which checkpoint continues it, whether the config still describes that run, and
extending a finished schedule on purpose (`resume=extend`). It reads checkpoints; it never trains or writes.

resume=auto continues a run only when nothing that shapes it changed: the experiment (`RESUME_MUST_MATCH`)
and its learning-rate schedule (optimizer, scheduler, trainer.max_epochs). A warm-up + cosine schedule is a
function of max_epochs: resuming with another max_epochs would train the rest of a run on a schedule it never
had (a finished run would continue at its final lr, usually 0). resume=extend makes that explicit: training
continues from the checkpoint on the schedule recomputed for the new max_epochs (`ExtendedSchedule`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from vdg.core.errors import CheckpointError, ConfigError
from vdg.methods.checkpoint import read_checkpoint
from vdg.run.checkpoint import config_differences

# Keys of the learning-rate schedule: with resume=auto they must match the checkpoint's (extend may change
# trainer.max_epochs only).
SCHEDULE_KEYS = ("optimizer", "scheduler")


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: the checkpoint, the epoch it trains next and its global step."""

    path: Path
    next_epoch: int
    global_step: int
    saved_max_epochs: int | None
    extend: bool


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest of checkpoints/last.ckpt and a SLURM-requeue hpc_ckpt_*.ckpt in the run directory."""
    candidates = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.exists()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _max_epochs_message(path: Path, done: int, saved: int | None, wanted: int) -> str:
    """Why resume=auto refuses another trainer.max_epochs, and what to type instead."""
    if wanted < done:
        return (
            f"refusing to resume {path}: it has already trained {done} epochs, more than trainer.max_epochs="
            f"{wanted}. Rerun with trainer.max_epochs={saved or done} (nothing to train), or use another run_dir"
        )
    if saved is not None and done >= saved:
        epochs = f"epoch {done}" if wanted - done == 1 else f"epochs {done}-{wanted - 1}"
        return (
            f"refusing to resume {path}: the run finished its {saved}-epoch schedule (trainer.max_epochs={saved}); "
            f"trainer.max_epochs={wanted} would train {epochs} at the schedule's final learning "
            f"rate. To extend the run on a schedule recomputed over {wanted} epochs, add resume=extend; for a fresh "
            f"{wanted}-epoch run, use another run_dir"
        )
    return (
        f"refusing to resume {path}: it stopped after {done} of {saved} epochs, and trainer.max_epochs={wanted} "
        f"would change its learning-rate schedule mid-run. Rerun with trainer.max_epochs={saved} to finish it as "
        f"planned, or add resume=extend to continue on a schedule recomputed over {wanted} epochs"
    )


def find_resume_point(cfg: DictConfig, run_dir: str | Path) -> ResumePoint | None:
    """The checkpoint a run continues from (None: a fresh run), after checking it may be continued.

    Refuses (CheckpointError / ConfigError, one line naming the keys) with resume=never when a checkpoint
    exists, when the experiment changed, when the schedule changed under resume=auto, and when
    trainer.max_epochs is below the epochs already trained.
    """
    run_dir = Path(run_dir)
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return None
    mode = str(cfg.resume)
    if mode == "never":
        raise ConfigError(
            f"{newest} already exists and resume=never: refusing to overwrite a run; pass resume=auto to "
            f"continue it or choose another run_dir"
        )
    checkpoint = read_checkpoint(newest)
    saved = checkpoint["hyper_parameters"]["cfg"]
    current = OmegaConf.to_container(cfg, resolve=True)
    diffs = config_differences(saved, current)
    if diffs:
        raise CheckpointError(
            f"refusing to resume {newest}: the config changed in keys that define the experiment "
            f"({'; '.join(diffs)}). Use another run_dir for a new experiment, or restore these values."
        )
    schedule = config_differences(saved, current, SCHEDULE_KEYS)
    if schedule:
        raise CheckpointError(
            f"refusing to resume {newest}: the learning-rate schedule changed ({'; '.join(schedule)}), so the rest "
            f"of the run would train on a schedule it never had. Restore these values, or use another run_dir"
        )
    done = int(checkpoint.get("epoch", -1)) + 1
    saved_max = (saved.get("trainer") or {}).get("max_epochs")
    wanted = int(cfg.trainer.max_epochs)
    if wanted < done or (saved_max is not None and wanted != saved_max and mode != "extend"):
        raise CheckpointError(_max_epochs_message(newest, done, saved_max, wanted))
    if mode == "extend" and wanted == done:
        raise CheckpointError(
            f"resume=extend: {newest} has already trained {done} epochs; set trainer.max_epochs above {done} "
            f"to extend the run"
        )
    return ResumePoint(newest, done, int(checkpoint.get("global_step", 0)), saved_max, mode == "extend")


class ExtendedSchedule(pl.Callback):
    """resume=extend: once Lightning has restored the optimizer and scheduler, set each parameter group's lr to
    the recomputed schedule's value at the resumed step, instead of the value the old schedule left there.

    The LambdaLR schedules of `BaseMethod.configure_optimizers` are rebuilt from the current config (new
    max_epochs) and keep their restored position (`last_epoch`); only the optimizer's current lr is stale.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for config in trainer.lr_scheduler_configs:
            scheduler: Any = config.scheduler
            lambdas = getattr(scheduler, "lr_lambdas", None)
            if lambdas is None:
                continue
            lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, lambdas, strict=True)]
            for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            scheduler._last_lr = lrs  # what get_last_lr() and LearningRateMonitor report
