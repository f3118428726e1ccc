"""Gate regularisers: the FLOPs budget loss L_G (paper Eq. 3) and DGNet's annealed bound loss.

They read a FLOPs ratio and per-block channel densities; counting FLOPs is `vdg.models.flops`' job.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BOUND_TARGETS = ("sqrt", "linear")


def budget_loss(flops_ratio: Tensor, budget: float, weight: float = 5.0) -> Tensor:
    """L_G = lambda * (F_R / F_O - t_d)^2, lambda = 5 (paper Eq. 3)."""
    return weight * (flops_ratio - budget) ** 2


def bound_annealing(epoch: float, alpha: float = 0.02) -> float:
    """p = exp(-alpha * epoch): 1 at epoch 0, 0.37 at 50, 4.5e-5 at 500 with the official alpha 0.02."""
    return math.exp(-alpha * epoch)


def bound_loss(density: Tensor, budget: float, p: float, weight: float = 1.0, target: str = "sqrt") -> Tensor:
    """DGNet's bound ("balance") loss on per-block densities rho_b [B] (reference §1.8).

    gamma * mean_b [relu(p*s - rho_b)^2 + relu(rho_b - 1 + p - p*s)^2], with s = sqrt(t_d) (target="sqrt",
    inherited from DGNet and used by the official code) or s = t_d (target="linear"). At p = 1 every block's
    density is pinned to s; as p -> 0 the bounds relax to [0, 1].
    """
    if target not in BOUND_TARGETS:
        raise ValueError(f"unknown gating.bound_target {target!r}; allowed values: {list(BOUND_TARGETS)}")
    s = math.sqrt(budget) if target == "sqrt" else budget
    lower = torch.relu(p * s - density).pow(2)
    upper = torch.relu(density - 1 + p - p * s).pow(2)
    return weight * (lower + upper).mean()
