"""Gate regularisers: the FLOPs budget loss L_G (paper Eq. 3) and DGNet's annealed bound loss.

They read a FLOPs ratio, per-block channel densities and the masks' channel counts; counting FLOPs is
`vdg.models.flops`' job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from vdg.core.errors import ConfigError

BOUND_TARGETS = ("sqrt", "linear")
BOUND_GRADIENTS = ("open", "all")


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
        raise ConfigError(f"unknown gating.bound_target {target!r}; allowed values: {list(BOUND_TARGETS)}")
    s = math.sqrt(budget) if target == "sqrt" else budget
    lower = torch.relu(p * s - density).pow(2)
    upper = torch.relu(density - 1 + p - p * s).pow(2)
    return weight * (lower + upper).mean()


def bound_channel_counts(masks: Sequence[Tensor], gradient: str = "open") -> Tensor:
    """Open channels per sample and block, [N, B], from one mask [N, C_b] per block, for the bound loss.

    The values are those of the plain count (the mask's sum); `gradient` says which channels the bound loss
    may push on (reference §1.8):
    - "open" (official): each mask's L1 norm, as the official `torch.norm(mask, p=1)`. Its gradient is
      sign(m), 0 at a closed channel, so the bound loss never pushes on a closed channel: only the budget
      loss and the SSL loss can reopen one.
    - "all": the mask's sum, gradient 1 at every channel, so early in training (p ~ 1) the lower bound also
      raises the logits of closed channels (vdg's behaviour before the official one became the default).
    The FLOPs ratio of the budget loss always uses the sum (`BackboneOutput.active_channels`), as officially.
    """
    if gradient not in BOUND_GRADIENTS:
        raise ConfigError(f"unknown gating.bound_gradient {gradient!r}; allowed values: {list(BOUND_GRADIENTS)}")
    if gradient == "open":
        return torch.stack([torch.linalg.vector_norm(m, ord=1, dim=1) for m in masks], dim=1)
    return torch.stack([m.sum(dim=1) for m in masks], dim=1)
