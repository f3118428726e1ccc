"""The budget loss alone drives the realised FLOPs ratio to t_d (paper Eq. 3), on synthetic data."""

import pytest
import torch

from vdg.data.datasets import make_synthetic
from vdg.losses import budget_loss
from vdg.models import GatedResNet, network_cost


@pytest.mark.parametrize("budget", [0.3, 0.6])
def test_budget_loss_drives_ratio_to_target(budget):
    torch.manual_seed(0)
    model = GatedResNet(width=4)
    cost = network_cost(model, 32)
    images = make_synthetic("train", size=64).images.float() / 255
    gate_params = [p for n, p in model.named_parameters() if ".gate." in n]
    optimizer = torch.optim.Adam(gate_params, lr=0.05)
    model.train()
    for _ in range(100):
        ratio = cost.flops_ratio(model(images, "gated").active_channels())
        loss = budget_loss(ratio, budget, weight=5.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # the ratio the loss constrains: the batch mean over sampled (training-mode) gates, averaged over draws
    with torch.no_grad():
        realised = sum(cost.flops_ratio(model(images, "gated").active_channels()).item() for _ in range(10)) / 10
    assert realised == pytest.approx(budget, abs=0.03)
    start = network_cost(GatedResNet(width=4), 32).flops_ratio(GatedResNet(width=4)(images, "gated").active_channels())
    assert abs(start.item() - budget) > 0.05  # it really moved: gates start ~50% open
