"""The GPU data backend's pieces: choosing the backend, and batches sliced from a device-resident uint8 split.

No augmentation here (that is `vdg.data.gpu_augment`) and no Lightning wiring (that is `vdg.data.module`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import torch
from torch import Tensor

from vdg.core.errors import ConfigError

BACKENDS = ("cpu", "gpu", "auto")


def free_device_memory(device: torch.device) -> int:
    """Free bytes on `device`, else the host's available memory (unknown: no limit).

    On CUDA: the driver's free memory plus what PyTorch's caching allocator holds without using it (reserved
    minus allocated), which the driver counts as used although this process can reuse it at once.
    """
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + int(cached)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # sysconf names are POSIX extensions (absent on macOS)
        return sys.maxsize


def resolve_backend(
    backend: str, nbytes: int, device: torch.device, memory_fraction: float, free_bytes: int | None = None
) -> str:
    """"cpu" or "gpu" for `data.backend` given the train split's size in bytes and the training device.

    auto: gpu when training on CUDA and the split takes at most `memory_fraction` of the free device memory.
    gpu: always (a CPU device works too, for tests); raises when the split does not fit in that fraction.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown data.backend {backend!r}; allowed values: {list(BACKENDS)}")
    if not 0 < memory_fraction <= 1:
        raise ConfigError(f"data.gpu_memory_fraction={memory_fraction} must lie in (0, 1]")
    if backend == "cpu" or (backend == "auto" and device.type != "cuda"):
        return "cpu"
    free = free_device_memory(device) if free_bytes is None else free_bytes
    fits = nbytes <= memory_fraction * free
    if backend == "auto":
        return "gpu" if fits else "cpu"
    if not fits:
        raise MemoryError(
            f"data.backend=gpu: the train split needs {nbytes:,} bytes ({nbytes / 2**30:.2f} GiB) on {device}, "
            f"but only {free:,} bytes ({free / 2**30:.2f} GiB) are free and data.gpu_memory_fraction="
            f"{memory_fraction} allows {int(memory_fraction * free):,}; use data.backend=cpu (or auto), a "
            f"smaller dataset.image_size, or raise data.gpu_memory_fraction"
        )
    return "gpu"


class DeviceBatchLoader:
    """Training batches of uint8 images [N, 3, H, W] and labels [N] that already live on one device.

    Each epoch draws one random permutation on the device, seeded by (seed, epoch) like a DistributedSampler, so
    every rank draws the same one and a resumed run continues the same sequence; it is sliced into batches of
    `batch_size`, dropping the last partial batch. With `world_size` > 1 the ranks take disjoint slices of each
    global batch. Nothing is read back to the host: one epoch is one randperm plus an index_select per step.
    The epoch advances by itself after each pass; Lightning also sets it (`set_epoch`, reached via `.sampler`).

    Example: ``for images, labels in DeviceBatchLoader(images.cuda(), labels.cuda(), 256): ...``
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            # not user input: the data module's own tensors
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (len(images),) or labels.device != images.device:
            # not user input: the data module's own tensors
            raise ValueError(f"labels must be [N={len(images)}] on {images.device}, got {tuple(labels.shape)}")
        if not 0 <= rank < world_size:
            # not user input: the Trainer's ranks
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if len(images) < batch_size * world_size:
            raise ConfigError(
                f"the train split has {len(images)} images, fewer than one global batch "
                f"({batch_size} x {world_size} devices); lower data.batch_size"
            )
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch = 0

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def sampler(self) -> DeviceBatchLoader:
        """Where Lightning looks for `set_epoch` on a train loader (`_set_sampler_epoch`)."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images) // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = torch.Generator(device=self.device).manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.images), generator=generator, device=self.device)
        step = self.batch_size * self.world_size
        for i in range(len(self)):
            start = i * step + self.rank * self.batch_size
            index = order[start : start + self.batch_size]
            yield self.images.index_select(0, index), self.labels.index_select(0, index)
