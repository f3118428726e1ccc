"""RankMe, the label-free effective rank that training logs for each branch every epoch (Garrido et al. 2023)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vdg.losses import rankme


def test_rankme_is_one_for_collapse_and_the_dimension_for_equal_spread():
    assert rankme(torch.ones(64, 16)) == pytest.approx(1.0, abs=1e-3)  # every embedding on one line
    assert rankme(torch.zeros(8, 4)) == 1.0
    assert rankme(torch.eye(16) * 3.0) == pytest.approx(16.0, rel=1e-4)  # scale does not matter
    two = torch.zeros(100, 32)
    two[:50, 0], two[50:, 1] = 1.0, 1.0  # two directions, equal weight
    assert rankme(two) == pytest.approx(2.0, rel=1e-4)


def test_rankme_matches_the_papers_formula_on_random_embeddings():
    torch.manual_seed(0)
    z = torch.randn(500, 24) @ torch.diag(torch.linspace(0.1, 2.0, 24))
    sigma = torch.linalg.svdvals(z.double())
    p = sigma / sigma.sum() + 1e-7
    assert rankme(z) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)
    assert 1 < rankme(z) < 24


def test_training_logs_rankme_for_each_branch_and_the_summary_keeps_it(tiny_cfg):
    from vdg.run.driver import pretrain

    summary = pretrain(tiny_cfg("final_knn.enabled=false"))
    assert set(summary["rankme"]) == {"dense", "gated"}
    for value in summary["rankme"].values():
        assert 1.0 <= value <= summary["feature_dim"]
    header = (Path(summary["run_dir"]) / "metrics.csv").read_text().splitlines()[0]
    assert "val/rankme_dense" in header and "val/rankme_gated" in header
