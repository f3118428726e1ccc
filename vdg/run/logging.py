"""Experiment loggers of a pretraining run: run_dir/metrics.csv always, plus Weights & Biases or TensorBoard.

`build_loggers` turns the `logger:` config group (configs/logger/) into Lightning loggers. It imports wandb or
tensorboard only when chosen, so neither is needed to train; it never decides what is logged (the methods do).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import secrets
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from vdg.core.atomic import atomic_write_text
from vdg.core.errors import ConfigError

LOGGERS = ("csv", "wandb", "tensorboard")
WANDB_MODES = ("offline", "online", "disabled")
WANDB_ID_FILE = "wandb_run_id.txt"  # in the run directory: a resumed run logs into the same wandb run


def read_metrics(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and complete rows of a metrics.csv; a row cut short by a kill or a full disk is dropped."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if None not in r and None not in r.values()]
        return list(reader.fieldnames or []), rows


def csv_text(header: list[str], rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


class KeepingExperimentWriter(ExperimentWriter):
    """Lightning's metrics.csv writer, except that it never deletes or truncates the file in place.

    Lightning deletes an existing metrics.csv when the writer starts and rewrites it in place when a new column
    appears: a kill or a full disk at those moments would lose the history of a run. Here the file is
    replaced atomically instead: at start by the rows `keep(row)` accepts (the epochs a resumed run keeps),
    later by the same rows under a wider header. New rows are appended as Lightning does.
    """

    def __init__(self, log_dir: str, keep: Callable[[dict[str, str]], bool]) -> None:
        self._keep = keep  # read by _check_log_dir_exists, which the base __init__ calls
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        header, rows = read_metrics(path)
        atomic_write_text(path, csv_text(header, [r for r in rows if self._keep(r)]))
        self.metrics_keys = list(header)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = Path(self.metrics_file_path)
        _, rows = read_metrics(path)
        atomic_write_text(path, csv_text(list(fieldnames), rows))


class ResumableCSVLogger(CSVLogger):
    """CSVLogger writing run_dir/metrics.csv that, on resume, keeps the rows of the epochs already done.

    The rows from before the resumed epoch (or step, for rows without an epoch) are kept and the rows of the
    interrupted epoch dropped (it is trained again); a fresh run starts from an empty file. At no moment is the
    file missing or half-written (`KeepingExperimentWriter`).
    """

    def __init__(self, run_dir: Path, resume_epoch: int | None, resume_step: int | None) -> None:
        super().__init__(save_dir=str(run_dir), name="", version="")
        self._resume = (resume_epoch, resume_step)

    def _keeps(self, row: dict[str, str]) -> bool:
        resume_epoch, resume_step = self._resume
        if resume_epoch is None:
            return False
        epoch, step = row.get("epoch") or "", row.get("step") or ""
        try:
            return float(epoch) < resume_epoch if epoch else (step != "" and float(step) < resume_step)
        except ValueError:  # a mangled cell: the row is not a record worth keeping
            return False

    @property
    @rank_zero_experiment
    def experiment(self) -> KeepingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = KeepingExperimentWriter(self.log_dir, self._keeps)
        return self._experiment


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
        atomic_write_text(path, run_id + "\n")
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


def check_logger(cfg: Any) -> None:
    """The `logger:` choice is known and usable here (its package installed, a known wandb mode): checked
    before the run directory is touched, so a missing package never leaves a half-started run."""
    name = str((cfg.get("logger") or {}).get("name", "csv"))
    if name not in LOGGERS:
        raise ConfigError(f"unknown logger {name!r}; allowed values: {list(LOGGERS)}")
    if name == "wandb":
        mode = str(cfg.logger.wandb.mode)
        if mode not in WANDB_MODES:
            raise ConfigError(f"unknown logger.wandb.mode {mode!r}; allowed values: {list(WANDB_MODES)}")
        _require_package("wandb", "wandb", "wandb")
    elif name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        if importlib.util.find_spec("tensorboardX") is None:
            _require_package("tensorboard", "tensorboard", "tensorboard")


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
