import math

import pytest
import torch

from vdg.losses import barlow_twins_loss, bound_annealing, bound_channel_counts, bound_loss, budget_loss, vicreg_loss
from vdg.methods import build_method
from vdg.models import BackboneOutput


def test_vicreg_matches_hand_computation():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    z2 = torch.tensor([[0.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    out = vicreg_loss(z1, z2)
    # invariance: mean of squared differences over N*D = (1 + 0 + 0 + 1 + 1 + 0) / 6
    assert out["invariance"].item() == pytest.approx(3 / 6)
    # unbiased variances: z1 cols (1/3, 1), z2 cols (4/3, 1/3)

    def v(var):
        return max(0.0, 1 - math.sqrt(var + 1e-4))

    expected_var = (v(1 / 3) + v(1.0)) / 2 + (v(4 / 3) + v(1 / 3)) / 2
    assert out["variance"].item() == pytest.approx(expected_var, rel=1e-5)
    # covariances: cov(z1) off-diagonal = -0.5, cov(z2) off-diagonal = 1/3; sum over i!=j of squares / D
    expected_cov = (2 * 0.25) / 2 + (2 * (1 / 9)) / 2
    assert out["covariance"].item() == pytest.approx(expected_cov, rel=1e-5)
    total = 25 * 0.5 + 25 * expected_var + 1 * expected_cov
    assert out["loss"].item() == pytest.approx(total, rel=1e-5)


def test_vicreg_variance_reduction_option():
    z1, z2 = torch.randn(16, 8) * 0.1, torch.randn(16, 8) * 0.1
    summed = vicreg_loss(z1, z2, variance_reduction="sum")["variance"]
    mean = vicreg_loss(z1, z2, variance_reduction="mean")["variance"]
    assert summed.item() == pytest.approx(2 * mean.item())
    with pytest.raises(ValueError, match="allowed values: \\['sum', 'mean'\\]"):
        vicreg_loss(z1, z2, variance_reduction="max")


def test_vicreg_weights_and_zero_invariance():
    z1, z2 = torch.randn(32, 4), torch.randn(32, 4)
    full = vicreg_loss(z1, z2)
    no_inv = vicreg_loss(z1, z2, invariance_weight=0.0)
    assert no_inv["loss"].item() == pytest.approx(full["loss"].item() - 25 * full["invariance"].item(), rel=1e-5)


def test_budget_loss_by_hand():
    assert budget_loss(torch.tensor(0.5), 0.3).item() == pytest.approx(5 * 0.04)
    assert budget_loss(torch.tensor(0.3), 0.3).item() == 0.0
    assert budget_loss(torch.tensor(0.1), 0.3, weight=2.0).item() == pytest.approx(2 * 0.04)


def test_bound_loss_by_hand():
    density = torch.tensor([0.1, 0.5, 0.99])
    budget = 0.25  # s = sqrt(0.25) = 0.5
    p = 1.0  # bounds [p*s, 1 - p + p*s] = [0.5, 0.5]
    expected = ((0.5 - 0.1) ** 2 + 0 + (0.99 - 0.5) ** 2) / 3
    assert bound_loss(density, budget, p).item() == pytest.approx(expected, rel=1e-5)
    # p = 0.5: bounds [0.25, 0.75]
    expected = ((0.25 - 0.1) ** 2 + 0 + (0.99 - 0.75) ** 2) / 3
    assert bound_loss(density, budget, 0.5).item() == pytest.approx(expected, rel=1e-5)
    # linear target: s = t_d
    expected = ((0.25 - 0.1) ** 2 + (0.5 - 0.25) ** 2 + (0.99 - 0.25) ** 2) / 3
    assert bound_loss(density, budget, 1.0, target="linear").item() == pytest.approx(expected, rel=1e-5)
    assert bound_loss(density, budget, 0.0).item() == 0.0
    with pytest.raises(ValueError, match="bound_target"):
        bound_loss(density, budget, 1.0, target="cube")


def test_bound_annealing_schedule():
    assert bound_annealing(0) == 1.0
    assert bound_annealing(50) == pytest.approx(0.3679, abs=1e-4)
    assert bound_annealing(500) == pytest.approx(4.54e-5, rel=1e-2)


def test_barlow_twins_by_hand():
    torch.manual_seed(0)
    z = torch.randn(64, 8)
    perfect = barlow_twins_loss(z, z)
    zs = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    corr = zs.T @ zs / 64
    on = ((1 - corr.diagonal()) ** 2).sum()
    off = corr.pow(2).sum() - corr.diagonal().pow(2).sum()
    assert perfect["on_diagonal"].item() == pytest.approx(on.item(), abs=1e-5)
    assert perfect["loss"].item() == pytest.approx(0.024 * (on + 0.0051 * off).item(), rel=1e-4)
    unrelated = barlow_twins_loss(z, torch.randn(64, 8))
    assert unrelated["loss"] > perfect["loss"]


# ----- the gradient each gate loss sends to the masks (reference §1.8) -----------------------------------------
def quarter_open_masks(model) -> list[torch.Tensor]:  # noqa: ANN001 - a gated method
    """One leaf mask [4, C_b] per block with the first quarter of the channels open (density 0.25)."""
    masks = []
    for block in model.cost.blocks:
        mask = torch.zeros(4, block.channels)
        mask[:, : block.channels // 4] = 1.0
        masks.append(mask.requires_grad_())
    return masks


def mask_gradients(model, masks, term: str) -> list[torch.Tensor]:  # noqa: ANN001
    terms = model.gate_terms(BackboneOutput(torch.zeros(4, 32), tuple(masks)))
    return list(torch.autograd.grad(terms[term], masks))


def bound_gradient_per_channel(model, channels: int) -> float:  # noqa: ANN001
    """d bound / d m for one entry of a block at density 0.25: gamma/B * -2 (p s - rho) / (N C_b), p = 1."""
    s = math.sqrt(model.budget)
    return -2 * (s - 0.25) / (len(model.cost.blocks) * 4 * channels)


@pytest.mark.parametrize("option", [None, "open", "all"])
def test_bound_loss_gradient_reaches_open_channels_only_unless_asked(tiny_cfg, option):
    """Official (default, "open"): the L1 norm of the mask, so a closed channel gets no push from the bound loss.
    "all": the sum, every channel of a block gets the same push."""
    model = build_method(tiny_cfg() if option is None else tiny_cfg(f"gating.bound_gradient={option}"))
    masks = quarter_open_masks(model)
    for mask, grad, block in zip(masks, mask_gradients(model, masks, "bound_loss"), model.cost.blocks, strict=True):
        expected = torch.full_like(grad, bound_gradient_per_channel(model, block.channels))
        if option != "all":
            expected = expected * mask.detach()
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=0)


def test_budget_loss_gradient_reaches_every_channel(tiny_cfg):
    """The FLOPs ratio counts channels with the mask's sum whatever gating.bound_gradient (as officially)."""
    model = build_method(tiny_cfg())
    masks = quarter_open_masks(model)
    ratio = model.gate_terms(BackboneOutput(torch.zeros(4, 32), tuple(masks)))["flops_ratio"].item()
    scale = 2 * 5.0 * (ratio - model.budget) / (4 * model.cost.dense_macs)  # lambda = 5, N = 4
    for grad, block in zip(mask_gradients(model, masks, "budget_loss"), model.cost.blocks, strict=True):
        torch.testing.assert_close(grad, torch.full_like(grad, scale * block.per_channel), rtol=1e-5, atol=0)


def test_bound_channel_counts_values_and_bad_option():
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    for gradient in ("open", "all"):
        assert bound_channel_counts([mask, mask[:, :2]], gradient).tolist() == [[2.0, 1.0], [1.0, 0.0]]
    with pytest.raises(ValueError, match=r"gating.bound_gradient 'some'; allowed values: \['open', 'all'\]"):
        bound_channel_counts([mask], "some")


def test_gate_terms_takes_the_gated_pass_not_its_channel_counts(tiny_cfg):
    model = build_method(tiny_cfg())
    with pytest.raises(TypeError, match="not their active_channels"):
        model.gate_terms(torch.ones(4, 8))


# ----- float32 whatever the autocast ---------------------------------------------------------------------------
def loss_and_gradients(loss_fn, z1: torch.Tensor, z2: torch.Tensor, autocast: bool) -> list[torch.Tensor]:  # noqa: ANN001
    z1, z2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        terms = loss_fn(z1, z2)
    grads = torch.autograd.grad(terms["loss"], [z1, z2])
    return [t.detach() for t in terms.values()] + list(grads)


@pytest.mark.parametrize("loss_fn", [vicreg_loss, barlow_twins_loss], ids=["vicreg", "barlow_twins"])
def test_ssl_losses_are_float32_under_bf16_autocast(loss_fn):
    """The covariance / cross-correlation matmuls must not be recast to bf16 (VICReg was 0.2% off, Barlow Twins'
    on-diagonal term quantised to 0 near invariance)."""
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(64, 128, generator=generator)
    z2 = z1 + 0.05 * torch.randn(64, 128, generator=generator)  # nearly invariant views
    autocast = loss_and_gradients(loss_fn, z1, z2, autocast=True)
    for value, fp32 in zip(autocast, loss_and_gradients(loss_fn, z1, z2, autocast=False), strict=True):
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, fp32, rtol=1e-5, atol=0)  # the bar: within 1e-5 relative
