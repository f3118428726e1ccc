"""scripts/bench_inference.py and vdg/deploy/bench.py: the timing harness reports every execution, checks sparse
against the masked reference, labels its masks, and appends a row; flops.py's latency=true. No timing asserts."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from vdg.core.errors import ConfigError
from vdg.deploy import bench, native
from vdg.deploy.bench import (
    EXECUTIONS,
    append_row,
    batches,
    calibrated_setup,
    checkpoint_setup,
    interleaved_times,
    measure,
)
from vdg.deploy.sparse import AUTO_NATIVE_ISAS
from vdg.deploy.to_onnx import onnx_available
from vdg.report.flops import flops_summary

from .conftest import compose_config
from .test_export import write_checkpoint
from .test_native import needs_kernel

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("dense_ms", "masked_ms", "sparse_ms", "slim_ms", "flops_ratio", "latency_ratio", "max_abs_diff")
REQUIRED += ("batch_size", "threads", "device", "masks")


def run_script(*overrides: str) -> None:
    argv = sys.argv
    sys.argv = ["bench_inference.py", *overrides]
    try:
        runpy.run_path(str(REPO / "scripts" / "bench_inference.py"), run_name="__main__")
    finally:
        sys.argv = argv


@needs_kernel  # dense_native, slim_native
@pytest.mark.kernel
def test_measure_reports_every_execution_and_the_difference_to_the_reference(tmp_path):
    setup = calibrated_setup(4, "cifar", 32, 0.5, num_images=3, calibration_images=32, seed=0)
    torch.set_num_threads(2)
    threads_before = torch.get_num_threads()
    result = measure(setup, batch_size=2, threads=1, rounds=2, warmup=0)
    assert all(key in result for key in REQUIRED)
    # onnxruntime has no ISA cap: under ONEDNN_MAX_CPU_ISA=AVX2 on a wider CPU (CI's forced-AVX2 pass) it sits out,
    # as it does where the onnx extra is not installed
    onnx = [n for n in EXECUTIONS if n.endswith("_onnx")]
    assert result["executions_left_out"] == (onnx if bench.onednn_capped() or not onnx_available() else [])
    timed = [n for n in EXECUTIONS if n not in result["executions_left_out"]]
    assert {f"{name}_ms" for name in timed} <= set(result) and all(result[f"{n}_ms"] > 0 for n in timed)
    assert result["masks"] == "calibrated" and result["batch_size"] == 2 and result["threads"] == 1
    for network in ("dense", "slim"):  # a network's latency is the fastest of its engines
        assert result[f"{network}_ms"] <= min(result[f"{network}_onednn_ms"], result[f"{network}_native_ms"]) + 1e-9
        assert result["engines"][network] in ("onednn", "native", "onnx")
    auto = "native" if native.kernel_isa() in AUTO_NATIVE_ISAS else "torch"  # VDG_KERNEL_ISA=portable: torch
    assert result["kernel"] == auto and 0 < result["latency_ratio"]
    assert torch.get_num_threads() == threads_before  # measure(threads=1) restored the caller's thread count
    assert result["kernel_isa"] == (native.kernel_isa() if auto == "native" else None)
    assert result["cpu_isa"] == native.cpu_isa()
    assert result["cpu"] and result["onednn_isa"] != "unknown" and result["aten_isa"]
    assert result["max_rel_diff"] <= 1e-4 and 0 < result["flops_ratio"] < 1
    assert len(result["plan"]) == 8 and len(result["slim_widths"]) == 8 and result["images"] == 3
    path = append_row(result, tmp_path / "inference.md")
    append_row(result, path)
    lines = path.read_text().splitlines()
    assert lines[0] == "# Inference latency (scripts/bench_inference.py)"
    assert sum(line.startswith("| 20") for line in lines) == 2 and "| calibrated | 4 | cifar 32px | 2 |" in lines[-1]


def test_without_a_compiler_the_benchmark_leaves_the_kernel_engines_out_unless_asked_for(tmp_path, monkeypatch):
    from vdg.deploy import sparse

    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setattr(sparse, "_kernel_warned", False)
    monkeypatch.setenv("VDG_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setenv("VDG_CC", str(tmp_path / "no-such-cc"))
    setup = calibrated_setup(4, "cifar", 32, 0.5, num_images=2, calibration_images=16, seed=0)
    executions = ("dense", "dense_native", "sparse", "slim", "slim_native")
    result = measure(setup, 1, 1, rounds=1, warmup=0, executions=executions)
    assert result["executions_left_out"] == ["dense_native", "slim_native"] and result["kernel"] == "torch"
    assert "dense_native_ms" not in result and result["engines"] == {"dense": "onednn", "slim": "onednn"}
    with pytest.raises(native.NativeKernelError, match="needs a C compiler"):  # asked for: an error
        measure(setup, 1, 1, rounds=1, warmup=0, kernel="native")


def test_a_row_with_other_columns_starts_a_new_table_below_the_old_rows(tmp_path):
    path = tmp_path / "inference.md"
    old_table = "# Inference latency\n\n| date | device | load |\n|---|---|---|\n| 2026-01-01 | cpu | 0.1 |\n"
    path.write_text(old_table)
    setup = calibrated_setup(4, "cifar", 32, 0.5, num_images=2, calibration_images=16, seed=0)
    result = measure(setup, 1, 1, rounds=1, warmup=0, executions=("dense", "sparse"))
    append_row(result, path)
    append_row(result, path)
    text = path.read_text()
    assert text.startswith(old_table)  # the old rows are kept as they were
    tables = [line for line in text.splitlines() if line.startswith("| date |")]
    assert len(tables) == 2 and "| engines |" in tables[1]  # one new header, then both new rows under it
    assert text.splitlines()[-1].startswith("| 20") and text.splitlines()[-2].startswith("| 20")


def test_batches_cycle_through_too_few_images():
    images = torch.arange(3.0).view(3, 1, 1, 1)
    assert [b.flatten().tolist() for b in batches(images, 2)] == [[0.0, 1.0]]
    assert batches(images, 5)[0].flatten().tolist() == [0.0, 1.0, 2.0, 0.0, 1.0]


def test_interleaved_times_rotate_the_order():
    order = []
    interleaved_times({k: (lambda k=k: order.append(k)) for k in "abc"}, repeats=3, warmup=0, rotate=True)
    assert order == list("abcbcacab")


def test_checkpoint_masks_are_labelled_and_timed(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt", "backbone.gate_bias_init=0.5")
    setup = checkpoint_setup(ckpt, None, num_images=4)
    assert setup.masks == "checkpoint" and setup.images.shape == (4, 3, 32, 32)
    result = measure(setup, 2, 1, rounds=1, warmup=0, plan="sample", executions=("dense", "sparse"))
    assert result["masks"] == "checkpoint" and result["setup_dense_weights"] == "checkpoint"
    assert result["plan"] == ["sample"] * 8 and result["plan_choice"] == "sample"
    assert result["max_rel_diff"] <= 1e-4 and "masked_ms" not in result and result["latency_ratio"] > 0
    gated_only = write_checkpoint(tmp_path / "g.ckpt", "method=vicreg_gating")
    assert checkpoint_setup(gated_only, None, 2).notes["dense_weights"].startswith("random")


def test_bench_script_prints_json_and_appends_a_row(tmp_path, capsys):
    results = tmp_path / "inference.md"
    run_script("model.width=4", "images=2", "rounds=1", "warmup=0", "calibration.images=16", f"results={results}")
    printed = json.loads(capsys.readouterr().out)
    assert all(key in printed for key in REQUIRED) and printed["masks"] == "calibrated"
    assert printed["results"] == str(results) and results.read_text().count("| calibrated |") == 1


@pytest.mark.parametrize(
    "override,message",
    [
        ("batch_size=0", "batch_size=0 must be an integer >= 1"),
        ("rounds=1.5", "rounds=1.5 must be an integer >= 1"),
        ("executions=[sparse]", "must include 'dense'"),
        ("executions=[dense,fast]", "unknown executions 'fast'; allowed values: ['dense', 'dense_native', 'dense_onnx'"),  # noqa: E501
        ("kernel=torch", "kernel=torch and executions ['dense_native', 'slim_native'] contradict"),
        ("kernel=fast", "unknown kernel 'fast'; allowed values: ['auto', 'native', 'torch']"),
        ("calibration.density=[0.3,0.2]", "one number in [0, 1] or 8 of them"),
        ("calibration.density=1.5", "calibration.density=1.5 must be a number in [0, 1]"),
        ("model.stem=vit", "unknown model.stem 'vit'; allowed values: ['cifar', 'imagenet']"),
        ("device=tpu", "unknown device 'tpu'; allowed values: ['cpu', 'cuda']"),
        ("plan=fast", "unknown plan 'fast'; allowed values: ['default', 'tune', 'sample', 'masked']"),
        ("split=val", "unknown split 'val'; allowed values"),
        ("+threadz=2", "unknown key threadz (did you mean threads?)"),
        ("+model.depth=34", "unknown key model.depth"),
        ("batch_size=128", "images=64 < batch_size=128: a timed batch must hold distinct images"),
        ("ckpt=/no/such.ckpt", "checkpoint not found"),
    ],
)
def test_bench_script_bad_input_is_one_line(override, message):
    with pytest.raises(SystemExit) as exit_info:
        run_script(override, "results=null")
    assert str(exit_info.value).startswith("error: ") and message in str(exit_info.value)


def test_flops_latency_reports_the_latency_ratio_next_to_the_flops_ratio(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt")
    overrides = ["bench.images=2", "bench.rounds=1", "bench.warmup=0", "bench.threads=1", "data.num_workers=0"]
    cfg = compose_config([f"ckpt={ckpt}", "latency=true", *overrides], config_name="flops")
    summary = flops_summary(cfg)
    assert summary["latency_ratio"] > 0 and 0 < summary["flops_ratio"] <= 1
    assert {"dense_ms", "sparse_ms", "masked_ms", "flops_ratio", "max_rel_diff"} <= set(summary["latency"])
    with pytest.raises(ConfigError, match="latency=true needs ckpt"):
        flops_summary(compose_config(["latency=true"], config_name="flops"))
    with pytest.raises(ConfigError, match="bench.threads=0 must be an integer >= 1"):
        flops_summary(compose_config([f"ckpt={ckpt}", "latency=true", "bench.threads=0"], config_name="flops"))
