"""VICReg-Dual-Gating (Krishna et al., BMVC 2023): one encoder trained as a gated and a dense network."""

from __future__ import annotations

from torch import Tensor, nn

from vdg.methods.base import StepOutput
from vdg.methods.vicreg import VICReg
from vdg.models import BackboneOutput, Branch, mlp_projector


class VDG(VICReg):
    """Gated branch on view 0, dense branch on view 1, VICReg between their embeddings (reference §1.2).

    L = VICReg(g(f_gated(x0)), g(f_dense(x1))) + lambda (F_R/F_O - t_d)^2 + bound loss. No stop-gradient:
    both passes train the shared convolutions; each branch has its own block BNs.

    Options (method/vdg.yaml):
        separate_projectors: one projector per branch instead of the shared one (the paper's Fig. 1 reading).
        symmetric: also compare gated(x1) with dense(x0) and average the two VICReg losses; the gate losses
            then see both gated passes (4 backbone passes per step instead of 2).
        invariance_weight: 0 gives the "w/o invariance" ablation (paper Table 6).
    """

    name = "vdg"
    branches = (Branch.DENSE, Branch.GATED)

    def __init__(self, cfg) -> None:  # noqa: ANN001 - DictConfig
        super().__init__(cfg)
        m = cfg.method
        self.dense_projector: nn.Module = self.projector
        if m.separate_projectors:
            self.dense_projector = mlp_projector(
                self.backbone.feature_dim, int(m.projector_hidden_dim), int(m.projector_output_dim)
            )

    def pair(self, gated_view: Tensor, dense_view: Tensor) -> tuple[dict[str, Tensor], BackboneOutput, Tensor]:
        """VICReg terms of gated(gated_view) vs dense(dense_view), the gated pass and the dense features."""
        gated = self.encode(gated_view, Branch.GATED)
        dense = self.encode(dense_view, Branch.DENSE)
        terms = self.vicreg(self.projector(gated.features), self.dense_projector(dense.features))
        return terms, gated, dense.features

    def ssl_step(self, views: list[Tensor], targets: Tensor) -> StepOutput:
        terms, gated, f_dense = self.pair(views[0], views[1])
        gated_passes = [gated]
        if self.cfg.method.symmetric:
            terms2, gated2, _ = self.pair(views[1], views[0])
            terms = {k: (v + terms2[k]) / 2 for k, v in terms.items()}
            gated_passes.append(gated2)
        gate = self.gate_terms(*gated_passes)
        vicreg = terms.pop("loss")
        loss = vicreg + gate["gate_loss"]
        return StepOutput(
            loss, {"vicreg_loss": vicreg, **terms, **gate}, {Branch.GATED: gated.features, Branch.DENSE: f_dense}
        )
