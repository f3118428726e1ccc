"""Backbone export (vdg/deploy/export.py, scripts/export.py): exported weights load into a fresh model and reproduce the
checkpoint's features exactly, for both branches of every backbone layout."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import vdg
from vdg.core.errors import CheckpointError
from vdg.deploy.export import export_backbone, export_name, load_backbone
from vdg.methods import build_method
from vdg.methods.checkpoint import load_method
from vdg.models import Branch, GatedResNet
from vdg.models.encoder import BranchBackbone, branch_encoder
from vdg.run.driver import pretrain

from .conftest import TINY, compose_config

REPO = Path(__file__).resolve().parents[1]


def randomise_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm its own random statistics and affine parameters, so that a dense/gated mix-up of
    the per-branch BN sets (or of shared and split ones) changes the features."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


def write_checkpoint(path: Path, *overrides: str) -> Path:
    """A checkpoint file as Lightning writes it (state_dict + hyper_parameters.cfg) for an untrained model whose
    BatchNorms were randomised: every layout (bn_split, method, bias) without a training run."""
    cfg = compose_config([*TINY, "dataset=synthetic", *overrides])
    model = build_method(cfg)
    randomise_norms(model)
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "epoch": 3, "global_step": 12},
        path,
    )
    return path


def reference_features(ckpt: Path, branch: str, images: torch.Tensor) -> torch.Tensor:
    model = load_method(ckpt)  # eval mode: deterministic gates
    with torch.no_grad():
        return model.backbone(images, Branch.parse(branch)).features


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory) -> Path:
    """last.ckpt of a 1-epoch VDG pretraining (width 4, 64 synthetic images)."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("export") / "run"
    return Path(pretrain(compose_config([*TINY, f"run_dir={run_dir}", "probe.enabled=false"]))["checkpoint"])


IMAGES = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("branch", ["dense", "gated"])
def test_export_reproduces_the_trained_checkpoint_features(trained_ckpt, tmp_path, branch):
    paths = export_backbone(trained_ckpt, branch, out_dir=tmp_path)
    expected = reference_features(trained_ckpt, branch, IMAGES)
    for weights in (paths["pt"], paths["safetensors"], paths["json"]):
        model = load_backbone(weights, branch=branch)
        assert isinstance(model, BranchBackbone) and not model.training
        with torch.no_grad():
            assert torch.equal(model(IMAGES), expected), weights.name
    assert expected.shape == (6, 32)  # width 4: 8 x width features (512 at the paper's width 64)


@pytest.mark.parametrize(
    "layout",
    [
        ("method=vdg", "backbone.bn_split=blocks"),
        ("method=vdg", "backbone.bn_split=all", "backbone.gate_bias_init=2.0"),
        ("method=vdg", "backbone.bn_split=none"),
        ("method=vdg_2x",),
        ("method=vicreg_gating",),
        ("method=bt_dual",),
    ],
    ids=lambda layout: "-".join(o.split("=")[1] for o in layout),
)
def test_every_layout_exports_each_branch_exactly(tmp_path, layout):
    ckpt = write_checkpoint(tmp_path / "model.ckpt", *layout)
    served = load_method(ckpt).backbone.branches
    for branch in served:
        paths = export_backbone(ckpt, branch, out_dir=tmp_path / "export")
        model = load_backbone(paths["safetensors"])
        with torch.no_grad():
            assert torch.equal(model(IMAGES), reference_features(ckpt, branch.value, IMAGES)), branch
        # a single-branch encoder: BNs of the other branch and (dense) the gates are not carried along
        assert model.encoder.branches == (branch,)
        assert model.encoder.gated is (branch is Branch.GATED)


def test_dense_only_method_exports_dense_and_refuses_gated(tmp_path):
    ckpt = write_checkpoint(tmp_path / "vicreg.ckpt", "method=vicreg")
    paths = export_backbone(ckpt, "dense", out_dir=tmp_path)
    assert paths["pt"].name == "vicreg-synthetic-dense.pt"  # t_d means nothing to a dense-only method
    assert json.loads(paths["json"].read_text())["budget"] is None
    with pytest.raises(CheckpointError, match="branch='gated' is not in this checkpoint"):
        export_backbone(ckpt, "gated", out_dir=tmp_path)


def test_export_json_describes_architecture_gates_budget_and_source(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt", "budget=0.3", "backbone.gate_bias_init=2.0")
    paths = export_backbone(ckpt, "gated", out_dir=tmp_path)
    meta = json.loads(paths["json"].read_text())
    assert paths["json"].name == "vdg-synthetic-td0.3-gated.json"
    assert meta["format"] == "vdg-backbone" and meta["format_version"] == 1
    assert meta["branch"] == "gated" and meta["budget"] == 0.3 and meta["method"] == "vdg"
    assert meta["arch"] == GatedResNet(width=4, branches=("gated",), gate_bias_init=2.0).arch_config()
    assert meta["gate"] == {
        "reduction": 4,
        "bias": True,
        "temperature": pytest.approx(2 / 3),
        "eval_mask": "1[logit >= 0]",
    }
    assert meta["feature_dim"] == 32 and meta["image_size"] == 32 and meta["pretrain_dataset"] == "synthetic"
    cfg = compose_config([*TINY, "dataset=synthetic"])
    assert meta["normalize"] == {"mean": list(cfg.dataset.eval_mean), "std": list(cfg.dataset.eval_std)}
    assert meta["source"]["checkpoint"] == str(ckpt.resolve())
    assert (meta["source"]["epoch"], meta["source"]["global_step"]) == (3, 12)
    assert meta["source"]["arch"]["branches"] == ["dense", "gated"]
    assert meta["files"] == {
        "pt": "vdg-synthetic-td0.3-gated.pt",
        "safetensors": "vdg-synthetic-td0.3-gated.safetensors",
    }
    with safe_open(str(paths["safetensors"]), framework="pt") as f:  # the safetensors file describes itself too
        assert json.loads(f.metadata()["vdg_export"]) == meta


def test_weights_are_a_plain_backbone_state_dict(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt")
    paths = export_backbone(ckpt, "gated", out_dir=tmp_path)
    state = torch.load(paths["pt"], weights_only=True)
    fresh = GatedResNet(width=4, branches=("gated",))
    assert set(state) == set(fresh.state_dict())  # loads into GatedResNet directly, no "backbone." prefix
    fresh.load_state_dict(state)
    assert not any(k.startswith(("backbone", "projector", "probes")) for k in state)


def test_export_refuses_to_overwrite_another_export_unless_asked(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt")
    first = export_backbone(ckpt, "dense", out_dir=tmp_path)
    stamps = {key: path.stat().st_mtime_ns for key, path in first.items()}
    # the same export again (as after pretraining, which exports already) is a no-op, not an error
    assert export_backbone(ckpt, "dense", out_dir=tmp_path) == first
    # another checkpoint's weights under the same name are refused, and the files stay as they were
    other = write_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(FileExistsError, match="hold another export.*overwrite=true"):
        export_backbone(other, "dense", out_dir=tmp_path)
    assert {key: path.stat().st_mtime_ns for key, path in first.items()} == stamps
    export_backbone(other, "dense", out_dir=tmp_path, overwrite=True)
    assert json.loads(first["json"].read_text())["source"]["checkpoint"] == str(other.resolve())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_load_backbone_checks_branch_and_files(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt")
    paths = export_backbone(ckpt, "gated", out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"holds the gated branch, not 'dense'.*branch=dense"):
        load_backbone(paths["pt"], branch="dense")
    with pytest.raises(ValueError, match="expected an exported .safetensors, .pt or .json"):
        load_backbone(ckpt)
    paths["json"].unlink()
    assert load_backbone(paths["safetensors"]).branch is Branch.GATED  # the header carries the JSON
    with pytest.raises(FileNotFoundError, match="describes the architecture"):
        load_backbone(paths["pt"])


def test_load_backbone_uses_weights_only_loading(tmp_path, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "m.ckpt")
    paths = export_backbone(ckpt, "dense", out_dir=tmp_path)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    load_backbone(paths["pt"])
    assert calls and all(k.get("weights_only") is True for k in calls)


def test_gated_backbone_is_deterministic_in_eval_and_exposes_masks(tmp_path):
    model = load_backbone(export_backbone(write_checkpoint(tmp_path / "m.ckpt"), "gated", out_dir=tmp_path)["pt"])
    with torch.no_grad():
        assert torch.equal(model(IMAGES), model(IMAGES))
        out = model.encode(IMAGES)
    assert len(out.masks) == 8 and out.active_channels().shape == (6, 8)


def test_branch_encoder_rejects_a_branch_the_backbone_lacks():
    with pytest.raises(ValueError, match="serves \\['dense'\\], not 'gated'"):
        branch_encoder(GatedResNet(width=4, branches=("dense",)), "gated")


def test_export_name():
    assert export_name("vdg", "cifar100", 0.3, "gated") == "vdg-cifar100-td0.3-gated"
    assert export_name("vicreg", "stl10", None, Branch.DENSE) == "vicreg-stl10-dense"


def test_vdg_exposes_load_backbone_lazily():
    assert vdg.load_backbone is load_backbone
    with pytest.raises(AttributeError):
        vdg.no_such_thing  # noqa: B018


def run_export_script(*overrides: str) -> None:
    argv = sys.argv
    sys.argv = ["export.py", *overrides]
    try:
        runpy.run_path(str(REPO / "scripts" / "export.py"), run_name="__main__")
    finally:
        sys.argv = argv


def test_export_script_writes_the_default_files(trained_ckpt, capsys):
    run_export_script(f"ckpt={trained_ckpt}", "branch=gated", "overwrite=true")
    printed = json.loads(capsys.readouterr().out)
    export_dir = trained_ckpt.parent / "export"
    assert printed == {k: str(export_dir / f"vdg-synthetic-td0.3-gated.{k}") for k in ("pt", "safetensors", "json")}
    with torch.no_grad():
        assert torch.equal(load_backbone(printed["pt"])(IMAGES), reference_features(trained_ckpt, "gated", IMAGES))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["branch=gated"], "ckpt=PATH: the pretraining checkpoint is required"),
        (["ckpt=x.ckpt"], "branch=dense|gated is required"),
        (["ckpt=missing.ckpt", "branch=gated"], "checkpoint not found"),
        (["branch=sparse"], None),
        (["ckpt=x.ckpt", "branch=gated", "slim=yes"], "slim='yes' must be true or false"),
        (["ckpt=x.ckpt", "branch=gated", "overwrite=1"], "overwrite=1 must be true or false"),
        (["ckpt=x.ckpt", "branch=gated", "profile_split=val"], "unknown profile_split 'val'; allowed values"),
        (["ckpt=x.ckpt", "branch=gated", "+executoin=sparse"], "unknown key executoin (did you mean execution?)"),
        (["ckpt=x.ckpt", "branch=gated", "+data.rot=/d"], "unknown key data.rot"),
        (["ckpt=x.ckpt", "branch=gated", "data.num_workers=-1"], "data.num_workers=-1 must be an integer >= 0"),
    ],
)
def test_export_script_errors_are_one_line(trained_ckpt, overrides, message):
    if message is None:  # a bad branch name, with a real checkpoint
        overrides, message = [f"ckpt={trained_ckpt}", *overrides], "unknown branch 'sparse'"
    with pytest.raises(SystemExit) as exit_info:
        run_export_script(*overrides)
    assert str(exit_info.value).startswith("error: ") and message in str(exit_info.value)


def test_export_script_reruns_and_refuses_to_overwrite(trained_ckpt, tmp_path):
    run_export_script(f"ckpt={trained_ckpt}", "branch=dense", f"out_dir={tmp_path}")
    run_export_script(f"ckpt={trained_ckpt}", "branch=dense", f"out_dir={tmp_path}")  # same export: succeeds
    other = write_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(SystemExit, match="already exist.*overwrite=true"):
        run_export_script(f"ckpt={other}", "branch=dense", f"out_dir={tmp_path}")


# ----- executions and slim exports (issue 12) ---------------------------------------------------------------------


def test_load_backbone_returns_the_chosen_execution_with_the_same_features(tmp_path):
    from vdg.deploy.sparse import BlockPath, FoldedResNet

    ckpt = write_checkpoint(tmp_path / "m.ckpt", "backbone.gate_bias_init=0.5")
    gated = export_backbone(ckpt, "gated", out_dir=tmp_path)
    expected = reference_features(ckpt, "gated", IMAGES)
    assert isinstance(load_backbone(gated["pt"]), BranchBackbone)  # the default stays the module as trained
    for execution in ("folded", "sparse"):
        model = load_backbone(gated["safetensors"], execution=execution)
        assert isinstance(model, FoldedResNet) and model.branch is Branch.GATED and model.feature_dim == 32
        assert model.config["branch"] == "gated"
        assert ((model(IMAGES) - expected).abs().max() / expected.abs().max()).item() <= 1e-4
        masks = model.encode(IMAGES).masks
        assert [m.shape for m in masks] == [m.shape for m in load_backbone(gated["pt"]).encode(IMAGES).masks]
    sparse, folded = load_backbone(gated["pt"], execution="sparse"), load_backbone(gated["pt"], execution="folded")
    assert sparse.skip_inactive and not folded.skip_inactive
    sparse.set_plan(1, [BlockPath.SAMPLE] * 8)  # width 4: the default would be masked everywhere
    folded.set_plan(1, [BlockPath.SAMPLE] * 8)
    assert sparse.paths(1, 32) == [BlockPath.SAMPLE] * 8 and folded.paths(1, 32) == [BlockPath.MASKED] * 8
    dense = export_backbone(ckpt, "dense", out_dir=tmp_path)
    model = load_backbone(dense["pt"], execution="folded")
    expected = reference_features(ckpt, "dense", IMAGES)
    assert ((model(IMAGES) - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    with pytest.raises(ValueError, match="holds the dense network, which has no gates"):
        load_backbone(dense["pt"], execution="sparse")
    allowed = r"allowed values: \['masked', 'folded', 'sparse'\]"
    with pytest.raises(ValueError, match=r"unknown execution 'fast'; " + allowed):
        load_backbone(gated["pt"], execution="fast")


def test_export_records_the_default_execution(tmp_path):
    from vdg.deploy.sparse import FoldedResNet

    ckpt = write_checkpoint(tmp_path / "m.ckpt")
    paths = export_backbone(ckpt, "gated", out_dir=tmp_path, execution="sparse")
    assert json.loads(paths["json"].read_text())["execution"] == "sparse"
    assert isinstance(load_backbone(paths["json"]), FoldedResNet)
    assert isinstance(load_backbone(paths["json"], execution="masked"), BranchBackbone)
    with pytest.raises(ValueError, match="execution=sparse needs the gated network"):
        export_backbone(ckpt, "dense", out_dir=tmp_path, execution="sparse")


@pytest.mark.parametrize("execution", ["sparse", "folded"])
def test_a_teacher_from_a_sparse_or_folded_export_runs_masked(tmp_path, execution):
    from vdg.methods.teachers import load_teacher

    ckpt = write_checkpoint(tmp_path / "m.ckpt")
    paths = export_backbone(ckpt, "gated", out_dir=tmp_path, execution=execution)
    teacher = load_teacher(paths["safetensors"])  # a module in a training step: train()/eval(), plain tensors
    assert isinstance(teacher.backbone, BranchBackbone), type(teacher.backbone)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = teacher.backbone(x)
    assert not features.is_inference()
    expected = load_backbone(paths["json"], execution="masked")(x)
    assert torch.allclose(features, expected)


def test_slim_export_is_the_compacted_gated_network_and_its_profile(trained_ckpt, tmp_path):
    from vdg.data.module import eval_loader
    from vdg.deploy.slim import ChannelProfile, checkpoint_profile, slim_widths

    paths = export_backbone(trained_ckpt, "gated", out_dir=tmp_path, slim=True, execution="sparse")
    assert paths["json"].name == "vdg-synthetic-td0.3-gated-slim.json"
    meta = json.loads(paths["json"].read_text())
    profile = ChannelProfile.load(paths["profile"])
    assert profile.samples == 64 and meta["slim"]["profile_split"] == "train"  # the run's 64 training images
    assert meta["slim"]["kept"] == [int((f > 0).sum()) for f in profile.frequency]
    assert meta["slim"]["slim_widths"] == slim_widths(profile) == slim_widths(checkpoint_profile(trained_ckpt))
    assert meta["arch"]["block_widths"] == [max(k, 1) for k in meta["slim"]["kept"]]
    model, full = load_backbone(paths["safetensors"]), load_method(trained_ckpt)
    images = torch.cat([x for x, _ in eval_loader(full.cfg, "train", 32)])  # the profiled images
    with torch.no_grad():
        expected = full.backbone(images, Branch.GATED).features
    assert ((model(images) - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    with pytest.raises(ValueError, match="slim=true needs the gated network"):
        export_backbone(trained_ckpt, "dense", out_dir=tmp_path, slim=True)


def test_export_script_slim_and_execution_options(trained_ckpt, tmp_path, capsys):
    run_export_script(f"ckpt={trained_ckpt}", "branch=gated", f"out_dir={tmp_path}", "slim=true", "execution=sparse")
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"pt", "safetensors", "json", "profile"} and all(Path(p).is_file() for p in printed.values())
    written = {key: Path(p).stat().st_mtime_ns for key, p in printed.items()}
    run_export_script(f"ckpt={trained_ckpt}", "branch=gated", f"out_dir={tmp_path}", "slim=true", "execution=sparse")
    assert {key: Path(p).stat().st_mtime_ns for key, p in printed.items()} == written  # the same export: no rewrite
    with pytest.raises(SystemExit, match="already exist.*overwrite=true"):  # another default execution: refused
        run_export_script(f"ckpt={trained_ckpt}", "branch=gated", f"out_dir={tmp_path}", "slim=true")
    allowed = r"allowed values: \['masked', 'folded', 'sparse'\]"
    with pytest.raises(SystemExit, match=r"error: unknown execution 'quick'; " + allowed):
        run_export_script(f"ckpt={trained_ckpt}", "branch=gated", f"out_dir={tmp_path}", "execution=quick")


@pytest.mark.parametrize("execution", ["masked", "folded", "sparse"])
def test_every_execution_accepts_and_refuses_the_same_inputs(trained_ckpt, tmp_path, execution):
    """One rule for all three engines (vdg/models/inputs.py): floating images are computed in float32, anything
    else (integers, NaN/Inf, wrong channels, non-square, not a tensor) is one InputError naming the problem."""
    from vdg.models.inputs import InputError

    paths = export_backbone(trained_ckpt, "gated", tmp_path / "export")
    model = load_backbone(paths["safetensors"], execution=execution, kernel="torch")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    reference = model(x)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        cast = x.to(dtype)
        torch.testing.assert_close(model(cast), model(cast.float()))  # computed in float32, same as cast.float()
    assert model(x.double()).dtype == reference.dtype == torch.float32
    bad = {
        "floating point and normalised": (x * 255).to(torch.uint8),
        "NaN or Inf": torch.where(x > 2, torch.nan, x),
        r"\[N >= 1, 3, H, H\] \(square\), got \[2, 1, 32, 32\]": x[:, :1],
        r"got \[2, 3, 32, 30\]": x[..., :30],
        r"got \[0, 3, 32, 32\]": x[:0],
        "must be a torch.Tensor": x.numpy(),
    }
    for message, images in bad.items():
        with pytest.raises(InputError, match=message):
            model(images)
