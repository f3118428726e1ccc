"""Datasets vdg trains and evaluates on, each returned as (image, label) pairs without any transform.

Only loading lives here: augmentation is `vdg.data.transforms`, batching is `vdg.data.module`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

DATASETS = ("cifar10", "cifar100", "folder", "digits", "synthetic")
SPLITS = ("train", "test")


class DataNotFoundError(FileNotFoundError):
    """The data a config asks for is not on disk (and could not be downloaded)."""


class TensorImageDataset(Dataset):
    """In-memory uint8 images [N, 3, H, W] with integer labels; the images can also move to a device whole."""

    def __init__(self, images: Tensor, labels: Tensor, classes: list[str], transform: Callable | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels, self.classes, self.transform = images, labels.long(), classes, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed values: {list(SPLITS)}")


def load_digits(split: str, image_size: int = 32) -> TensorImageDataset:
    """scikit-learn's handwritten digits (1,797 real 8x8 scans), as 32x32 RGB uint8; 80/20 stratified split.

    The embedded default dataset: it ships with scikit-learn, so the quickstart needs no download.
    """
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    _check_split(split)
    bunch = sk_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # values 0..16
    images = torch.nn.functional.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(bunch.target)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.2, random_state=0, stratify=labels.numpy()
    )
    idx = torch.as_tensor(train_idx if split == "train" else test_idx)
    return TensorImageDataset(images[idx], labels[idx], [str(i) for i in range(10)])


def make_synthetic(
    split: str, num_classes: int = 10, size: int = 512, image_size: int = 32, seed: int = 0
) -> TensorImageDataset:
    """Class-conditional random images for tests and benchmarks: a smooth per-class pattern plus noise.

    Classes are learnable (the prototypes differ), the split decides the per-sample noise seed.
    """
    _check_split(split)
    if num_classes < 1 or size < 1:
        raise ValueError(f"synthetic dataset needs num_classes >= 1 and size >= 1, got {num_classes}, {size}")
    gen = torch.Generator().manual_seed(seed)
    low = max(image_size // 8, 2)
    prototypes = torch.rand(num_classes, 3, low, low, generator=gen)
    prototypes = torch.nn.functional.interpolate(
        prototypes, size=image_size, mode="bicubic", align_corners=False
    )
    sample_gen = torch.Generator().manual_seed(seed + (1 if split == "train" else 2))
    labels = torch.arange(size) % num_classes
    noise = 0.15 * torch.randn(size, 3, image_size, image_size, generator=sample_gen)
    images = ((prototypes[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return TensorImageDataset(images, labels, [f"class_{i}" for i in range(num_classes)])


def load_cifar(name: str, root: str | Path, split: str, download: bool) -> TensorImageDataset:
    """CIFAR-10/100 in torchvision's format under `root` (downloaded there when `download` and the network allow)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    _check_split(split)
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    try:
        ds = cls(str(root), train=split == "train", download=download)
    except Exception as err:  # torchvision raises RuntimeError (missing) or URLError/OSError (no network)
        raise DataNotFoundError(
            f"{name} not found under data.root={str(root)!r} and could not be downloaded "
            f"(data.download={download}): {err}. Expected torchvision's layout {Path(root) / folder}/ "
            f"(the python-version archive unpacked there); set data.root to its parent folder, or use "
            f"dataset=folder with an ImageFolder copy."
        ) from err
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return TensorImageDataset(images, torch.tensor(ds.targets), list(ds.classes))


class ImageFolderDataset(Dataset):
    """An ImageFolder split (`root/<split>/<class>/<image>`) with sorted class names; errors name the path."""

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None) -> None:
        _check_split(split)
        root = Path(root)
        folder = root / split
        if not folder.is_dir():
            raise DataNotFoundError(
                f"data.root={str(root)!r} has no {split}/ folder; dataset=folder expects "
                f"{root}/train/<class>/<image> and {root}/test/<class>/<image>"
            )
        self.classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if not self.classes:
            raise DataNotFoundError(f"{folder} has no class sub-folders; expected {folder}/<class>/<image>")
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in self.EXTENSIONS)
            if not files:
                raise DataNotFoundError(
                    f"class folder {folder / name} holds no images (extensions {list(self.EXTENSIONS)})"
                )
            self.samples.extend((str(p), label) for p in files)
        self.labels = torch.tensor([label for _, label in self.samples])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):  # noqa: ANN201 - PIL.Image
        from PIL import Image, UnidentifiedImageError

        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise OSError(f"cannot read image {path}: {err}") from err

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[index][1]


def build_dataset(dataset_cfg: Any, data_cfg: Any, split: str) -> Dataset:
    """The raw split of the dataset a config names (`dataset.name`), images untransformed."""
    name = dataset_cfg.name
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_cfg.root, split, bool(data_cfg.download))
    if name == "folder":
        return ImageFolderDataset(data_cfg.root, split)
    if name == "digits":
        return load_digits(split, int(dataset_cfg.image_size))
    if name == "synthetic":
        size = int(dataset_cfg.train_size if split == "train" else dataset_cfg.test_size)
        return make_synthetic(split, int(dataset_cfg.num_classes), size, int(dataset_cfg.image_size))
    raise ValueError(f"unknown dataset.name {name!r}; allowed values: {list(DATASETS)}")


def mean_std(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images [N, 3, H, W] in [0, 1] units (to fill a dataset yaml)."""
    x = images.float() / 255
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std if not math.isnan(v)]
