"""Tests for the baseline and ablation methods: VICReg-Gating, BT-Dual, VDG 2x ResNet-18, VDG w/o invariance.

Tiny width-4 backbones on random tensors; only the vdg_2x round trip runs a (seconds-long) Lightning fit.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from vdg.losses import barlow_twins_loss
from vdg.methods import METHODS, VDG, BTDual, VDG2x, VICRegGating, build_method
from vdg.methods.checkpoint import load_method, require_branch
from vdg.models import BackboneOutput, Branch, BranchNorm, GatedResNet
from vdg.models.flops import network_cost

from .conftest import TINY, compose_config

NEW_METHODS = ("vicreg_gating", "bt_dual", "vdg_2x")
BATCH = 16


@pytest.fixture(autouse=True)
def _one_thread():
    """Width-4 models gain nothing from a second thread, and on shared busy cores two threads thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(seed: int = 0) -> tuple[list[Tensor], Tensor]:
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(BATCH, 3, 32, 32, generator=generator) for _ in range(2)]
    return views, torch.randint(0, 10, (BATCH,), generator=generator)


Call = tuple[str, Branch, Tensor, BackboneOutput]


def view_index(x: Tensor, views: list[Tensor]) -> int:
    """Which view an encoder saw (by value: the method may change the memory format, e.g. channels_last)."""
    return next(i for i, v in enumerate(views) if torch.equal(x, v))


def spy(monkeypatch: pytest.MonkeyPatch, encoder: nn.Module, tag: str, calls: list[Call]) -> None:
    """Record (tag, branch, input, output) of every forward of `encoder`."""
    original = encoder.forward

    def forward(x: Tensor, branch: str | Branch = Branch.DENSE) -> BackboneOutput:
        out = original(x, branch)
        calls.append((tag, Branch.parse(branch), x, out))
        return out

    monkeypatch.setattr(encoder, "forward", forward)


def seeded(fn: Callable, seed: int = 1):  # noqa: ANN201 - whatever fn returns
    """Call `fn` with the global RNG reset, so the gates sample the same masks every time."""
    torch.manual_seed(seed)
    return fn()


# ----- registry and configs --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, cls", [("vicreg_gating", VICRegGating), ("bt_dual", BTDual), ("vdg_2x", VDG2x)])
def test_registered_and_built_from_its_config(name, cls, tiny_cfg):
    assert METHODS[name] is cls and cls.name == name
    cfg = tiny_cfg(f"method={name}")
    assert cfg.method.name == name
    assert type(build_method(cfg)) is cls


def test_bt_dual_config_has_the_official_defaults(tiny_cfg):
    m = tiny_cfg("method=bt_dual").method
    assert (m.scale, m.off_diagonal_weight) == (0.024, 0.0051)


# ----- every new method trains ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW_METHODS)
def test_loss_decreases_on_a_fixed_batch(name, tiny_cfg):
    torch.manual_seed(0)
    model = build_method(tiny_cfg(f"method={name}"))
    views, targets = batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = seeded(lambda: model.ssl_step(views, targets).loss).item()
    for step in range(15):
        optimizer.zero_grad()
        seeded(lambda: model.ssl_step(views, targets).loss, seed=step + 2).backward()
        optimizer.step()
    end = seeded(lambda: model.ssl_step(views, targets).loss).item()
    assert end < start


# ----- VICReg-Gating (Baseline-2) -------------------------------------------------------------------------
def test_vicreg_gating_runs_only_the_gated_network_on_both_views(tiny_cfg, monkeypatch):
    model = build_method(tiny_cfg("method=vicreg_gating"))
    calls: list[Call] = []
    spy(monkeypatch, model.backbone, "backbone", calls)
    views, targets = batch()
    step = model.ssl_step(views, targets)
    assert [(c[1], view_index(c[2], views)) for c in calls] == [(Branch.GATED, 0), (Branch.GATED, 1)]
    assert set(step.features) == {Branch.GATED} and set(model.probes) == {"gated"}


def test_vicreg_gating_has_one_bn_set_and_no_dense_branch(tiny_cfg):
    model = build_method(tiny_cfg("method=vicreg_gating"))
    assert model.backbone.branches == (Branch.GATED,)
    norms = [m for m in model.backbone.modules() if isinstance(m, BranchNorm)]
    assert norms and all(list(m.norms) == ["shared"] for m in norms)
    with pytest.raises(ValueError, match="no 'dense' branch"):
        model.backbone(torch.randn(2, 3, 32, 32), "dense")


def test_vicreg_gating_sums_the_gate_losses_of_both_views(tiny_cfg, monkeypatch):
    model = build_method(tiny_cfg("method=vicreg_gating"))
    calls: list[Call] = []
    spy(monkeypatch, model.backbone, "backbone", calls)
    step = model.ssl_step(*batch())
    gate0, gate1 = (model.gate_terms(c[3]) for c in calls)
    assert torch.allclose(step.terms["gate_loss"], gate0["gate_loss"] + gate1["gate_loss"])
    assert torch.allclose(step.terms["budget_loss"], gate0["budget_loss"] + gate1["budget_loss"])
    assert torch.allclose(step.terms["flops_ratio"], (gate0["flops_ratio"] + gate1["flops_ratio"]) / 2)
    assert torch.allclose(step.loss, step.terms["vicreg_loss"] + step.terms["gate_loss"])


# ----- BT-Dual --------------------------------------------------------------------------------------------
def test_bt_dual_runs_gated_on_view0_and_dense_on_view1(tiny_cfg, monkeypatch):
    model = build_method(tiny_cfg("method=bt_dual"))
    calls: list[Call] = []
    spy(monkeypatch, model.backbone, "backbone", calls)
    views, targets = batch()
    model.ssl_step(views, targets)
    assert [(c[1], view_index(c[2], views)) for c in calls] == [(Branch.GATED, 0), (Branch.DENSE, 1)]


def test_bt_dual_loss_is_barlow_twins_on_the_shared_projector_plus_gate_losses(tiny_cfg, monkeypatch):
    model = build_method(tiny_cfg("method=bt_dual"))
    calls: list[Call] = []
    spy(monkeypatch, model.backbone, "backbone", calls)
    step = model.ssl_step(*batch())
    gated, dense = calls[0][3], calls[1][3]
    barlow = barlow_twins_loss(
        model.projector(gated.features), model.projector(dense.features), off_diagonal_weight=0.0051, scale=0.024
    )["loss"]
    gate = model.gate_terms(gated)["gate_loss"]
    assert torch.allclose(step.loss, barlow + gate, rtol=1e-5)
    assert [name for name, m in model.named_children() if isinstance(m, nn.Sequential)] == ["projector"]


# ----- VDG with two encoders ------------------------------------------------------------------------------
def test_vdg_2x_runs_the_gated_encoder_on_view0_and_the_dense_encoder_on_view1(tiny_cfg, monkeypatch):
    model = build_method(tiny_cfg("method=vdg_2x"))
    calls: list[Call] = []
    spy(monkeypatch, model.backbone.gated_encoder, "gated_encoder", calls)
    spy(monkeypatch, model.backbone.dense_encoder, "dense_encoder", calls)
    views, targets = batch()
    model.ssl_step(views, targets)
    assert [(c[0], c[1], view_index(c[2], views)) for c in calls] == [
        ("gated_encoder", Branch.GATED, 0),
        ("dense_encoder", Branch.DENSE, 1),
    ]


def test_vdg_2x_encoders_share_no_parameters_and_the_projector_is_shared(tiny_cfg, monkeypatch):
    model = build_method(tiny_cfg("method=vdg_2x"))
    gated, dense = model.backbone.gated_encoder, model.backbone.dense_encoder
    assert isinstance(gated, GatedResNet) and isinstance(dense, GatedResNet)
    assert gated.branches == (Branch.GATED,) and dense.branches == (Branch.DENSE,)
    assert not {p.data_ptr() for p in gated.parameters()} & {p.data_ptr() for p in dense.parameters()}
    assert dense.blocks[0].gate is None and not any("norms.dense" in n for n, _ in gated.named_parameters())
    # one projector module, applied to both embeddings
    assert model.dense_projector is model.projector
    inputs: list[Tensor] = []
    model.projector.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    calls: list[Call] = []
    spy(monkeypatch, gated, "gated_encoder", calls)
    spy(monkeypatch, dense, "dense_encoder", calls)
    model.ssl_step(*batch())
    assert len(inputs) == 2
    assert inputs[0] is calls[0][3].features and inputs[1] is calls[1][3].features


def test_vdg_2x_gate_losses_train_only_the_gated_encoder(tiny_cfg):
    model = build_method(tiny_cfg("method=vdg_2x"))
    step = model.ssl_step(*batch())
    step.terms["gate_loss"].backward(retain_graph=True)
    assert all(p.grad is None for p in model.backbone.dense_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.gated_encoder.parameters())
    model.zero_grad()
    step.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.dense_encoder.parameters())


def test_vdg_2x_gated_encoder_keeps_its_weight_decay(tiny_cfg):
    """Only the gating networks lose their weight decay, not the whole gated encoder."""
    model = build_method(tiny_cfg("method=vdg_2x", "scheduler.name=constant"))
    groups = {g["name"]: {id(p) for p in g["params"]} for g in model.configure_optimizers().param_groups}
    for encoder in (model.backbone.gated_encoder, model.backbone.dense_encoder):
        assert id(encoder.conv1.weight) in groups["decay"]
        assert id(encoder.blocks[0].conv1.weight) in groups["decay"]
    assert id(model.backbone.gated_encoder.blocks[0].gate.reduce.weight) in groups["gates"]


def test_vdg_2x_costs_and_validation_use_the_right_encoder(tiny_cfg, monkeypatch):
    model = build_method(tiny_cfg("method=vdg_2x"))
    assert model.cost == network_cost(model.backbone.gated_encoder, 32)
    calls: list[Call] = []
    spy(monkeypatch, model.backbone.gated_encoder, "gated_encoder", calls)
    spy(monkeypatch, model.backbone.dense_encoder, "dense_encoder", calls)
    model.eval()
    views, targets = batch()
    model.validation_step((views[0], targets), 0)
    assert sorted((c[0], c[1].value) for c in calls) == [("dense_encoder", "dense"), ("gated_encoder", "gated")]


@pytest.fixture(scope="module")
def vdg_2x_run(tmp_path_factory) -> dict:
    """The summary of a 1-epoch vdg_2x pretraining on synthetic data (with the final k-NN of both branches)."""
    from vdg.run.driver import pretrain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("vdg_2x") / "run"
    try:
        return pretrain(compose_config([*TINY, "method=vdg_2x", "final_knn.enabled=true", f"run_dir={run_dir}"]))
    finally:
        torch.set_num_threads(threads)


def test_vdg_2x_pretrains_saves_and_reloads(vdg_2x_run):
    assert set(vdg_2x_run["knn"]) >= {"dense", "gated", "flops_ratio"}
    assert vdg_2x_run["method"] == "vdg_2x"
    model = load_method(vdg_2x_run["checkpoint"], expected_method="vdg_2x")
    assert isinstance(model.backbone.dense_encoder, GatedResNet)
    x = torch.randn(4, 3, 32, 32)
    for branch in ("dense", "gated"):
        require_branch(model, branch)
    with torch.no_grad():
        dense = model.backbone.dense_encoder(x, "dense").features
        assert torch.equal(model.backbone(x, "dense").features, dense)
        assert not torch.allclose(model.backbone(x, "gated").features, dense)


def test_vdg_2x_checkpoints_evaluate_both_branches(vdg_2x_run, tmp_path):
    api = pytest.importorskip("vdg.eval.api")
    records = api.evaluate_checkpoint(vdg_2x_run["checkpoint"], "knn", results_dir=str(tmp_path))
    assert {(r["method"], r["branch"]) for r in records} == {("vdg_2x", "dense"), ("vdg_2x", "gated")}
    gated = next(r for r in records if r["branch"] == "gated")
    assert 0 < gated["flops_reduction"] < 1


# ----- VDG w/o invariance (Table 6) -----------------------------------------------------------------------
def test_vdg_without_invariance_is_variance_covariance_plus_gate_losses(tiny_cfg):
    torch.manual_seed(0)
    with_invariance = build_method(tiny_cfg("method=vdg"))
    without = build_method(tiny_cfg("method=vdg", "method.invariance_weight=0"))
    assert type(without) is VDG
    without.load_state_dict(with_invariance.state_dict())
    views, targets = batch()
    full = seeded(lambda: with_invariance.ssl_step(views, targets))
    ablated = seeded(lambda: without.ssl_step(views, targets))
    t = ablated.terms
    assert torch.allclose(ablated.loss, 25.0 * t["variance"] + 1.0 * t["covariance"] + t["gate_loss"])
    assert t["invariance"] > 0  # still computed and logged, just not optimised
    assert torch.allclose(full.loss - ablated.loss, 25.0 * full.terms["invariance"], rtol=1e-4)
