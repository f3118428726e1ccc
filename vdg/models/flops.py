"""Analytic MAC counts of a `GatedResNet` (reference §1.8): dense totals, realised gated cost, the FLOPs ratio.

Counts convolutions only (BN, ReLU, pooling, additions and heads are free), exactly as the official code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from vdg.models.resnet import GatedResNet


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class BlockCost:
    """MACs of one BasicBlock at its output resolution H_b x W_b.

    channels: C_b, conv1's output channels (the ones a gate switches); planes: the block's output channels
    (equal to C_b except in slim blocks, `GatedBasicBlock.mid_planes`).
    full: F_O,b = 9HW*C_b*inplanes + 9HW*planes*C_b (+ HW*planes*inplanes for the downsample conv).
    per_channel: MACs each active gated channel costs: 9HW*inplanes (conv1 output) + 9HW*planes (conv2 input).
    fixed: the ungated downsample conv (0 without one). gate: the gating network's constant cost.
    So F_R,b(i) = per_channel * c_i + fixed, and F_R,b = F_O,b when all `channels` are active.
    """

    channels: int
    planes: int
    full: int
    per_channel: int
    fixed: int
    gate: int


@dataclass(frozen=True)
class NetworkCost:
    """MACs of the whole backbone at one input size; the stem is counted in numerator and denominator."""

    stem: int
    blocks: tuple[BlockCost, ...]

    @property
    def dense_macs(self) -> int:
        """Stem + sum_b F_O,b: the dense network (the paper's FLOPs column, e.g. 7.03E8 on CIFAR)."""
        return self.stem + sum(b.full for b in self.blocks)

    @property
    def gate_macs(self) -> int:
        return sum(b.gate for b in self.blocks)

    def per_channel(self, device: torch.device | None = None) -> Tensor:
        return _constant(tuple(b.per_channel for b in self.blocks), device)

    def channels(self, device: torch.device | None = None) -> Tensor:
        return _constant(tuple(b.channels for b in self.blocks), device)

    def gated_macs(self, active: Tensor) -> Tensor:
        """Per-sample realised MACs of the gated network, [N], from active channels [N, num_blocks]."""
        constant = self.stem + self.gate_macs + sum(b.fixed for b in self.blocks)
        # a product and a sum, not a matmul: autocast would run the matmul in bf16 (F_R off by up to ~0.4%)
        return (active.float() * self.per_channel(active.device)).sum(dim=1) + constant

    def flops_ratio(self, active: Tensor) -> Tensor:
        """F_R / F_O of the paper's Eq. 3: batch mean of per-sample gated MACs over dense MACs (a 0-d tensor).

        Gradients flow into `active` (and through the straight-through masks into the gate logits).
        """
        return self.gated_macs(active).mean() / self.dense_macs

    def channel_density(self, active: Tensor) -> Tensor:
        """rho_b: batch-mean fraction of active channels per block, [num_blocks]."""
        return active.float().mean(dim=0) / self.channels(active.device)


@lru_cache(maxsize=64)
def _constant(values: tuple[int, ...], device: torch.device | None) -> Tensor:
    """float32 `values` on `device`, built once: a tensor built from host data every training step is a blocking
    host-to-device copy on CUDA. Made outside inference mode so that autograd may save it even when validation
    asked first; callers must not modify it in place."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=torch.float32, device=device)


def network_cost(backbone: GatedResNet, image_size: int) -> NetworkCost:
    """Walk the backbone's stem and blocks and count MACs for a square input of `image_size` pixels."""
    conv = backbone.conv1
    size = conv_out(image_size, conv.kernel_size[0], conv.stride[0], conv.padding[0])
    stem = conv.kernel_size[0] * conv.kernel_size[1] * size * size * conv.in_channels * conv.out_channels
    if backbone.stem_kind == "imagenet":
        size = conv_out(size, 3, 2, 1)
    blocks = []
    for block in backbone.blocks:
        size = conv_out(size, 3, block.stride, 1)
        hw = size * size
        inp, planes, mid = block.in_planes, block.planes, block.mid_planes
        fixed = hw * planes * inp if block.downsample is not None else 0
        blocks.append(
            BlockCost(
                channels=mid,
                planes=planes,
                full=9 * hw * mid * inp + 9 * hw * planes * mid + fixed,
                per_channel=9 * hw * (inp + planes),
                fixed=fixed,
                gate=block.gate.macs if block.gate is not None else 0,
            )
        )
    return NetworkCost(stem=stem, blocks=tuple(blocks))
