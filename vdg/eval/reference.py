"""The random-init reference: the same protocol, on the same data, for randomly initialised networks of the same
architecture and branch. Every trained figure is shown as "+X over random init", which answers a reader's first
question about a self-supervised result: better than what?

A random ResNet's features are far from useless (1-NN on digits: 75-84% at width 8), so a trained figure means
something only next to this one. The reference is the mean over a few initialisation seeds. The other reference,
raw pixels (`features=pixels`), runs the protocol on the images themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from omegaconf import ListConfig

from vdg.core.errors import ConfigError
from vdg.eval.features import Features, extract_branches
from vdg.eval.knn import knn_accuracy
from vdg.models import Branch

RANDOM_INIT_SEEDS = (0, 1, 2)


def random_init_knn(
    model: Any,
    branches: Sequence[Branch],
    train_loader: Iterable,
    test_loader: Iterable,
    device: torch.device,
    seeds: Sequence[int] = RANDOM_INIT_SEEDS,
    **knn_options: Any,
) -> dict[Branch, list[float]]:
    """k-NN top-1 of each branch of a fresh, randomly initialised encoder per seed, built as `model` builds its own
    (`model.build_backbone(model.cfg)`: width, stem, gates, slim block widths), in eval mode like the trained one.

    The caller's RNG state is left as it was.
    """
    runs: dict[Branch, list[float]] = {branch: [] for branch in branches}
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            backbone = model.build_backbone(model.cfg)
        backbone.to(device).eval()
        with torch.no_grad():
            train = extract_branches(backbone, train_loader, branches, device)
            test = extract_branches(backbone, test_loader, branches, device)
        for branch in branches:
            runs[branch].append(knn_accuracy(train[branch].features.to(device), train[branch].labels,
                                             test[branch].features, test[branch].labels, **knn_options))
    return runs


def pixel_features(loader: Iterable) -> Features:
    """The raw-pixel reference's "features": each image exactly as it would enter the network (the evaluation
    transform: resized and normalised), flattened to C*H*W values. No network is involved."""
    features, labels = [], []
    for images, targets in loader:
        features.append(torch.as_tensor(images).flatten(1).float().cpu())
        labels.append(torch.as_tensor(targets).long().cpu())
    return Features(torch.cat(features), torch.cat(labels))


def reference_fields(top1: float, runs: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
    """What a record keeps of the reference: its runs, their mean and the trained figure's margin over it."""
    mean = sum(runs) / len(runs)
    return {
        "random_init": {"top1_mean": mean, "top1_runs": list(runs), "seeds": [int(s) for s in seeds]},
        "over_random_init": top1 - mean,
    }


def check_seeds(key: str, value: Any) -> list[int]:
    """A list of init seeds (integers >= 0); an empty list turns the reference off."""
    values = list(value) if isinstance(value, list | tuple | ListConfig) else None
    if values is None or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConfigError(f"{key}={value!r} must be a list of init seeds (integers >= 0), e.g. [0, 1, 2]; [] turns "
                          "the random-init reference off")
    return [int(v) for v in values]
