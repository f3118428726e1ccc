"""LightningDataModule for pretraining: two augmented views per image for training, the test split for
validation (online probes, validation FLOPs). It batches and loads; it does not define augmentations."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from vdg.data.datasets import build_dataset
from vdg.data.recipes import ViewRecipe
from vdg.data.transforms import MultiView, eval_transform, view_transform


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
        raise ValueError(
            f"dataset.augment must list 2 views (view 0 -> gated, view 1 -> dense), got {len(views)}"
        )
    return [ViewRecipe.from_config(v) for v in views]


def per_device_batch_size(cfg: Any) -> int:
    """data.batch_size is the total batch over all devices and nodes (512 in the paper)."""
    world = int(cfg.trainer.devices) * int(cfg.trainer.num_nodes) if str(cfg.trainer.devices).isdigit() else 1
    total = int(cfg.data.batch_size)
    if total % world:
        raise ValueError(f"data.batch_size={total} must be divisible by devices x nodes = {world}")
    return total // world


class PretrainDataModule(pl.LightningDataModule):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.batch_size = per_device_batch_size(cfg)

    def setup(self, stage: str | None = None) -> None:
        ds, data = self.cfg.dataset, self.cfg.data
        mean, std = list(ds.mean), list(ds.std)
        views = [view_transform(r, int(ds.image_size), mean, std) for r in view_recipes(ds)]
        self.train_set = TransformedDataset(build_dataset(ds, data, "train"), MultiView(views))
        self.val_set = None
        if ds.get("has_labels", True):
            val_t = eval_transform(
                int(ds.image_size), list(ds.eval_mean), list(ds.eval_std), ds.get("eval_resize")
            )
            self.val_set = TransformedDataset(build_dataset(ds, data, "test"), val_t)

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

    def train_dataloader(self) -> DataLoader:
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"the {self.cfg.dataset.name} train split has {len(self.train_set)} images, fewer than one "
                f"per-device batch ({self.batch_size}); lower data.batch_size"
            )
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, train=False)


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
