"""VDG with two base encoders (paper Table 5, "2x ResNet-18"): a gated ResNet-18 and a separate dense one.

The objective is VDG's; only the weight sharing goes. It must not change the loss, the views or the projector.
"""

from __future__ import annotations

from torch import Tensor, nn

from vdg.methods.base import build_backbone
from vdg.methods.vdg import VDG
from vdg.models import BackboneOutput, Branch, GatedResNet, network_cost


class TwoEncoders(nn.Module):
    """A gated-only and a dense-only `GatedResNet` behind one backbone interface: forward(x, branch).

    As `model.backbone`, it lets everything that reads a backbone by branch (online probes, k-NN, linear
    evaluation, checkpoints) reach the right encoder without knowing there are two. The encoders share no
    parameters and each has a single BatchNorm set (one branch each).
    """

    def __init__(self, gated: GatedResNet, dense: GatedResNet) -> None:
        super().__init__()
        if gated.branches != (Branch.GATED,) or dense.branches != (Branch.DENSE,):
            # not user input: how vdg_2x builds its encoders
            raise ValueError("TwoEncoders needs a gated-only and a dense-only GatedResNet")
        self.encoders = nn.ModuleList([gated, dense])
        self.branches = (Branch.DENSE, Branch.GATED)
        self.feature_dim = gated.feature_dim

    @property
    def gated_encoder(self) -> GatedResNet:
        return self.encoders[0]

    @property
    def dense_encoder(self) -> GatedResNet:
        return self.encoders[1]

    @property
    def gated(self) -> bool:
        return True

    def forward(self, x: Tensor, branch: str | Branch = Branch.DENSE) -> BackboneOutput:
        branch = Branch.parse(branch)
        encoder = self.gated_encoder if branch is Branch.GATED else self.dense_encoder
        return encoder(x, branch)

    def arch_config(self) -> dict:
        return {
            "name": "2x resnet18",
            "gated": self.gated_encoder.arch_config(),
            "dense": self.dense_encoder.arch_config(),
        }


class VDG2x(VDG):
    """VDG (gated view 0 vs dense view 1, shared projector) with `TwoEncoders` as the backbone.

    The budget and bound losses reach only the gated encoder, so nothing trades sparsity against the dense
    network's invariance (the paper's reading of Table 5). Config: method/vdg_2x.yaml (method/vdg.yaml's keys).
    """

    name = "vdg_2x"
    branches = (Branch.DENSE, Branch.GATED)

    def build_backbone(self, cfg) -> TwoEncoders:  # noqa: ANN001 - DictConfig
        # Table 5: two encoders that share no weights instead of one dual encoder.
        return TwoEncoders(build_backbone(cfg, (Branch.GATED,)), build_backbone(cfg, (Branch.DENSE,)))

    def build_cost(self, cfg):  # noqa: ANN001, ANN201
        return network_cost(self.backbone.gated_encoder, int(cfg.dataset.image_size))
