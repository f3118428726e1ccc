"""BT-Dual: Barlow Twins (Zbontar et al., ICML 2021) in VDG's dual setting, the paper's Table 4 baseline.

Only the SSL objective differs from VDG; branches, views and gate losses must stay VDG's.
"""

from __future__ import annotations

from torch import Tensor

from vdg.losses import barlow_twins_loss
from vdg.methods.base import BaseMethod, StepOutput
from vdg.models import Branch, mlp_projector


class BTDual(BaseMethod):
    """Gated branch on view 0, dense branch on view 1, one shared projector, Barlow Twins between them.

    L = BT(g(f_gated(x0)), g(f_dense(x1))) + lambda (F_R/F_O - t_d)^2 + bound loss, with
    BT = scale * [sum_i (1 - C_ii)^2 + off_diagonal_weight * sum_{i != j} C_ij^2] (official `barlow_gating`).

    Config (method/bt_dual.yaml): projector_hidden_dim, projector_output_dim, scale (0.024),
    off_diagonal_weight (lambda_off, 0.0051).
    """

    name = "bt_dual"
    branches = (Branch.DENSE, Branch.GATED)

    def __init__(self, cfg) -> None:  # noqa: ANN001 - DictConfig
        super().__init__(cfg)
        m = cfg.method
        self.projector = mlp_projector(
            self.backbone.feature_dim, int(m.projector_hidden_dim), int(m.projector_output_dim)
        )

    def ssl_step(self, views: list[Tensor], targets: Tensor) -> StepOutput:
        m = self.cfg.method
        gated = self.encode(views[0], Branch.GATED)
        dense = self.encode(views[1], Branch.DENSE)
        terms = barlow_twins_loss(
            self.projector(gated.features),
            self.projector(dense.features),
            off_diagonal_weight=float(m.off_diagonal_weight),
            scale=float(m.scale),
        )
        barlow = terms.pop("loss")
        gate = self.gate_terms(gated)
        loss = barlow + gate["gate_loss"]
        return StepOutput(
            loss,
            {"barlow_twins_loss": barlow, **terms, **gate},
            {Branch.GATED: gated.features, Branch.DENSE: dense.features},
        )
