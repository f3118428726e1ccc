"""Programmatic evaluation: `evaluate_checkpoint("runs/.../last.ckpt", "linear", branch="gated", epochs=2)`.

What the pretraining driver calls to chain evaluations after pretraining. It composes the same Hydra configs as
scripts/linear_eval.py and scripts/knn_eval.py and runs the same `run_evaluation`; it holds no evaluation logic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.singleton import Singleton
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from vdg.core.errors import ConfigError
from vdg.core.paths import CONFIG_DIR
from vdg.eval.protocols import PROTOCOLS, run_evaluation

CONFIG_NAMES = {"linear": "linear_eval", "transfer": "linear_eval", "knn": "knn_eval"}


@contextmanager
def _hydra_at_configs() -> Iterator[None]:
    """Hydra's compose API needs its global state; set it up for configs/ and give a running app back its own.

    The pretraining driver runs inside `@hydra.main`, which already holds that state: it is set aside here
    and restored afterwards, so chaining evaluations leaves the driver's Hydra untouched.
    """
    running = Singleton._instances.pop(GlobalHydra, None)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            yield
    finally:
        if running is not None:
            Singleton._instances[GlobalHydra] = running


def eval_config(ckpt: str | Path, protocol: str, **options: Any) -> DictConfig:
    """The resolved eval config a script would get from `ckpt=... eval=<protocol> key=value ...`.

    options: top-level eval-config keys (e.g. branch="gated", epochs=2, k=20, target="cifar10",
    data={"root": "/data"}); a key the config does not have is an error naming the allowed keys.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; allowed values: {list(PROTOCOLS)}")
    with _hydra_at_configs():
        cfg = compose(config_name=CONFIG_NAMES[protocol], overrides=[f"eval={protocol}"])
    unknown = sorted(set(options) - set(cfg.keys()))
    if unknown:
        raise ConfigError(f"unknown {protocol} evaluation option(s) {unknown}; allowed keys: {sorted(cfg.keys())}")
    try:
        return OmegaConf.merge(cfg, {**options, "ckpt": str(ckpt)})
    except ConfigKeyError as err:  # a nested key that does not exist, e.g. data={"rooot": ...}
        raise ConfigError(f"unknown {protocol} evaluation option: {err.msg}") from err


def evaluate_checkpoint(ckpt: str | Path, protocol: str, **options: Any) -> list[dict[str, Any]]:
    """Evaluate a checkpoint with `protocol` ("linear", "knn" or "transfer") and return the records written.

    One record per evaluated branch, each also written to `<checkpoint dir>/results/` (see
    `vdg.eval.results`). Example: `evaluate_checkpoint(ckpt, "transfer", target="cifar10", runs=1)`.
    """
    return run_evaluation(eval_config(ckpt, protocol, **options))
