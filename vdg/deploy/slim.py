"""Channel-usage profiles of a gated network's policy, slim dense ResNet-18s whose widths follow it, and the
compacted gated network without the channels the policy never uses.

The paper's Table 3 students are "sampled from R18's subspace with the number of filters for each basic block
derived from our gating network": `slim_widths(profile)` gives those per-block conv1 widths and `slim_resnet`
builds the (untrained) student. `compact_gated` removes never-active channels from the trained gated network
and ungates always-active ones. Profiles are measured here; nothing in this module trains.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from vdg.core.errors import CheckpointError, ConfigError
from vdg.data.module import eval_loader
from vdg.eval.features import extract_features
from vdg.methods.checkpoint import load_method, require_branch
from vdg.models import Branch, GatedResNet
from vdg.models.encoder import branch_encoder

PROFILE_FORMAT = "vdg-channel-profile"


@dataclass(frozen=True)
class ChannelProfile:
    """How often each gated channel of each block is active over a dataset (deterministic eval gates).

    frequency: one float tensor [C_b] per block, the fraction of the `samples` images in which conv1's channel c
    of block b was kept (1[logit >= 0]). From it: a channel is always on (1.0), always off (0.0) or
    data-dependent; the mean number of active channels of block b is frequency[b].sum().
    arch: `GatedResNet.arch_config()` of the profiled network, so a profile is not applied to another one.
    """

    frequency: tuple[Tensor, ...]
    samples: int
    arch: dict[str, Any]

    @property
    def channels(self) -> list[int]:
        return [f.numel() for f in self.frequency]

    @property
    def mean_active(self) -> list[float]:
        return [float(f.double().sum()) for f in self.frequency]

    def always_on(self) -> list[Tensor]:
        """Per block, the indices of the channels kept for every sample."""
        return [torch.nonzero(f >= 1.0).flatten() for f in self.frequency]

    def always_off(self) -> list[Tensor]:
        """Per block, the indices of the channels dropped for every sample."""
        return [torch.nonzero(f <= 0.0).flatten() for f in self.frequency]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "samples": self.samples,
            "arch": self.arch,
            "channels": self.channels,
            "mean_active": self.mean_active,
            "frequency": [f.tolist() for f in self.frequency],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChannelProfile:
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ConfigError(f"not a channel profile: expected a JSON object with format={PROFILE_FORMAT!r}")
        frequency = tuple(torch.tensor(f, dtype=torch.float32) for f in data["frequency"])
        return cls(frequency, int(data["samples"]), dict(data["arch"]))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ChannelProfile:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"cannot read channel profile {path}: {err}") from err


def profile_from_masks(masks: Sequence[Tensor], arch: dict[str, Any]) -> ChannelProfile:
    """A profile from one 0/1 mask [N, C_b] per block (e.g. `vdg.eval.features.Features.masks`)."""
    if not masks or any(m.ndim != 2 or m.shape[0] != masks[0].shape[0] or m.shape[0] == 0 for m in masks):
        # not user input: the profilers pass their own masks
        raise ValueError("profile_from_masks needs one [N > 0, C_b] mask per block, all with the same N")
    return ChannelProfile(tuple(m.float().mean(dim=0) for m in masks), int(masks[0].shape[0]), dict(arch))


def gated_encoder(backbone: nn.Module) -> GatedResNet:
    """The encoder that runs the gated branch: the backbone itself, or vdg_2x's gated encoder."""
    encoder = backbone if isinstance(backbone, GatedResNet) else getattr(backbone, "gated_encoder", None)
    if not isinstance(encoder, GatedResNet) or not encoder.gated:
        raise CheckpointError("a channel profile needs a backbone with a gated branch")
    return encoder


@torch.no_grad()
def channel_profile(backbone: nn.Module, loader: Iterable, device: torch.device | str | None = None) -> ChannelProfile:
    """Run the gated branch in eval mode over `loader` (batches of (images, labels)) and count active channels."""
    features = extract_features(backbone, loader, Branch.GATED, device, keep_masks=True)
    return profile_from_masks(features.masks, gated_encoder(backbone).arch_config())


def slim_widths(profile: ChannelProfile) -> list[int]:
    """Per-block conv1 widths of the slim student: the mean number of active channels, rounded, at least 1."""
    return [max(1, round(m)) for m in profile.mean_active]


def slim_resnet(
    widths: Sequence[int], width: int = 64, stem: str = "cifar", zero_init_residual: bool = False
) -> GatedResNet:
    """A dense ResNet-18 (no gates, one BatchNorm set) whose block b has `widths[b]` conv1 channels.

    Block outputs, shortcuts and the feature dimension keep the standard widths (width x {1, 2, 4, 8}), so the
    student's features have the teacher's and the gated network's dimension.
    """
    return GatedResNet(
        width=width,
        stem=stem,
        branches=(Branch.DENSE,),
        bn_split="none",
        zero_init_residual=zero_init_residual,
        block_widths=list(widths),
    )


def slim_from_profile(profile: ChannelProfile) -> GatedResNet:
    """`slim_resnet(slim_widths(profile))` at the profiled network's width and stem."""
    return slim_resnet(slim_widths(profile), int(profile.arch["width"]), str(profile.arch["stem"]))


def checkpoint_profile(
    ckpt: str | Path,
    split: str = "train",
    data: dict[str, Any] | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> ChannelProfile:
    """The gate policy of a pretraining checkpoint on its own dataset's `split` (evaluation transform).

    data: keys of the checkpoint's `data:` block to override on this machine (e.g. {"root": "/data"}).
    The train split is the default: a student shaped on the test split would have seen it.
    """
    return method_profile(load_method(ckpt), split, data, batch_size, device)


def method_profile(
    model: Any,
    split: str = "train",
    data: dict[str, Any] | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> ChannelProfile:
    """`checkpoint_profile` of a pretraining module already loaded (`vdg.methods.checkpoint.load_method`)."""
    model, cfg = gated_method(model, data)
    return channel_profile(model.backbone, eval_loader(cfg, split, batch_size), device)


def gated_checkpoint(ckpt: str | Path, data: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(the pretraining module of `ckpt`, refused unless it serves a gated network; its config with the non-null
    `data` keys overridden for this machine, e.g. {"root": "/data"})."""
    return gated_method(load_method(ckpt), data)


def gated_method(model: Any, data: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """`gated_checkpoint` of a pretraining module already loaded."""
    require_branch(model, Branch.GATED)
    cfg = model.cfg.copy()
    OmegaConf.set_struct(cfg, False)
    for key, value in (data or {}).items():
        if value is not None:
            cfg.data[key] = value
    return model, cfg


# A gate logit this large keeps its channel on (or, negated, off) whatever the input: used for channels a compacted
# network keeps always on (the gate's weights for them are zeroed, so the logit is exactly this constant).
FORCED_LOGIT = 1e4


def compaction(profile: ChannelProfile) -> list[dict[str, Any]]:
    """Per block, what `compact_gated` does with `profile`'s channels: kept (active on some sample), always on
    (kept and active on every sample) and removed (never active) channel indices."""
    rows = []
    for freq in profile.frequency:
        kept = torch.nonzero(freq > 0).flatten()
        rows.append(
            {
                "channels": freq.numel(),
                "kept": kept.tolist(),
                "always_on": torch.nonzero(freq >= 1).flatten().tolist(),
                "removed": torch.nonzero(freq <= 0).flatten().tolist(),
            }
        )
    return rows


@torch.no_grad()
def compact_gated(backbone: nn.Module, profile: ChannelProfile) -> GatedResNet:
    """The gated network without the conv1 channels `profile` never saw active, and with the always-active ones
    left ungated (the paper's policy, made static where the data showed it static). Eval mode, gated branch only.

    Block b keeps the channels with frequency > 0 (conv1 rows, BN1 entries, conv2 columns, gate outputs); a gate
    output of an always-active channel gets zero weights and the bias +`FORCED_LOGIT`, so it is on for every
    input; a block whose channels were all never active keeps one channel, forced off. The result is a plain
    `GatedResNet` (`block_widths` = kept channels, gates with a bias), so every vdg tool, `load_backbone` and the
    sparse engine run it.

    Equality: its features equal the gated network's on every sample whose removed channels are off and whose
    always-active channels are on, which is every sample of the profiled dataset (up to float round-off).
    """
    source = branch_encoder(gated_encoder(backbone), Branch.GATED)
    channels = [block.mid_planes for block in source.blocks]
    if profile.channels != channels:
        raise ConfigError(f"the profile has {profile.channels} channels per block; this network has {channels}")
    plan = compaction(profile)
    kept = [torch.tensor(row["kept"] or [0], dtype=torch.long) for row in plan]
    gate = source.blocks[0].gate
    compact = GatedResNet(
        width=source.width,
        stem=source.stem_kind,
        branches=(Branch.GATED,),
        bn_split=source.bn_split,
        gate_reduction=gate.reduction,
        gate_temperature=gate.temperature,
        gate_bias_init=0.0,
        block_widths=[len(k) for k in kept],
    ).eval()
    state = source.state_dict()
    target = compact.state_dict()
    for key in target:
        if key not in state:  # the gate bias of a source without one: zero, the same logits
            target[key] = torch.zeros_like(target[key])
            continue
        value = state[key]
        parts = key.split(".")
        if parts[0] == "blocks":
            index, module = int(parts[1]), parts[2]
            rows = kept[index]
            if module == "conv1" or (module == "bn1" and value.ndim == 1):
                value = value.index_select(0, rows)
            elif module == "conv2":
                value = value.index_select(1, rows)
            elif module == "gate" and parts[3] == "expand":
                value = value.index_select(0, rows)
        target[key] = value.clone()
    for index, row in enumerate(plan):
        position = {c: i for i, c in enumerate(kept[index].tolist())}
        forced = [position[c] for c in row["always_on"]]
        weight = target[f"blocks.{index}.gate.expand.weight"]
        bias = target[f"blocks.{index}.gate.expand.bias"]
        weight[forced] = 0.0
        bias[forced] = FORCED_LOGIT
        if not row["kept"]:  # nothing was ever active: the one channel kept is forced off
            weight.zero_()
            bias.fill_(-FORCED_LOGIT)
    compact.load_state_dict(target, strict=True)
    return compact.eval()
