"""Validation of a composed pretraining config: every bad value fails early with the key and allowed values.

Checks values only; composing configs is Hydra's job and building objects is the caller's.
"""

from __future__ import annotations

from typing import Any

from vdg.data.datasets import DATASETS
from vdg.data.gpu_module import BACKENDS
from vdg.models.resnet import BN_SPLITS, STEMS
from vdg.optim import INTERVALS, OPTIMIZERS

RESUME_MODES = ("auto", "never")


class ConfigError(ValueError):
    """A config value is outside what vdg accepts; the message names the key and the allowed values."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_pretrain_config(cfg: Any) -> None:
    from vdg.methods import METHODS

    budget = cfg.get("budget")
    _require(
        isinstance(budget, int | float) and not isinstance(budget, bool) and 0 < budget <= 1,
        f"budget={budget!r} is outside (0, 1]: budget is t_d, the gated network's target FLOPs ratio "
        "(e.g. budget=0.3)",
    )
    _require(
        cfg.method.name in METHODS,
        f"unknown method.name {cfg.method.name!r}; allowed values: {sorted(METHODS)}",
    )
    _require(
        cfg.dataset.name in DATASETS,
        f"unknown dataset.name {cfg.dataset.name!r}; allowed values: {list(DATASETS)}",
    )
    _require(
        cfg.dataset.stem in STEMS, f"unknown dataset.stem {cfg.dataset.stem!r}; allowed values: {list(STEMS)}"
    )
    _require(
        cfg.backbone.bn_split in BN_SPLITS,
        f"unknown backbone.bn_split {cfg.backbone.bn_split!r}; allowed values: {list(BN_SPLITS)}",
    )
    _require(
        isinstance(cfg.backbone.width, int) and cfg.backbone.width >= 4,
        f"backbone.width={cfg.backbone.width!r} must be an integer >= 4",
    )
    _require(
        isinstance(cfg.dataset.image_size, int) and cfg.dataset.image_size >= 8,
        f"dataset.image_size={cfg.dataset.image_size!r} must be an integer >= 8",
    )
    _require(
        isinstance(cfg.data.batch_size, int) and cfg.data.batch_size >= 2,
        f"data.batch_size={cfg.data.batch_size!r} must be an integer >= 2 (VICReg needs batch statistics)",
    )
    _require(
        cfg.data.backend in BACKENDS,
        f"unknown data.backend {cfg.data.backend!r}; allowed values: {list(BACKENDS)}",
    )
    _require(
        isinstance(cfg.data.num_workers, int) and cfg.data.num_workers >= 0,
        f"data.num_workers={cfg.data.num_workers!r} must be an integer >= 0",
    )
    _require(
        isinstance(cfg.trainer.max_epochs, int) and cfg.trainer.max_epochs >= 1,
        f"trainer.max_epochs={cfg.trainer.max_epochs!r} must be an integer >= 1",
    )
    _require(
        cfg.scheduler.get("interval", "epoch") in INTERVALS,
        f"unknown scheduler.interval {cfg.scheduler.get('interval')!r}; allowed values: {list(INTERVALS)}",
    )
    _require(
        cfg.resume in RESUME_MODES, f"unknown resume {cfg.resume!r}; allowed values: {list(RESUME_MODES)}"
    )
    for key in ("lr", "weight_decay", "momentum"):
        value = cfg.optimizer[key]
        _require(
            isinstance(value, int | float) and value >= 0, f"optimizer.{key}={value!r} must be a number >= 0"
        )
    _require(
        cfg.gating.budget_weight >= 0 and cfg.gating.bound_weight >= 0 and cfg.gating.bound_alpha >= 0,
        "gating.budget_weight, gating.bound_weight and gating.bound_alpha must be >= 0",
    )
    _require(
        cfg.optimizer.name in OPTIMIZERS,
        f"unknown optimizer.name {cfg.optimizer.name!r}; allowed values: {list(OPTIMIZERS)}",
    )
    validate_distillation_config(cfg)


def validate_distillation_config(cfg: Any) -> None:
    """teacher.* only with a distillation method (simreg, seed), and in range; student.budget a t_d."""
    from vdg.methods import METHODS, DistillMethod
    from vdg.models.teachers import TEACHER_FORMATS

    teacher = cfg.get("teacher") or {}
    distills = issubclass(METHODS[cfg.method.name], DistillMethod)
    kd = sorted(name for name, cls in METHODS.items() if issubclass(cls, DistillMethod))
    _require(
        distills or teacher.get("path") is None,
        f"teacher.path is set, but method={cfg.method.name} has no teacher; the distillation methods are {kd}",
    )
    formats = ["auto", *TEACHER_FORMATS]
    _require(
        teacher.get("format", "auto") in formats,
        f"unknown teacher.format {teacher.get('format')!r}; allowed values: {formats}",
    )
    _require(
        teacher.get("branch", "dense") in ("dense", "gated"),
        f"unknown teacher.branch {teacher.get('branch')!r}; allowed values: ['dense', 'gated']",
    )
    student = cfg.get("student") or {}
    if student.get("channels_from") is not None:
        budget = student.get("budget")
        _require(
            isinstance(budget, int | float) and not isinstance(budget, bool) and 0 < budget <= 1,
            f"student.budget={budget!r} is outside (0, 1]: the t_d of the student.channels_from checkpoint",
        )
