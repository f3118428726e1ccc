"""scripts/flops.py and its per-block channel-usage report (flops_report.json + channel_usage.png)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vdg.core.errors import CheckpointError
from vdg.data.module import eval_loader
from vdg.eval.features import extract_features, gate_report
from vdg.methods.checkpoint import load_method
from vdg.models import GatedResNet, network_cost
from vdg.report.flops import block_labels, flops_summary
from vdg.report.tables import build_table, load_results
from vdg.run.driver import pretrain

from .conftest import TINY, compose_config

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """last.ckpt of a 1-epoch VDG and VICReg pretraining (width 4, 64 synthetic images)."""
    torch.set_num_threads(1)  # 2 threads on 2 shared, busy cores are many times slower for these tiny convs
    root = tmp_path_factory.mktemp("pretrain")
    out = {}
    for method in ("vdg", "vicreg"):
        cfg = compose_config([*TINY, f"method={method}", f"run_dir={root / method}", "probe.enabled=false"])
        out[method] = Path(pretrain(cfg)["checkpoint"])
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def run_script_here(*overrides: str) -> None:
    """`python scripts/flops.py overrides...` in this process (no second interpreter start-up)."""
    argv = sys.argv
    sys.argv = ["flops.py", *overrides]
    try:
        runpy.run_path(str(REPO / "scripts" / "flops.py"), run_name="__main__")
    finally:
        sys.argv = argv


def test_block_labels_name_stage_and_block():
    labels = block_labels(network_cost(GatedResNet(width=8), 32))
    assert labels == ["(B1,L1)", "(B1,L2)", "(B2,L1)", "(B2,L2)", "(B3,L1)", "(B3,L2)", "(B4,L1)", "(B4,L2)"]


def test_report_counts_add_up_and_files_are_written(ckpts):
    ckpt = ckpts["vdg"]
    summary = flops_summary(compose_config([f"ckpt={ckpt}", "report=true"], "flops"))
    model = load_method(ckpt)
    assert {"dense_macs", "gated_macs", "reduction", "flops_ratio", "density_per_block"} <= summary.keys()
    assert summary["reduction"] == pytest.approx(1 - summary["gated_macs"] / summary["dense_macs"])
    blocks = summary["blocks"]
    assert [b["channels"] for b in blocks] == [c.channels for c in model.cost.blocks]
    for block, density in zip(blocks, summary["density_per_block"], strict=True):
        assert block["always_off"] + block["always_on"] + block["data_dependent"] == block["channels"]
        assert block["always_on"] <= block["mean_active"] <= block["always_on"] + block["data_dependent"]
        assert block["density"] == pytest.approx(density)
    # the same test split with deterministic gates (in other batches), counted independently of the report
    test = extract_features(model.backbone, eval_loader(model.cfg, "test", batch_size=7), "gated", keep_masks=True)
    expected = gate_report(test.active_channels, model.cost)["active_channels_per_block"]
    assert [b["mean_active"] for b in blocks] == pytest.approx(expected)
    assert [b["always_on"] for b in blocks] == [int(m.all(dim=0).sum()) for m in test.masks]
    assert [b["always_off"] for b in blocks] == [int((~m).all(dim=0).sum()) for m in test.masks]

    results = ckpt.parent / "results"
    assert (results / "channel_usage.png").read_bytes()[:8] == PNG
    record = json.loads((results / "flops_report.json").read_text())
    assert (record["protocol"], record["method"], record["branch"]) == ("flops", "vdg", "gated")
    assert record["blocks"] == blocks and record["flops_reduction"] == summary["reduction"]
    assert load_results(results) == [record]  # a record: the tables read it and keep it out of every table
    assert all(build_table(name, [record]) == build_table(name, []) for name in ("table1", "table4"))


def test_without_report_nothing_is_written(ckpts, tmp_path):
    summary = flops_summary(compose_config([f"ckpt={ckpts['vdg']}", f"results_dir={tmp_path}"], "flops"))
    assert "blocks" not in summary and not list(tmp_path.iterdir())


def test_analytic_count_without_checkpoint(capsys):
    run_script_here("dataset=cifar10")
    assert json.loads(capsys.readouterr().out)["dense_macs"] == 703_560_448  # the paper's 7.03E8


def test_checkpoint_without_gates_is_refused(ckpts):
    with pytest.raises(CheckpointError, match=r"branch='gated' is not in this checkpoint"):
        flops_summary(compose_config([f"ckpt={ckpts['vicreg']}", "report=true"], "flops"))
    with pytest.raises(SystemExit, match=r"^error: branch='gated' is not in this checkpoint \(vicreg serves"):
        run_script_here(f"ckpt={ckpts['vicreg']}", "report=true")


def test_flops_script_report(ckpts, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "scripts" / "flops.py"), f"ckpt={ckpts['vdg']}", "report=true"]
    done = subprocess.run(
        [*command, f"results_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert {"dense_macs", "gated_macs", "reduction"} <= summary.keys() and len(summary["blocks"]) == 8
    assert summary["report"] == str(tmp_path / "flops_report.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["channel_usage.png", "flops_report.json"]
