"""Tests of vdg.data loading: split roles, every dataset's loader on tiny fakes, the per-view recipes of the
yamls (reference §1.10), the decode cache, the CPU backend, bad input, scripts/make_imagenet100.py."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from vdg.core.errors import ConfigError
from vdg.data import datasets as D
from vdg.data.module import PretrainDataModule, eval_loader, view_recipes
from vdg.run.config import validate_pretrain_config

from .conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10.tar.gz"


def make_folder(root: Path, layout: dict[str, dict[str, int]], size: tuple[int, int] = (8, 8)) -> Path:
    """root/<split>/<class>/<i>.png with `layout[split][class]` small random RGB images."""
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
    return root


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ recipes from the yamls
REFERENCE = {  # reference §1.10: (image_size, stem, blur p view 0, blur p view 1, pretrain mean)
    "cifar10": (32, "cifar", 0.0, 0.0, [0.4914, 0.4822, 0.4465]),
    "cifar100": (32, "cifar", 0.0, 0.2, [0.5071, 0.4865, 0.4409]),
    "stl10": (96, "imagenet", 0.0, 0.0, [0.4914, 0.4823, 0.4466]),
    "imagenet100": (224, "imagenet", 0.0, 0.0, [0.485, 0.456, 0.406]),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_dataset_yaml_recipes_follow_the_reference(name: str) -> None:
    ds = compose_config([f"dataset={name}"]).dataset
    size, stem, blur0, blur1, mean = REFERENCE[name]
    assert (ds.name, ds.image_size, ds.stem, list(ds.mean)) == (name, size, stem, mean)
    views = view_recipes(ds)
    assert [v.blur_prob for v in views] == [blur0, blur1]  # CIFAR-100 blurs only the dense view (view 1)
    for v in views:
        assert (v.crop_min_scale, v.crop_max_scale) == (0.2, 1.0)
        assert (v.color_jitter_prob, v.brightness, v.contrast, v.saturation, v.hue) == (0.8, 0.4, 0.4, 0.2, 0.1)
        assert (v.grayscale_prob, v.solarize_prob, v.flip_prob) == (0.2, 0.1, 0.5)
        assert (v.blur_sigma_min, v.blur_sigma_max) == (0.1, 2.0)


def test_pretrain_config_defaults_to_auto_backend() -> None:
    cfg = compose_config([])
    assert cfg.data.backend == "auto" and 0 < cfg.data.gpu_memory_fraction <= 1


# ------------------------------------------------------------------------------------------- split roles
def test_disk_split_maps_roles_per_dataset() -> None:
    def split(name: str, role: str, *extra: str) -> str:
        return D.disk_split(compose_config([f"dataset={name}", *extra]).dataset, role)

    assert [split("cifar10", r) for r in D.SPLITS] == ["train", "train", "test"]
    assert [split("stl10", r) for r in D.SPLITS] == ["unlabeled", "train", "test"]  # official: unlabeled only
    assert split("stl10", "pretrain", "dataset.pretrain_split=train+unlabeled") == "train+unlabeled"
    assert [split("imagenet100", r) for r in D.SPLITS] == ["train", "train", "val"]
    assert split("folder", "test", "dataset.test_split=val") == "val"


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [("stl10", "unlabelled", "'unlabeled', 'train+unlabeled', 'train'"), ("cifar10", "unlabeled", "'train'")],
)
def test_unknown_pretrain_split_names_key_and_allowed_values(name: str, value: str, allowed: str) -> None:
    ds = compose_config([f"dataset={name}", f"++dataset.pretrain_split={value}"]).dataset
    with pytest.raises(ValueError, match=re.escape(f"dataset.pretrain_split {value!r}") + ".*" + re.escape(allowed)):
        D.disk_split(ds, "pretrain")


def test_unknown_split_role_and_dataset_name() -> None:
    cfg = compose_config(["dataset=synthetic"])
    with pytest.raises(ValueError, match=r"unknown split 'val'; allowed values: \['pretrain', 'train', 'test'\]"):
        D.build_dataset(cfg.dataset, cfg.data, "val")
    cfg.dataset.name = "imagenet"
    with pytest.raises(ValueError, match=r"unknown dataset.name 'imagenet'; allowed values: \['cifar10'.*'stl10'"):
        D.build_dataset(cfg.dataset, cfg.data, "train")
    with pytest.raises(ConfigError, match="unknown dataset.name 'imagenet'"):
        validate_pretrain_config(cfg)


def test_unknown_backend_is_a_config_error() -> None:
    cfg = compose_config(["data.backend=dali"])
    with pytest.raises(ConfigError, match=r"unknown data.backend 'dali'; allowed values: \['cpu', 'gpu', 'auto'\]"):
        validate_pretrain_config(cfg)


# -------------------------------------------------------------------------------------------- image folders
def test_image_folder_sorts_classes_and_counts_images(tmp_path: Path) -> None:
    layout = {"train": {"zebra": 2, "apple": 3, "mango": 1}, "test": {"apple": 1, "mango": 1, "zebra": 1}}
    root = make_folder(tmp_path, layout)
    cfg = compose_config(["dataset=folder", f"data.root={root}", "dataset.num_classes=3"])
    train = D.build_dataset(cfg.dataset, cfg.data, "pretrain")
    assert train.classes == ["apple", "mango", "zebra"]
    assert Counter(train.labels.tolist()) == {0: 3, 1: 1, 2: 2}
    assert [Path(p).parent.name for p, _ in train.samples] == ["apple"] * 3 + ["mango"] + ["zebra"] * 2
    image, label = train[3]
    assert (image.size, image.mode, label) == ((8, 8), "RGB", 1)
    assert len(D.build_dataset(cfg.dataset, cfg.data, "test")) == 3


def test_image_folder_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(D.DataNotFoundError, match=re.escape(f"data.root='{tmp_path}' has no train/ folder")):
        D.ImageFolderDataset(tmp_path, "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(D.DataNotFoundError, match="has no class sub-folders"):
        D.ImageFolderDataset(tmp_path, "train")
    make_folder(tmp_path, {"train": {"cat": 1}})
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(D.DataNotFoundError, match=re.escape(f"class folder {tmp_path / 'train' / 'dog'} holds no")):
        D.ImageFolderDataset(tmp_path, "train")
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = D.ImageFolderDataset(tmp_path, "train")
    with pytest.raises(OSError, match=re.escape(f"cannot read image {tmp_path / 'train' / 'dog' / 'broken.jpg'}")):
        ds[1]
    with pytest.raises(OSError, match="broken.jpg"):
        D.decode_folder(ds, 8, cache_dir=tmp_path / "cache")


@pytest.mark.skipif(not SHARED_CIFAR10.is_file(), reason="../shared/data/cifar10.tar.gz is absent")
def test_real_cifar10_folder_archive_indexes(tmp_path: Path) -> None:
    """The shared CIFAR-10 ImageFolder archive: 10 sorted classes, 50,000 / 10,000 images (indexing only)."""
    # 60,000 small files: unpacked in RAM (/dev/shm) where there is one, as a loaded disk takes up to a minute.
    shm = Path("/dev/shm")
    scratch = tempfile.TemporaryDirectory(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path)
    with scratch as folder:
        if shutil.which("tar"):  # GNU tar unpacks about 3x faster than tarfile
            subprocess.run(["tar", "-xzf", str(SHARED_CIFAR10), "-C", folder], check=True)
        else:
            with tarfile.open(SHARED_CIFAR10) as archive:
                archive.extractall(folder, filter="data")
        cfg = compose_config(["dataset=folder", f"data.root={Path(folder) / 'cifar10'}"])
        train = D.build_dataset(cfg.dataset, cfg.data, "pretrain")
        test = D.build_dataset(cfg.dataset, cfg.data, "test")
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert train.classes == test.classes == classes
    assert (len(train), len(test)) == (50_000, 10_000)
    assert set(Counter(train.labels.tolist()).values()) == {5000}
    assert set(Counter(test.labels.tolist()).values()) == {1000}


# ----------------------------------------------------------------------------------------------- decode cache
def test_decode_folder_resizes_and_caches_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_folder(tmp_path / "data", {"train": {"a": 2, "b": 1}}, size=(12, 8))
    ds = D.ImageFolderDataset(root, "train")
    out = D.decode_folder(ds, 6, cache_dir=tmp_path / "cache")
    assert out.images.shape == (3, 3, 6, 6) and out.images.dtype == torch.uint8
    assert out.labels.tolist() == [0, 0, 1] and out.classes == ["a", "b"]
    cache = D.decode_cache_path(ds, 6, tmp_path / "cache")
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr(D, "_Decoded", no_decode)
        again = D.decode_folder(D.ImageFolderDataset(root, "train"), 6, cache_dir=tmp_path / "cache")
    assert torch.equal(again.images, out.images) and cache.stat().st_mtime_ns == stamp

    make_folder(root, {"train": {"b": 2}}, size=(12, 8))  # a new file invalidates the cache
    grown = D.decode_folder(D.ImageFolderDataset(root, "train"), 6, cache_dir=tmp_path / "cache")
    assert len(grown) == 4 and cache.stat().st_mtime_ns != stamp
    bigger = D.decode_folder(D.ImageFolderDataset(root, "train"), 8, cache_dir=tmp_path / "cache")
    assert bigger.images.shape[-2:] == (8, 8)


def test_decode_keeps_same_size_images_exact(tmp_path: Path) -> None:
    root = make_folder(tmp_path, {"train": {"a": 2}}, size=(8, 8))
    ds = D.ImageFolderDataset(root, "train")
    out = D.decode_folder(ds, 8)  # default place: beside the data
    assert (root / ".vdg_cache").is_dir()
    pixels = torch.from_numpy(np.asarray(ds.load(1))).permute(2, 0, 1)
    assert torch.equal(out.images[1], pixels)


def test_decode_cache_unwritable_place_only_warns(tmp_path: Path) -> None:
    root = make_folder(tmp_path, {"train": {"a": 1}})
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not write the decode cache"):
        out = D.decode_folder(D.ImageFolderDataset(root, "train"), 8, cache_dir=blocker / "cache")
    assert len(out) == 1


# ---------------------------------------------------------------------------------------------------- STL-10
def write_fake_stl10(root: Path, counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """stl10_binary/ with a few images per part in the real format (column-major planes, labels 1..10)."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    images = {}
    for part, n in counts.items():
        images[part] = torch.randint(0, 256, (n, 3, 96, 96), generator=gen, dtype=torch.uint8)
        images[part].transpose(2, 3).numpy().tofile(folder / f"{part}_X.bin")
        if part != "unlabeled":
            np.arange(1, n + 1, dtype=np.uint8).tofile(folder / f"{part}_y.bin")
    return images


def test_stl10_splits_and_unlabeled_labels(tmp_path: Path) -> None:
    images = write_fake_stl10(tmp_path, {"train": 3, "test": 2, "unlabeled": 4})
    cfg = compose_config(["dataset=stl10", f"data.root={tmp_path}", "data.download=false"])
    pretrain = D.build_dataset(cfg.dataset, cfg.data, "pretrain")
    assert torch.equal(pretrain.images, images["unlabeled"]) and pretrain.labels.tolist() == [-1] * 4
    train = D.build_dataset(cfg.dataset, cfg.data, "train")
    assert torch.equal(train.images, images["train"]) and train.labels.tolist() == [0, 1, 2]
    assert train.classes == list(D.STL10_CLASSES)
    cfg.dataset.pretrain_split = "train+unlabeled"
    both = D.build_dataset(cfg.dataset, cfg.data, "pretrain")
    assert len(both) == 7 and both.labels.tolist() == [0, 1, 2, -1, -1, -1, -1]
    assert len(D.build_dataset(cfg.dataset, cfg.data, "test")) == 2


def test_stl10_missing_names_root_and_layout(tmp_path: Path) -> None:
    with pytest.raises(D.DataNotFoundError, match=re.escape(f"data.root='{tmp_path}'") + ".*unlabeled_X.bin"):
        D.load_stl10(tmp_path, "unlabeled", download=False)


# ---------------------------------------------------------------------------------------------- ImageNet-100
def test_imagenet100_class_list_is_the_cmc_subset() -> None:
    classes = D.imagenet100_classes()
    assert len(classes) == len(set(classes)) == 100
    assert all(re.fullmatch(r"n\d{8}", c) for c in classes)
    assert (classes[0], classes[-1]) == ("n02869837", "n02090622")  # CMC's imagenet100.txt order


def fake_imagenet(root: Path, classes: list[str], flat_val: bool = False) -> Path:
    for split in ("train", "val"):
        for wnid in classes:
            if split == "val" and flat_val:
                (root / "val").mkdir(parents=True, exist_ok=True)
                (root / "val" / f"ILSVRC2012_val_{wnid}.JPEG").write_bytes(b"")
                continue
            (root / split / wnid).mkdir(parents=True)
            (root / split / wnid / f"{wnid}_0.JPEG").write_bytes(b"")
    return root


@pytest.mark.parametrize("copy", [False, True])
def test_make_imagenet100_builds_the_subset(tmp_path: Path, copy: bool) -> None:
    script = load_script("make_imagenet100")
    classes = D.imagenet100_classes()
    source = fake_imagenet(tmp_path / "imagenet", [*classes, "n99999999"])
    out = tmp_path / "in100"
    counts = script.main([str(source), str(out), *(["--copy"] if copy else [])])
    assert counts == {"train": 100, "val": 100}
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(classes)
    assert (out / "val" / classes[0]).is_symlink() is not copy
    if copy:
        with pytest.raises(SystemExit):  # copies are never overwritten
            script.main([str(source), str(out), "--copy"])
    else:
        assert script.main([str(source), str(out)]) == counts  # re-running keeps the links

    cfg = compose_config(["dataset=imagenet100", f"data.root={out}"])
    val = D.build_dataset(cfg.dataset, cfg.data, "test")  # test -> val/
    assert val.classes == sorted(classes) and len(val) == 100 and Path(val.samples[0][0]).parent.parent.name == "val"


def test_make_imagenet100_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    script = load_script("make_imagenet100")
    classes = D.imagenet100_classes()
    flat = fake_imagenet(tmp_path / "flat", classes, flat_val=True)
    with pytest.raises(SystemExit):
        script.main([str(flat), str(tmp_path / "out")])
    assert "holds image files but no class folders" in capsys.readouterr().err
    partial = fake_imagenet(tmp_path / "partial", classes[:98])
    with pytest.raises(SystemExit):
        script.main([str(partial), str(tmp_path / "out")])
    assert "lacks 2 of the 100 classes" in capsys.readouterr().err
    with pytest.raises(D.DataNotFoundError, match=r"missing \['n.*\(2\)"):
        D.load_imagenet100(partial, "train")


def test_imagenet100_missing_folder_names_root(tmp_path: Path) -> None:
    cfg = compose_config(["dataset=imagenet100", f"data.root={tmp_path}"])
    with pytest.raises(D.DataNotFoundError, match=re.escape(f"data.root='{tmp_path}' has no val/ folder")):
        D.build_dataset(cfg.dataset, cfg.data, "test")


# ------------------------------------------------------------------------------------------------ CPU backend
def test_cpu_backend_loader_two_views_drop_last(tiny_cfg) -> None:
    cfg = tiny_cfg("data.backend=cpu", "data.batch_size=24")  # 64 images -> 2 full batches, 16 dropped
    module = PretrainDataModule(cfg)
    module.setup("fit")
    assert module.backend == "cpu"
    loader = module.train_dataloader()
    assert loader.drop_last and len(loader) == 2
    views, labels = next(iter(loader))
    assert [v.shape for v in views] == [(24, 3, 32, 32)] * 2 and views[0].dtype == torch.float32
    assert not torch.equal(views[0], views[1]) and labels.shape == (24,)
    val = module.val_dataloader()
    assert not val.drop_last and len(val.dataset) == 32


def test_eval_loader_uses_the_eval_split(tiny_cfg) -> None:
    cfg = tiny_cfg()
    images, labels = next(iter(eval_loader(cfg, "test", batch_size=8, num_workers=0)))
    assert images.shape == (8, 3, 32, 32) and labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


def test_synthetic_and_digits_splits() -> None:
    cfg = compose_config(["dataset=digits"])
    train, test = (D.build_dataset(cfg.dataset, cfg.data, s) for s in ("pretrain", "test"))
    assert (len(train), len(test)) == (1437, 360) and train.images.shape[1:] == (3, 32, 32)
    assert OmegaConf.select(cfg, "dataset.pretrain_split") is None


def test_bad_augmentation_recipe_names_the_key() -> None:
    from vdg.data.recipes import ViewRecipe

    with pytest.raises(ValueError, match=r"unknown augmentation key\(s\) \['blur'\] in dataset.augment; allowed keys"):
        ViewRecipe.from_config({"blur": 0.5})
    with pytest.raises(ValueError, match=r"dataset.augment.flip_prob=1.5 must lie in \[0, 1\]"):
        ViewRecipe.from_config({"flip_prob": 1.5})
    with pytest.raises(ValueError, match="crop_min_scale <= crop_max_scale"):
        ViewRecipe.from_config({"crop_min_scale": 0.9, "crop_max_scale": 0.5})
