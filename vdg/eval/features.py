"""Frozen-backbone features for evaluation, and the gate statistics of a dataset (FLOPs ratio, channel usage).

It never trains, loads checkpoints or builds loaders: it reads a backbone and a loader of (images, labels).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vdg.models.branch import Branch
from vdg.models.flops import NetworkCost


@dataclass
class Features:
    """Backbone outputs over a dataset, on the CPU.

    features [N, D] float32; labels [N] long; active_channels [N, num_blocks] float32 (gated branch only);
    masks: one bool [N, C_b] tensor per block (gated branch with `keep_masks=True` only).
    """

    features: Tensor
    labels: Tensor
    active_channels: Tensor | None = None
    masks: tuple[Tensor, ...] | None = None

    def __len__(self) -> int:
        return self.features.shape[0]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then give each one back its own previous train/eval flag."""
    previous = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in previous:
            m.training = training


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Iterable,
    branch: str | Branch,
    device: torch.device | str | None = None,
    keep_masks: bool = False,
) -> Features:
    """Run `backbone(images, branch)` in eval mode (deterministic gates 1[logit >= 0]) over `loader`.

    device: where the forward runs; None = the backbone's device, otherwise the backbone is moved there.
    """
    branch = Branch.parse(branch)
    if device is None:
        device = module_device(backbone)
    else:
        backbone.to(device)
    features, labels, active, masks = [], [], [], []
    with eval_mode(backbone):
        for images, targets in loader:
            out = backbone(images.to(device, non_blocking=True), branch)
            features.append(out.features.float().cpu())
            labels.append(torch.as_tensor(targets).long().cpu())
            if branch is Branch.GATED:
                active.append(out.active_channels().float().cpu())
                if keep_masks:
                    masks.append([m.bool().cpu() for m in out.masks])
    if not features:
        # not user input: the protocols build non-empty loaders
        raise ValueError("extract_features got an empty loader")
    return Features(
        features=torch.cat(features),
        labels=torch.cat(labels),
        active_channels=torch.cat(active) if active else None,
        masks=tuple(torch.cat(block) for block in zip(*masks, strict=True)) if masks else None,
    )


@contextmanager
def channels_last(module: nn.Module) -> Iterator[nn.Module]:
    """Hold `module`'s 4-d weights in channels_last (NHWC) memory, then give them back the default layout.

    Convolutions run faster on NHWC on CPUs (oneDNN) and GPUs; values are unchanged, only strides differ.
    """
    module.to(memory_format=torch.channels_last)
    try:
        yield module
    finally:
        module.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def extract_branches(
    backbone: nn.Module,
    loader: Iterable,
    branches: Sequence[str | Branch],
    device: torch.device | str,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[Branch, Features]:
    """`extract_features` for several branches in one pass over `loader`: each batch feeds every branch.

    The backbone must already be on `device`; memory_format is applied to each input batch.
    """
    branches = [Branch.parse(b) for b in branches]
    parts: dict[Branch, tuple[list, list]] = {b: ([], []) for b in branches}
    labels = []
    with eval_mode(backbone):
        for images, targets in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            labels.append(torch.as_tensor(targets).long().cpu())
            for branch in branches:
                out = backbone(images, branch)
                parts[branch][0].append(out.features.float().cpu())
                if branch is Branch.GATED:
                    parts[branch][1].append(out.active_channels().float().cpu())
    if not labels:
        # not user input: the protocols build non-empty loaders
        raise ValueError("extract_branches got an empty loader")
    return {
        b: Features(torch.cat(feats), torch.cat(labels), torch.cat(active) if active else None)
        for b, (feats, active) in parts.items()
    }


def gate_report(active_channels: Tensor, cost: NetworkCost) -> dict:
    """Inference cost of the gated network over a dataset (reference §1.13, paper Table 1 "FLOPs R.").

    active_channels: [N, num_blocks] c_i of every sample (e.g. `Features.active_channels` on the test set).
    Per-sample realised MACs F_R(i) (stem + gates + downsample convs + active channels) are averaged over all
    N samples; flops_ratio = mean F_R / F_O with F_O the dense MACs; flops_reduction = 1 - flops_ratio.
    density_per_block is rho_b = mean c_b / C_b; density is all active gated channels over all gated channels.
    """
    active = active_channels.float()
    if active.ndim != 2 or active.shape[1] != len(cost.blocks):
        # not user input: the protocols' mask tensors
        raise ValueError(
            f"active_channels must be [N, {len(cost.blocks)}] (one column per block), "
            f"got {list(active.shape)}"
        )
    if active.shape[0] == 0:
        # not user input: the protocols' mask tensors
        raise ValueError("gate_report needs at least one sample")
    gated = cost.gated_macs(active).double().mean().item()
    per_block = active.mean(dim=0)
    channels = cost.channels(active.device)
    ratio = gated / cost.dense_macs
    return {
        "gated_macs": gated,
        "dense_macs": cost.dense_macs,
        "flops_ratio": ratio,
        "flops_reduction": 1.0 - ratio,
        "active_channels_per_block": per_block.tolist(),
        "density_per_block": (per_block / channels).tolist(),
        "density": (per_block.sum() / channels.sum()).item(),
    }


def channel_usage(masks_per_block: Sequence[Tensor]) -> list[dict[str, int]]:
    """Per block, how many gated channels are always off, always on or data-dependent over a dataset.

    masks_per_block: one [N, C_b] 0/1 mask per block (`Features.masks`). This is the paper's supplementary
    channel-distribution figure (reference §1.13): a channel is "always on" if kept for all N samples.
    """
    usage = []
    for mask in masks_per_block:
        if mask.ndim != 2 or mask.shape[0] == 0:
            # not user input: the protocols' mask tensors
            raise ValueError(f"each block mask must be [N>0, C_b], got {list(mask.shape)}")
        kept = mask.bool()
        on, off = kept.all(dim=0).sum().item(), (~kept).all(dim=0).sum().item()
        channels = kept.shape[1]
        usage.append(
            {"channels": channels, "always_off": off, "always_on": on, "data_dependent": channels - on - off}
        )
    return usage
