"""VICReg-Gating (Krishna et al., IMVIP 2022): the gated-only Baseline-2 of the paper's Table 1.

One encoder that only ever runs gated (no dense branch, one BN set); a dense pass here would make it VDG.
"""

from __future__ import annotations

from torch import Tensor

from vdg.methods.base import StepOutput
from vdg.methods.vicreg import VICReg
from vdg.models import Branch


class VICRegGating(VICReg):
    """Both views through the gated network and one projector; VICReg between the two gated embeddings.

    L = VICReg(g(f_gated(x0)), g(f_gated(x1))) + sum over both views of [lambda (F_R/F_O - t_d)^2 + bound loss].
    The budget and bound losses of the two views are summed, as the Baseline-2 paper's own code (SSL_DGC,
    reference §2: `sp1_l + sp2_l`), so each view's gated pass is held to t_d. The backbone is built with
    branches=("gated",): no dense branch and hence no per-branch BatchNorm.

    Config: method/vicreg_gating.yaml (the same keys as method/vicreg.yaml).
    """

    name = "vicreg_gating"
    branches = (Branch.GATED,)

    def ssl_step(self, views: list[Tensor], targets: Tensor) -> StepOutput:
        out0 = self.encode(views[0], Branch.GATED)
        out1 = self.encode(views[1], Branch.GATED)
        terms = self.vicreg(self.projector(out0.features), self.projector(out1.features))
        vicreg = terms.pop("loss")
        gate0, gate1 = self.gate_terms(out0), self.gate_terms(out1)
        gate = {k: v + gate1[k] for k, v in gate0.items()}
        gate["flops_ratio"] = gate["flops_ratio"] / 2  # a ratio: logged as the two views' mean, not their sum
        loss = vicreg + gate["gate_loss"]
        return StepOutput(loss, {"vicreg_loss": vicreg, **terms, **gate}, {Branch.GATED: out0.features})
