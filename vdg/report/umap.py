"""UMAP of a checkpoint's test-set features, dense and gated side by side, coloured by class (paper Fig. 2).

The runner behind scripts/umap_plot.py: features with deterministic gates, one umap-learn embedding per
branch (as the official OfflineUMAP: n_components 2, n_neighbors 50, random_state 42), one PNG.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from vdg.core.errors import ConfigError
from vdg.core.options import check_int, check_known_keys, check_str
from vdg.core.paths import config_file
from vdg.core.rundir import check_writable
from vdg.data.module import eval_loader
from vdg.eval.features import extract_features
from vdg.eval.protocols import (
    BRANCH_CHOICES,
    IMAGE_STATS,
    check_device,
    data_config,
    eval_dataset,
    resolve_device,
    select_branches,
)
from vdg.eval.results import results_dir
from vdg.methods.checkpoint import load_method
from vdg.report.plots import plot_embeddings


def exact_knn(features: Tensor, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Indices [N, k] (int64) and euclidean distances [N, k] (float32) of every row's k nearest rows, the row
    itself first at distance 0 (umap-learn's convention), computed exactly in chunks of `chunk` rows."""
    x = features.float()
    indices, distances = [], []
    for start in range(0, x.shape[0], chunk):
        dist = torch.cdist(x[start : start + chunk], x)
        rows = torch.arange(dist.shape[0])
        dist[rows, rows + start] = 0.0  # the matmul form of cdist leaves ~1e-3 on the diagonal
        values, index = dist.topk(k, dim=1, largest=False)
        indices.append(index)
        distances.append(values)
    return torch.cat(indices).numpy(), torch.cat(distances).numpy()


def umap_embedding(features: Tensor, n_neighbors: int = 50, random_state: int = 42) -> np.ndarray:
    """[N, D] features -> [N, 2] UMAP embedding; n_neighbors is capped at N - 1 (umap needs fewer than N).

    The k-NN graph is computed exactly here and handed to umap-learn (`precomputed_knn`): the same neighbours
    umap finds itself below 4,096 samples (above, it approximates), without compiling its numba search.
    """
    import umap  # optional heavy dependency: umap-learn (numba compiles on first use, which takes seconds)

    n = features.shape[0]
    if n < 3:
        raise ConfigError(f"UMAP needs at least 3 samples, got {n}")
    k = min(n_neighbors, n - 1)
    reducer = umap.UMAP(
        n_components=2, n_neighbors=k, random_state=random_state, precomputed_knn=(*exact_knn(features, k), None)
    )
    with warnings.catch_warnings():
        # fixing random_state makes umap single-threaded; without a search index it cannot `transform` new data
        warnings.filterwarnings("ignore", message="n_jobs value")
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]")
        return reducer.fit_transform(features.float().numpy())


def spread_subset(n: int, size: int | None) -> list[int]:
    """`size` evenly spaced indices of range(n) (all when size is None or >= n): covers class-sorted splits."""
    if size is None or size >= n:
        return list(range(n))
    if size < 1:
        raise ConfigError(f"max_samples={size} must be >= 1 (or null for the whole test split)")
    return torch.linspace(0, n - 1, size).round().long().tolist()


def check_umap_config(cfg: DictConfig) -> None:
    """Every option, the output folder's permissions included, before the checkpoint is even read."""
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise ConfigError("ckpt=PATH is required: the pretraining checkpoint to plot")
    check_known_keys("", cfg, [k for k in OmegaConf.load(config_file("umap.yaml")) if k != "defaults"])
    for key, allowed in (("branch", BRANCH_CHOICES), ("image_stats", IMAGE_STATS)):
        if cfg[key] not in allowed:
            raise ConfigError(f"unknown {key} {cfg[key]!r}; allowed values: {list(allowed)}")
    if cfg.max_samples is not None:
        check_int("max_samples", cfg.max_samples, 3, note=" (UMAP needs 3 samples) or null for the whole split")
    check_int("n_neighbors", cfg.n_neighbors, 2)
    check_int("random_state", cfg.random_state, 0)
    check_int("batch_size", cfg.batch_size, 1)
    check_device(cfg.device)
    output = check_str("output", cfg.output, optional=True)
    check_str("results_dir", cfg.results_dir, optional=True)
    if output:
        check_writable(Path(output).parent, "output")
    else:
        check_writable(results_dir(cfg.ckpt, cfg.results_dir), "results_dir")


def umap_plot(cfg: DictConfig) -> dict[str, Any]:
    """Embed the test split of the checkpoint's pretraining dataset per branch and write one PNG."""
    check_umap_config(cfg)
    model = load_method(cfg.ckpt, cfg.get("expected_method"))
    branches = select_branches(model, cfg.branch)
    dataset = eval_dataset(model.cfg, None, str(cfg.image_stats))
    data = data_config(model.cfg, cfg)
    device = resolve_device(str(cfg.device))
    full = eval_loader(OmegaConf.create({"dataset": dataset, "data": data}), "test", int(cfg.batch_size))
    subset = Subset(full.dataset, spread_subset(len(full.dataset), cfg.max_samples))
    if len(subset) < 3:  # before any feature is extracted
        raise ConfigError(f"UMAP needs at least 3 samples; the {dataset.name} test split gives {len(subset)}")
    loader = DataLoader(subset, batch_size=int(cfg.batch_size), shuffle=False, num_workers=full.num_workers)

    embeddings, labels = {}, None
    for branch in branches:
        feats = extract_features(model.backbone, loader, branch, device)
        embeddings[branch.value] = umap_embedding(feats.features, int(cfg.n_neighbors), int(cfg.random_state))
        labels = feats.labels.numpy()
    out = Path(cfg.output) if cfg.output else results_dir(cfg.ckpt, cfg.results_dir) / f"umap-{dataset.name}.png"
    budget = "" if model.cfg.method.name == "vicreg" else f", t_d {float(model.cfg.budget):g}"
    title = f"{model.cfg.method.name}{budget}: UMAP of {dataset.name} test features ({len(subset)} images)"
    classes = getattr(full.dataset.base, "classes", None)
    path = plot_embeddings(embeddings, labels, out, classes, title)
    return {
        "plot": str(path),
        "dataset": str(dataset.name),
        "branches": [b.value for b in branches],
        "num_samples": len(subset),
        "n_neighbors": min(int(cfg.n_neighbors), len(subset) - 1),
        "ckpt": str(cfg.ckpt),
    }
