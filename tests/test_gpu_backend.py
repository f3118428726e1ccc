"""Tests of the GPU data backend run on CPU tensors: backend choice, DeviceBatchLoader, the datamodule's
device-side augmentation, a full `pretrain` run with data.backend=gpu, and scripts/bench_data.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import vdg.data.gpu_module as G
from vdg.data.gpu_module import DeviceBatchLoader, resolve_backend
from vdg.data.module import PretrainDataModule
from vdg.run.driver import pretrain

from .conftest import compose_config
from .test_data import make_folder

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
ROOT = Path(__file__).resolve().parents[1]


def numbered_images(n: int, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value i (so a batch tells which images it holds); labels = arange."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return images, torch.arange(n)


# ------------------------------------------------------------------------------------------- backend choice
def test_resolve_backend_choices() -> None:
    assert resolve_backend("cpu", 10**12, CUDA, 0.5, free_bytes=10**13) == "cpu"
    assert resolve_backend("auto", 10, CPU, 0.5, free_bytes=10**9) == "cpu"  # auto needs CUDA
    assert resolve_backend("auto", 400, CUDA, 0.5, free_bytes=1000) == "gpu"
    assert resolve_backend("auto", 600, CUDA, 0.5, free_bytes=1000) == "cpu"  # more than the fraction
    assert resolve_backend("gpu", 10, CPU, 0.5, free_bytes=1000) == "gpu"  # CPU tensors: tests, debugging


def test_gpu_backend_that_does_not_fit_names_bytes_and_the_fix() -> None:
    with pytest.raises(MemoryError, match=r"needs 600 bytes .* only 1,000 bytes .* free.*use data.backend=cpu"):
        resolve_backend("gpu", 600, CUDA, 0.5, free_bytes=1000)
    with pytest.raises(ValueError, match=r"unknown data.backend 'dali'; allowed values: \['cpu', 'gpu', 'auto'\]"):
        resolve_backend("dali", 1, CPU, 0.5)
    with pytest.raises(ValueError, match=r"data.gpu_memory_fraction=0 must lie in \(0, 1\]"):
        resolve_backend("gpu", 1, CPU, 0)


def test_datamodule_refuses_a_split_too_big_for_the_device(tiny_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(G, "free_device_memory", lambda device: 1000)
    module = PretrainDataModule(tiny_cfg("data.backend=gpu"), device="cpu")
    with pytest.raises(MemoryError, match=r"the train split needs 196,608 bytes"):  # 64 x 3 x 32 x 32
        module.setup("fit")


# ------------------------------------------------------------------------------------------ DeviceBatchLoader
def test_device_batches_use_each_image_once_per_epoch_and_drop_last() -> None:
    images, labels = numbered_images(10)
    loader = DeviceBatchLoader(images, labels, batch_size=3, seed=0)
    assert len(loader) == 3
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert [b[0].shape for b in batches] == [(3, 3, 4, 4)] * 3  # the 10th image is dropped
        seen = torch.cat([b[1] for b in batches])
        assert len(set(seen.tolist())) == 9  # no image twice within an epoch
        assert all(torch.equal(b[0][:, 0, 0, 0].long(), b[1]) for b in batches)  # labels follow their images
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])  # a fresh permutation each epoch
    replay = torch.cat([b[1] for b in DeviceBatchLoader(images, labels, 3, seed=0)])
    assert torch.equal(replay, epochs[0])  # seeded
    loader.sampler.set_epoch(1)  # what Lightning calls at each epoch start (a resumed run too)
    assert torch.equal(torch.cat([b[1] for b in loader]), epochs[1])


def test_device_batches_shard_disjointly_over_ranks() -> None:
    images, labels = numbered_images(13)
    ranks = [DeviceBatchLoader(images, labels, batch_size=2, seed=7, rank=r, world_size=3) for r in range(3)]
    assert [len(r) for r in ranks] == [2, 2, 2]  # 13 // (2 x 3)
    seen = [torch.cat([b[1] for b in r]) for r in ranks]
    everything = torch.cat(seen).tolist()
    assert len(everything) == len(set(everything)) == 12
    single = torch.cat([b[1] for b in DeviceBatchLoader(images, labels, batch_size=6, seed=7)])
    assert torch.equal(torch.cat([s.view(2, 2) for s in seen], 1).flatten(), single)


def test_device_batches_bad_input() -> None:
    images, labels = numbered_images(4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        DeviceBatchLoader(images, labels, batch_size=5)
    with pytest.raises(ValueError, match="expected uint8 images"):
        DeviceBatchLoader(images.float(), labels, batch_size=2)


# ------------------------------------------------------------------------------------- datamodule, gpu backend
ALL_OFF = {
    "crop_min_scale": 1.0, "color_jitter_prob": 0.0, "grayscale_prob": 0.0, "blur_prob": 0.0,
    "solarize_prob": 0.0, "flip_prob": 0.0,
}  # fmt: skip


def gpu_module(cfg, *views: dict) -> PretrainDataModule:
    for i, view in enumerate(views):
        cfg.dataset.augment[i] = view
    module = PretrainDataModule(cfg, device="cpu")
    module.setup("fit")
    return module


def test_gpu_backend_yields_two_views_on_the_device(tiny_cfg) -> None:
    module = gpu_module(tiny_cfg("data.backend=gpu", "data.batch_size=24"))
    assert module.backend == "gpu" and module.train_set is None
    loader = module.train_dataloader()
    assert isinstance(loader, DeviceBatchLoader) and len(loader) == 2  # 64 images, drop_last
    images, labels = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (24, 3, 32, 32)
    views, same_labels = module.augment((images, labels))
    assert [v.shape for v in views] == [(24, 3, 32, 32)] * 2 and views[0].dtype == torch.float32
    assert same_labels is labels and not torch.equal(views[0], views[1])
    assert len(module.val_dataloader().dataset) == 32


def test_gpu_views_follow_their_own_recipe(tiny_cfg) -> None:
    """Probabilities 0/1: view 0 is only flipped, view 1 only solarized; both are whole-image, normalised."""
    module = gpu_module(tiny_cfg("data.backend=gpu"), {**ALL_OFF, "flip_prob": 1.0}, {**ALL_OFF, "solarize_prob": 1.0})
    images, labels = next(iter(module.train_dataloader()))
    view0, view1 = module.augment((images, labels))[0]
    ds = module.cfg.dataset
    mean, std = torch.tensor(list(ds.mean)).view(1, 3, 1, 1), torch.tensor(list(ds.std)).view(1, 3, 1, 1)
    x = images.float() / 255
    torch.testing.assert_close(view0, (x.flip(-1) - mean) / std, atol=1e-4, rtol=0)
    torch.testing.assert_close(view1, (torch.where(x >= 0.5, 1 - x, x) - mean) / std, atol=1e-4, rtol=0)


def test_only_training_batches_are_augmented(tiny_cfg) -> None:
    module = gpu_module(tiny_cfg("data.backend=gpu"))
    batch = next(iter(module.train_dataloader()))
    module.trainer = SimpleNamespace(training=False)
    assert module.on_after_batch_transfer(batch, 0) is batch  # validation / sanity check: untouched
    module.trainer = SimpleNamespace(training=True)
    views, _ = module.on_after_batch_transfer(batch, 0)
    assert len(views) == 2 and views[0].dtype == torch.float32


def test_gpu_backend_decodes_a_folder_once(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", {"train": {"a": 5, "b": 4}, "test": {"a": 1, "b": 1}}, size=(40, 36))
    overrides = ["data.backend=gpu", "dataset=folder", f"data.root={root}", "dataset.num_classes=2",
                 "data.batch_size=4", "data.num_workers=0"]
    module = gpu_module(compose_config([*overrides, f"data.cache_dir={tmp_path / 'cache'}"]))
    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and len(module.train_dataloader()) == 2
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["data-train-32px.pt"]


# --------------------------------------------------------------------------------------------- end to end
def test_pretrain_end_to_end_with_the_gpu_backend(tiny_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"batches": 0, "augmented": 0}
    original_iter, original_augment = DeviceBatchLoader.__iter__, PretrainDataModule.augment

    def counting_iter(self):
        for batch in original_iter(self):
            calls["batches"] += 1
            yield batch

    def counting_augment(self, batch):
        calls["augmented"] += 1
        return original_augment(self, batch)

    monkeypatch.setattr(DeviceBatchLoader, "__iter__", counting_iter)
    monkeypatch.setattr(PretrainDataModule, "augment", counting_augment)
    cfg = tiny_cfg("data.backend=gpu", "trainer.max_epochs=2")
    summary = pretrain(cfg)
    assert summary["epochs"] == 2 and calls == {"batches": 8, "augmented": 8}  # 2 x 64 // 16
    assert summary["probe_acc"]["dense"] is not None
    assert (Path(cfg.run_dir) / "checkpoints" / "last.ckpt").is_file()


def test_bench_data_script_reports_both_backends(capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("bench_data", ROOT / "scripts" / "bench_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["dataset=synthetic", "dataset.train_size=32", "data.batch_size=8", "data.num_workers=0"]
    rows = bench.main([*args, "batches=3", "warmup=1", "backends=[cpu,gpu]"])
    assert [r["backend"] for r in rows] == ["cpu", "gpu"]
    assert all(r["pairs_per_s"] > 0 and r["view_shape"] == [3, 32, 32] for r in rows)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines == rows
