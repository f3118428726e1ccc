"""Experiment loggers (vdg/run/logging.py: metrics.csv, wandb, tensorboard) and progress (vdg/run/progress.py)."""

from __future__ import annotations

import csv
import importlib.util
import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import RichProgressBar
from torch import nn

import vdg.run.logging as vdg_logging
from vdg.core.errors import ConfigError
from vdg.run.logging import (
    WANDB_ID_FILE,
    FinishingWandbLogger,
    ResumableCSVLogger,
    build_loggers,
    wandb_run_id,
)
from vdg.run.progress import ModelOverview, PlainProgress, progress_callbacks

from .conftest import compose_config

REPO = Path(__file__).resolve().parents[1]
LOGGER_OPTIONS = sorted(p.stem for p in (REPO / "configs" / "logger").glob("*.yaml"))


has_tensorboard = importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX")


class TinyRegression(pl.LightningModule):
    """A 4-step-per-epoch least-squares fit: enough to drive loggers and progress callbacks."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.save_hyperparameters({"cfg": {"method": {"name": "tiny"}}})

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return {"loss": loss}

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):  # noqa: ANN201
        data = torch.utils.data.TensorDataset(torch.randn(16, 3), torch.randn(16, 1))
        return torch.utils.data.DataLoader(data, batch_size=4)


def fit(run_dir: Path, loggers, callbacks=(), epochs: int = 2, progress_bar: bool = False) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=loggers,
        callbacks=list(callbacks),
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        default_root_dir=str(run_dir),
        accelerator="cpu",
    )
    trainer.fit(TinyRegression())
    return trainer


def logger_cfg(option: str, run_dir: Path, *extra: str):
    """The part of a pretraining config `build_loggers` reads: run_dir and configs/logger/<option>.yaml."""
    cfg = OmegaConf.create(
        {"run_dir": str(run_dir), "logger": OmegaConf.load(REPO / "configs" / "logger" / f"{option}.yaml")}
    )
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(extra)))


# ----- the config group --------------------------------------------------------------------------------------


def test_logger_group_has_the_documented_options():
    assert LOGGER_OPTIONS == ["csv", "tensorboard", "wandb"]
    assert sorted(vdg_logging.LOGGERS) == LOGGER_OPTIONS
    for option in LOGGER_OPTIONS:
        assert OmegaConf.load(REPO / "configs" / "logger" / f"{option}.yaml").name == option
    wandb = OmegaConf.load(REPO / "configs" / "logger" / "wandb.yaml").wandb
    assert wandb.mode == "offline"  # never online unless asked for


def test_pretrain_config_defaults_to_csv():
    assert compose_config([]).logger.name == "csv"


# ----- csv -----------------------------------------------------------------------------------------------------


def test_csv_is_always_there_and_alone_by_default(tmp_path):
    loggers = build_loggers(OmegaConf.create({"run_dir": str(tmp_path)}), tmp_path)  # no logger block at all
    assert [type(lg) for lg in loggers] == [ResumableCSVLogger]
    fit(tmp_path, loggers)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows if r.get("train/loss")] == [0, 1]


def test_csv_logger_keeps_the_rows_before_the_resumed_epoch(tmp_path):
    fit(tmp_path, build_loggers(OmegaConf.create({}), tmp_path), epochs=3)
    logger = ResumableCSVLogger(tmp_path, resume_epoch=2, resume_step=8)
    logger.log_metrics({"train/loss": 1.0, "epoch": 2}, step=8)
    logger.save()
    with open(tmp_path / "metrics.csv") as f:
        epochs = [int(float(r["epoch"])) for r in csv.DictReader(f) if r.get("train/loss")]
    assert epochs == [0, 1, 2]  # epoch 2 of the first run dropped, the resumed epoch 2 appended


def test_unknown_logger_is_refused(tmp_path):
    cfg = OmegaConf.create({"logger": {"name": "mlflow"}})
    with pytest.raises(ConfigError, match=r"unknown logger 'mlflow'.*\['csv', 'wandb', 'tensorboard'\]"):
        build_loggers(cfg, tmp_path)


# ----- wandb ---------------------------------------------------------------------------------------------------


@pytest.fixture
def quiet_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.delenv("WANDB_MODE", raising=False)


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logger=wandb needs the wandb package.*pip install"):
        build_loggers(logger_cfg("wandb", tmp_path), tmp_path)


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    missing = ("tensorboard", "tensorboardX")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    with pytest.raises(ConfigError, match=r"logger=tensorboard needs the tensorboard package"):
        build_loggers(logger_cfg("tensorboard", tmp_path), tmp_path)


def test_unknown_wandb_mode_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"logger.wandb.mode 'dryrun'.*\['offline', 'online', 'disabled'\]"):
        build_loggers(logger_cfg("wandb", tmp_path, "logger.wandb.mode=dryrun"), tmp_path)


def test_wandb_run_id_is_stored_once_and_reused(tmp_path):
    first = wandb_run_id(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{8}", first)
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == first
    assert wandb_run_id(tmp_path) == first
    assert wandb_run_id(tmp_path / "other") != first


def test_wandb_offline_run_lives_in_the_run_dir_and_resumes_its_id(tmp_path, quiet_wandb):
    import wandb

    cfg = logger_cfg("wandb", tmp_path, "logger.wandb.project=vdg-tests")
    loggers = build_loggers(cfg, tmp_path)
    assert [type(lg) for lg in loggers] == [ResumableCSVLogger, FinishingWandbLogger]
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    fit(tmp_path, loggers)
    assert wandb.run is None  # finished: the next job of a sweep gets its own run
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert (tmp_path / "metrics.csv").is_file()  # csv is kept alongside
    again = build_loggers(cfg, tmp_path, resume_epoch=2, resume_step=8)[1]
    assert again._wandb_init["id"] == run_id and again._wandb_init["resume"] == "allow"
    assert again._wandb_init["mode"] == "offline" and again._wandb_init["name"] == str(tmp_path)


def test_wandb_disabled_writes_nothing(tmp_path, quiet_wandb):
    fit(tmp_path, build_loggers(logger_cfg("wandb", tmp_path, "logger.wandb.mode=disabled"), tmp_path), epochs=1)
    assert not (tmp_path / "wandb").exists()


def test_pretrain_with_wandb_resumes_the_same_wandb_run(tiny_cfg, quiet_wandb):
    cfg = tiny_cfg("method=vicreg", "logger=wandb", "probe.enabled=false", "checkpoint.every_n_epochs=1")
    from vdg.run.driver import pretrain

    pretrain(cfg)
    run_dir = Path(cfg.run_dir)
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    pretrain(tiny_cfg("method=vicreg", "logger=wandb", "probe.enabled=false", "trainer.max_epochs=2", "resume=extend"))
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == run_id
    runs = [p.name for p in (run_dir / "wandb").glob("offline-run-*")]
    assert runs and all(f"-{run_id}" in name for name in runs), runs  # wandb may suffix a second one with "-1"


@pytest.mark.skipif(not has_tensorboard, reason="tensorboard is not installed (pip install -e '.[tensorboard]')")
def test_tensorboard_events_go_to_the_run_dir(tmp_path):
    fit(tmp_path, build_loggers(logger_cfg("tensorboard", tmp_path), tmp_path), epochs=1)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "metrics.csv").is_file()


# ----- progress ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trainer", "tty", "kind", "bar"),
    [
        ({"progress": "none"}, True, None, False),
        ({"progress": "rich", "enable_progress_bar": False}, True, None, False),
        ({"progress": "plain"}, True, PlainProgress, False),
        ({"progress": "rich"}, False, RichProgressBar, True),
        ({"progress": "auto"}, True, RichProgressBar, True),
        ({"progress": "auto"}, False, PlainProgress, False),
        ({}, False, PlainProgress, False),
    ],
)
def test_progress_callbacks_follow_the_mode_and_the_terminal(monkeypatch, trainer, tty, kind, bar):
    monkeypatch.setattr("sys.stdout.isatty", lambda: tty)
    callbacks, enable_bar = progress_callbacks(trainer)
    assert [type(c) for c in callbacks] == ([ModelOverview, kind] if kind else [])
    assert enable_bar is bar


def test_progress_every_n_steps_is_read():
    (_, callback), _ = progress_callbacks({"progress": "plain", "progress_every_n_steps": 7})
    assert callback.every == 7


def test_unknown_progress_mode_is_refused():
    with pytest.raises(ConfigError, match=r"trainer.progress 'tqdm'.*\['auto', 'rich', 'plain', 'none'\]"):
        progress_callbacks({"progress": "tqdm"})


def test_plain_progress_prints_steps_epochs_and_eta(tmp_path):
    stream = io.StringIO()
    fit(tmp_path, False, [PlainProgress(every_n_steps=2, stream=stream)], epochs=2)
    lines = stream.getvalue().splitlines()
    steps = [line for line in lines if " step " in line]
    epochs = [line for line in lines if " done in " in line]
    assert len(steps) == 4 and len(epochs) == 2 and len(lines) == 6  # 4 steps/epoch, a line every 2, per epoch
    assert all(line.startswith("[vdg] ") for line in lines)
    assert re.search(r"epoch 1/2 step 2/4 loss \d+\.\d{4} \| \d+\.\d s/epoch \| ETA epoch 0:00:\d\d, run \d", steps[0])
    assert re.search(r"epoch 1/2 done in \d+\.\d s \| train/loss \d+\.\d{4} \| \d+\.\d s/epoch \| ETA ", epochs[0])
    assert epochs[1].startswith("[vdg] epoch 2/2 done") and epochs[1].endswith("ETA 0:00:00")


def test_plain_progress_an_epoch_ended_but_not_started_here_is_resumed_not_timed():
    # Lightning resumes a checkpoint written at an epoch's end by ending that epoch (validation, epoch-end hooks)
    # without starting it; the line once said "done in 33608.5 s" (the time since perf_counter's origin)
    stream = io.StringIO()
    callback = PlainProgress(stream=stream)
    trainer = SimpleNamespace(is_global_zero=True, max_epochs=30, current_epoch=9, callback_metrics={})
    callback.on_train_epoch_end(trainer, None)
    assert stream.getvalue() == "[vdg] epoch 10/30 done (resumed)\n" and callback.durations == []
    callback.on_train_epoch_start(trainer, None)
    trainer.current_epoch = 10
    callback.on_train_epoch_end(trainer, None)
    last = stream.getvalue().splitlines()[-1]
    assert re.fullmatch(r"\[vdg\] epoch 11/30 done in 0\.0 s \| 0\.0 s/epoch \| ETA 0:00:00", last), last
    assert len(callback.durations) == 1


def test_the_epoch_timer_times_only_epochs_started_in_this_process():
    from vdg.run.callbacks import EpochTimer

    timer, module = EpochTimer(), SimpleNamespace(device=torch.device("cpu"))
    timer.on_train_epoch_end(None, module)  # resumed at an epoch's end: ended here, started in another process
    assert timer.durations == []
    timer.on_train_epoch_start(None, module)
    timer.on_train_epoch_end(None, module)
    assert len(timer.durations) == 1 and 0 <= timer.durations[0] < 1


def test_plain_progress_stays_quiet_between_steps(tmp_path):
    stream = io.StringIO()
    fit(tmp_path, False, [PlainProgress(every_n_steps=100, stream=stream)], epochs=1)
    assert [line for line in stream.getvalue().splitlines() if " step " in line] == []
    assert len(stream.getvalue().splitlines()) == 1  # the epoch line only


def test_pretrain_prints_plain_progress_lines(tiny_cfg, capsys):
    from vdg.run.driver import pretrain

    pretrain(
        tiny_cfg(
            "method=vicreg",
            "probe.enabled=false",
            "trainer.enable_progress_bar=true",
            "trainer.progress=plain",
            "trainer.progress_every_n_steps=2",
        )
    )
    out = capsys.readouterr().out
    assert re.search(r"\[vdg\] epoch 1/1 step 2/4 loss ", out)
    assert re.search(r"\[vdg\] epoch 1/1 done in .* ETA 0:00:00", out)
