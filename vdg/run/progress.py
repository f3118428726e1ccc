"""Training progress for people and for log files: Lightning's rich bar on a terminal, plain lines elsewhere.

`trainer.progress: auto | rich | plain | none`; plain lines suit SLURM logs, CI and notebooks. It only reports:
it must not change what is trained or logged.
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.utilities.model_summary import get_human_readable_count

from vdg.core.errors import ConfigError

PROGRESS_MODES = ("auto", "rich", "plain", "none")
# what the epoch lines show besides the loss, when the run logs them
EPOCH_METRICS = ("val/acc_dense", "val/acc_gated", "val/flops_ratio")


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class PlainProgress(pl.Callback):
    """One line every `every_n_steps` training steps and one per epoch, on global rank 0, flushed at once.

        [vdg] epoch 3/500 step 40/97 loss 48.2145 | 142.1 s/epoch | ETA epoch 0:01:22, run 19:41:03
        [vdg] epoch 3/500 done in 141.9 s | train/loss 47.9012 val/acc_dense 45.10 | 142.1 s/epoch | ETA 19:38:41

    loss: the total loss of the last step (SSL + gate + probe losses). s/epoch: the mean wall-clock time of the
    epochs finished in this process (validation included); before the first one, estimated from the steps.
    ETA epoch: the rest of this epoch's training steps; run: the rest of the run at that pace. A run resumed from a
    checkpoint written at an epoch's end finishes that epoch (its validation) without starting it: its line says
    "resumed" and counts in no mean.
    """

    def __init__(self, every_n_steps: int = 50, stream: TextIO | None = None) -> None:
        self.every = max(int(every_n_steps), 1)
        self.stream = stream  # None: sys.stdout at print time (so redirections made later still apply)
        self.durations: list[float] = []
        self._epoch_start: float | None = None  # None: the current epoch was not started in this process

    def _print(self, line: str) -> None:
        print(f"[vdg] {line}", file=self.stream or sys.stdout, flush=True)

    @staticmethod
    def _epochs(trainer: pl.Trainer) -> int | None:
        max_epochs = trainer.max_epochs
        return None if max_epochs is None or max_epochs < 0 else int(max_epochs)

    def _seconds_per_epoch(self, seconds_per_step: float, steps: float) -> float | None:
        if self.durations:
            return sum(self.durations) / len(self.durations)
        return seconds_per_step * steps if math.isfinite(steps) else None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero or (batch_idx + 1) % self.every:
            return
        if self._epoch_start is None:
            return
        done, steps = batch_idx + 1, trainer.num_training_batches
        per_step = (time.perf_counter() - self._epoch_start) / done
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        epochs = self._epochs(trainer)
        line = f"epoch {trainer.current_epoch + 1}/{epochs or '?'} step {done}"
        line += f"/{steps}" if math.isfinite(steps) else ""
        if loss is not None:
            line += f" loss {float(loss):.4f}"
        per_epoch = self._seconds_per_epoch(per_step, steps)
        if per_epoch is not None and math.isfinite(steps):
            left_in_epoch = per_step * (steps - done)
            line += f" | {per_epoch:.1f} s/epoch | ETA epoch {_duration(left_in_epoch)}"
            if epochs is not None:
                run_left = left_in_epoch + per_epoch * (epochs - trainer.current_epoch - 1)
                line += f", run {_duration(run_left)}"
        self._print(line)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started, self._epoch_start = self._epoch_start, None
        seconds = None if started is None else time.perf_counter() - started
        if seconds is not None:
            self.durations.append(seconds)
        if not trainer.is_global_zero:
            return
        epochs = self._epochs(trainer)
        metrics = trainer.callback_metrics
        shown = [f"{key} {float(metrics[key]):.4f}" for key in ("train/loss", *EPOCH_METRICS) if key in metrics]
        line = f"epoch {trainer.current_epoch + 1}/{epochs or '?'} "
        line += "done (resumed)" if seconds is None else f"done in {seconds:.1f} s"
        line += (" | " + " ".join(shown)) if shown else ""
        if self.durations:
            per_epoch = sum(self.durations) / len(self.durations)
            line += f" | {per_epoch:.1f} s/epoch"
            if epochs is not None:
                line += f" | ETA {_duration(per_epoch * (epochs - trainer.current_epoch - 1))}"
        self._print(line)


class ModelOverview(pl.Callback):
    """One line at the start of training: the method, its parameters per top-level module and the dense MACs.

    It stands in for Lightning's model summary (configs/trainer/default.yaml turns that off): Lightning counts
    FLOPs by running an example input, which a vdg method does not define, so its summary printed "Total FLOPs: 0";
    vdg counts MACs analytically (`vdg.models.flops`, `method.cost`).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    @staticmethod
    def describe(pl_module: pl.LightningModule) -> str:
        parts = [
            f"{name} {get_human_readable_count(sum(p.numel() for p in module.parameters()))}"
            for name, module in pl_module.named_children()
        ]
        trainable = get_human_readable_count(sum(p.numel() for p in pl_module.parameters() if p.requires_grad))
        line = f"model: {pl_module.name}, parameters {', '.join(parts)} ({trainable} trainable)"
        cost, cfg = getattr(pl_module, "cost", None), getattr(pl_module, "cfg", None)
        if cost is not None and cfg is not None:
            size = int(cfg.dataset.image_size)
            line += f" | dense network {get_human_readable_count(cost.dense_macs)} MACs per {size}x{size} image"
            if getattr(pl_module.backbone, "gated", False):
                line += f", gated target t_d = {float(cfg.budget):g}"
        return line

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            print(f"[vdg] {self.describe(pl_module)}", file=self.stream or sys.stdout, flush=True)


def progress_callbacks(trainer_cfg: Mapping[str, Any]) -> tuple[list[pl.Callback], bool]:
    """The progress callbacks for the `trainer:` config and the `enable_progress_bar` the Trainer needs with them.

    trainer.progress: auto (rich when stdout is a terminal, else plain) | rich (Lightning's RichProgressBar: one
    bar per epoch with its time remaining) | plain (`PlainProgress` lines every trainer.progress_every_n_steps
    steps and per epoch) | none. trainer.enable_progress_bar=false means none, whatever trainer.progress says.
    Except with none, a `ModelOverview` line comes first.
    """
    mode = str(trainer_cfg.get("progress", "auto"))
    if mode not in PROGRESS_MODES:
        raise ConfigError(f"unknown trainer.progress {mode!r}; allowed values: {list(PROGRESS_MODES)}")
    if not trainer_cfg.get("enable_progress_bar", True) or mode == "none":
        return [], False
    if mode == "auto":
        mode = "rich" if sys.stdout.isatty() else "plain"
    if mode == "rich":
        return [ModelOverview(), RichProgressBar()], True
    return [ModelOverview(), PlainProgress(int(trainer_cfg.get("progress_every_n_steps", 50)))], False
