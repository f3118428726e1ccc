"""Data: datasets, per-view augmentation recipes and pipelines (CPU and GPU backends), the pretraining module."""

from vdg.core.errors import DataNotFoundError
from vdg.data.datasets import DATASETS, ImageFolderDataset, TensorImageDataset, build_dataset, decode_folder, disk_split
from vdg.data.gpu_module import BACKENDS, DeviceBatchLoader, resolve_backend
from vdg.data.module import PretrainDataModule, eval_loader
from vdg.data.recipes import ViewRecipe

__all__ = [
    "BACKENDS",
    "DATASETS",
    "DataNotFoundError",
    "DeviceBatchLoader",
    "ImageFolderDataset",
    "PretrainDataModule",
    "TensorImageDataset",
    "ViewRecipe",
    "build_dataset",
    "decode_folder",
    "disk_split",
    "eval_loader",
    "resolve_backend",
]
