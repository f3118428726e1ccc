"""Experiment loggers of a pretraining run: run_dir/metrics.csv always, plus Weights & Biases or TensorBoard.

`build_loggers` turns the `logger:` config group (configs/logger/) into Lightning loggers. It imports wandb or
tensorboard only when chosen, so neither is needed to train; it never decides what is logged (the methods do).
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import secrets
import warnings
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from vdg.run.config import ConfigError

LOGGERS = ("csv", "wandb", "tensorboard")
WANDB_MODES = ("offline", "online", "disabled")
WANDB_ID_FILE = "wandb_run_id.txt"  # in the run directory: a resumed run logs into the same wandb run


class ResumableCSVLogger(CSVLogger):
    """CSVLogger writing run_dir/metrics.csv that, on resume, keeps the rows of the epochs already done.

    Lightning's CSV writer deletes an existing metrics.csv; the rows from before the resumed epoch are read
    first and written back ahead of the new ones, so one file holds the whole run.
    """

    def __init__(self, run_dir: Path, resume_epoch: int | None, resume_step: int | None) -> None:
        self._carry: list[dict[str, str]] = []
        path = run_dir / "metrics.csv"
        if resume_epoch is not None and path.exists():
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    epoch, step = row.get("epoch") or "", row.get("step") or ""
                    keep = float(epoch) < resume_epoch if epoch else (step != "" and float(step) < resume_step)
                    if keep:
                        self._carry.append(row)
        super().__init__(save_dir=str(run_dir), name="", version="")

    @property
    def experiment(self):  # noqa: ANN201 - lightning's ExperimentWriter
        with warnings.catch_warnings():
            # Lightning warns "previous log files in this directory will be deleted" whenever the folder is not
            # empty, and the run directory never is (config.yaml, checkpoints). Its writer replaces one file,
            # metrics.csv, whose earlier rows this class carries over below: nothing is lost.
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            writer = super().experiment
        if self._carry:
            writer.metrics[:0] = [{k: v for k, v in row.items() if v != ""} for row in self._carry]
            self._carry = []
        return writer


class FinishingWandbLogger(WandbLogger):
    """WandbLogger that ends its wandb run when training ends (successfully or not).

    Lightning leaves the run open, and a later WandbLogger in the same process would then log into it: the jobs
    of a Hydra sweep run one after another in one process, each must get its own wandb run.
    """

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None and hasattr(self._experiment, "finish"):
            self._experiment.finish(exit_code=0 if status == "success" else 1)


def _require_package(package: str, logger: str, extra: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f'logger={logger} needs the {package} package, which is not installed: `pip install -e ".[{extra}]"` '
            f"(or `pip install {package}`), or choose another logger; allowed values: {list(LOGGERS)}"
        )


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of a run directory: read from run_dir/wandb_run_id.txt, else made up and written there.

    Only global rank 0 writes the file (the other processes of a multi-GPU run do not log to wandb).
    """
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f]: a valid wandb run id
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def wandb_logger(cfg: Any, run_dir: Path) -> WandbLogger:
    """A wandb logger writing under run_dir/wandb/, resuming the run id stored in the run directory."""
    options = cfg.logger.wandb
    mode = str(options.mode)
    if mode not in WANDB_MODES:
        raise ConfigError(f"unknown logger.wandb.mode {mode!r}; allowed values: {list(WANDB_MODES)}")
    _require_package("wandb", "wandb", "wandb")
    return FinishingWandbLogger(
        save_dir=str(run_dir),
        id=wandb_run_id(run_dir),
        resume="allow",
        mode=mode,
        project=options.project,
        entity=options.entity,
        name=options.name or str(cfg.run_dir),
        group=options.group,
        tags=list(options.tags or []),
    )


def tensorboard_logger(run_dir: Path) -> TensorBoardLogger:
    """TensorBoard event files in run_dir/tensorboard/ (`tensorboard --logdir runs` shows every run)."""
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        _require_package("tensorboard", "tensorboard", "tensorboard")
    return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)


def build_loggers(
    cfg: Any, run_dir: str | Path, resume_epoch: int | None = None, resume_step: int | None = None
) -> list[Logger]:
    """metrics.csv (kept across resumes) plus the logger named by `logger.name`: csv | wandb | tensorboard.

    resume_epoch / resume_step: where a resumed run continues (metrics.csv keeps the rows before them);
    None for a fresh run. A config without a `logger:` block logs to metrics.csv only.
    """
    run_dir = Path(run_dir)
    name = str((cfg.get("logger") or {}).get("name", "csv"))
    if name not in LOGGERS:
        raise ConfigError(f"unknown logger {name!r}; allowed values: {list(LOGGERS)}")
    loggers: list[Logger] = [ResumableCSVLogger(run_dir, resume_epoch, resume_step)]
    if name == "wandb":
        loggers.append(wandb_logger(cfg, run_dir))
    elif name == "tensorboard":
        loggers.append(tensorboard_logger(run_dir))
    return loggers


class _DropLightningTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger/litmodels" lines: advertisements for cloud
    services, printed on every run, that say nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_known_warnings() -> None:
    """Silence the messages every run printed that are known to be harmless (each says why below).

    Process-wide and idempotent: the scripts call it once before training.
    """
    # Lightning 2.6 builds torch's LeafSpec, which torch 2.14 deprecated in favour of TreeSpec.is_leaf(); the
    # tree it builds is the same, so the FutureWarning (Lightning's to act on) changes nothing for a run.
    leafspec = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
    warnings.filterwarnings("ignore", message=leafspec, category=FutureWarning)
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTips) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLightningTips())
