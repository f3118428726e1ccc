import math

import pytest
import torch

from vdg.losses import barlow_twins_loss, bound_annealing, bound_loss, budget_loss, vicreg_loss


def test_vicreg_matches_hand_computation():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    z2 = torch.tensor([[0.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    out = vicreg_loss(z1, z2)
    # invariance: mean of squared differences over N*D = (1 + 0 + 0 + 1 + 1 + 0) / 6
    assert out["invariance"].item() == pytest.approx(3 / 6)
    # unbiased variances: z1 cols (1/3, 1), z2 cols (4/3, 1/3)

    def v(var):
        return max(0.0, 1 - math.sqrt(var + 1e-4))

    expected_var = (v(1 / 3) + v(1.0)) / 2 + (v(4 / 3) + v(1 / 3)) / 2
    assert out["variance"].item() == pytest.approx(expected_var, rel=1e-5)
    # covariances: cov(z1) off-diagonal = -0.5, cov(z2) off-diagonal = 1/3; sum over i!=j of squares / D
    expected_cov = (2 * 0.25) / 2 + (2 * (1 / 9)) / 2
    assert out["covariance"].item() == pytest.approx(expected_cov, rel=1e-5)
    total = 25 * 0.5 + 25 * expected_var + 1 * expected_cov
    assert out["loss"].item() == pytest.approx(total, rel=1e-5)


def test_vicreg_variance_reduction_option():
    z1, z2 = torch.randn(16, 8) * 0.1, torch.randn(16, 8) * 0.1
    summed = vicreg_loss(z1, z2, variance_reduction="sum")["variance"]
    mean = vicreg_loss(z1, z2, variance_reduction="mean")["variance"]
    assert summed.item() == pytest.approx(2 * mean.item())
    with pytest.raises(ValueError, match="allowed values: \\['sum', 'mean'\\]"):
        vicreg_loss(z1, z2, variance_reduction="max")


def test_vicreg_weights_and_zero_invariance():
    z1, z2 = torch.randn(32, 4), torch.randn(32, 4)
    full = vicreg_loss(z1, z2)
    no_inv = vicreg_loss(z1, z2, invariance_weight=0.0)
    assert no_inv["loss"].item() == pytest.approx(full["loss"].item() - 25 * full["invariance"].item(), rel=1e-5)


def test_budget_loss_by_hand():
    assert budget_loss(torch.tensor(0.5), 0.3).item() == pytest.approx(5 * 0.04)
    assert budget_loss(torch.tensor(0.3), 0.3).item() == 0.0
    assert budget_loss(torch.tensor(0.1), 0.3, weight=2.0).item() == pytest.approx(2 * 0.04)


def test_bound_loss_by_hand():
    density = torch.tensor([0.1, 0.5, 0.99])
    budget = 0.25  # s = sqrt(0.25) = 0.5
    p = 1.0  # bounds [p*s, 1 - p + p*s] = [0.5, 0.5]
    expected = ((0.5 - 0.1) ** 2 + 0 + (0.99 - 0.5) ** 2) / 3
    assert bound_loss(density, budget, p).item() == pytest.approx(expected, rel=1e-5)
    # p = 0.5: bounds [0.25, 0.75]
    expected = ((0.25 - 0.1) ** 2 + 0 + (0.99 - 0.75) ** 2) / 3
    assert bound_loss(density, budget, 0.5).item() == pytest.approx(expected, rel=1e-5)
    # linear target: s = t_d
    expected = ((0.25 - 0.1) ** 2 + (0.5 - 0.25) ** 2 + (0.99 - 0.25) ** 2) / 3
    assert bound_loss(density, budget, 1.0, target="linear").item() == pytest.approx(expected, rel=1e-5)
    assert bound_loss(density, budget, 0.0).item() == 0.0
    with pytest.raises(ValueError, match="bound_target"):
        bound_loss(density, budget, 1.0, target="cube")


def test_bound_annealing_schedule():
    assert bound_annealing(0) == 1.0
    assert bound_annealing(50) == pytest.approx(0.3679, abs=1e-4)
    assert bound_annealing(500) == pytest.approx(4.54e-5, rel=1e-2)


def test_barlow_twins_by_hand():
    torch.manual_seed(0)
    z = torch.randn(64, 8)
    perfect = barlow_twins_loss(z, z)
    zs = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    corr = zs.T @ zs / 64
    on = ((1 - corr.diagonal()) ** 2).sum()
    off = corr.pow(2).sum() - corr.diagonal().pow(2).sum()
    assert perfect["on_diagonal"].item() == pytest.approx(on.item(), abs=1e-5)
    assert perfect["loss"].item() == pytest.approx(0.024 * (on + 0.0051 * off).item(), rel=1e-4)
    unrelated = barlow_twins_loss(z, torch.randn(64, 8))
    assert unrelated["loss"] > perfect["loss"]
