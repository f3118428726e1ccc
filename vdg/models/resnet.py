"""ResNet-18 whose BasicBlocks carry a channel gate and per-branch BatchNorm (one encoder, two networks).

It builds the network only: FLOPs live in `vdg.models.flops`, losses in `vdg.losses`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from vdg.core.errors import ConfigError
from vdg.models.branch import Branch
from vdg.models.gates import ChannelGate

STEMS = ("cifar", "imagenet")
BN_SPLITS = ("blocks", "all", "none")


class BranchNorm(nn.Module):
    """BatchNorm2d with its own statistics and affine parameters per branch, or one set shared by all.

    Keys of the state dict name the branch (`norms.dense.*`, `norms.gated.*`) or `norms.shared.*`.
    """

    def __init__(self, channels: int, branches: Sequence[Branch], split: bool) -> None:
        super().__init__()
        names = [b.value for b in branches] if split else ["shared"]
        self.split = split
        self.norms = nn.ModuleDict({name: nn.BatchNorm2d(channels) for name in names})

    def forward(self, x: Tensor, branch: Branch) -> Tensor:
        return self.norms[branch.value if self.split else "shared"](x)


class ShortcutConv(nn.Conv2d):
    """The shortcut's strided 1x1 convolution (in_planes -> planes, stride s, no bias): a plain `nn.Conv2d` (same
    parameters and state-dict keys) that routes around a oneDNN crash.

    On CPU with fewer than 8 input channels it runs as "take every s-th pixel, then a stride-1 1x1 convolution":
    the same sums, another oneDNN primitive. Why: oneDNN's AVX2 weight gradient of a *strided* 1x1 convolution
    in channels_last segfaults, or spins forever, for 2-7 input channels (backbone.width=4's first shortcut).
    Verbose line of the crash: `jit_1x1:avx2,backward_weights,src/dst f32 acdb,
    mb16_ic4oc8_ih34oh17kh1sh2_iw34ow17kw1sw2`; torch 2.14.1 with its bundled oneDNN v3.12.0. Reproduced on an
    AVX-512 CPU with ONEDNN_MAX_CPU_ISA=AVX2; NCHW, stride 1, >= 8 channels and the AVX-512 kernels are fine
    (tests/test_isa.py). Drop this class once a torch whose oneDNN passes that test is the minimum.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.in_channels < 8 and self.stride != (1, 1) and x.device.type == "cpu":
            sh, sw = self.stride
            return nn.functional.conv2d(x[:, :, ::sh, ::sw], self.weight)
        return super().forward(x)


class GatedBasicBlock(nn.Module):
    """ResNet BasicBlock whose conv1 output channels are masked by a `ChannelGate` in the gated branch.

    conv1 -> BN1 -> ReLU -> (x mask, gated branch only) -> conv2 -> BN2 -> + shortcut -> ReLU (reference §1.3).
    The gate reads the block input x; the shortcut is never gated. BN1/BN2 are per branch when `split_bn`.
    `mid_planes` is conv1's output width (the channels the gate switches); None = `planes`, a standard
    BasicBlock. A smaller value gives a slim block, as in the paper's Table 3 students.
    """

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        branches: Sequence[Branch],
        split_bn: bool,
        split_shortcut_bn: bool,
        gate: ChannelGate | None,
        mid_planes: int | None = None,
    ) -> None:
        super().__init__()
        mid = planes if mid_planes is None else int(mid_planes)
        if mid < 1:
            # not user input: block_widths are checked by GatedResNet first
            raise ValueError(f"a block needs at least one conv1 channel, got mid_planes={mid_planes}")
        self.in_planes, self.planes, self.mid_planes, self.stride = in_planes, planes, mid, stride
        self.conv1 = nn.Conv2d(in_planes, mid, 3, stride, 1, bias=False)
        self.bn1 = BranchNorm(mid, branches, split_bn)
        self.conv2 = nn.Conv2d(mid, planes, 3, 1, 1, bias=False)
        self.bn2 = BranchNorm(planes, branches, split_bn)
        self.gate = gate
        self.downsample: nn.Conv2d | None = None
        self.downsample_bn: BranchNorm | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = ShortcutConv(in_planes, planes, 1, stride, bias=False)
            self.downsample_bn = BranchNorm(planes, branches, split_shortcut_bn)

    def forward(self, x: Tensor, branch: Branch) -> tuple[Tensor, Tensor | None]:
        out = torch.relu(self.bn1(self.conv1(x), branch))
        mask = None
        if branch is Branch.GATED:
            mask = self.gate(x)
            out = out * mask[:, :, None, None].to(out.dtype)
        out = self.bn2(self.conv2(out), branch)
        shortcut = x if self.downsample is None else self.downsample_bn(self.downsample(x), branch)
        return torch.relu(out + shortcut), mask


class BackboneOutput(NamedTuple):
    """Pooled features [N, feature_dim] and, for the gated branch, one mask [N, C_b] per block."""

    features: Tensor
    masks: tuple[Tensor, ...] | None = None

    def active_channels(self) -> Tensor:
        """Active gated channels per sample and block, [N, num_blocks] (c_i of reference §1.8)."""
        if self.masks is None:
            # not user input: a caller asking a dense output for masks
            raise ValueError("active_channels() needs a gated forward (branch='gated')")
        return torch.stack([m.sum(dim=1) for m in self.masks], dim=1)


class GatedResNet(nn.Module):
    """ResNet-18 (BasicBlock, layers [2, 2, 2, 2]) that runs as a dense or a gated network.

    Args:
        width: channels of the first stage (64 = ResNet-18; stages use width x {1, 2, 4, 8}).
        stem: "cifar" (3x3/1, padding 2, no maxpool: 34x34 maps at 32 px, as the official code)
            or "imagenet" (7x7/2 + 3x3/2 maxpool).
        branches: the branches this encoder serves; ("dense",) builds a plain ResNet-18 without gates.
        bn_split: "blocks" (official: BN1/BN2 of every block per branch; stem and shortcut BNs shared),
            "all" (also the stem and shortcut BNs per branch) or "none" (every BN shared).
        gate_reduction, gate_temperature, gate_bias_init: see `ChannelGate`.
        zero_init_residual: zero BN2's scale in every block (off in the official code).
        block_widths: conv1 output channels of each of the 8 blocks (`GatedBasicBlock.mid_planes`); None = the
            standard widths (width x {1, 1, 2, 2, 4, 4, 8, 8}). Slim ResNets built from a gate policy set it
            (`vdg.deploy.slim`); block outputs, shortcuts and the feature dimension keep the standard widths.

    forward(x [N, 3, H, W], branch) -> BackboneOutput; no classifier head (512-d features at width 64).
    """

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        width: int = 64,
        stem: str = "cifar",
        branches: Sequence[str | Branch] = (Branch.DENSE, Branch.GATED),
        bn_split: str = "blocks",
        gate_reduction: int = 4,
        gate_temperature: float = 2.0 / 3.0,
        gate_bias_init: float | None = None,
        zero_init_residual: bool = False,
        block_widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ConfigError(f"unknown backbone stem {stem!r}; allowed values: {list(STEMS)}")
        if bn_split not in BN_SPLITS:
            raise ConfigError(f"unknown backbone.bn_split {bn_split!r}; allowed values: {list(BN_SPLITS)}")
        if width < 4:
            raise ConfigError(f"backbone.width={width} must be >= 4")
        if block_widths is not None:
            block_widths = [int(w) for w in block_widths]
            if len(block_widths) != sum(layers) or min(block_widths) < 1:
                raise ConfigError(
                    f"backbone.block_widths={block_widths} must give {sum(layers)} positive conv1 widths, one per block"
                )
        self.branches = tuple(dict.fromkeys(Branch.parse(b) for b in branches))
        if not self.branches:
            raise ConfigError("backbone.branches must name at least one of ['dense', 'gated']")
        self.stem_kind, self.width, self.bn_split = stem, width, bn_split
        self.block_widths = None if block_widths is None else tuple(block_widths)
        gated = Branch.GATED in self.branches
        several = len(self.branches) > 1
        split_blocks = several and bn_split in ("blocks", "all")
        split_rest = several and bn_split == "all"

        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, width, 3, 1, 2, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = BranchNorm(width, self.branches, split_rest)

        blocks: list[GatedBasicBlock] = []
        in_planes = width
        for stage, depth in enumerate(layers):
            planes = width * 2**stage
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                mid = planes if block_widths is None else block_widths[len(blocks)]
                gate = (
                    ChannelGate(in_planes, mid, gate_reduction, gate_temperature, gate_bias_init) if gated else None
                )
                blocks.append(
                    GatedBasicBlock(in_planes, planes, stride, self.branches, split_blocks, split_rest, gate, mid)
                )
                in_planes = planes
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = in_planes
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for block in self.blocks:
                for norm in block.bn2.norms.values():
                    nn.init.zeros_(norm.weight)

    @property
    def gated(self) -> bool:
        return Branch.GATED in self.branches

    def forward(self, x: Tensor, branch: str | Branch = Branch.DENSE) -> BackboneOutput:
        branch = Branch.parse(branch)
        if branch not in self.branches:
            raise ConfigError(
                f"this backbone has no {branch.value!r} branch; it serves {[b.value for b in self.branches]}"
            )
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x), branch)))
        masks = []
        for block in self.blocks:
            x, mask = block(x, branch)
            masks.append(mask)
        features = torch.flatten(x.mean(dim=(2, 3)), 1)
        return BackboneOutput(features, tuple(masks) if branch is Branch.GATED else None)

    def arch_config(self) -> dict:
        """What defines this architecture: used to refuse checkpoints of another model."""
        gate = self.blocks[0].gate
        return {
            "name": "resnet18",
            "width": self.width,
            "stem": self.stem_kind,
            "branches": [b.value for b in self.branches],
            "bn_split": self.bn_split,
            "gate_reduction": None if gate is None else gate.reduction,
            "gate_bias": None if gate is None else gate.expand.bias is not None,
            "block_widths": None if self.block_widths is None else list(self.block_widths),
        }
