"""VICReg loss (Bardes et al., ICLR 2022) with the official VDG code's reductions as the default.

Pure function of two embedding batches; it knows nothing of branches or gates, and of process groups only the
optional gather of the global batch (`vdg.losses.distributed.gather_rows`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vdg.core.errors import ConfigError
from vdg.losses.distributed import gather_rows

VARIANCE_REDUCTIONS = ("sum", "mean")


def variance_term(z: Tensor, eps: float = 1e-4, target_std: float = 1.0) -> Tensor:
    """v(Z) = mean_d relu(target_std - sqrt(Var_unbiased(Z_d) + eps)), Z of shape [N, D]."""
    std = torch.sqrt(z.var(dim=0) + eps)
    return torch.relu(target_std - std).mean()


def covariance_term(z: Tensor) -> Tensor:
    """c(Z) = sum_{i != j} Cov(Z)_ij^2 / D with Cov = (Z - mean)^T (Z - mean) / (N - 1)."""
    n, d = z.shape
    z = z - z.mean(dim=0)
    cov = (z.T @ z) / (n - 1)
    off_diagonal = cov.pow(2).sum() - cov.diagonal().pow(2).sum()
    return off_diagonal / d


def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    eps: float = 1e-4,
    variance_reduction: str = "sum",
    gather_across_processes: bool = False,
) -> dict[str, Tensor]:
    """VICReg between two embedding batches [N, D] (row i of z1 and z2 are views of one image).

    loss = invariance_weight * s(Z1, Z2) + variance_weight * V + covariance_weight * (c(Z1) + c(Z2)), where
    s is the MSE over N*D elements and V = v(Z1) + v(Z2) with variance_reduction="sum" (the official VDG code,
    reference §1.7) or (v(Z1) + v(Z2)) / 2 with "mean" (the original VICReg code). The paper's Eq. 1 writes
    the weights as mu (variance) = 25, nu (covariance) = 25 (code: 1) and eta (invariance) = 1 (code: 25); the
    defaults here are the code's 25 / 25 / 1.

    gather_across_processes: under DDP, first all-gather z1 and z2 from every process (differentiably), so all
    three terms see the global batch: every rank then gets the single-process loss of the whole batch, and
    after DDP's gradient averaging the single-process gradient. False (default) keeps each process's loss on its
    own shard, as the official VDG code does (the original VICReg code gathers for the variance and covariance
    terms only: the invariance MSE is a mean over rows, so gathering it changes the per-rank value but not the
    DDP-averaged gradient).

    Returns a dict with "loss" and the unweighted terms "invariance", "variance", "covariance".
    Computed in float32 whatever the autocast dtype (autocast is disabled inside), as the statistics are
    precision-sensitive.
    """
    if variance_reduction not in VARIANCE_REDUCTIONS:
        raise ConfigError(
            f"unknown method.variance_reduction {variance_reduction!r}; allowed values: {list(VARIANCE_REDUCTIONS)}"
        )
    # .float() alone is not enough: autocast would run the covariance matmul in bf16 again (loss off by ~0.2%)
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = z1.float(), z2.float()  # before the gather too: its backward sums gradients over ranks
        if gather_across_processes:
            z1, z2 = gather_rows(z1), gather_rows(z2)
        invariance = F.mse_loss(z1, z2)
        variance = variance_term(z1, eps) + variance_term(z2, eps)
        if variance_reduction == "mean":
            variance = variance / 2
        covariance = covariance_term(z1) + covariance_term(z2)
        loss = invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance
    return {"loss": loss, "invariance": invariance, "variance": variance, "covariance": covariance}
