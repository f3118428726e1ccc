"""Validation of a composed pretraining config: every bad value fails early with the key and allowed values.

Checks values, types and key names only (a typo such as `+trainer.max_epoch=3` is refused, not ignored);
composing configs is Hydra's job and building objects is the caller's. Integers must be integers (seed=1.5
and seed=true are refused, never truncated), booleans must be booleans, numbers must be finite.
"""

from __future__ import annotations

import inspect
from functools import cache
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.strategies import StrategyRegistry

from vdg.core.errors import ConfigError
from vdg.core.options import (
    _plain,
    _require,
    check_bool,
    check_choice,
    check_int,
    check_known_keys,
    check_number,
    check_rgb,
    check_str,
    is_int,
    is_number,
)
from vdg.core.paths import config_file
from vdg.data.datasets import DATASETS, disk_split
from vdg.data.gpu_module import BACKENDS
from vdg.data.module import view_recipes
from vdg.eval.api import eval_config
from vdg.eval.knn import DISTANCES
from vdg.eval.protocols import check_eval_config
from vdg.eval.reference import check_seeds
from vdg.losses.gating import BOUND_GRADIENTS, BOUND_TARGETS
from vdg.losses.vicreg import VARIANCE_REDUCTIONS
from vdg.methods import METHODS, DistillMethod
from vdg.methods.base import sync_batchnorm_scope
from vdg.methods.teachers import TEACHER_FORMATS
from vdg.models.resnet import BN_SPLITS, STEMS
from vdg.optim import INTERVALS, OPTIMIZERS, SCHEDULERS
from vdg.run.logging import LOGGERS
from vdg.run.progress import PROGRESS_MODES

RESUME_MODES = ("auto", "never", "extend")
MAX_SEED = 2**32 - 1  # numpy's seed range, which Lightning's seed_everything enforces (by picking another seed)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("auto", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "bf16-true", "16-true", "64-true",
              "64", "transformer-engine", "transformer-engine-float16")
# trainer keys vdg passes itself: setting them in trainer: would clash with the run directory's own
RESERVED_TRAINER_KEYS = ("callbacks", "logger", "plugins", "default_root_dir", "enable_checkpointing")


# ------------------------------------------------------------------------------------------- unknown keys
@cache
def _yaml_keys(path: Path) -> frozenset[str]:
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return frozenset(k for k in (data or {}) if k != "defaults")


def _group_keys(group: str, option: str | None) -> frozenset[str]:
    """Keys of configs/<group>/<option>.yaml; all files of the group when that file does not exist."""
    folder = config_file(group)
    path = folder / f"{option}.yaml"
    if option and path.is_file():
        return _yaml_keys(path)
    return frozenset().union(*(_yaml_keys(p) for p in folder.glob("*.yaml")))


@cache
def _section_keys() -> dict[str, frozenset[str]]:
    """Keys of the fixed sections of configs/pretrain.yaml (backbone:, gating:, data:, ...)."""
    data = OmegaConf.to_container(OmegaConf.load(config_file("pretrain.yaml")), resolve=False)
    return {k: frozenset(v) for k, v in data.items() if isinstance(v, dict) and k != "hydra"}


@cache
def trainer_arguments() -> frozenset[str]:
    return frozenset(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}


def check_config_keys(cfg: DictConfig) -> None:
    """Every key of every section is one vdg (or, for trainer:, Lightning's Trainer) knows."""
    for section, allowed in _section_keys().items():
        if section in cfg and section != "trainer":
            check_known_keys(section, cfg[section], allowed)
    for group in ("method", "dataset", "optimizer", "scheduler", "logger"):
        if group in cfg and isinstance(cfg[group], DictConfig):
            check_known_keys(group, cfg[group], _group_keys(group, cfg[group].get("name")))
    if "trainer" in cfg:
        defaults = _group_keys("trainer", "default")
        for key in RESERVED_TRAINER_KEYS:
            _require(key not in cfg.trainer, f"trainer.{key} is set by vdg itself and cannot be overridden")
        check_known_keys("trainer", cfg.trainer, defaults | trainer_arguments(),
                         " and any pytorch_lightning.Trainer argument", shown=defaults)
    wandb = OmegaConf.select(cfg, "logger.wandb")
    if isinstance(wandb, DictConfig):
        path = config_file("logger", "wandb.yaml")
        check_known_keys("logger.wandb", wandb, OmegaConf.load(path).wandb.keys())


# ------------------------------------------------------------------------------------------- sections
def check_trainer(t: DictConfig) -> None:
    accelerator = check_choice("trainer.accelerator", t.get("accelerator", "auto"), ACCELERATORS)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible on this machine "
            "(torch.cuda.is_available() is False); use trainer.accelerator=cpu or auto"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps but the MPS backend is not available; use cpu or auto")
    devices = t.get("devices", 1)
    if isinstance(devices, ListConfig):
        _require(all(is_int(d) and d >= 0 for d in devices) and len(devices) > 0,
                 f"trainer.devices={_plain(devices)!r} must be a positive integer, -1, 'auto' or a list of ids")
    elif devices not in ("auto", -1):
        check_int("trainer.devices", devices, 1, note=" (or -1 / 'auto': every device)")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu and is_int(devices) and devices > torch.cuda.device_count():
        raise ConfigError(f"trainer.devices={devices} but this machine has {torch.cuda.device_count()} GPU(s)")
    check_int("trainer.num_nodes", t.get("num_nodes", 1), 1)
    check_choice("trainer.strategy", t.get("strategy", "auto"), ["auto", *StrategyRegistry.available_strategies()])
    precision = t.get("precision", "auto")
    check_choice("trainer.precision", str(precision) if is_int(precision) else precision, PRECISIONS)
    if not on_gpu and str(precision) in ("16-mixed", "16"):
        raise ConfigError(f"trainer.precision={precision} needs a GPU; on the CPU use bf16-mixed or 32-true")
    check_int("trainer.max_epochs", t.max_epochs, 1)
    for key in ("log_every_n_steps", "check_val_every_n_epoch", "progress_every_n_steps"):
        if key in t:
            check_int(f"trainer.{key}", t[key], 1)
    for key in ("limit_train_batches", "limit_val_batches"):
        value = t.get(key)
        if value is None:
            continue
        low = 1 if key == "limit_train_batches" else 0
        if is_int(value):
            check_int(f"trainer.{key}", value, low, note=" (a number of batches) or a fraction in (0, 1]")
        else:
            check_number(f"trainer.{key}", value, 0, 1, low_open=key == "limit_train_batches",
                         note=" (a fraction of the batches) or an integer number of batches")
    check_choice("trainer.progress", t.get("progress", "auto"), PROGRESS_MODES)
    for key in ("enable_progress_bar", "channels_last", "compile"):
        if key in t:
            check_bool(f"trainer.{key}", t[key])
    if t.get("benchmark") is not None:
        check_bool("trainer.benchmark", t.benchmark)
    try:
        sync_batchnorm_scope(t.get("sync_batchnorm"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if "deterministic" in t and t.deterministic != "warn":
        check_bool("trainer.deterministic", t.deterministic)


def check_dataset(ds: DictConfig) -> None:
    check_choice("dataset.name", ds.name, DATASETS)
    check_int("dataset.num_classes", ds.num_classes, 1)
    check_int("dataset.image_size", ds.image_size, 8)
    check_choice("dataset.stem", ds.stem, STEMS)
    check_bool("dataset.has_labels", ds.get("has_labels", True))
    for key in ("mean", "std", "eval_mean", "eval_std"):
        check_rgb(f"dataset.{key}", ds[key], positive="std" in key)
    if ds.get("eval_resize") is not None:
        check_int("dataset.eval_resize", ds.eval_resize, int(ds.image_size),
                  note=" (the shorter side before the centre crop of dataset.image_size) or null")
    for key in ("train_size", "test_size"):
        if key in ds:
            check_int(f"dataset.{key}", ds[key], 1)
    for key in ("test_split", "pretrain_split"):
        if key in ds:
            check_str(f"dataset.{key}", ds[key])
    split = ds.get("validation_split")
    if split is not None and (isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 < split < 1):
        raise ConfigError(
            f"dataset.validation_split={split!r} must be a fraction in (0, 1) of the train split, or null"
        )
    for key in ("subset_per_class", "test_subset_per_class"):  # subset_seed matters (and is checked) only then
        if ds.get(key) is not None:
            check_int(f"dataset.{key}", ds[key], 1, note=" (images per class) or null (the whole split)")
            if ds.get("subset_seed") is None:
                raise ConfigError(
                    f"dataset.{key}={ds[key]} needs dataset.subset_seed (an integer; default: the run's seed)"
                )
            check_int("dataset.subset_seed", ds.subset_seed, 0, 2**32 - 1)
    try:
        disk_split(ds, "pretrain")
        view_recipes(ds)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from err


def check_method(m: DictConfig) -> None:
    check_choice("method.name", m.name, sorted(METHODS))
    for key in ("projector_hidden_dim", "projector_output_dim"):
        if key in m:
            check_int(f"method.{key}", m[key], 1)
    for key in ("invariance_weight", "variance_weight", "covariance_weight", "off_diagonal_weight"):
        if key in m:
            check_number(f"method.{key}", m[key], 0)
    for key in ("eps", "scale"):
        if key in m:
            check_number(f"method.{key}", m[key], 0, low_open=True)
    if "variance_reduction" in m:
        check_choice("method.variance_reduction", m.variance_reduction, VARIANCE_REDUCTIONS)
    for key in ("gather_across_processes", "separate_projectors", "symmetric"):
        if key in m:
            check_bool(f"method.{key}", m[key])


def check_backbone(b: DictConfig) -> None:
    check_choice("backbone.name", b.get("name", "resnet18"), ["resnet18"])
    check_int("backbone.width", b.width, 4)
    check_choice("backbone.bn_split", b.bn_split, BN_SPLITS)
    check_int("backbone.gate_reduction", b.gate_reduction, 1)
    _require(b.width // b.gate_reduction >= 1,
             f"backbone.gate_reduction={b.gate_reduction} leaves no gate channel at backbone.width={b.width}")
    check_number("backbone.gate_temperature", b.gate_temperature, 0, low_open=True)
    if b.get("gate_bias_init") is not None:
        check_number("backbone.gate_bias_init", b.gate_bias_init)
    check_bool("backbone.zero_init_residual", b.zero_init_residual)
    widths = b.get("block_widths")
    if widths is not None:
        _require(
            isinstance(widths, ListConfig) and len(widths) == 8 and all(is_int(w) and w >= 1 for w in widths),
            f"backbone.block_widths={_plain(widths)!r} must be null or 8 integers >= 1 (conv1 width of each block)",
        )


def check_optimization(cfg: DictConfig) -> None:
    o, s = cfg.optimizer, cfg.scheduler
    check_choice("optimizer.name", o.name, OPTIMIZERS)
    check_number("optimizer.lr", o.lr, 0, low_open=True)
    for key in ("weight_decay", "classifier_lr"):
        if key in o:
            check_number(f"optimizer.{key}", o[key], 0)
    check_number("optimizer.momentum", o.momentum, 0, 1, high_open=True)
    if "eta" in o:
        check_number("optimizer.eta", o.eta, 0, low_open=True)
    for key in ("scale_lr", "clip_lr", "exclude_bias_n_norm"):
        if key in o:
            check_bool(f"optimizer.{key}", o[key])
    check_choice("scheduler.name", s.name, SCHEDULERS)
    for key in ("warmup_epochs", "warmup_start_lr", "min_lr"):
        if key in s:
            check_number(f"scheduler.{key}", s[key], 0)
    check_choice("scheduler.interval", s.get("interval", "epoch"), INTERVALS)


def check_gating(g: DictConfig) -> None:
    for key in ("budget_weight", "bound_weight", "bound_alpha"):
        check_number(f"gating.{key}", g[key], 0)
    check_bool("gating.bound_loss", g.bound_loss)
    check_choice("gating.bound_target", g.bound_target, BOUND_TARGETS)
    if "bound_gradient" in g:
        check_choice("gating.bound_gradient", g.bound_gradient, BOUND_GRADIENTS)


def check_data(d: DictConfig) -> None:
    check_str("data.root", d.root)
    check_bool("data.download", d.download)
    check_int("data.batch_size", d.batch_size, 2, note=" (VICReg needs batch statistics)")
    check_int("data.num_workers", d.num_workers, 0)
    check_bool("data.pin_memory", d.pin_memory)
    check_choice("data.backend", d.backend, BACKENDS)
    if "gpu_memory_fraction" in d:
        check_number("data.gpu_memory_fraction", d.gpu_memory_fraction, 0, 1, low_open=True)
    if "cache_dir" in d:
        check_str("data.cache_dir", d.cache_dir, optional=True)


def check_run(cfg: DictConfig) -> None:
    check_int("seed", cfg.seed, 0, MAX_SEED)
    check_str("run_dir", cfg.run_dir)
    check_choice("resume", cfg.resume, RESUME_MODES)
    check_bool("dry_run", cfg.get("dry_run", False))
    check_bool("json", cfg.get("json", False))
    for key in ("enabled", "batchnorm"):
        if key in cfg.probe:
            check_bool(f"probe.{key}", cfg.probe[key])
    check_int("checkpoint.every_n_epochs", cfg.checkpoint.every_n_epochs, 1)
    check_bool("checkpoint.export_backbone", cfg.checkpoint.get("export_backbone", True))
    check_int("guard.check_every_n_steps", cfg.guard.check_every_n_steps, 1)
    knn = cfg.final_knn
    check_bool("final_knn.enabled", knn.enabled)
    check_int("final_knn.k", knn.k, 1)
    check_choice("final_knn.distance", knn.distance, DISTANCES)
    check_seeds("final_knn.random_init_seeds", knn.get("random_init_seeds", []))
    if "logger" in cfg and cfg.logger is not None:
        check_choice("logger.name", cfg.logger.get("name", "csv"), LOGGERS)


def check_evaluate(cfg: DictConfig) -> list[DictConfig]:
    """The `evaluate:` list: each entry composes to a valid evaluation config (checked now, not after training).

    Returns the composed evaluation configs (ckpt left as a placeholder), for the data checks of the driver.
    """
    specs = cfg.get("evaluate")
    if specs is None:
        return []
    _require(isinstance(specs, ListConfig | list),
             f"evaluate={_plain(specs)!r} must be a list, e.g. [{{protocol: linear}}, {{protocol: knn}}]")
    composed = []
    for i, spec in enumerate(specs):
        _require(isinstance(spec, DictConfig) and "protocol" in spec,
                 f"evaluate[{i}]={_plain(spec)!r} must be a mapping with a protocol, e.g. {{protocol: knn, k: 20}}")
        options = _plain(spec)
        protocol = options.pop("protocol")
        try:
            eval_cfg = eval_config("<last.ckpt of this run>", protocol, **options)
            check_eval_config(eval_cfg, need_checkpoint=False)
        except ConfigError as err:
            raise ConfigError(f"evaluate[{i}]: {err}") from err
        composed.append(eval_cfg)
    return composed


def validate_pretrain_config(cfg: Any) -> list[DictConfig]:
    """Every key and value a pretraining run will use, before anything is created or loaded.

    Returns the composed configs of the chained evaluations (`evaluate:`), already checked.
    """
    budget = cfg.get("budget")
    _require(
        is_number(budget),
        f"budget={budget!r} must be a number in (0, 1]: budget is t_d, the gated network's target FLOPs ratio "
        "(e.g. budget=0.3)",
    )
    _require(
        0 < budget <= 1,
        f"budget={budget!r} is outside (0, 1]: budget is t_d, the gated network's target FLOPs ratio "
        "(e.g. budget=0.3)",
    )
    check_method(cfg.method)
    check_dataset(cfg.dataset)
    check_backbone(cfg.backbone)
    check_data(cfg.data)
    check_trainer(cfg.trainer)
    check_optimization(cfg)
    check_gating(cfg.gating)
    check_run(cfg)
    check_config_keys(cfg)
    validate_distillation_config(cfg)
    return check_evaluate(cfg)


def validate_distillation_config(cfg: Any) -> None:
    """teacher.* only with a distillation method (simreg, seed), and in range; student.budget a t_d."""
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
