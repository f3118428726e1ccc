"""Shared fixtures: tiny configs composed from the real Hydra configs (so the tests exercise them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")

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
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
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
