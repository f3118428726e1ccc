"""k-nearest-neighbour classification of frozen features (paper protocol: k=1, euclidean, raw 512-d features).

Pure tensor maths in memory-bounded chunks; it never extracts features or touches a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vdg.core.errors import ConfigError

DISTANCES = ("euclidean", "cosine")
WEIGHTINGS = ("uniform", "distance", "exp")
DISTANCE_EPS = 1e-5  # 1/(d + eps) vote weight, as the official code and solo-learn
CHUNK_ELEMENTS = 2**25  # default budget of one distance matrix chunk (128 MiB in float32)


def check_options(k: int, n_train: int, distance: str, weighting: str, temperature: float) -> None:
    if distance not in DISTANCES:
        raise ConfigError(f"unknown knn distance {distance!r}; allowed values: {list(DISTANCES)}")
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown knn weighting {weighting!r}; allowed values: {list(WEIGHTINGS)}")
    if not 1 <= k <= n_train:
        raise ConfigError(f"knn k={k} must satisfy 1 <= k <= number of train features ({n_train})")
    if weighting == "exp" and temperature <= 0:
        raise ConfigError(f"knn temperature={temperature} must be > 0 for weighting='exp'")


def pairwise_distance(queries: Tensor, bank: Tensor, bank_sq_norms: Tensor | None, distance: str) -> Tensor:
    """[M, N] distances: euclidean ||q - b||, or cosine 1 - q.b (both inputs already l2-normalised)."""
    if distance == "cosine":
        return 1.0 - queries @ bank.T
    sq = (queries * queries).sum(dim=1, keepdim=True) + bank_sq_norms[None, :] - 2.0 * queries @ bank.T
    return sq.clamp_min(0.0).sqrt()


def nearest(dist: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """k smallest distances per row and their indices; ties at the k-th place go to the lowest bank index.

    topk alone breaks ties arbitrarily; rows whose k-th and (k+1)-th distances are equal are re-ranked with a
    stable sort, so the neighbour set (hence the prediction) is a function of the data only.
    """
    n = dist.shape[1]
    values, index = dist.topk(min(k + 1, n), dim=1, largest=False, sorted=True)
    if k < n:
        tied = values[:, k - 1] == values[:, k]
        if tied.any():
            sorted_values, order = dist[tied].sort(dim=1, stable=True)
            values[tied, :k], index[tied, :k] = sorted_values[:, :k], order[:, :k]
    return values[:, :k], index[:, :k]


def vote_weights(dist: Tensor, distance: str, weighting: str, temperature: float) -> Tensor:
    if weighting == "uniform":
        return torch.ones_like(dist)
    if weighting == "distance":
        return 1.0 / (dist + DISTANCE_EPS)
    # exp: solo-learn's exp(sim / T) for cosine (sim = 1 - d); exp(-d / T) for euclidean.
    return torch.exp((1.0 - dist) / temperature) if distance == "cosine" else torch.exp(-dist / temperature)


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int = 1,
    distance: str = "euclidean",
    weighting: str = "uniform",
    temperature: float = 0.07,
    normalize: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Predicted class [M] of each test feature by a weighted vote of its k nearest train features.

    train_features [N, D], train_labels [N] (ints >= 0), test_features [M, D].
    distance: "euclidean" or "cosine" (1 - cosine similarity; features are l2-normalised for it).
    weighting: "uniform" (majority), "distance" (1/(d + 1e-5)) or "exp" (exp(sim/T) for cosine, solo-learn's
        k=20 default with T = `temperature` = 0.07; exp(-d/T) for euclidean).
    normalize: l2-normalise the features before a euclidean search.
    chunk_size: test rows per distance matrix; None = about 2^25 distances per chunk. Ties: among equally
        distant neighbours the lowest train index wins; among equal class scores the lowest class wins.
    Runs on train_features' device and returns predictions there.
    """
    dims_ok = train_features.ndim == 2 and test_features.ndim == 2
    if not dims_ok or train_features.shape[1] != test_features.shape[1]:
        # not user input: the protocols' feature tensors
        raise ValueError(
            f"knn features must be [N, D] and [M, D], got {list(train_features.shape)} and "
            f"{list(test_features.shape)}"
        )
    if train_labels.shape != (train_features.shape[0],):
        # not user input: the protocols' feature tensors
        raise ValueError(f"train_labels must be [{train_features.shape[0]}], got {list(train_labels.shape)}")
    n_train = train_features.shape[0]
    check_options(k, n_train, distance, weighting, temperature)
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"knn chunk_size={chunk_size} must be >= 1 (or None)")
    rows = chunk_size or max(1, CHUNK_ELEMENTS // n_train)

    device = train_features.device
    bank = train_features
    if normalize or distance == "cosine":
        bank = F.normalize(bank, dim=1)
    bank_sq_norms = (bank * bank).sum(dim=1) if distance == "euclidean" else None
    labels = train_labels.to(device).long()
    num_classes = int(labels.max().item()) + 1

    predictions = []
    for start in range(0, test_features.shape[0], rows):
        queries = test_features[start : start + rows].to(device, bank.dtype)
        if normalize or distance == "cosine":
            queries = F.normalize(queries, dim=1)
        dist, index = nearest(pairwise_distance(queries, bank, bank_sq_norms, distance), k)
        scores = torch.zeros(queries.shape[0], num_classes, dtype=dist.dtype, device=device)
        scores.scatter_add_(1, labels[index], vote_weights(dist, distance, weighting, temperature))
        predictions.append(scores.argmax(dim=1))  # argmax returns the first maximum: lowest class on ties
    if not predictions:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(predictions)


def knn_accuracy(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor, **options
) -> float:
    """Top-1 accuracy in percent of `knn_predict(train_features, train_labels, test_features, **options)`."""
    predictions = knn_predict(train_features, train_labels, test_features, **options)
    if predictions.numel() == 0:
        # not user input: the protocols' feature tensors
        raise ValueError("knn_accuracy needs at least one test feature")
    return (predictions.cpu() == test_labels.cpu().long()).float().mean().item() * 100.0
