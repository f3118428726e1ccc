"""ONNX export (vdg/deploy/to_onnx.py, scripts/export.py format=onnx) and the benchmark's onnxruntime engines: the
exported graph reproduces the PyTorch network at several batch sizes, carries the export JSON, never overwrites,
and the optional packages' absence is one line naming the extra."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from vdg.core.errors import ConfigError
from vdg.deploy.bench import calibrated_setup, measure
from vdg.deploy.export import export_backbone
from vdg.deploy.to_onnx import CHECK_RTOL, read_onnx_metadata, session
from vdg.methods.checkpoint import load_method
from vdg.models import Branch
from vdg.models.encoder import BranchBackbone, branch_encoder

from .test_export import reference_features, run_export_script, write_checkpoint

ort = pytest.importorskip("onnxruntime")  # the `onnx` extra (in `dev`); without it these tests say so and skip
pytest.importorskip("onnxscript")

IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def run_onnx(path, images: torch.Tensor) -> torch.Tensor:
    out = session(path, threads=1).run(["features"], {"images": images.numpy()})[0]
    return torch.from_numpy(out)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("onnx") / "vdg.ckpt")


@pytest.mark.parametrize("branch", ["dense", "gated"])
def test_onnx_export_reproduces_the_network_at_any_batch_size(ckpt, tmp_path, branch):
    paths = export_backbone(ckpt, branch, tmp_path, output_format="onnx")
    assert list(paths) == ["onnx"] and paths["onnx"].name == f"vdg-synthetic-td0.3-{branch}.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == [paths["onnx"].name]  # no temp file left behind
    expected = reference_features(ckpt, branch, IMAGES)
    for images in (IMAGES[:1], IMAGES):  # the batch axis is dynamic
        got = run_onnx(paths["onnx"], images)
        assert got.shape == (len(images), expected.shape[1])
        assert (got - expected[: len(images)]).abs().max() <= 1e-4 * expected.abs().max()
    metadata = read_onnx_metadata(paths["onnx"])
    assert metadata["branch"] == branch and metadata["files"] == {"onnx": paths["onnx"].name}
    assert metadata["normalize"]["mean"] and metadata["budget"] == 0.3 and "execution" not in metadata
    assert metadata["onnx"]["graph"].startswith("masked" if branch == "gated" else "static")
    check = metadata["onnx_check"]
    assert check["batches"] == [1, 5] and check["max_rel_diff"] <= CHECK_RTOL and check["runtime"] == "onnxruntime"


def test_the_slim_student_exports_as_a_static_graph(tmp_path):
    """A Table 3 student (a dense network with its own block widths) is what `branch=dense` exports."""
    student = write_checkpoint(tmp_path / "student.ckpt", "method=vicreg", "backbone.block_widths=[2,3,3,4,5,6,7,8]")
    path = export_backbone(student, "dense", tmp_path / "out", output_format="onnx")["onnx"]
    metadata = read_onnx_metadata(path)
    assert metadata["arch"]["block_widths"] == [2, 3, 3, 4, 5, 6, 7, 8] and metadata["onnx"]["graph"] == "static"
    expected = reference_features(student, "dense", IMAGES)
    assert (run_onnx(path, IMAGES) - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_a_slim_gated_export_to_onnx_is_the_compacted_network(ckpt, tmp_path, monkeypatch):
    from vdg.deploy import export as export_module
    from vdg.deploy.slim import ChannelProfile

    model = load_method(ckpt)
    encoder = branch_encoder(model.backbone, Branch.GATED)
    channels = [block.mid_planes for block in encoder.blocks]
    # channel 0 always on, 1 never, 2 data-dependent, and so on: a third of each block removed
    frequency = tuple(torch.tensor([[1.0, 0.0, 0.5][i % 3] for i in range(c)]) for c in channels)
    profile = ChannelProfile(frequency, 10, encoder.arch_config())
    monkeypatch.setattr(export_module, "method_profile", lambda *args: profile)
    path = export_backbone(ckpt, "gated", tmp_path, slim=True, output_format="onnx")["onnx"]
    metadata = read_onnx_metadata(path)
    assert path.name.endswith("-gated-slim.onnx") and metadata["slim"]["kept"] == [c - (c + 1) // 3 for c in channels]
    compact = export_module.compact_gated(model.backbone, profile)
    with torch.no_grad():
        expected = BranchBackbone(compact, Branch.GATED).eval()(IMAGES)
    assert (run_onnx(path, IMAGES) - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_onnx_export_refuses_to_overwrite_and_refuses_an_execution(ckpt, tmp_path):
    path = export_backbone(ckpt, "dense", tmp_path, output_format="onnx")["onnx"]
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=true"):
        export_backbone(ckpt, "dense", tmp_path, output_format="onnx")
    assert path.read_bytes() == before
    export_backbone(ckpt, "dense", tmp_path, output_format="onnx", overwrite=True)
    with pytest.raises(ConfigError, match="leave execution unset with format=onnx"):
        export_backbone(ckpt, "gated", tmp_path, output_format="onnx", execution="sparse")
    with pytest.raises(ConfigError, match="unknown format 'tflite'; allowed values: \\['torch', 'onnx'\\]"):
        export_backbone(ckpt, "dense", tmp_path, output_format="tflite")


def test_a_graph_that_onnxruntime_runs_differently_is_never_written(ckpt, tmp_path, monkeypatch):
    from vdg.deploy import to_onnx

    real = to_onnx.compare
    seen = []

    def off_by_more_than_allowed(model, *args, **kwargs):
        seen.append(type(model))
        return {**real(model, *args, **kwargs), "max_rel_diff": 10 * CHECK_RTOL}

    monkeypatch.setattr(to_onnx, "compare", off_by_more_than_allowed)
    with pytest.raises(RuntimeError, match="differ from PyTorch's by 1.00e-03 .*not written to"):
        export_backbone(ckpt, "dense", tmp_path, output_format="onnx")
    assert seen == [bytes] and list(tmp_path.iterdir()) == []  # checked in memory, before any file


def test_export_script_format_onnx_prints_the_file_and_its_check(ckpt, tmp_path, capsys):
    run_export_script(f"ckpt={ckpt}", "branch=dense", "format=onnx", f"out_dir={tmp_path}")
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"onnx": str(tmp_path / "vdg-synthetic-td0.3-dense.onnx")}
    line = captured.err.strip().splitlines()[-1]
    assert line.startswith("checked with onnxruntime against PyTorch at batch 1 and 5: max relative difference ")
    assert float(line.rsplit(" ", 1)[1]) <= CHECK_RTOL
    with pytest.raises(SystemExit, match="^error: unknown format 'onx'; allowed values"):
        run_export_script(f"ckpt={ckpt}", "branch=dense", "format=onx")


@pytest.mark.parametrize("missing", ["onnxruntime", "onnxscript"])
def test_without_the_onnx_extra_export_names_it_and_writes_nothing(ckpt, tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    with pytest.raises(ConfigError, match=rf"format=onnx needs the {missing} package.*pip install 'vdg\[onnx\]'"):
        export_backbone(ckpt, "dense", tmp_path, output_format="onnx")
    assert not any(tmp_path.iterdir())


def test_the_benchmark_times_onnxruntime_as_a_dense_engine_and_the_masked_graph(monkeypatch):
    from vdg.deploy import bench

    monkeypatch.setattr(bench, "onednn_capped", lambda: False)  # the plumbing, not the ISA: also in CI's AVX2 pass
    setup = calibrated_setup(4, "cifar", 32, 0.5, num_images=2, calibration_images=16, seed=0)
    executions = ("dense", "dense_onnx", "sparse", "slim", "slim_onnx", "masked_onnx")
    threads_before = torch.get_num_threads()
    result = measure(setup, 1, 1, rounds=2, warmup=0, executions=executions, kernel="torch")
    assert torch.get_num_threads() == threads_before
    for network in ("dense", "slim"):  # the fastest engine, round by round
        assert result[f"{network}_ms"] <= min(result[f"{network}_onednn_ms"], result[f"{network}_onnx_ms"]) + 1e-9
        assert result["engines"][network] in ("onednn", "onnx")
    assert result["masked_onnx_ms"] > 0 and result["masked_onnx_ratio"] > 0 and result["executions_left_out"] == []


def test_without_onnxruntime_the_benchmark_leaves_its_engines_out(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    setup = calibrated_setup(4, "cifar", 32, 0.5, num_images=2, calibration_images=16, seed=0)
    result = measure(setup, 1, 1, rounds=1, warmup=0, executions=("dense", "dense_onnx", "sparse"), kernel="torch")
    assert result["executions_left_out"] == ["dense_onnx"] and "dense_onnx_ms" not in result
    assert result["engines"] == {"dense": "onednn"}


def test_under_an_emulated_narrower_cpu_the_onnxruntime_engines_are_left_out(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN and the kernel, not onnxruntime: timed, it would be this CPU's speed."""
    from vdg.core import machine

    monkeypatch.setattr(machine, "short_isa", lambda: "avx2")
    monkeypatch.setattr(machine, "cpu_isa", lambda: "avx512")
    setup = calibrated_setup(4, "cifar", 32, 0.5, num_images=2, calibration_images=16, seed=0)
    result = measure(setup, 1, 1, rounds=1, warmup=0, executions=("dense", "dense_onnx", "sparse"), kernel="torch")
    assert result["executions_left_out"] == ["dense_onnx"] and result["engines"] == {"dense": "onednn"}
