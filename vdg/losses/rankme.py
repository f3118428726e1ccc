"""RankMe (Garrido et al., "RankMe: Assessing the downstream performance of pretrained self-supervised
representations by their rank", ICML 2023): the effective rank of a batch of embeddings, a label-free sign of
learning and of collapse. A statistic to monitor, not a loss: nothing here takes gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-7  # the paper's epsilon, added to every normalised singular value


@torch.no_grad()
def rankme(embeddings: Tensor, eps: float = EPS) -> float:
    """RankMe(Z) = exp(-sum_k p_k log p_k), p_k = sigma_k(Z) / ||sigma(Z)||_1 + eps, for Z [N, D] (not centred).

    Lies in [1, min(N, D)]: 1 for a fully collapsed representation (every embedding on one line), min(N, D) for
    singular values all equal. The paper computes it on ~25k embeddings; fewer give a lower bound on the rank.
    Computed in float64 on the embeddings' device.

    >>> round(rankme(torch.eye(4)), 3)  # four orthogonal directions of equal weight
    4.0
    """
    if embeddings.ndim != 2 or min(embeddings.shape) == 0:
        # not user input: the monitors pass the [N, D] features they gathered
        raise ValueError(f"rankme needs embeddings [N > 0, D > 0], got {list(embeddings.shape)}")
    singular = torch.linalg.svdvals(embeddings.double())
    total = singular.sum()
    if total <= 0:  # every embedding is zero: nothing spans any direction
        return 1.0
    p = singular / total + eps
    return round(float(torch.exp(-(p * p.log()).sum())), 6)
