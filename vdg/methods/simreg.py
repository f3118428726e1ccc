"""SimReg (Navaneet et al., "SimReg: Regression as a Simple Yet Effective Tool for Self-supervised Knowledge
Distillation", BMVC 2021): the student, through a deep MLP head, regresses the frozen teacher's features."""

from __future__ import annotations

from torch import Tensor, nn

from vdg.losses.distill import simreg_loss
from vdg.methods.base import StepOutput
from vdg.methods.distill import DistillMethod
from vdg.models import Branch


def mlp_block(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> BN1d -> ReLU -> Linear: [N, in_dim] -> [N, out_dim]."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


class SimReg(DistillMethod):
    """L = || normalise(g(f_S(x))) - normalise(f_T(x)) ||^2, batch mean (= 2 - 2 cos), `simreg_loss`.

    The student and the teacher see the same image (view 0, SimReg's "single_aug"), weakly augmented by the
    recipe (configs/recipe/simreg.yaml: random resized crop + flip). g is SimReg's 4-layer MLP head used only
    while distilling: a projector (Linear d->2d, BN, ReLU, Linear 2d->d) then a predictor (Linear d->2d, BN,
    ReLU, Linear 2d->D_T), no BN or ReLU between the two, d the student's feature dimension (512 for a
    ResNet-18) and D_T the teacher's. The student's backbone features (before g) are what is evaluated.

    Config (method/simreg.yaml): projector_hidden_dim (null: 2d), projector_output_dim (null: d),
    predictor_hidden_dim (null: 2d), predictor_output_dim (null: the teacher's dimension, resolved at start),
    teacher_output (features: the teacher's pooled backbone features, SimReg's default; embedding: after its
    head). Defaults from the SimReg paper and its authors' released settings (4-layer head, normalised MSE,
    same weak view for both networks, SGD lr 0.05, weight decay 1e-4, cosine, batch 256, 130 epochs).
    """

    name = "simreg"
    target_dim_key = "predictor_output_dim"

    def __init__(self, cfg) -> None:  # noqa: ANN001 - DictConfig
        super().__init__(cfg)
        m, d = cfg.method, self.backbone.feature_dim
        hidden = int(m.projector_hidden_dim or 2 * d)
        middle = int(m.projector_output_dim or d)
        self.projector = mlp_block(d, hidden, middle)
        self.predictor = mlp_block(middle, int(m.predictor_hidden_dim or 2 * d), int(m.predictor_output_dim))

    def ssl_step(self, views: list[Tensor], targets: Tensor) -> StepOutput:
        x = views[0]
        features = self.encode(x, Branch.DENSE).features
        loss = simreg_loss(self.predictor(self.projector(features)), self.teacher_output(x))
        return StepOutput(loss, {"simreg_loss": loss}, {Branch.DENSE: features})
