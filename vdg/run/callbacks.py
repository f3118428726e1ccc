"""Lightning callbacks for the pretraining driver: epoch timing, exact-resume RNG state, the non-finite loss
guard and fault injection for the resume tests. They observe and protect training; they hold no science."""

from __future__ import annotations

import os
import random
import signal
import time
import warnings
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from vdg.core.errors import NonFiniteLossError
from vdg.losses.distributed import gather_objects


class EpochTimer(pl.Callback):
    """Wall-clock seconds of each training epoch (validation excluded) started in this process.

    A run resumed from a checkpoint written at an epoch's end finishes that epoch without starting it (Lightning
    runs its validation and epoch-end hooks): it is not timed (it once counted as 33,608 s, the time since
    perf_counter's origin, and a 30-epoch run's summary said 1,618.8 s/epoch)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started, self._start = self._start, None
        if started is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.durations.append(time.perf_counter() - started)


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG streams, as tensors and plain containers (loadable with weights_only=True): torch's CPU
    generator, numpy, Python's `random`, and the CUDA generator of `device` only (the process's own GPU).

    Only the own GPU's: a process draws from no other, and a list over every visible GPU could not be put back
    where fewer are visible (a SLURM requeue onto a smaller allocation, CUDA_VISIBLE_DEVICES=0).
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Put back what `capture_rng_state` saved; the CUDA state goes to `device` (when it is a GPU)."""
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, list | tuple):  # checkpoints before per-process states: one state per visible GPU
        index = device.index or 0
        if index >= len(cuda):
            warnings.warn(f"the checkpoint holds no RNG state for {device}; its stream starts afresh", stacklevel=2)
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def seed_rank_stream(rank: int, device: torch.device) -> None:
    """Give process `rank` > 0 its own stream of `device`'s default generator; rank 0 keeps the seed's stream.

    Lightning seeds every process alike, so every GPU would draw the same GPU-side augmentation parameters
    (data.backend=gpu: 8 GPUs, a global batch of 512, only 64 independent crops) and the same gate noise. The
    seed mixes the run's seed with the rank (numpy's SeedSequence), so runs stay reproducible.
    """
    if rank == 0:
        return
    cuda = device.type == "cuda"
    base = torch.cuda.initial_seed() if cuda else torch.initial_seed()
    seed = int(np.random.SeedSequence([base, rank]).generate_state(1)[0])
    if cuda:
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


class RNGState(pl.Callback):
    """Every process's random streams: its own from the start, saved with each checkpoint, and put back just
    before a resumed run draws its first training batch, so that it draws exactly what an uninterrupted run
    would have drawn.

    - A fresh run gives each process > 0 its own stream of the training device (`seed_rank_stream`).
    - Saving: every process captures its own RNG states (`capture_rng_state`, its own GPU only) and they are
      gathered into the checkpoint as one list indexed by global rank (Lightning writes rank 0's checkpoint,
      but every rank builds it).
    - Restoring: each process takes its own rank's states. A checkpoint written by a different number of
      processes is resumed without crashing, with a warning: ranks the checkpoint does not know get a fresh
      stream of their own (never another rank's), and the run is no longer the exact continuation.
    Lightning restores callbacks before `on_fit_start`, then runs a sanity validation (which consumes random
    numbers: each DataLoader iterator draws a seed) and then creates the training iterator. So the states are
    restored at fit start and again after the sanity check.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None  # saved states per rank, until training starts
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def _device(self) -> torch.device | None:
        return None if self._trainer is None else self._trainer.strategy.root_device

    def state_dict(self) -> dict[str, Any]:
        # runs in every process when a checkpoint is built (Trainer.save_checkpoint), so the gather is safe
        return {"rng_per_rank": gather_objects(capture_rng_state(self._device()))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng_per_rank" in state_dict:
            self._pending = list(state_dict["rng_per_rank"])
        elif state_dict.get("rng") is not None:  # checkpoints before per-process states: rank 0's only
            self._pending = [state_dict["rng"]]

    def _restore(self, trainer: pl.Trainer) -> None:
        if self._pending is None:
            return
        rank, device = trainer.global_rank, trainer.strategy.root_device
        if rank < len(self._pending):
            restore_rng_state(self._pending[rank], device)
        else:
            seed_rank_stream(rank, device)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            seed_rank_stream(trainer.global_rank, trainer.strategy.root_device)
            return
        if len(self._pending) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds the RNG states of {len(self._pending)} process(es) and this run has "
                f"{trainer.world_size}: each process resumes its own rank's streams where the checkpoint has them "
                "and starts a fresh stream otherwise, so the run is not the exact continuation of the saved one"
            )
        self._restore(trainer)

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending = None


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
