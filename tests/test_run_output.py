"""What a pretraining run prints and records for people: the online probe it reports, the end-of-run summary,
summary.json's paths, and logs without known-harmless noise (vdg.methods.base probes, vdg.run.driver,
vdg.run.logging, vdg.run.progress, scripts/pretrain.py)."""

from __future__ import annotations

import json
import logging
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vdg.core.errors import CheckpointError
from vdg.methods import build_method
from vdg.methods.base import online_probe
from vdg.run.driver import describe_summary, pretrain

from .conftest import TINY, compose_config

REPO = Path(__file__).resolve().parents[1]


def fit_probe(probe: nn.Module, offset: float, scale: float = 1.0, steps: int = 100) -> tuple[float, float]:
    """(largest training loss, test top-1) of `probe` fit by the online probe's SGD (lr 0.1, momentum 0.9) on
    10-class features offset + scale * (class centre + noise), the way backbone features share a common mean."""
    g = torch.Generator().manual_seed(0)
    centers = 0.3 * torch.randn(10, 64, generator=g)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(10, (n,), generator=g)
        return offset + scale * (centers[y] + 0.5 * torch.randn(n, 64, generator=g)), y

    optimizer = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9)
    worst = 0.0
    for _ in range(steps):
        x, y = sample(256)
        loss = F.cross_entropy(probe(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        worst = max(worst, loss.item())
    probe.eval()
    x, y = sample(1000)
    return worst, (probe(x).argmax(1) == y).float().mean().item() * 100


def test_online_probe_is_stable_whatever_the_features_common_offset():
    """The normalised probe learns the same from features with any common offset and scale; the bare linear
    layer (the old probe) diverges on the same features once their common mean dominates."""
    torch.manual_seed(0)
    reference = fit_probe(online_probe(64, 10, batchnorm=True), offset=0.0)
    for offset, scale in ((1.6, 1.0), (5.0, 3.0)):
        torch.manual_seed(0)
        assert fit_probe(online_probe(64, 10, batchnorm=True), offset, scale) == pytest.approx(reference, rel=1e-3)
    assert reference[1] > 95.0
    torch.manual_seed(0)
    worst, top1 = fit_probe(online_probe(64, 10, batchnorm=False), offset=5.0)
    assert worst > 50.0 and top1 < 30.0


def test_probe_layout_follows_the_config_and_old_checkpoints_still_load(tmp_path):
    cfg = compose_config([*TINY, f"run_dir={tmp_path}"])
    assert cfg.probe.batchnorm is True
    model = build_method(cfg)
    assert isinstance(model.probes["gated"][0], nn.BatchNorm1d) and not model.probes["gated"][0].affine
    old = compose_config([*TINY, f"run_dir={tmp_path}", "~probe.batchnorm"])  # a config written before the key
    old_model = build_method(old)
    assert isinstance(old_model.probes["dense"], nn.Linear)
    with pytest.raises(CheckpointError, match=r"probes \(without BatchNorm\).*resume with probe.batchnorm=false"):
        model.on_load_checkpoint({"state_dict": {f"probes.{k}": v for k, v in old_model.probes.state_dict().items()}})


def summary(**extra) -> dict:
    base = {"method": "vdg", "dataset": "digits", "epochs": 20, "steps": 100, "width": 8, "budget": 0.5,
            "mean_seconds_per_epoch": 3.0, "probe_acc": {"dense": 21.39, "gated": 12.22},
            "checkpoint": str(Path.cwd() / "runs/quickstart/checkpoints/last.ckpt")}
    return {**base, **extra}


def test_summary_explains_a_probe_far_below_knn():
    knn = {"k": 1, "distance": "euclidean", "dense": 73.06, "gated": 61.67, "flops_ratio": 0.506,
           "flops_reduction": 0.494}
    text = describe_summary(summary(knn=knn))
    lines = text.splitlines()
    assert lines[0] == "vdg on digits: 20 epochs (100 steps), 3.0 s/epoch"
    assert "k-NN (k=1, euclidean) top-1 on the test split: dense 73.06%, gated 61.67%" in lines
    probe = next(i for i, line in enumerate(lines) if line.startswith("online linear probes"))
    assert "a training monitor, fit on the augmented training views over 100 steps" in lines[probe]
    assert lines[probe + 1].startswith("  they trail k-NN here") and "Report k-NN or scripts/linear_eval.py" in text
    assert lines[-1] == (
        "checkpoint: runs/quickstart/checkpoints/last.ckpt; next: python scripts/linear_eval.py "
        "ckpt=runs/quickstart/checkpoints/last.ckpt"
    )
    close = {**knn, "dense": 25.0, "gated": 15.0}  # a probe close to k-NN needs no explanation
    assert "they trail" not in describe_summary(summary(knn=close))


def run_pretrain_script(*args: str) -> None:
    saved = sys.argv
    sys.argv = [str(REPO / "scripts" / "pretrain.py"), *args]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = saved


def test_pretrain_prints_a_summary_and_no_known_noise(tmp_path, monkeypatch, capsys, caplog):
    """First run and resume: a human summary (json=true: the JSON), absolute paths in summary.json, and none of
    the harmless messages every run used to print."""
    monkeypatch.chdir(tmp_path)
    args = [*TINY, "run_dir=runs/tiny", "trainer.enable_progress_bar=true", "trainer.progress=plain"]
    args.append("final_knn.enabled=true")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        run_pretrain_script(*args)
        first = capsys.readouterr().out
        run_pretrain_script(*args, "trainer.max_epochs=2", "resume=extend", "json=true")  # one more epoch
        second = capsys.readouterr().out
    # warnings, log records, and what Hydra's console handler printed
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records] + [first, second]
    for noise in ("Previous log files", "LeafSpec", "Tip:", "Total FLOPs"):
        assert not [m for m in messages if noise in m], noise
    assert "[vdg] model: vdg, parameters backbone " in first and "MACs per 32x32 image, gated target t_d = 0.3" in first
    assert "k-NN (k=1, euclidean) top-1 on the test split: dense " in first and not first.lstrip().startswith("{")
    assert first.rstrip().endswith("next: python scripts/linear_eval.py ckpt=runs/tiny/checkpoints/last.ckpt")
    printed = json.loads(second[second.index("\n{") + 1 :])
    saved = json.loads((tmp_path / "runs/tiny/summary.json").read_text())
    assert printed == saved and saved["epochs"] == 2
    paths = [saved["run_dir"], saved["checkpoint"], saved["resumed_from"], *saved["exports"].values()]
    assert all(Path(p).is_absolute() and Path(p).exists() for p in paths)
    assert saved["checkpoint"] == str(tmp_path / "runs/tiny/checkpoints/last.ckpt")


def test_summary_paths_are_absolute_when_called_from_code(tiny_cfg, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg("run_dir=relative/run", "probe.enabled=false")
    result = pretrain(cfg)
    assert result["checkpoint"] == str(tmp_path / "relative/run/checkpoints/last.ckpt")
    assert result["run_dir"] == str(tmp_path / "relative/run") and result["resumed_from"] is None


def test_final_knn_reports_the_random_init_reference_in_summary_and_print(tiny_cfg):
    summary = pretrain(tiny_cfg("final_knn.enabled=true", "final_knn.random_init_seeds=[0,1]"))
    knn = summary["knn"]
    for branch in ("dense", "gated"):
        reference = knn["random_init"][branch]
        assert reference["seeds"] == [0, 1] and len(reference["top1_runs"]) == 2
        assert reference["over"] == pytest.approx(knn[branch] - reference["top1_mean"])
    line = next(x for x in describe_summary(summary).splitlines() if x.startswith("k-NN"))
    assert line.count("over random init") == 2 and "2 init seeds" in line
