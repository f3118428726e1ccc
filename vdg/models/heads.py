"""Projection heads ("expanders", g_phi in the paper) mapping backbone features to the SSL embedding."""

from __future__ import annotations

from torch import nn


def mlp_projector(in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048) -> nn.Sequential:
    """Linear -> BN1d -> ReLU -> Linear -> BN1d -> ReLU -> Linear (512-2048-2048-2048 in the paper).

    Shapes: [N, in_dim] -> [N, out_dim]. All Linears have biases, as the official code.
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )
