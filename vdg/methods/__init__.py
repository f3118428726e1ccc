"""Methods: the `METHODS` registry mapping a config name (`method.name`) to its LightningModule class."""

from __future__ import annotations

from typing import Any

from vdg.core.errors import ConfigError
from vdg.methods.base import BaseMethod, StepOutput
from vdg.methods.bt_dual import BTDual
from vdg.methods.distill import DistillMethod
from vdg.methods.seed import SEED
from vdg.methods.simreg import SimReg
from vdg.methods.vdg import VDG
from vdg.methods.vdg_2x import VDG2x
from vdg.methods.vicreg import VICReg
from vdg.methods.vicreg_gating import VICRegGating

METHODS: dict[str, type[BaseMethod]] = {
    "vicreg": VICReg,
    "vdg": VDG,
    "vicreg_gating": VICRegGating,
    "bt_dual": BTDual,
    "vdg_2x": VDG2x,
    "simreg": SimReg,
    "seed": SEED,
}


def register_method(cls: type[BaseMethod]) -> type[BaseMethod]:
    """Class decorator adding a method to `METHODS` under `cls.name` (the plugin API for new methods)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        # not user input: a developer registering two methods under one name
        raise ValueError(f"a method named {cls.name!r} is already registered ({METHODS[cls.name].__name__})")
    METHODS[cls.name] = cls
    return cls


def build_method(cfg: Any) -> BaseMethod:
    name = cfg.method.name
    if name not in METHODS:
        raise ConfigError(f"unknown method.name {name!r}; allowed values: {sorted(METHODS)}")
    return METHODS[name](cfg)


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
