"""Barlow Twins loss (Zbontar et al., ICML 2021), as used by the BT-Dual baseline (paper Table 4).

Pure function of two embedding batches; cross-process averaging of the correlation is optional.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _standardise(z: Tensor, eps: float = 1e-5) -> Tensor:
    # Equals a freshly created BatchNorm1d(affine=False) in train mode (biased variance), as the official code.
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


def barlow_twins_loss(
    z1: Tensor,
    z2: Tensor,
    off_diagonal_weight: float = 0.0051,
    scale: float = 0.024,
    all_reduce: bool = True,
) -> dict[str, Tensor]:
    """scale * [sum_i (1 - C_ii)^2 + off_diagonal_weight * sum_{i != j} C_ij^2], C = Z1n^T Z2n / N.

    Defaults are the official VDG code's (lambda_off 0.0051, scale 0.024). With `all_reduce`, C is averaged
    over processes when torch.distributed is initialised (as the official code does).
    Returns "loss", "on_diagonal" and "off_diagonal" (unweighted sums), computed in float32 whatever the autocast.
    """
    # autocast disabled: it would run the correlation matmul in bf16 despite .float() (the on-diagonal term is
    # then quantised: exactly 0 near invariance)
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = _standardise(z1.float()), _standardise(z2.float())
        corr = z1.T @ z2 / z1.shape[0]
        if all_reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            corr = torch.distributed.nn.functional.all_reduce(corr) / dist.get_world_size()
        diagonal = corr.diagonal()
        on_diagonal = (1 - diagonal).pow(2).sum()
        off_diagonal = corr.pow(2).sum() - diagonal.pow(2).sum()
        loss = scale * (on_diagonal + off_diagonal_weight * off_diagonal)
    return {"loss": loss, "on_diagonal": on_diagonal, "off_diagonal": off_diagonal}
