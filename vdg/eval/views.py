"""Augmented train views of linear evaluation and their frozen-backbone features, one epoch at a time.

Every epoch, each train image gets a RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bilinear) and a random
horizontal flip (reference §1.13), once per view stream, and the same augmented batch goes through every
evaluated branch of the frozen backbone. Two sources of augmented images:
- batched: the uint8 train split held on the evaluation device and augmented there a batch at a time with the
  ops of `vdg.data.gpu_augment` (no per-image Python, no workers; CPU tensors work too);
- workers: torchvision's per-image transform in DataLoader workers, for splits that do not fit in memory.
It never trains heads (`vdg.eval.linear`) and never chooses datasets (`vdg.eval.protocols`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vdg.core.errors import ConfigError
from vdg.data.datasets import ImageFolderDataset, TensorImageDataset
from vdg.data.gpu_augment import CROP_RATIO, hflip, resized_crop, sample_crop_boxes, sample_mask
from vdg.data.gpu_module import free_device_memory
from vdg.data.module import TransformedDataset
from vdg.data.transforms import linear_train_transform
from vdg.eval.features import eval_mode
from vdg.models.branch import Branch

AUGMENT_BACKENDS = ("auto", "batched", "workers")
CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop area range of the linear protocol (official code, solo-learn)
FLIP_PROB = 0.5


def choose_backend(backend: str, dataset: Dataset, device: torch.device, memory_fraction: float) -> str:
    """"batched" or "workers" for `augment_backend`.

    auto: batched when the split is already a uint8 tensor (CIFAR, STL-10, digits, synthetic) and takes at most
    `memory_fraction` of the device's free memory; image folders keep the per-image pipeline, whose crops come
    from the full-resolution files. batched on an image folder is refused rather than silently resized.
    """
    if backend not in AUGMENT_BACKENDS:
        raise ConfigError(f"unknown augment_backend {backend!r}; allowed values: {list(AUGMENT_BACKENDS)}")
    if backend == "workers":
        return "workers"
    is_tensor = isinstance(dataset, TensorImageDataset)
    fits = is_tensor and dataset.images.numel() <= memory_fraction * free_device_memory(device)
    if backend == "auto":
        return "batched" if fits else "workers"
    if not is_tensor:
        kind = "an image folder" if isinstance(dataset, ImageFolderDataset) else type(dataset).__name__
        raise ConfigError(f"augment_backend=batched needs a split held as a uint8 tensor, not {kind}; use workers")
    if not fits:
        raise ConfigError(
            f"augment_backend=batched: the train split ({dataset.images.numel() / 2**30:.2f} GiB) does not fit in "
            f"data.gpu_memory_fraction={memory_fraction} of the free memory of {device}; use workers or auto"
        )
    return "batched"


class BatchedViews:
    """Augmented copies of a uint8 split [N, 3, H, W] that lives on the device, in dataset order.

    Stream s draws from its own generator, seeded with seeds[s] on the split's device; `batches(s)` yields
    normalised float batches [B, 3, size, size] covering the N images once.
    """

    def __init__(
        self,
        images: Tensor,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        seeds: Sequence[int],
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            # not user input: the protocol's own tensors
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images, self.size, self.batch_size = images, size, batch_size
        device = images.device
        self.mean = torch.tensor(list(mean), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), device=device).view(1, 3, 1, 1)
        self.generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]

    def __len__(self) -> int:
        return self.images.shape[0]

    def batches(self, stream: int) -> Iterator[Tensor]:
        generator, device = self.generators[stream], self.images.device
        _, _, height, width = self.images.shape
        for chunk in self.images.split(self.batch_size):
            n = chunk.shape[0]
            boxes = sample_crop_boxes(n, height, width, CROP_SCALE, CROP_RATIO, generator, device)
            flips = sample_mask(n, FLIP_PROB, generator, device)
            x = hflip(resized_crop(chunk.float() / 255, boxes, self.size, mode="bilinear"), flips)
            yield (x - self.mean) / self.std


class WorkerViews:
    """Augmented copies of any (image, label) dataset through torchvision in DataLoader workers, in dataset order.

    Stream s draws from its own seed, seeds[s]: its loader's workers are seeded from it, and with num_workers=0
    (transforms in this process, drawing from the global CPU RNG) the stream's own RNG state is swapped in while
    it yields, and the caller's given back.
    """

    def __init__(
        self,
        dataset: Dataset,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        seeds: Sequence[int],
        device: torch.device,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        transformed = TransformedDataset(dataset, linear_train_transform(size, list(mean), list(std)))
        self.device, self.size, self.num_workers = device, len(dataset), num_workers
        self.rng_states = [torch.Generator().manual_seed(int(seed)).get_state() for seed in seeds]
        self.loaders = [
            DataLoader(
                transformed,
                batch_size=batch_size,
                shuffle=False,
                num_workers=num_workers,
                pin_memory=pin_memory,
                persistent_workers=num_workers > 0,
                generator=torch.Generator().manual_seed(int(seed)),
            )
            for seed in seeds
        ]

    def __len__(self) -> int:
        return self.size

    def batches(self, stream: int) -> Iterator[Tensor]:
        if self.num_workers:
            for images, _ in self.loaders[stream]:
                yield images.to(self.device, non_blocking=True)
            return
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng_states[stream])
            for images, _ in self.loaders[stream]:
                yield images.to(self.device, non_blocking=True)
            self.rng_states[stream] = torch.get_rng_state()


class EpochFeatures:
    """epoch -> {branch: [S, N, D]}: the backbone features of S augmented copies of the train split.

    Each augmented batch is made once and fed to every branch (eval mode: running BN statistics, deterministic
    gates; no gradients). The buffers are reused from epoch to epoch. The callable is what
    `vdg.eval.linear.train_linear_runs` reads.
    """

    def __init__(
        self,
        backbone: nn.Module,
        branches: Sequence[Branch],
        views: BatchedViews | WorkerViews,
        streams: int,
        device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.backbone, self.branches, self.views, self.streams = backbone, list(branches), views, streams
        self.memory_format = memory_format
        n, dim = len(views), int(backbone.feature_dim)
        self.buffers = {b: torch.empty(streams, n, dim, device=device) for b in self.branches}

    @torch.no_grad()
    def __call__(self, epoch: int) -> dict[Branch, Tensor]:
        with eval_mode(self.backbone):
            for stream in range(self.streams):
                start = 0
                for images in self.views.batches(stream):
                    images = images.contiguous(memory_format=self.memory_format)
                    stop = start + images.shape[0]
                    for branch in self.branches:
                        self.buffers[branch][stream, start:stop] = self.backbone(images, branch).features.float()
                    start = stop
        return self.buffers


def batched_views_of(dataset: Any, device: torch.device, **kwargs: Any) -> BatchedViews:
    """`BatchedViews` of a `TensorImageDataset`, its uint8 images copied to `device` once."""
    return BatchedViews(dataset.images.to(device), **kwargs)
