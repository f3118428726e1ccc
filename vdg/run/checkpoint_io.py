"""Atomic checkpoint writes for the Trainer: a checkpoint file is either the previous one or the new one,
never a half-written mix. It only writes files; what goes into a checkpoint is Lightning's business."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

FAULT_ENV = "VDG_FAULT_KILL_IN_SAVE"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `<name>.tmp-<pid>` in the same folder, fsync, then os.replace onto the final name.

    os.replace is atomic on POSIX file systems, so a process killed at any moment leaves the last complete
    checkpoint in place. Written out here (rather than relying on fsspec transactions) so that the guarantee
    is explicit, includes fsync, and can be fault-tested: with VDG_FAULT_KILL_IN_SAVE=N set, the process
    SIGKILLs itself halfway through writing its N-th checkpoint.
    """

    def __init__(self) -> None:
        super().__init__()
        self.saves = 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        self.saves += 1
        kill_at = os.environ.get(FAULT_ENV)
        try:
            with open(tmp, "wb") as f:
                if kill_at is not None and self.saves == int(kill_at):
                    torch.save(checkpoint, f)
                    f.flush()
                    f.truncate(f.tell() // 2)
                    os.fsync(f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
