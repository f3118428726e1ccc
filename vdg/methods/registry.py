"""The `METHODS` registry: config name (`method.name`) -> LightningModule class, and building a method from a config.

The built-in methods are registered by `vdg.methods` (its `__init__`); this module imports none of them, so that
the checkpoint loader (`vdg.methods.checkpoint`), which any method's teacher may need, does not import them back.
"""

from __future__ import annotations

from typing import Any

from vdg.core.errors import ConfigError
from vdg.methods.base import BaseMethod

METHODS: dict[str, type[BaseMethod]] = {}  # filled by vdg.methods with the built-in methods, then by plugins


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
