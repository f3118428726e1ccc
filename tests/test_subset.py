"""Class-balanced subsets (dataset.subset_per_class / test_subset_per_class) and the reduced-scale table."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from vdg.core.errors import CheckpointError, ConfigError
from vdg.data.datasets import (
    ImageFolderDataset,
    TensorImageDataset,
    build_dataset,
    class_balanced_indices,
    decode_cache_path,
)
from vdg.run.config import validate_pretrain_config
from vdg.run.driver import pretrain

from .conftest import compose_config


def _uneven_labels() -> torch.Tensor:
    # classes of 7, 12 and 30 samples, interleaved
    labels = torch.tensor([0] * 7 + [1] * 12 + [2] * 30)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]


def test_class_balanced_indices_exact_deterministic_seeded():
    labels = _uneven_labels()
    a = class_balanced_indices(labels, 5, seed=1)
    assert Counter(labels[a].tolist()) == {0: 5, 1: 5, 2: 5}
    assert len(set(a.tolist())) == 15 and a.tolist() == sorted(a.tolist())
    assert torch.equal(a, class_balanced_indices(labels, 5, seed=1))  # deterministic under the seed
    assert not torch.equal(a, class_balanced_indices(labels, 5, seed=2))  # another seed, another subset
    assert Counter(labels[class_balanced_indices(labels, 7, seed=3)].tolist()) == {0: 7, 1: 7, 2: 7}


def test_class_balanced_indices_refuses_too_few_or_unlabelled():
    labels = _uneven_labels()
    with pytest.raises(ValueError, match=r"subset_per_class=8 but class 0 has only 7 images .*allowed values: 1..7"):
        class_balanced_indices(labels, 8, seed=0)
    with pytest.raises(ValueError, match="needs labels"):
        class_balanced_indices(torch.tensor([-1, -1, 0]), 1, seed=0)


def _dataset_cfg(**keys):
    cfg = compose_config(["dataset=synthetic", "dataset.train_size=60", "dataset.test_size=40", "seed=3",
                          *(f"dataset.{k}={v}" for k, v in keys.items())])
    return cfg.dataset, cfg.data


def test_build_dataset_applies_the_subsets_to_their_splits():
    ds, data = _dataset_cfg(subset_per_class=2, test_subset_per_class=3)
    assert ds.subset_seed == 3  # the run's seed unless set
    train, test = build_dataset(ds, data, "train"), build_dataset(ds, data, "test")
    pretrain_split = build_dataset(ds, data, "pretrain")
    assert isinstance(train, TensorImageDataset)  # the batched backends need the tensor form
    assert Counter(train.labels.tolist()) == {c: 2 for c in range(10)}
    assert Counter(test.labels.tolist()) == {c: 3 for c in range(10)}
    assert torch.equal(pretrain_split.images, train.images)  # pretraining and evaluation see the same images
    full = build_dataset(*_dataset_cfg(), "train")
    other = build_dataset(*_dataset_cfg(subset_per_class=2, subset_seed=4), "train")
    assert len(full) == 60 and not torch.equal(other.images, train.images)


def test_image_folder_subset_keeps_its_kind_and_its_own_decode_cache(tmp_path: Path):
    for cls in ("a", "b"):
        for i in range(4):
            (tmp_path / "train" / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "train" / cls / f"{i}.png")
    ds = OmegaConf.create({"name": "folder", "num_classes": 2, "subset_per_class": 3, "subset_seed": 0})
    subset = build_dataset(ds, OmegaConf.create({"root": str(tmp_path)}), "train")
    assert isinstance(subset, ImageFolderDataset) and len(subset) == 6
    assert Counter(subset.labels.tolist()) == {0: 3, 1: 3}
    assert [label for _, label in subset.samples] == subset.labels.tolist()
    full = build_dataset(OmegaConf.merge(ds, {"subset_per_class": None}), OmegaConf.create({"root": str(tmp_path)}),
                         "train")
    assert decode_cache_path(subset, 8) != decode_cache_path(full, 8)


def test_subset_values_are_validated():
    with pytest.raises(ConfigError, match=r"dataset.subset_per_class=0 must be an integer >= 1"):
        validate_pretrain_config(compose_config(["dataset=synthetic", "dataset.subset_per_class=0"]))
    with pytest.raises(ConfigError, match=r"dataset.test_subset_per_class='5' must be an integer"):
        validate_pretrain_config(compose_config(["dataset=synthetic", "dataset.test_subset_per_class='5'"]))


def test_resume_with_another_subset_is_refused(tiny_cfg):
    pretrain(tiny_cfg("dataset.subset_per_class=3", "final_knn.enabled=false"))
    with pytest.raises(CheckpointError, match=r"refusing to resume .*dataset.subset_per_class: 3 -> 4"):
        pretrain(tiny_cfg("dataset.subset_per_class=4", "final_knn.enabled=false"))
    with pytest.raises(CheckpointError, match=r"dataset.subset_seed: 5 -> 6"):
        pretrain(tiny_cfg("dataset.subset_per_class=3", "dataset.subset_seed=6", "final_knn.enabled=false"))
    with pytest.raises(CheckpointError, match=r"dataset.subset_per_class: 3 -> None"):
        pretrain(tiny_cfg("final_knn.enabled=false"))


# ----- dataset.validation_split: settings are chosen on held-out train images, never on the test split ---------
def _digits_cfg(**keys):
    dataset = {"name": "digits", "image_size": 32, "num_classes": 10, **keys}
    return OmegaConf.create(dataset), OmegaConf.create({"root": "unused", "download": False})


def test_validation_split_carves_the_train_split_stratified_and_fixed():
    ds, data = _digits_cfg(validation_split=0.2)
    train, held = build_dataset(ds, data, "train"), build_dataset(ds, data, "test")
    pretrain = build_dataset(ds, data, "pretrain")
    whole = build_dataset(*_digits_cfg(), "train")
    assert len(train) + len(held) == len(whole) == 1437 and torch.equal(pretrain.images, train.images)
    rows = {tuple(img.flatten()[::7].tolist()) for img in whole.images}
    test = build_dataset(*_digits_cfg(), "test")
    assert all(tuple(img.flatten()[::7].tolist()) in rows for img in held.images)  # held-out images come from train
    assert not any(tuple(img.flatten()[::7].tolist()) in rows for img in test.images[:20])
    per_class = Counter(whole.labels.tolist())
    assert Counter(held.labels.tolist()) == {c: round(0.2 * n) for c, n in per_class.items()}  # stratified
    assert torch.equal(held.images, build_dataset(ds, data, "test").images)  # the same carve every time


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, True, "half"])
def test_validation_split_refuses_what_is_not_a_fraction(value):
    with pytest.raises(ConfigError, match=r"dataset.validation_split=.* must be a fraction in \(0, 1\)"):
        build_dataset(*_digits_cfg(validation_split=value), "train")
    cfg = compose_config(["dataset=digits", f"++dataset.validation_split={value!r}" if isinstance(value, str)
                          else f"++dataset.validation_split={value}"])
    with pytest.raises(ConfigError, match=r"dataset.validation_split=.* must be a fraction in \(0, 1\)"):
        validate_pretrain_config(cfg)
