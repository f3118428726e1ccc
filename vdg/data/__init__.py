"""Data: datasets, per-view augmentation recipes and pipelines, the pretraining data module."""

from vdg.data.datasets import DATASETS, DataNotFoundError, build_dataset
from vdg.data.module import PretrainDataModule
from vdg.data.recipes import ViewRecipe

__all__ = ["DATASETS", "DataNotFoundError", "build_dataset", "PretrainDataModule", "ViewRecipe"]
