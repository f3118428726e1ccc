"""Faults: SIGKILL mid-epoch + resume is exact, a kill while saving leaves a good checkpoint, unsafe pickles
are refused, a NaN loss stops the run, and resuming with a changed experiment is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vdg.methods.vdg import VDG
from vdg.run.callbacks import NonFiniteLossError
from vdg.run.checkpoint import CheckpointError, load_method, read_checkpoint
from vdg.run.driver import pretrain

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
RUN = [*TINY, "trainer.max_epochs=3", "trainer.deterministic=true", "checkpoint.every_n_epochs=50", "seed=3"]


def run_script(run_dir: Path, env_extra: dict[str, str] | None = None, extra: tuple[str, ...] = ()):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), *RUN, f"run_dir={run_dir}", *extra]
    return subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=600)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    result = run_script(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    # 64 images / batch 16 = 4 steps per epoch: step 6 is in the middle of epoch 1
    killed = run_script(run_dir, {"VDG_FAULT_KILL_AT_STEP": "6"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 0
    resumed = run_script(run_dir)  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = final_state(uninterrupted), final_state(run_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sa = json.loads((uninterrupted / "summary.json").read_text())
    sb = json.loads((run_dir / "summary.json").read_text())
    assert sb["resumed_from"] is not None
    for key in ("epochs", "probe_acc", "flops_ratio_val", "flops_ratio_train"):
        assert sa[key] == sb[key], key
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows == (uninterrupted / "metrics.csv").read_text().splitlines()


def test_kill_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    killed = run_script(run_dir, {"VDG_FAULT_KILL_IN_SAVE": "2"})  # 2nd save = last.ckpt after epoch 1
    assert killed.returncode == -9
    last = run_dir / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["epoch"] == 0  # the epoch-0 checkpoint, intact
    load_method(last)
    resumed = run_script(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = final_state(uninterrupted), final_state(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": {"method": {}}}, "payload": _Exploit()}, ckpt)
    with pytest.raises(CheckpointError, match="refusing to load .*pickled Python objects"):
        load_method(ckpt)
    assert not marker.exists()
    # the same file does run code under a plain pickle load: the test's exploit is real
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_corrupt_and_missing_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_method(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError, match="corrupt or not a torch checkpoint"):
        load_method(bad)


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("trainer.max_epochs=3", "guard.check_every_n_steps=1")
    original = VDG.ssl_step

    def poisoned(self, views, targets):
        out = original(self, views, targets)
        if self.global_step == 5:  # epoch 1, second step
            out.terms["invariance"] = out.terms["invariance"] * float("nan")
            out.loss = out.loss + out.terms["invariance"]
        return out

    monkeypatch.setattr(VDG, "ssl_step", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 5: loss, invariance became NaN/Inf"):
        pretrain(cfg)
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(last)
    assert checkpoint["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_resume_refuses_a_changed_experiment(tiny_cfg):
    pretrain(tiny_cfg())
    with pytest.raises(CheckpointError, match=r"refusing to resume .*budget: 0.3 -> 0.5"):
        pretrain(tiny_cfg("budget=0.5"))
    with pytest.raises(CheckpointError, match=r"backbone.width: 4 -> 8"):
        pretrain(tiny_cfg("backbone.width=8"))
    with pytest.raises(ValueError, match="resume=never: refusing to overwrite"):
        pretrain(tiny_cfg("resume=never"))
    summary = pretrain(tiny_cfg("trainer.max_epochs=2"))  # more epochs is fine: it continues
    assert summary["epochs"] == 2 and summary["resumed_from"]
