"""Lightning callbacks for the pretraining driver: epoch timing, exact-resume RNG state, the non-finite loss
guard and fault injection for the resume tests. They observe and protect training; they hold no science."""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor


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


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as tensors and plain containers (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGState(pl.Callback):
    """Saves the RNG states with each checkpoint and puts them back just before a resumed run draws its
    first training batch, so that it draws exactly what an uninterrupted run would have drawn.

    Lightning restores callbacks before `on_fit_start`, then runs a sanity validation (which consumes random
    numbers: each DataLoader iterator draws a seed) and then creates the training iterator. So the state is
    restored at fit start and again after the sanity check.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def _restore(self) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending = None


class NonFiniteLossError(FloatingPointError):
    """Training stopped because a loss term became NaN or Inf."""


class NonFiniteGuard(pl.Callback):
    """Stops training when a loss term is NaN/Inf, naming the epoch, step and the offending terms.

    The finiteness test runs on the device every step and is read on the host only every `check_every_n_steps`
    steps and before any validation or checkpoint, so the guard adds no host synchronisation per step. A bad
    step is always caught before a checkpoint could be written, so the last good checkpoint stays intact.
    """

    def __init__(self, check_every_n_steps: int = 50) -> None:
        self.every = max(int(check_every_n_steps), 1)
        self._reset()

    def _reset(self) -> None:
        self.names: list[str] | None = None
        self.first_bad: Tensor | None = None  # [2 + T]: step, epoch, bad flag per term, at the first bad step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # device-side counters, set once per epoch, so the per-step bookkeeping never copies from the host
        self._step = torch.tensor(trainer.global_step, device=pl_module.device)
        self._epoch = torch.tensor(trainer.current_epoch, device=pl_module.device)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        terms = outputs.get("terms", {}) if isinstance(outputs, dict) else {}
        terms = {"loss": outputs["loss"] if isinstance(outputs, dict) else outputs, **terms}
        if self.names is None:
            self.names = list(terms)
        values = torch.stack([terms[n].detach().float().reshape(()) for n in self.names])
        bad = ~torch.isfinite(values)
        here = torch.cat([torch.stack([self._step, self._epoch]), bad.long()])
        if self.first_bad is None:
            self.first_bad = torch.full_like(here, -1)
        fresh = (self.first_bad[0] < 0) & bad.any()
        self.first_bad = torch.where(fresh, here, self.first_bad)
        self._step = self._step + 1
        if (batch_idx + 1) % self.every == 0:
            self.check()

    def check(self) -> None:
        if self.first_bad is None or int(self.first_bad[0]) < 0:
            return
        record = self.first_bad.tolist()
        step, epoch, flags = record[0], record[1], record[2:]
        offending = [n for n, f in zip(self.names or [], flags, strict=True) if f]
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, step {step}: {', '.join(offending)} became NaN/Inf. Training "
            f"stopped; the last good checkpoint was not overwritten (lower optimizer.lr, or check the data)."
        )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.check()


FAULT_ENV = "VDG_FAULT_KILL_AT_STEP"


class FaultInjection(pl.Callback):
    """Test hook: SIGKILLs this process after global step N when VDG_FAULT_KILL_AT_STEP=N is set.

    Used by the resume tests to interrupt a run mid-epoch for real (no clean shutdown, no final save).
    """

    def __init__(self, kill_at_step: int) -> None:
        self.kill_at_step = kill_at_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
