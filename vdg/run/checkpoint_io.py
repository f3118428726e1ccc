"""Lightning's checkpoint writer through vdg's atomic writes (`vdg.core.atomic`), with the fault injection the
resume tests use. It writes what Lightning hands it; it never decides what goes into a checkpoint.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from vdg.core.atomic import atomic_write

FAULT_ENV = "VDG_FAULT_KILL_IN_SAVE"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer through `atomic_write`: the last complete checkpoint survives a kill or a
    full disk at any moment, and a failed save is a one-line `StorageError`.

    Written out here (rather than relying on fsspec transactions) so that the guarantee is explicit, includes
    fsync, and can be fault-tested: with VDG_FAULT_KILL_IN_SAVE=N set, the process SIGKILLs itself halfway
    through writing its N-th checkpoint (leaving an orphan temp file for the next run to clean up).
    """

    def __init__(self) -> None:
        super().__init__()
        self.saves = 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.saves += 1
        kill_at = os.environ.get(FAULT_ENV)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                if kill_at is not None and self.saves == int(kill_at):
                    f.truncate(f.tell() // 2)
                    os.fsync(f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)

        atomic_write(path, write)
