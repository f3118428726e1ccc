"""LightningDataModule for pretraining: two augmented views per image for training (CPU workers or on the
GPU), the test split for validation (online probes, validation FLOPs). It batches and loads; it does not
define augmentations (recipes come from the dataset yaml)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vdg.core.errors import ConfigError, DatasetError
from vdg.data.datasets import ImageFolderDataset, TensorImageDataset, build_dataset, decode_folder
from vdg.data.gpu_augment import GPUMultiViewAugment
from vdg.data.gpu_module import DeviceBatchLoader, resolve_backend
from vdg.data.recipes import ViewRecipe
from vdg.data.transforms import MultiView, eval_transform, view_transform
from vdg.losses.distributed import gather_objects


class TransformedDataset(Dataset):
    """Wrap a raw (image, label) dataset with a transform, leaving the raw dataset untouched."""

    def __init__(self, base: Dataset, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):  # noqa: ANN204
        image, label = self.base[index]
        return self.transform(image), label


def view_recipes(dataset_cfg: Any) -> list[ViewRecipe]:
    views = dataset_cfg.augment
    if len(views) != 2:
        raise ConfigError(
            f"dataset.augment must list 2 views (view 0 -> gated, view 1 -> dense), got {len(views)}"
        )
    return [ViewRecipe.from_config(v) for v in views]


def per_device_batch_size(cfg: Any, world: int | None = None) -> int:
    """data.batch_size is the total batch over all devices and nodes (512 in the paper).

    `world` is the number of processes (the Trainer's world size once known); without it, it is read from
    trainer.devices x trainer.num_nodes when devices is an integer.
    """
    if world is None:
        devices = str(cfg.trainer.devices)
        world = int(devices) * int(cfg.trainer.num_nodes) if devices.isdigit() else 1
    total = int(cfg.data.batch_size)
    if total % world:
        raise DatasetError(f"data.batch_size={total} must be divisible by devices x nodes = {world}")
    return total // world


class PretrainDataModule(pl.LightningDataModule):
    """Two augmented views per pretraining image (view 0 -> gated branch, view 1 -> dense), test split for val.

    data.backend picks where augmentation runs (`gpu_module.resolve_backend`, one answer for all processes):
    - cpu: torchvision v2 pipelines in DataLoader workers, pinned memory, shuffled, drop_last.
    - gpu: the uint8 train split lives on the training device; `DeviceBatchLoader` slices a per-epoch random
      permutation and `on_after_batch_transfer` augments each training batch there with `GPUMultiViewAugment`
      (same recipes), drawing from the device's default generator (each process has its own stream:
      `vdg.run.callbacks.RNGState`). Validation batches always come from the CPU loader, untouched. The device
      copy is released when fit ends (`teardown`).
    `device` overrides the training device when there is no Trainer (benchmarks, tests).
    """

    def __init__(self, cfg: Any, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.batch_size = per_device_batch_size(cfg)
        self._device = None if device is None else torch.device(device)
        self.backend: str | None = None  # "cpu" | "gpu" once set up
        self.train_set: Dataset | None = None  # cpu backend
        self.train_batches: DeviceBatchLoader | None = None  # gpu backend
        self.gpu_augment: GPUMultiViewAugment | None = None
        self._raw: dict[str, Dataset] = {}  # raw splits loaded by `load_splits`, reused by `setup`

    def load_splits(self) -> None:
        """Load the raw pretraining and validation splits and check them against the batch size, before the
        pretraining driver creates anything: missing data, classes that differ between the splits or a batch
        larger than the split fail here, in one line. `setup` reuses what is loaded."""
        ds, data = self.cfg.dataset, self.cfg.data
        self._raw["pretrain"] = build_dataset(ds, data, "pretrain")
        if ds.get("has_labels", True):
            self._raw["test"] = build_dataset(ds, data, "test")
        check_image_size(self._raw.get("test"), ds)
        size = len(self._raw["pretrain"])
        if size < self.batch_size:
            raise DatasetError(
                f"the {ds.name} pretraining split has {size} images, fewer than one per-device batch "
                f"(data.batch_size={int(data.batch_size)} over {int(data.batch_size) // self.batch_size} "
                f"device(s)): lower data.batch_size to at most {size}"
            )

    def _split(self, role: str) -> Dataset:
        if role not in self._raw:
            self._raw[role] = build_dataset(self.cfg.dataset, self.cfg.data, role)
        return self._raw[role]

    @property
    def device(self) -> torch.device:
        """The training device: the Trainer's root device, else the one given, else CUDA when available."""
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        if self._device is not None:
            return self._device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def setup(self, stage: str | None = None) -> None:
        if self.backend is not None:  # Lightning calls setup once per stage; the data stay loaded
            return
        ds, data = self.cfg.dataset, self.cfg.data
        if self.trainer is not None:  # devices=auto/-1 resolve only here
            self.batch_size = per_device_batch_size(self.cfg, self.trainer.world_size)
        size, mean, std = int(ds.image_size), list(ds.mean), list(ds.std)
        recipes = view_recipes(ds)
        raw = self._split("pretrain")
        device = self.device
        backend = str(data.backend)
        if backend == "auto" and isinstance(raw, ImageFolderDataset) and ds.get("eval_resize") is not None:
            # Large folder images (ImageNet-100) would be pre-resized for the device copy, which changes what
            # RandomResizedCrop crops from; auto keeps the official full-resolution CPU pipeline for them
            # (data.backend=gpu still forces the fast path).
            backend = "cpu"
        self.backend = self._agreed_backend(backend, _uint8_bytes(raw, size), device)
        if self.backend == "gpu":
            if isinstance(raw, ImageFolderDataset):
                raw = self._decode_once(raw, size)
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            self.train_batches = DeviceBatchLoader(
                raw.images.to(device), raw.labels.to(device), self.batch_size, int(self.cfg.seed), rank, world
            )
            self.gpu_augment = GPUMultiViewAugment(recipes, size, mean, std).to(device)
        else:
            views = [view_transform(r, size, mean, std) for r in recipes]
            self.train_set = TransformedDataset(raw, MultiView(views))
        self.val_set = None
        if ds.get("has_labels", True):
            val_t = eval_transform(size, list(ds.eval_mean), list(ds.eval_std), ds.get("eval_resize"))
            self.val_set = TransformedDataset(self._split("test"), val_t)
        self._raw = {}  # the loaders hold what they need

    def _agreed_backend(self, backend: str, nbytes: int, device: torch.device) -> str:
        """`resolve_backend` in every process, then one answer for all: gpu only if every process chose it.

        Each process sees its own GPU's free memory, and ranks with different pipelines would train on
        differently augmented data. data.backend=gpu that does not fit on one GPU fails on every process (a
        failure on one alone would leave the others waiting in the next collective).
        """
        fraction = float(self.cfg.data.get("gpu_memory_fraction", 0.5))
        try:
            local: str | MemoryError = resolve_backend(backend, nbytes, device, fraction)
        except MemoryError as err:
            local = err
        choices = gather_objects(local)
        for rank, choice in enumerate(choices):
            if isinstance(choice, MemoryError):
                raise MemoryError(f"process {rank}: {choice}") if len(choices) > 1 else choice
        return "gpu" if all(choice == "gpu" for choice in choices) else "cpu"

    def _decode_once(self, raw: ImageFolderDataset, size: int) -> TensorImageDataset:
        """`decode_folder` in the first process of each node, then the others read its cache (not N decodes)."""
        data = self.cfg.data

        def decode() -> TensorImageDataset:
            return decode_folder(raw, size, data.get("cache_dir"), int(data.num_workers))

        if self.trainer is None or self.trainer.world_size == 1:
            return decode()
        first = self.trainer.local_rank == 0
        decoded = decode() if first else None
        self.trainer.strategy.barrier("vdg.decode_folder")  # the others wait for the cache file
        return decoded if first else decode()

    def teardown(self, stage: str) -> None:
        """After fit: let go of the device copy of the split and the augmenter (setup reloads them if needed)."""
        if stage == "fit":
            self.backend = self.train_set = self.train_batches = self.gpu_augment = None

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        workers = int(self.cfg.data.num_workers)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=workers,
            pin_memory=bool(self.cfg.data.pin_memory),
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader | DeviceBatchLoader:
        if self.backend == "gpu":
            return self.train_batches
        if len(self.train_set) < self.batch_size:
            raise DatasetError(
                f"the {self.cfg.dataset.name} train split has {len(self.train_set)} images, fewer than one "
                f"per-device batch ({self.batch_size}); lower data.batch_size"
            )
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, train=False)

    @torch.no_grad()
    def augment(self, batch: tuple[Tensor, Tensor]) -> tuple[list[Tensor], Tensor]:
        """GPU backend: (uint8 images, labels) on the device -> ([view 0, view 1], labels)."""
        images, labels = batch
        return self.gpu_augment(images), labels

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.backend == "gpu" and self.trainer is not None and self.trainer.training:
            return self.augment(batch)
        return batch


def check_image_size(dataset: Dataset | None, dataset_cfg: Any) -> None:
    """Without dataset.eval_resize, evaluation images are used at their own size: an image folder whose first
    image is not dataset.image_size square would give features (and FLOPs) of another input size."""
    if not isinstance(dataset, ImageFolderDataset) or dataset_cfg.get("eval_resize") is not None or not len(dataset):
        return
    width, height = dataset.load(0).size
    size = int(dataset_cfg.image_size)
    if (width, height) != (size, size):
        raise DatasetError(
            f"{dataset.samples[0][0]} is {width}x{height} but dataset.image_size={size} and dataset.eval_resize=null "
            f"(evaluation images are not resized): set dataset.image_size={min(width, height)}, or "
            f"dataset.eval_resize=<shorter side before a centre crop of {size}>"
        )


def _uint8_bytes(dataset: Dataset, image_size: int) -> int:
    """Bytes the split takes as uint8 [N, 3, H, W]: a tensor dataset's own size, a folder's after decode."""
    if isinstance(dataset, TensorImageDataset):
        return dataset.images.numel()
    return len(dataset) * 3 * image_size * image_size


def eval_loader(cfg: Any, split: str, batch_size: int = 512, num_workers: int | None = None) -> DataLoader:
    """Unaugmented loader of a split with the evaluation transform (k-NN banks, feature extraction)."""
    ds = cfg.dataset
    transform = eval_transform(
        int(ds.image_size), list(ds.eval_mean), list(ds.eval_std), ds.get("eval_resize")
    )
    workers = int(cfg.data.num_workers) if num_workers is None else num_workers
    return DataLoader(
        TransformedDataset(build_dataset(ds, cfg.data, split), transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=bool(cfg.data.pin_memory),
    )
