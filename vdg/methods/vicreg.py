"""VICReg (Bardes et al., 2022): dense Baseline-1 of the paper — a plain ResNet-18, no gates."""

from __future__ import annotations

from torch import Tensor

from vdg.losses import vicreg_loss
from vdg.methods.base import BaseMethod, StepOutput
from vdg.models import Branch, mlp_projector


class VICReg(BaseMethod):
    """Both views through the dense network and one projector; loss = VICReg(z0, z1).

    Config (method/vicreg.yaml): projector_hidden_dim, projector_output_dim, invariance_weight,
    variance_weight, covariance_weight, eps, variance_reduction, gather_across_processes (DDP: the loss's
    statistics over the global batch instead of each process's shard; see `vicreg_loss`).
    """

    name = "vicreg"
    branches = (Branch.DENSE,)

    def __init__(self, cfg) -> None:  # noqa: ANN001 - DictConfig
        super().__init__(cfg)
        m = cfg.method
        self.projector = mlp_projector(
            self.backbone.feature_dim, int(m.projector_hidden_dim), int(m.projector_output_dim)
        )

    def vicreg(self, z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
        m = self.cfg.method
        return vicreg_loss(
            z1,
            z2,
            float(m.invariance_weight),
            float(m.variance_weight),
            float(m.covariance_weight),
            float(m.eps),
            str(m.variance_reduction),
            bool(m.get("gather_across_processes", False)),
        )

    def ssl_step(self, views: list[Tensor], targets: Tensor) -> StepOutput:
        f0 = self.encode(views[0], Branch.DENSE).features
        f1 = self.encode(views[1], Branch.DENSE).features
        terms = self.vicreg(self.projector(f0), self.projector(f1))
        loss = terms.pop("loss")
        return StepOutput(loss, {"vicreg_loss": loss, **terms}, {Branch.DENSE: f0})
