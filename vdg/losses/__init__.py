"""Losses: self-supervised objectives (VICReg, Barlow Twins) and gate regularisers (budget, bound); and RankMe, a
label-free statistic of the embeddings those objectives shape (monitored, never optimised)."""

from vdg.losses.barlow import barlow_twins_loss
from vdg.losses.gating import bound_annealing, bound_channel_counts, bound_loss, budget_loss
from vdg.losses.rankme import rankme
from vdg.losses.vicreg import covariance_term, variance_term, vicreg_loss

__all__ = [
    "barlow_twins_loss",
    "bound_annealing",
    "bound_channel_counts",
    "bound_loss",
    "budget_loss",
    "covariance_term",
    "rankme",
    "variance_term",
    "vicreg_loss",
]
