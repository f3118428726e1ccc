"""Shared fixtures: tiny configs composed from the real Hydra configs (so the tests exercise them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from vdg.core.paths import CONFIG_DIR

TINY = [
    "dataset=synthetic",
    "dataset.train_size=64",
    "dataset.test_size=32",
    "backbone.width=4",
    "method.projector_hidden_dim=32",
    "method.projector_output_dim=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.pin_memory=false",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "scheduler.warmup_epochs=1",
]


def compose_config(overrides: list[str], config_name: str = "pretrain"):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A composed pretraining config for a seconds-long run on synthetic data, writing under tmp_path."""

    def make(*extra: str):
        return compose_config([*TINY, f"run_dir={tmp_path / 'run'}", *extra])

    return make


@pytest.fixture(autouse=True)
def _threads():
    # Tiny test models run several times faster on one thread (thread overhead dominates their kernels).
    torch.set_num_threads(1)
    yield


def write_tiny_teacher(folder: Path, width: int = 4, dataset: str = "synthetic") -> Path:
    """A width-`width` dense ResNet-18 written as a vdg backbone export (.pt + .json): a teacher in milliseconds."""
    import json

    from vdg.models import GatedResNet

    torch.manual_seed(0)
    encoder = GatedResNet(width=width, branches=("dense",), bn_split="none")
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"teacher-w{width}.pt"
    torch.save(encoder.state_dict(), weights)
    metadata = {
        "format": "vdg-backbone",
        "format_version": 1,
        "branch": "dense",
        "arch": encoder.arch_config(),
        "feature_dim": encoder.feature_dim,
        "gate": None,
        "budget": None,
        "method": "vicreg",
        "pretrain_dataset": dataset,
        "image_size": 32,
        "normalize": {"mean": [0.4717, 0.5088, 0.5008], "std": [0.2812, 0.2788, 0.2843]},
        "source": {"checkpoint": "tests", "epoch": 0, "global_step": 0, "arch": encoder.arch_config()},
        "files": {"pt": weights.name},
    }
    weights.with_suffix(".json").write_text(json.dumps(metadata))
    return weights


def distill_overrides(method: str, teacher: Path) -> list[str]:
    """What a distillation method needs on top of TINY: a teacher file, and a queue that fits a tiny run.

    The tiny teacher has no head, so SEED distils its features (32-d at width 4, TINY's projector output)."""
    if method == "simreg":
        return [f"teacher.path={teacher}"]
    if method == "seed":
        return [f"teacher.path={teacher}", "method.teacher_output=features", "method.queue_size=40"]
    return []
