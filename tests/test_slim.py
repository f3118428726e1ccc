"""Slim ResNet-18s from a gate policy (vdg/deploy/slim.py) and per-block conv1 widths in `GatedResNet`."""

from __future__ import annotations

import pytest
import torch

from vdg.deploy.slim import (
    ChannelProfile,
    channel_profile,
    profile_from_masks,
    slim_from_profile,
    slim_resnet,
    slim_widths,
)
from vdg.models import Branch, GatedResNet


def test_block_widths_shape_every_block_and_keep_the_feature_dim():
    widths = [1, 2, 3, 4, 5, 6, 7, 8]
    model = GatedResNet(width=8, block_widths=widths).eval()
    assert [b.conv1.out_channels for b in model.blocks] == widths
    assert [b.conv2.in_channels for b in model.blocks] == widths
    assert [b.gate.out_channels for b in model.blocks] == widths
    assert model.arch_config()["block_widths"] == widths
    out = model(torch.randn(2, 3, 32, 32), Branch.GATED)
    assert out.features.shape == (2, 64) and [m.shape[1] for m in out.masks] == widths


@pytest.mark.parametrize("bad", [[4] * 7, [4, 4, 4, 0, 4, 4, 4, 4]])
def test_bad_block_widths_are_refused(bad):
    with pytest.raises(ValueError, match="block_widths"):
        GatedResNet(width=8, block_widths=bad)


def test_profile_counts_always_on_off_and_mean_active():
    masks = [torch.tensor([[1, 0, 1], [1, 0, 0]]), torch.tensor([[0, 0], [1, 1]])]
    profile = profile_from_masks(masks, {"width": 4, "stem": "cifar"})
    assert profile.samples == 2 and profile.channels == [3, 2]
    assert profile.mean_active == [1.5, 1.0]
    assert [t.tolist() for t in profile.always_on()] == [[0], []]
    assert [t.tolist() for t in profile.always_off()] == [[1], []]
    assert slim_widths(profile) == [2, 1]  # round half to even for 1.5 -> 2; never below one channel


def test_slim_network_widths_match_the_profile_it_was_built_from():
    gen = torch.Generator().manual_seed(0)
    freq = tuple(torch.rand(c, generator=gen) for c in (8, 8, 16, 16, 32, 32, 64, 64))
    profile = ChannelProfile(freq, 100, {"width": 8, "stem": "cifar"})
    slim = slim_from_profile(profile)
    expected = [max(1, round(float(f.double().sum()))) for f in freq]
    assert [b.mid_planes for b in slim.blocks] == expected == slim_widths(profile)
    assert slim.branches == (Branch.DENSE,) and not slim.gated
    assert slim(torch.randn(2, 3, 32, 32)).features.shape == (2, 64)


def test_profile_of_a_network_and_json_roundtrip(tmp_path):
    model = GatedResNet(width=4).eval()
    loader = [(torch.randn(5, 3, 32, 32), torch.zeros(5)), (torch.randn(3, 3, 32, 32), torch.zeros(3))]
    profile = channel_profile(model, loader)
    assert profile.samples == 8 and profile.channels == [4, 4, 8, 8, 16, 16, 32, 32]
    masks = [m.float() for m in model(torch.cat([x for x, _ in loader]), Branch.GATED).masks]
    assert [f.tolist() for f in profile.frequency] == [m.mean(0).tolist() for m in masks]
    again = ChannelProfile.load(profile.save(tmp_path / "p.json"))
    assert again.samples == 8
    assert all(torch.equal(a, b) for a, b in zip(again.frequency, profile.frequency, strict=True))
    with pytest.raises(ValueError, match="not a channel profile"):
        ChannelProfile.from_dict({"format": "other"})


def test_slim_resnet_is_a_standard_resnet_at_full_widths():
    full = slim_resnet([8, 8, 16, 16, 32, 32, 64, 64], width=8)
    plain = GatedResNet(width=8, branches=("dense",))
    assert {k: v.shape for k, v in full.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
