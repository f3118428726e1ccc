"""Datasets vdg trains and evaluates on, each returned as (image, label) pairs without any transform.

Only loading lives here (including the one-off decode of an image folder to a uint8 tensor for the GPU
backend): augmentation is `vdg.data.transforms` / `vdg.data.gpu_augment`, batching is `vdg.data.module`.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CIFAR10, CIFAR100, STL10

from vdg.core.atomic import atomic_write, remove_orphans
from vdg.core.errors import ConfigError, DataNotFoundError, DatasetError, ImageReadError
from vdg.data.transforms import decode_transform

DATASETS = ("cifar10", "cifar100", "stl10", "imagenet100", "folder", "digits", "synthetic")
# The roles a caller asks `build_dataset` for; which split on disk each role is depends on the dataset.
SPLITS = ("pretrain", "train", "test")
# dataset.pretrain_split: the split self-supervised pretraining reads. Only STL-10 has a choice.
PRETRAIN_SPLITS: dict[str, tuple[str, ...]] = {"stl10": ("unlabeled", "train+unlabeled", "train")}
DEFAULT_PRETRAIN_SPLITS = ("train",)
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
STL10_SIZE = 96


class TensorImageDataset(Dataset):
    """In-memory uint8 images [N, 3, H, W] with integer labels; the images can also move to a device whole."""

    def __init__(self, images: Tensor, labels: Tensor, classes: list[str], transform: Callable | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            # not user input: the dataset builders' tensors
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            # not user input: the dataset builders' tensors
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.classes, self.transform = images, labels.long(), classes, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def _check_split(split: str, allowed: tuple[str, ...] = ("train", "test")) -> None:
    if split not in allowed:
        raise ConfigError(f"unknown split {split!r}; allowed values: {list(allowed)}")


def disk_split(dataset_cfg: Any, split: str) -> str:
    """The split on disk that a role ("pretrain", "train", "test") means for the dataset `dataset_cfg` names.

    pretrain: `dataset.pretrain_split` (STL-10: unlabeled by default, as the official code), else train.
    test: `dataset.test_split` where set (ImageNet-100: val), else test. This is the one place that maps them.
    """
    _check_split(split, SPLITS)
    name = dataset_cfg.name
    if split == "pretrain":
        allowed = PRETRAIN_SPLITS.get(name, DEFAULT_PRETRAIN_SPLITS)
        chosen = str(dataset_cfg.get("pretrain_split", allowed[0]))
        if chosen not in allowed:
            raise ConfigError(
                f"unknown dataset.pretrain_split {chosen!r} for dataset {name!r}; allowed values: {list(allowed)}"
            )
        return chosen
    if split == "test":
        return str(dataset_cfg.get("test_split", "test"))
    return "train"


def load_digits(split: str, image_size: int = 32) -> TensorImageDataset:
    """scikit-learn's handwritten digits (1,797 real 8x8 scans), as 32x32 RGB uint8; 80/20 stratified split.

    The embedded default dataset: it ships with scikit-learn, so the quickstart needs no download.
    """
    # optional heavy dependency: scikit-learn (seconds to import), for the digits dataset only
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
        raise ConfigError(f"synthetic dataset needs num_classes >= 1 and size >= 1, got {num_classes}, {size}")
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


# ------------------------------------------------------------------------------------------------- STL-10
STL10_FILES = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin", None),
}


def _read_stl10_part(folder: Path, part: str) -> tuple[Tensor, Tensor]:
    """One STL-10 binary part: images uint8 [N, 3, 96, 96] and labels 0..9 (-1 for `unlabeled`)."""
    images_file, labels_file = STL10_FILES[part]
    # Each image is 3 planes of 96x96 bytes stored column-major: read as [N, C, W, H], then swap W and H.
    raw = np.memmap(folder / images_file, dtype=np.uint8, mode="r").reshape(-1, 3, STL10_SIZE, STL10_SIZE)
    images = torch.from_numpy(np.ascontiguousarray(raw.transpose(0, 1, 3, 2)))
    if labels_file is None:
        labels = torch.full((len(images),), -1, dtype=torch.long)
    else:
        labels = torch.from_numpy(np.fromfile(folder / labels_file, dtype=np.uint8).astype(np.int64) - 1)
    return images, labels


def load_stl10(root: str | Path, split: str, download: bool) -> TensorImageDataset:
    """STL-10 in torchvision's layout (`root/stl10_binary/*.bin`); split train (5k), test (8k), unlabeled (100k)
    or train+unlabeled. Unlabeled images get label -1 (the online probes and k-NN ignore them)."""
    _check_split(split, ("train", "test", "unlabeled", "train+unlabeled"))
    folder = Path(root) / "stl10_binary"
    parts = split.split("+")
    needed = [folder / f for part in parts for f in STL10_FILES[part] if f is not None]
    failure = ""
    if not all(p.is_file() for p in needed) and download:
        try:
            STL10(str(root), split="test", download=True)  # fetches and md5-checks the whole archive once
        except Exception as err:  # URLError/OSError without network, RuntimeError on a corrupt archive
            failure = f" ({type(err).__name__}: {err})"
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise DataNotFoundError(
            f"stl10 not found under data.root={str(root)!r} and could not be downloaded "
            f"(data.download={download}){failure}: missing {missing}. Expected torchvision's layout {folder}/ holding "
            f"train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin (stl10_binary.tar.gz unpacked "
            f"in data.root)."
        )
    loaded = [_read_stl10_part(folder, part) for part in parts]
    images = loaded[0][0] if len(loaded) == 1 else torch.cat([im for im, _ in loaded])
    labels = loaded[0][1] if len(loaded) == 1 else torch.cat([lb for _, lb in loaded])
    names_file = folder / "class_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else list(STL10_CLASSES)
    return TensorImageDataset(images, labels, classes)


# ------------------------------------------------------------------------------------------- image folders
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _is_sixteen_bit(image: Any) -> bool:
    """Mode "I" holding 16-bit samples: a 16-bit PNG (older Pillow) or a TIFF with BitsPerSample 16."""
    if image.format == "PNG":
        return True
    bits = getattr(image, "tag_v2", {}).get(258) if image.format == "TIFF" else None
    return bits is not None and tuple(bits if isinstance(bits, tuple) else (bits,)) == (16,)


def to_rgb(image: Any, path: str | Path) -> Any:
    """An opened PIL image as 8-bit RGB, without clipping: 16-bit grey (PNG/TIFF, modes I;16* and 16-bit I) is
    scaled by 255/65535 (Pillow's convert("RGB") would clip 94% of a typical image to white); palette, grey,
    CMYK, YCbCr, LAB, HSV and alpha modes go through Pillow's conversion (alpha dropped, as torchvision).
    32-bit integer (I) and floating-point (F) pixels have no fixed range: refused by name."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and _is_sixteen_bit(image)):
        samples = np.asarray(image).astype(np.float32)
        grey = np.clip(np.rint(samples / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise ImageReadError(
            f"cannot read image {path}: {kind} pixels (Pillow mode {mode}) have no fixed range to map to 8 bits; "
            f"convert the file to 8- or 16-bit"
        )
    try:
        return image.convert("RGB")
    except ValueError as err:  # a mode Pillow cannot convert (e.g. premultiplied La / RGBa)
        raise ImageReadError(f"cannot read image {path}: Pillow mode {mode} has no RGB conversion ({err})") from err


def _visible(name: str) -> bool:
    """Hidden entries (.ipynb_checkpoints, .DS_Store, macOS ._x.jpg resource forks) are never data."""
    return not name.startswith(".")


def _scan(folder: Path) -> list[os.DirEntry]:
    try:
        return sorted((e for e in os.scandir(folder) if _visible(e.name)), key=lambda e: e.name)
    except OSError as err:
        raise DatasetError(f"cannot list {folder}: {err.strerror or err}") from err


def list_classes(root: str | Path, split: str, name: str = "folder") -> list[str]:
    """Sorted class folders of `root/split`; refuses a missing split, no classes, or images outside classes."""
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        present = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
        raise DataNotFoundError(
            f"data.root={str(root)!r} has no {split}/ folder (sub-folders there: {present}); dataset={name} "
            f"expects {root}/{split}/<class>/<image>"
        )
    entries = _scan(folder)
    classes = [e.name for e in entries if e.is_dir()]
    stray = [e.name for e in entries if not e.is_dir() and e.name.lower().endswith(ImageFolderDataset.EXTENSIONS)]
    if not classes:
        raise DataNotFoundError(f"{folder} has no class sub-folders; expected {folder}/<class>/<image>")
    if stray:
        raise DatasetError(
            f"{len(stray)} image(s) lie directly in {folder} (e.g. {stray[:3]}), outside any class folder: they "
            f"would be ignored; move them into {folder}/<class>/"
        )
    return classes


def same_classes(root: str | Path, split: str, found: list[str], expected: list[str], reference: str) -> None:
    """Refuse a split whose class folders differ from the reference list: label i must mean one class."""
    if found == expected:
        return
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    raise DatasetError(
        f"data.root={str(root)!r}: {split}/ does not hold the classes of {reference} (labels are numbered from "
        f"one class list, so every later label would shift): missing in {split}/ {missing[:10]}"
        f"{'...' if len(missing) > 10 else ''}, only in {split}/ {extra[:10]}{'...' if len(extra) > 10 else ''}"
    )


class ImageFolderDataset(Dataset):
    """An ImageFolder split (`root/<split>/<class>/**/<image>`) with sorted class names; errors name the path.

    `classes`, when given, is the exact class list expected (the train split's for the other splits of a
    folder, the ImageNet-100 list): a split whose class folders differ is refused, so a label means the same
    class in every split. Hidden files and folders are skipped; images in sub-folders of a class folder count
    (as torchvision's ImageFolder); a dangling symlink is refused when listing.
    """

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable | None = None,
        classes: list[str] | None = None,
        name: str = "folder",
        reference: str = "train/",
    ) -> None:
        self.root, self.split = Path(root), split
        folder = self.root / split
        found = list_classes(self.root, split, name)
        if classes is not None:
            same_classes(self.root, split, found, list(classes), reference)
        self.classes = found
        self.samples: list[tuple[str, int]] = []
        for label, class_name in enumerate(self.classes):
            files = self._images(folder / class_name)
            if not files:
                raise DataNotFoundError(
                    f"class folder {folder / class_name} holds no images (extensions {list(self.EXTENSIONS)})"
                )
            self.samples.extend((str(p), label) for p in files)
        self.labels = torch.tensor([label for _, label in self.samples])
        self.transform = transform

    def _images(self, folder: Path, seen: frozenset[str] = frozenset()) -> list[Path]:
        """Every image file under `folder` (recursively, symlinks followed, hidden entries skipped), sorted."""
        real = os.path.realpath(folder)
        if real in seen:  # a symlink back to a parent: listing it again would never end
            raise DatasetError(f"symlink loop: {folder} leads back to {real}")
        files = []
        for entry in _scan(folder):
            path = Path(entry.path)
            if entry.is_dir():
                files.extend(self._images(path, seen | {real}))
            elif entry.name.lower().endswith(self.EXTENSIONS):
                if not entry.is_file():  # a symlink whose target is gone
                    raise DatasetError(f"dangling symlink {path}: its target {os.readlink(path)} does not exist")
                files.append(path)
        return files

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):  # noqa: ANN201 - PIL.Image
        """The image as 8-bit RGB (`to_rgb`); an unreadable file is an `ImageReadError` naming it."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                return to_rgb(img, path)
        except ImageReadError:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError) as err:
            raise ImageReadError(f"cannot read image {path}: not an image Pillow can decode ({err})") from None
        except OSError as err:  # truncated data, permissions, a file that vanished
            raise ImageReadError(f"cannot read image {path}: {err.strerror or err}") from None

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[index][1]


def imagenet100_classes() -> list[str]:
    """The 100 WordNet ids of the CMC ImageNet-100 subset (Tian et al. 2019), as solo-learn ships them."""
    text = resources.files("vdg.data").joinpath("imagenet100_classes.txt").read_text()
    return text.split()


def load_imagenet100(root: str | Path, split: str) -> ImageFolderDataset:
    """ImageNet-100 as built by `scripts/make_imagenet100.py`: `root/{train,val}/<wnid>/<image>`."""
    _check_split(split, ("train", "val"))
    expected = sorted(imagenet100_classes())
    found = list_classes(root, split, "imagenet100")
    if set(found) != set(expected):
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        raise DataNotFoundError(
            f"{Path(root) / split} does not hold the {len(expected)} classes dataset=imagenet100 expects: "
            f"missing {missing[:10]}{'...' if len(missing) > 10 else ''} ({len(missing)}), "
            f"unexpected {extra[:10]}{'...' if len(extra) > 10 else ''} ({len(extra)})"
        )
    return ImageFolderDataset(root, split, classes=expected, name="imagenet100", reference="the ImageNet-100 list")


def load_folder(root: str | Path, split: str, num_classes: int | None = None) -> ImageFolderDataset:
    """dataset=folder: every split takes its class list from train/ (refused when its folders differ), and
    the number of classes must be dataset.num_classes (the probes and linear heads have that many outputs)."""
    classes = list_classes(root, "train")
    if num_classes is not None and len(classes) != num_classes:
        raise DatasetError(
            f"data.root={str(root)!r}: train/ has {len(classes)} class folders ({classes[:10]}"
            f"{'...' if len(classes) > 10 else ''}) but dataset.num_classes={num_classes}; set "
            f"dataset.num_classes={len(classes)}"
        )
    return ImageFolderDataset(root, split, classes=None if split == "train" else classes)


# ------------------------------------------------------------------------------- folder -> uint8 tensor cache
DECODE_CACHE_VERSION = 1


def _fingerprint(dataset: ImageFolderDataset, image_size: int) -> str:
    """Hash of what the decoded tensor depends on: the relative file list, the labels, the decode size."""
    digest = hashlib.sha256(f"v{DECODE_CACHE_VERSION} {image_size}px\n".encode())
    prefix = len(str(dataset.root / dataset.split)) + 1
    for path, label in dataset.samples:
        digest.update(f"{path[prefix:]}\t{label}\n".encode())
    return digest.hexdigest()


def decode_cache_path(dataset: ImageFolderDataset, image_size: int, cache_dir: str | Path | None = None) -> Path:
    """Where `decode_folder` keeps its cache: `<cache_dir or data.root/.vdg_cache>/<root>-<split>-<size>px.pt`."""
    folder = Path(cache_dir) if cache_dir is not None else dataset.root / ".vdg_cache"
    tag = getattr(dataset, "cache_tag", "")  # class-balanced subsets (`class_subset`)
    return folder / f"{dataset.root.resolve().name}-{dataset.split}{tag}-{image_size}px.pt"


class _Decoded(Dataset):
    def __init__(self, dataset: ImageFolderDataset, image_size: int) -> None:
        self.dataset, self.size, self.transform = dataset, image_size, decode_transform(image_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tensor:
        image = self.dataset.load(index)
        if image.size == (self.size, self.size):  # already decode-sized (CIFAR): the same pixels, 5x cheaper
            return torch.from_numpy(np.array(image)).permute(2, 0, 1)
        return self.transform(image).as_subclass(Tensor)


def decode_folder(
    dataset: ImageFolderDataset, image_size: int, cache_dir: str | Path | None = None, num_workers: int = 0
) -> TensorImageDataset:
    """Every image of an ImageFolder split as uint8 [N, 3, S, S] (S = image_size), decoded once and cached.

    Decode = shorter side resized to S, centre S x S crop (`transforms.decode_transform`). The cache file is
    reused while the file list and S are unchanged, and rewritten otherwise; an unwritable place only warns.
    """
    cache = decode_cache_path(dataset, image_size, cache_dir)
    fingerprint = _fingerprint(dataset, image_size)
    if cache.is_file():
        try:
            blob = torch.load(cache, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:  # truncated or foreign file: decode again and replace it
            warnings.warn(f"ignoring the unreadable decode cache {cache} ({err}); decoding again", stacklevel=2)
            blob = {}
        if isinstance(blob, dict) and blob.get("fingerprint") == fingerprint:
            return TensorImageDataset(blob["images"], blob["labels"], list(blob["classes"]))
    images = torch.empty(len(dataset), 3, image_size, image_size, dtype=torch.uint8)
    loader = DataLoader(_Decoded(dataset, image_size), batch_size=256, num_workers=num_workers)
    start = 0
    for batch in loader:
        images[start : start + len(batch)] = batch
        start += len(batch)
    blob = {"fingerprint": fingerprint, "images": images, "labels": dataset.labels, "classes": dataset.classes}
    try:
        remove_orphans(cache.parent)  # temp files of killed writers (live writers' are kept)
        atomic_write(cache, lambda tmp: torch.save(blob, tmp))  # a concurrent reader sees the old or the new file
    except OSError as err:
        warnings.warn(f"could not write the decode cache {cache} ({err}); set data.cache_dir", stacklevel=2)
    return TensorImageDataset(images, dataset.labels, dataset.classes)


# ------------------------------------------------------------------------------------ class-balanced subsets
# dataset.<key> -> the role it applies to. The train split's subset serves pretraining and the evaluations'
# training side alike (k-NN bank, linear head), so one experiment sees the same images throughout.
SUBSET_KEYS = {"pretrain": "subset_per_class", "train": "subset_per_class", "test": "test_subset_per_class"}


def class_balanced_indices(labels: Tensor, per_class: int, seed: int, key: str = "dataset.subset_per_class") -> Tensor:
    """Sorted indices of `per_class` samples of every class in `labels`, drawn without replacement.

    Deterministic under `seed` (a torch.Generator, the same on every machine); another seed draws another
    subset. Refused (ValueError naming `key`) when a class has fewer samples, or when labels are missing (-1).
    """
    labels = torch.as_tensor(labels).long()
    if per_class < 1:
        raise ConfigError(f"{key}={per_class} must be a positive number of images per class, or null (the whole split)")
    if len(labels) and int(labels.min()) < 0:
        raise ConfigError(f"{key}={per_class} needs labels, but this split has unlabelled images (label -1)")
    classes, counts = torch.unique(labels, return_counts=True)
    if not len(classes):
        raise DatasetError(f"{key}={per_class}: the split is empty")
    smallest = int(counts.min())
    if smallest < per_class:
        name = int(classes[int(counts.argmin())])
        raise ConfigError(
            f"{key}={per_class} but class {name} has only {smallest} images in this split; "
            f"allowed values: 1..{smallest}"
        )
    generator = torch.Generator().manual_seed(int(seed))
    chosen = []
    for label in classes.tolist():
        members = torch.nonzero(labels == label).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def class_subset(dataset: Dataset, indices: Tensor) -> Dataset:
    """The same kind of dataset holding only `indices` (a tensor dataset stays one, for the batched backends)."""
    if isinstance(dataset, TensorImageDataset):
        return TensorImageDataset(dataset.images[indices], dataset.labels[indices], dataset.classes, dataset.transform)
    if isinstance(dataset, ImageFolderDataset):
        subset = copy.copy(dataset)
        subset.samples = [dataset.samples[i] for i in indices.tolist()]
        subset.labels = dataset.labels[indices]
        # its own decode cache file: a subset and the whole split (or two subsets) would replace each other's
        digest = hashlib.sha256(indices.numpy().tobytes()).hexdigest()[:8]
        subset.cache_tag = f"-subset{len(indices)}-{digest}"
        return subset
    # not user input: build_dataset returns only these two kinds
    raise TypeError(f"class-balanced subsets support tensor and image-folder datasets, not {type(dataset).__name__}")


def apply_subset(dataset: Dataset, dataset_cfg: Any, split: str) -> Dataset:
    """`dataset` reduced to `dataset.subset_per_class` (train split) or `dataset.test_subset_per_class` (test
    split) images per class, drawn with `dataset.subset_seed`; unchanged when the key is null or absent."""
    key = SUBSET_KEYS[split]
    per_class = dataset_cfg.get(key)
    if per_class is None:
        return dataset
    seed = dataset_cfg.get("subset_seed")
    if seed is None:
        raise ConfigError(
            f"dataset.{key}={per_class} needs dataset.subset_seed (an integer; pretraining sets the run's seed)"
        )
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise ConfigError(f"dataset.{key} needs a labelled split; {type(dataset).__name__} has no labels")
    where = f"dataset.{key} ({dataset_cfg.name} {disk_split(dataset_cfg, split)} split)"
    return class_subset(dataset, class_balanced_indices(labels, int(per_class), int(seed), where))


# ----------------------------------------------------------------------------------------------- the factory
def build_dataset(dataset_cfg: Any, data_cfg: Any, split: str) -> Dataset:
    """The raw split of the dataset a config names (`dataset.name`), images untransformed.

    split is a role: "pretrain" (what self-supervision reads), "train" or "test" (evaluation); `disk_split`
    maps it to the dataset's own split names. `dataset.subset_per_class` / `test_subset_per_class` reduce the
    split to a class-balanced subset (`apply_subset`).
    """
    name = dataset_cfg.name
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset.name {name!r}; allowed values: {list(DATASETS)}")
    fraction = dataset_cfg.get("validation_split")
    if fraction is None:
        return apply_subset(_load_split(dataset_cfg, data_cfg, split), dataset_cfg, split)
    return apply_subset(validation_part(dataset_cfg, data_cfg, split, fraction), dataset_cfg, split)


# ------------------------------------------------------------------------------------------ validation split
VALIDATION_SEED = 0  # one fixed carve, the same for every run and seed: recipes are compared on the same images


def validation_indices(labels: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """(kept, held_out): sorted indices that split every class of `labels`, round(fraction * n_c) held out.

    Class-stratified and deterministic (VALIDATION_SEED), so the held-out images have the split's class balance.
    """
    labels = torch.as_tensor(labels).long()
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    kept, held = [], []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_held = round(fraction * len(members))
        held.append(members[:n_held])
        kept.append(members[n_held:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def validation_part(dataset_cfg: Any, data_cfg: Any, split: str, fraction: Any) -> Dataset:
    """`dataset.validation_split`: a fraction of the train split held out to choose settings on, never the test split.

    Pretraining and the evaluations' train side read the rest of the train split; the test role reads the held-out
    images. So a recipe is chosen on images no evaluation trains on, and the test split stays unseen.
    """
    key = "dataset.validation_split"
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) < 1.0:
        raise ConfigError(f"{key}={fraction!r} must be a fraction in (0, 1) of the train split, or null (off)")
    if disk_split(dataset_cfg, "pretrain") != "train":
        raise ConfigError(
            f"{key} carves the train split, but dataset.pretrain_split={disk_split(dataset_cfg, 'pretrain')!r}: "
            "set dataset.pretrain_split=train, or validation_split=null"
        )
    train = _load_split(dataset_cfg, data_cfg, "train")
    labels = getattr(train, "labels", None)
    if labels is None or (len(labels) and int(torch.as_tensor(labels).min()) < 0):
        raise ConfigError(f"{key} needs a labelled train split; {dataset_cfg.name}'s has no labels")
    kept, held = validation_indices(labels, float(fraction))
    if not len(held) or not len(kept):
        raise ConfigError(f"{key}={fraction} leaves one side empty ({len(kept)} kept, {len(held)} held out)")
    return class_subset(train, held if split == "test" else kept)


def _load_split(dataset_cfg: Any, data_cfg: Any, split: str) -> Dataset:
    name, on_disk = dataset_cfg.name, disk_split(dataset_cfg, split)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_cfg.root, on_disk, bool(data_cfg.download))
    if name == "stl10":
        return load_stl10(data_cfg.root, on_disk, bool(data_cfg.download))
    if name == "imagenet100":
        return load_imagenet100(data_cfg.root, on_disk)
    if name == "folder":
        return load_folder(data_cfg.root, on_disk, dataset_cfg.get("num_classes"))
    if name == "digits":
        return load_digits(on_disk, int(dataset_cfg.image_size))
    size = int(dataset_cfg.train_size if on_disk == "train" else dataset_cfg.test_size)  # synthetic
    return make_synthetic(on_disk, int(dataset_cfg.num_classes), size, int(dataset_cfg.image_size))


def mean_std(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images [N, 3, H, W] in [0, 1] units (to fill a dataset yaml)."""
    x = images.float() / 255
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std if not math.isnan(v)]
