import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from vdg.models import GatedResNet, network_cost


@pytest.mark.parametrize(
    "stem,size,expected",
    [("cifar", 32, 703_560_448), ("imagenet", 96, 333_103_104), ("imagenet", 224, 1_813_561_344)],
)
def test_dense_totals_match_the_paper(stem, size, expected):
    cost = network_cost(GatedResNet(stem=stem), size)
    assert cost.dense_macs == expected
    assert cost.gate_macs == 240_640


def _fvcore_conv_macs(model: torch.nn.Module, size: int) -> int:
    class Dense(torch.nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def forward(self, x):
            return self.backbone(x, "dense").features

    analysis = FlopCountAnalysis(Dense(model).eval(), torch.randn(1, 3, size, size))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return int(analysis.by_operator()["conv"])


@pytest.mark.parametrize("stem,size,width", [("cifar", 32, 16), ("imagenet", 64, 8), ("cifar", 32, 64)])
def test_dense_count_agrees_with_fvcore(stem, size, width):
    model = GatedResNet(stem=stem, width=width)
    assert network_cost(model, size).dense_macs == _fvcore_conv_macs(model, size)


def test_width_scales_block_costs_quadratically():
    narrow, wide = network_cost(GatedResNet(width=16), 32), network_cost(GatedResNet(width=32), 32)
    assert sum(b.full for b in wide.blocks) == 4 * sum(b.full for b in narrow.blocks)


def test_ratio_is_one_when_every_channel_is_active_plus_gate_cost():
    cost = network_cost(GatedResNet(width=16), 32)
    full = cost.channels().expand(3, -1)
    expected = (cost.dense_macs + cost.gate_macs) / cost.dense_macs
    assert cost.flops_ratio(full).item() == pytest.approx(expected)
    assert cost.channel_density(full).eq(1).all()


def test_realised_cost_by_hand():
    cost = network_cost(GatedResNet(width=64), 32)
    active = torch.zeros(2, 8)
    active[0, 0] = 10  # 10 channels of block 0 (64 -> 64, 34x34 maps)
    per_sample = cost.gated_macs(active)
    fixed = cost.stem + cost.gate_macs + sum(b.fixed for b in cost.blocks)
    assert per_sample[1].item() == pytest.approx(fixed)
    assert per_sample[0].item() == pytest.approx(fixed + 10 * 9 * 34 * 34 * (64 + 64))
    ratio = cost.flops_ratio(active)
    assert ratio.item() == pytest.approx(per_sample.mean().item() / 703_560_448)
    # the floor the code can reach: stem + downsample convs + gates (1.5% on CIFAR, reference §1.8)
    assert cost.flops_ratio(torch.zeros(1, 8)).item() == pytest.approx(0.015, abs=0.001)


def test_ratio_gradient_reaches_active_counts():
    cost = network_cost(GatedResNet(width=8), 32)
    active = torch.full((4, 8), 3.0, requires_grad=True)
    cost.flops_ratio(active).backward()
    assert (active.grad > 0).all()


@pytest.mark.parametrize("stem,size", [("cifar", 32), ("imagenet", 64)])
def test_slim_block_widths_count_agrees_with_fvcore(stem, size):
    widths = [3, 16, 5, 32, 7, 64, 1, 128]  # block b's conv1 width; outputs keep 16 x {1, 2, 4, 8}
    model = GatedResNet(stem=stem, width=16, branches=("dense",), block_widths=widths)
    cost = network_cost(model, size)
    assert [b.channels for b in cost.blocks] == widths
    assert [b.planes for b in cost.blocks] == [16, 16, 32, 32, 64, 64, 128, 128]
    assert cost.dense_macs == _fvcore_conv_macs(model, size)
