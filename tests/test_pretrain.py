"""End to end: the pretraining driver writes a complete run directory for each method."""

import csv
import json

import pytest

from vdg.methods.checkpoint import load_method
from vdg.run.driver import pretrain


@pytest.mark.parametrize("method", ["vdg", "vicreg"])
def test_pretrain_writes_run_directory(tiny_cfg, method):
    cfg = tiny_cfg(f"method={method}", "trainer.max_epochs=2", "checkpoint.every_n_epochs=1")
    summary = pretrain(cfg)
    run = cfg.run_dir
    on_disk = json.loads(open(f"{run}/summary.json").read())
    assert on_disk == summary
    assert summary["epochs"] == 2 and summary["mean_seconds_per_epoch"] > 0
    assert summary["dense_macs"] > 0
    branches = ["dense", "gated"] if method == "vdg" else ["dense"]
    assert sorted(summary["probe_acc"]) == branches
    assert all(0 <= v <= 100 for v in summary["probe_acc"].values())
    if method == "vdg":
        assert 0 < summary["flops_ratio_val"] <= 1.01 and 0 < summary["flops_ratio_train"] <= 1.01
    else:
        assert summary["flops_ratio_val"] is None
    import os

    files = sorted(os.listdir(f"{run}/checkpoints"))
    assert files == ["epoch0000.ckpt", "epoch0001.ckpt", "export", "last.ckpt"]
    exported = sorted(os.listdir(f"{run}/checkpoints/export"))
    assert len(exported) == 3 * len(summary["exports"]) and sorted(summary["exports"]) == sorted(summary["probe_acc"])
    with open(f"{run}/metrics.csv") as f:
        columns = next(csv.reader(f))
    for key in ("train/loss", "train/invariance", "train/variance", "train/covariance", "lr-LARS"):
        assert any(c.startswith(key) for c in columns), key
    if method == "vdg":
        for key in ("train/flops_ratio", "train/budget_loss", "train/bound_loss", "val/flops_ratio",
                    "val/density_block0", "val/acc_gated", "train/probe_acc_gated"):
            assert key in columns, key
    model = load_method(f"{run}/checkpoints/last.ckpt", expected_method=method)
    assert model.cfg.budget == cfg.budget


def test_lr_schedule_is_per_epoch_warmup(tiny_cfg):
    cfg = tiny_cfg("trainer.max_epochs=3", "scheduler.warmup_epochs=2", "probe.enabled=false")
    pretrain(cfg)
    with open(f"{cfg.run_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-LARS/decay")]
    lrs = [float(r["lr-LARS/decay"]) for r in rows]
    base = 0.3 * 16 / 256
    assert lrs[0] == pytest.approx(0.003)  # epoch 0: warmup_start_lr, not batch-scaled
    assert lrs[1] == pytest.approx(base)  # reaches base lr at epoch warmup - 1
