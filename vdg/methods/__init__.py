"""Methods: the `METHODS` registry mapping a config name (`method.name`) to its LightningModule class."""

from __future__ import annotations

from vdg.methods.base import BaseMethod, StepOutput
from vdg.methods.bt_dual import BTDual
from vdg.methods.distill import DistillMethod
from vdg.methods.registry import METHODS, build_method, register_method
from vdg.methods.seed import SEED
from vdg.methods.simreg import SimReg
from vdg.methods.vdg import VDG
from vdg.methods.vdg_2x import VDG2x
from vdg.methods.vicreg import VICReg
from vdg.methods.vicreg_gating import VICRegGating

METHODS.update(
    {
        "vicreg": VICReg,
        "vdg": VDG,
        "vicreg_gating": VICRegGating,
        "bt_dual": BTDual,
        "vdg_2x": VDG2x,
        "simreg": SimReg,
        "seed": SEED,
    }
)

__all__ = [
    "METHODS",
    "BaseMethod",
    "BTDual",
    "DistillMethod",
    "SEED",
    "SimReg",
    "StepOutput",
    "VDG",
    "VDG2x",
    "VICReg",
    "VICRegGating",
    "build_method",
    "register_method",
]
