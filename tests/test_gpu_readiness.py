"""What the first GPU run would hit, reproduced in one CPU process (issue 17): exact-resume RNG states restored
on fewer GPUs, final_knn's device, Trainer arguments decided from the accelerator (precision, cuDNN autotuning,
SyncBatchNorm), the free-memory check of the GPU backend, and evaluation leaving the GPU's RNG alone.

CUDA is simulated where a CPU cannot show the behaviour (fake `torch.cuda` functions, a stand-in Trainer, the
meta device as "the training device"); the multi-process items are in tests/test_ddp.py.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import vdg.eval.features as eval_features
import vdg.run.driver as driver
from vdg.core.errors import ConfigError
from vdg.data.gpu_module import free_device_memory
from vdg.eval.api import evaluate_checkpoint
from vdg.eval.features import Features
from vdg.methods import build_method
from vdg.run.callbacks import RNGState, capture_rng_state
from vdg.run.driver import final_knn, pretrain, trainer_kwargs

from .conftest import TINY, compose_config

CUDA0 = torch.device("cuda", 0)


def stand_in_trainer(rank: int = 0, world: int = 1, device: torch.device = CUDA0) -> SimpleNamespace:
    """What the callbacks and hooks below read of a Lightning Trainer."""
    return SimpleNamespace(global_rank=rank, world_size=world, strategy=SimpleNamespace(root_device=device))


def cpu_rng_states(seed: int) -> dict:
    """A capture of the CPU-side streams after seeding them with `seed` (the caller's streams are left as found)."""
    with torch.random.fork_rng(devices=[]):
        py, np_state = random.getstate(), np.random.get_state()
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        state = capture_rng_state()
        random.setstate(py), np.random.set_state(np_state)
    return state


@pytest.fixture
def one_visible_gpu(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, torch.Tensor]]:
    """torch.cuda as on a machine where only cuda:0 is visible; returns the (device, state) pairs restored.

    torch's own set_rng_state_all loops over set_rng_state, which fails for a device that is not visible."""
    restored: list[tuple[int, torch.Tensor]] = []

    def set_rng_state(state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        index = device if isinstance(device, int) else (torch.device(device).index or 0)
        if index >= 1:
            raise IndexError("list index out of range")  # torch.cuda.default_generators[index]
        restored.append((index, state))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    return restored


# ----- item 1: exact-resume RNG states -----------------------------------------------------------------------
def test_a_two_gpu_checkpoint_resumes_on_one_visible_gpu(one_visible_gpu):
    """A checkpoint written before per-rank states, by rank 0 of a 2-GPU run (every visible GPU's state), resumed
    with CUDA_VISIBLE_DEVICES=0: no IndexError, and cuda:0 gets its own saved stream."""
    gpu_states = [torch.full((16,), i, dtype=torch.uint8) for i in (1, 2)]  # cuda:0's and cuda:1's
    saved = {**cpu_rng_states(11), "cuda": gpu_states}
    callback = RNGState()
    callback.load_state_dict({"rng": saved})
    with torch.random.fork_rng(devices=[]):
        callback.on_fit_start(stand_in_trainer(), None)
        assert torch.equal(torch.get_rng_state(), saved["torch"])
    assert [(device, state[0].item()) for device, state in one_visible_gpu] == [(0, 1)]


def test_each_rank_resumes_its_own_streams_and_never_another_ranks(one_visible_gpu):
    """Per-rank states: rank 1 takes rank 1's. A checkpoint of one process resumed by two: rank 1 must not take
    rank 0's stream (it starts its own) and the run warns that it is not the exact continuation."""
    states = [cpu_rng_states(seed) for seed in (1, 2)]
    callback = RNGState()
    callback.load_state_dict({"rng_per_rank": states})
    with torch.random.fork_rng(devices=[]):
        callback.on_fit_start(stand_in_trainer(rank=1, world=2, device=torch.device("cpu")), None)
        assert torch.equal(torch.get_rng_state(), states[1]["torch"])

    callback = RNGState()
    callback.load_state_dict({"rng": states[0]})
    with torch.random.fork_rng(devices=[]), pytest.warns(UserWarning, match="not the exact continuation"):
        callback.on_fit_start(stand_in_trainer(rank=1, world=2, device=torch.device("cpu")), None)
        assert not torch.equal(torch.get_rng_state(), states[0]["torch"])


# ----- item 5: final_knn on the training device --------------------------------------------------------------
def test_final_knn_runs_on_the_device_the_model_trained_on(tiny_cfg, monkeypatch):
    """Lightning hands the model back on the CPU after fit; final_knn must extract and search on the Trainer's
    device (here the meta device stands in for the GPU) and leave the backbone where it found it."""
    cfg = tiny_cfg("final_knn.enabled=true", "final_knn.random_init_seeds=[]")  # the reference: test_run_output
    model = build_method(cfg)
    model._trainer = stand_in_trainer(device=torch.device("meta"))
    calls: list[tuple] = []

    def extract(backbone, loader, branch, device=None, keep_masks=False):  # noqa: ANN001, ANN202
        calls.append(("extract", device))
        n = len(loader.dataset)
        return Features(torch.zeros(n, 4), torch.zeros(n, dtype=torch.long), torch.ones(n, 8))

    def knn(train_features, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(("knn", train_features.device))
        return 50.0

    monkeypatch.setattr(driver, "extract_features", extract)  # where final_knn looks them up
    monkeypatch.setattr(driver, "knn_accuracy", knn)
    result = final_knn(model, cfg)
    meta = torch.device("meta")
    assert calls == [("extract", meta), ("extract", meta), ("knn", meta)] * 2  # dense, then gated
    assert result["dense"] == result["gated"] == 50.0
    assert next(model.backbone.parameters()).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a GPU-trained model's final_knn")
def test_final_knn_after_gpu_training_extracts_on_the_gpu(tiny_cfg, monkeypatch):
    devices = []
    extract = eval_features.extract_features

    def spy(backbone, loader, branch, device=None, keep_masks=False):  # noqa: ANN001, ANN202
        out = extract(backbone, loader, branch, device, keep_masks)
        devices.append(eval_features.module_device(backbone).type)
        return out

    monkeypatch.setattr(driver, "extract_features", spy)  # where final_knn looks it up
    summary = pretrain(tiny_cfg("final_knn.enabled=true", "trainer.accelerator=gpu", "trainer.limit_train_batches=2"))
    assert devices == ["cuda"] * 4 and 0 <= summary["knn"]["gated"] <= 100


# ----- Trainer arguments ------------------------------------------------------------------------------------
def test_precision_auto_follows_the_accelerator_not_cuda_visibility(tiny_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert trainer_kwargs(tiny_cfg("trainer.accelerator=cpu"))["precision"] == "32-true"
    assert trainer_kwargs(tiny_cfg("trainer.accelerator=auto"))["precision"] == "bf16-mixed"
    assert trainer_kwargs(tiny_cfg("trainer.accelerator=gpu", "trainer.precision=16-mixed"))["precision"] == "16-mixed"


def test_cudnn_autotuning_is_on_unless_deterministic(tiny_cfg):
    assert trainer_kwargs(tiny_cfg())["benchmark"] is True
    assert trainer_kwargs(tiny_cfg("trainer.deterministic=true"))["benchmark"] is False
    assert trainer_kwargs(tiny_cfg("trainer.deterministic=true", "trainer.benchmark=true"))["benchmark"] is True


def test_sync_batchnorm_is_vdgs_own_key_with_named_scopes(tiny_cfg):
    for value in ("backbone", "all", "none", "true", "false"):
        assert "sync_batchnorm" not in trainer_kwargs(tiny_cfg(f"trainer.sync_batchnorm={value}"))
    with pytest.raises(ConfigError, match=r"trainer.sync_batchnorm 'heads'; allowed values: \['backbone', 'all'"):
        trainer_kwargs(tiny_cfg("trainer.sync_batchnorm=heads"))


def synchronised(cfg, trainer: SimpleNamespace) -> list[str]:  # noqa: ANN001 - DictConfig
    model = build_method(cfg)
    model._trainer = trainer
    model.configure_model()
    return [name for name, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]


def test_which_batchnorms_are_synchronised(tiny_cfg):
    """Conversion only (nothing runs): several processes on GPUs, per trainer.sync_batchnorm."""
    two_gpus = stand_in_trainer(world=2)
    backbone = synchronised(tiny_cfg(), two_gpus)
    assert backbone and all(n.startswith("backbone.") for n in backbone)
    everything = synchronised(tiny_cfg("trainer.sync_batchnorm=true"), two_gpus)
    assert set(everything) - set(backbone) == {"projector.1", "projector.4"}  # the projector's BatchNorm1d
    assert synchronised(tiny_cfg("trainer.sync_batchnorm=none"), two_gpus) == []
    assert synchronised(tiny_cfg(), stand_in_trainer(world=1)) == []  # one process: nothing to synchronise
    assert synchronised(tiny_cfg(), stand_in_trainer(world=2, device=torch.device("cpu"))) == []  # torch cannot

    model = build_method(tiny_cfg())
    model._trainer = two_gpus
    model.configure_model()
    layers = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    model.configure_model()  # Lightning calls it once per entry point (fit, validate...): converted once
    assert [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)] == layers


def test_compile_with_synchronised_batchnorm_warns(tiny_cfg, monkeypatch):
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: None)  # the warning, not the compilation
    with pytest.warns(UserWarning, match=r"trainer.compile=true with \d+ SyncBatchNorm layers"):
        synchronised(tiny_cfg("trainer.compile=true"), stand_in_trainer(world=2))


# ----- the GPU data backend's free memory -------------------------------------------------------------------
def test_free_device_memory_counts_pytorchs_unused_cache_as_free(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000, 10_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 600)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 200)
    assert free_device_memory(CUDA0) == 1000 + 600 - 200


# ----- evaluation and the caller's GPU RNG ------------------------------------------------------------------
def test_augmented_linear_evaluation_leaves_the_gpu_rng_alone(tmp_path, monkeypatch):
    """run_evaluation forks the CPU RNG only (fork_rng(devices=[])), so it must seed nothing else."""
    cfg = compose_config([*TINY, f"run_dir={tmp_path / 'run'}", "probe.enabled=false", "trainer.limit_train_batches=1"])
    ckpt = Path(pretrain(cfg)["checkpoint"])
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    options = {"branch": "gated", "epochs": 1, "runs": 1, "batch_size": 16, "augment": True}
    evaluate_checkpoint(ckpt, "linear", results_dir=str(tmp_path / "results"), **options)
    assert reseeded == []
