"""One branch of a trained encoder as its own network: `branch_encoder` cuts it out of a two-branch `GatedResNet`
(or vdg_2x's pair), `build_encoder` rebuilds one from an export's architecture record, `BranchBackbone` serves it
with its branch fixed. Shared by exports, slim networks, benchmarks and distillation teachers; builds, never
reads or writes files.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vdg.core.errors import CheckpointError, ConfigError
from vdg.models.branch import Branch
from vdg.models.inputs import check_images
from vdg.models.resnet import BackboneOutput, GatedResNet


class BranchBackbone(nn.Module):
    """A `GatedResNet` with its branch fixed: forward(x [N, 3, H, W]) -> features [N, feature_dim] (512 at width 64).

    In eval mode (as `load_backbone` returns it) the gated branch uses the deterministic masks 1[logit >= 0]
    of the paper's inference; in train mode it samples them. `encode(x)` returns the `BackboneOutput` with the
    masks. `config` is the export JSON: architecture, branch, t_d, input normalisation (mean/std), provenance.
    """

    def __init__(
        self, encoder: GatedResNet, branch: str | Branch, config: dict[str, Any] | None = None,
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        # False for a distillation teacher: its inputs are the training step's views, already checked by the
        # data pipeline, and the finite check would read a value back to the host on every step
        self.check_inputs = check_inputs
        self.branch = Branch.parse(branch)
        if self.branch not in encoder.branches:
            raise ConfigError(f"the encoder serves {[b.value for b in encoder.branches]}, not {self.branch.value!r}")
        self.encoder = encoder
        self.config = dict(config or {})

    @property
    def feature_dim(self) -> int:
        return self.encoder.feature_dim

    def encode(self, x: Tensor) -> BackboneOutput:
        if self.check_inputs:
            x = check_images(x, self.encoder.conv1.weight.device)
        return self.encoder(x, self.branch)

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x).features


def build_encoder(arch: dict[str, Any], branch: Branch, gate_temperature: float) -> GatedResNet:
    if arch.get("name") != "resnet18":
        raise CheckpointError(f"cannot build backbone {arch.get('name')!r}; vdg exports resnet18 encoders")
    return GatedResNet(
        width=int(arch["width"]),
        stem=str(arch["stem"]),
        branches=(branch,),
        bn_split=str(arch["bn_split"]),
        gate_reduction=int(arch["gate_reduction"] or 4),
        gate_temperature=float(gate_temperature),
        gate_bias_init=0.0 if arch["gate_bias"] else None,  # the value is overwritten by the loaded weights
        block_widths=arch.get("block_widths"),  # absent in exports written before slim networks existed
    )


def branch_encoder(backbone: nn.Module, branch: str | Branch) -> GatedResNet:
    """A single-branch `GatedResNet` computing exactly `backbone(x, branch)`.

    It keeps the branch's own BatchNorms (or the shared ones) and, for the gated branch, the gates; the other
    branch's BatchNorms, and the gates of a dense export, are left out. vdg_2x's `TwoEncoders` gives the
    encoder of that branch.
    """
    branch = Branch.parse(branch)
    source = backbone
    if not isinstance(source, GatedResNet):  # vdg_2x: one encoder per branch
        source = backbone.gated_encoder if branch is Branch.GATED else backbone.dense_encoder
    if branch not in source.branches:
        raise ConfigError(f"this backbone serves {[b.value for b in source.branches]}, not {branch.value!r}")
    gate = source.blocks[0].gate
    encoder = build_encoder(source.arch_config(), branch, gate.temperature if gate is not None else 2.0 / 3.0)
    weights = source.state_dict()
    state = {}
    for key in encoder.state_dict():
        # single-branch encoders name every BatchNorm "shared"; the source may name it after the branch
        candidates = (key.replace(".norms.shared.", f".norms.{branch.value}."), key)
        found = next((k for k in candidates if k in weights), None)
        if found is None:
            raise CheckpointError(f"the {branch.value} branch has no weights for {key!r}")
        state[key] = weights[found].detach().clone()
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()
