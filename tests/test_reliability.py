"""Faults and misuse, with real processes and real signals: SIGKILL mid-epoch + resume is exact, a kill while
saving leaves a good checkpoint and no orphan, a kill when a rerun starts keeps metrics.csv, SIGTERM is never a
silent success, a refused rerun changes nothing, one process per run directory, extending a finished run is
explicit, unsafe pickles are refused, a NaN loss stops the run; data that would be read wrongly is refused.

docs/validation.md lists each case with the message a user sees.
"""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vdg.core.errors import CheckpointError, NonFiniteLossError, RunDirError
from vdg.core.rundir import LOCK_NAME, RunDirLock
from vdg.methods.checkpoint import load_method, read_checkpoint
from vdg.methods.vdg import VDG
from vdg.run.driver import pretrain

from .conftest import TINY, compose_config

ROOT = Path(__file__).resolve().parents[1]
RUN = [*TINY, "trainer.max_epochs=3", "trainer.deterministic=true", "checkpoint.every_n_epochs=50", "seed=3"]


# Runs a script after wrapping `module:Class.method`: at its N-th call the process sends itself a real signal
# (the moment a pre-emption or the OOM killer could strike), then the script goes on as it would.
SIGNAL_AT = r"""
import importlib, os, runpy, signal, sys
target, action, nth = sys.argv[1:4]
module_name, path = target.split(":")
owner = importlib.import_module(module_name)
*parents, attr = path.split(".")
for name in parents:
    owner = getattr(owner, name)
original, calls = getattr(owner, attr), [0]
def wrapper(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(nth):
        os.kill(os.getpid(), getattr(signal, action))
    return original(*args, **kwargs)
setattr(owner, attr, wrapper)
sys.argv = sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_script(
    run_dir: Path,
    env_extra: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
    signal_at: tuple[str, str, int] | None = None,
    cwd: Path | None = None,
):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    script = [str(ROOT / "scripts" / "pretrain.py"), *RUN, f"run_dir={run_dir}", *extra]
    hook = ["-c", SIGNAL_AT, *map(str, signal_at)] if signal_at else []
    # a shell started in the background may leave SIGINT ignored; a terminal delivers it
    return subprocess.run(
        [sys.executable, *hook, *script], cwd=cwd or run_dir.parent, env=env, capture_output=True, text=True,
        timeout=600, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


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
    assert temp_files(run_dir)  # the killed write's half file
    resumed = run_script(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = final_state(uninterrupted), final_state(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert temp_files(run_dir) == []  # the next run removed the orphan of the dead writer
    assert not (run_dir / LOCK_NAME).exists()


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_epochs(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [int(float(r["epoch"])) for r in csv.DictReader(f) if r.get("train/loss")]


def test_sigkill_when_a_rerun_starts_keeps_metrics_csv(tmp_path):
    """Lightning used to delete metrics.csv when a resumed run's logger started, holding the earlier rows in
    memory until the first save: a SIGKILL in that window lost the whole history."""
    run_dir = tmp_path / "run"
    pretrain(compose_config([*RUN, f"run_dir={run_dir}", "trainer.max_epochs=1"]))
    assert train_epochs(run_dir) == [0]
    hook = ("pytorch_lightning.loggers.csv_logs:ExperimentWriter.log_hparams", "SIGKILL", 1)  # logger started
    killed = run_script(run_dir, extra=("trainer.max_epochs=1",), signal_at=hook)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert train_epochs(run_dir) == [0]


def test_a_refused_rerun_leaves_the_run_directory_unchanged(tmp_path):
    """Hydra used to rewrite run_dir/.hydra/*.yaml (and pretrain.log) before the run was refused."""
    run_dir = tmp_path / "run"
    pretrain(compose_config([*RUN, f"run_dir={run_dir}", "trainer.max_epochs=1"]))
    before = snapshot(run_dir)
    refused = run_script(run_dir, extra=("trainer.max_epochs=1", "budget=0.5"))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: refusing to resume"), refused.stderr[-2000:]
    assert snapshot(run_dir) == before
    invalid = run_script(tmp_path / "new" / "run", extra=("budget=2",), cwd=tmp_path)  # fails validation
    assert invalid.stderr.strip().splitlines()[-1].startswith("error: budget=2 is outside (0, 1]")
    assert not (tmp_path / "new").exists()


def test_sigterm_is_never_a_silent_success(tmp_path):
    """A pre-empted job (SIGTERM) used to exit 0 with an unfinished run: `pretrain && linear_eval` went on."""
    run_dir = tmp_path / "run"
    stopped = run_script(run_dir, signal_at=("vdg.optim.lars:LARS.step", "SIGTERM", 6))  # mid epoch 1
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert re.search(r"error: training stopped by SIGTERM at epoch 1.*last.ckpt holds the last completed epoch; "
                     r"rerun the same command to resume", stopped.stderr.strip().splitlines()[-1])
    assert not (run_dir / "summary.json").exists()
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 0


def test_chdir_does_not_nest_the_run_directory_and_checkpoints_need_no_quoting(tmp_path):
    done = run_script(Path("runs/x"), extra=("trainer.max_epochs=1", "checkpoint.every_n_epochs=1",
                                             "hydra.job.chdir=true"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "x"
    assert not (run_dir / "runs").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["epoch0000.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert (run_dir / "pretrain.log").is_file() and not (tmp_path / "pretrain.log").exists()


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
    with pytest.raises(CheckpointError, match=r"learning-rate schedule changed \(optimizer.lr: 0.3 -> 0.6\)"):
        pretrain(tiny_cfg("optimizer.lr=0.6"))
    with pytest.raises(ValueError, match="resume=never: refusing to overwrite"):
        pretrain(tiny_cfg("resume=never"))


def lrs(run_dir: str) -> list[float]:
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return [float(r["lr-LARS/decay"]) for r in csv.DictReader(f) if r.get("lr-LARS/decay")]


def test_extending_a_finished_run_is_refused_unless_explicit(tiny_cfg):
    """A finished run rerun with more epochs used to train the new epochs at the schedule's final lr (0)."""
    cfg = tiny_cfg("trainer.max_epochs=2", "probe.enabled=false")
    pretrain(cfg)
    with pytest.raises(CheckpointError, match=r"finished its 2-epoch schedule.*trainer.max_epochs=4 would train "
                                              r"epochs 2-3 at the schedule's final learning rate.*resume=extend"):
        pretrain(tiny_cfg("trainer.max_epochs=4", "probe.enabled=false"))
    with pytest.raises(CheckpointError, match=r"already trained 2 epochs, more than trainer.max_epochs=1"):
        pretrain(tiny_cfg("trainer.max_epochs=1", "probe.enabled=false"))
    summary = pretrain(tiny_cfg("trainer.max_epochs=4", "probe.enabled=false", "resume=extend"))
    assert summary["epochs"] == 4 and summary["resumed_from"]
    base, warmup = 0.3 * 16 / 256, 1  # lr x batch / 256; scheduler.warmup_epochs=1 in TINY
    expected = [base * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (4 - warmup))) for t in (2, 3)]
    assert lrs(cfg.run_dir)[2:] == pytest.approx(expected)  # the schedule recomputed over 4 epochs, never 0


def test_one_process_per_run_directory_and_a_dead_holder_is_taken_over(tiny_cfg, tmp_path):
    cfg = tiny_cfg("probe.enabled=false")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir / LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"run directory {run_dir} is in use by pid {holder.pid} on host "
                                              rf"{re.escape(socket.gethostname())}"):
            pretrain(cfg)
        assert not (run_dir / "checkpoints").exists()
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file stays; the kernel drops the lock
        holder.wait()
    assert (run_dir / LOCK_NAME).exists()
    pretrain(cfg)
    assert not (run_dir / LOCK_NAME).exists()


HOLD_LOCK = r"""
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": "holder"}).encode())
print("locked", flush=True)
time.sleep(600)
"""


def test_without_fcntl_locks_a_dead_holder_on_this_host_is_taken_over(tmp_path, monkeypatch):
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    lock = tmp_path / LOCK_NAME
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with RunDirLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # alive
    with pytest.raises(RunDirError, match=rf"in use by pid {os.getppid()}"):
        RunDirLock(tmp_path).acquire()
    lock.write_text(json.dumps({"pid": 1234, "host": "other-node"}))
    with pytest.raises(RunDirError, match=r"on host other-node.*cannot be checked from here.*delete"):
        RunDirLock(tmp_path).acquire()


# ------------------------------------------------------------------------------------------------ data on disk
def image_folder(root: Path, layout: dict[str, dict[str, int]], mode: str = "RGB") -> Path:
    """root/<split>/<class>/<i>.png: tiny images, a different colour per class."""
    from PIL import Image

    for split, classes in layout.items():
        for ci, (name, count) in enumerate(sorted(classes.items())):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new(mode, (8, 8), (40 * ci, 100, 200)).save(root / split / name / f"{i}.png")
    return root


def folder_cfg(root: Path, *extra: str):
    return compose_config(["dataset=folder", f"data.root={root}", "dataset.num_classes=3", *extra])


def test_splits_of_a_folder_share_one_class_list(tmp_path):
    """Labels used to be numbered per split: with one class missing from test/, every later label shifted."""
    from vdg.core.errors import DatasetError
    from vdg.data.datasets import build_dataset

    root = image_folder(tmp_path, {"train": {"a": 2, "b": 2, "c": 2}, "test": {"a": 1, "c": 1}})
    cfg = folder_cfg(root)
    assert build_dataset(cfg.dataset, cfg.data, "train").classes == ["a", "b", "c"]
    with pytest.raises(DatasetError, match=r"test/ does not hold the classes of train/.*missing in test/ \['b'\]"):
        build_dataset(cfg.dataset, cfg.data, "test")
    image_folder(root, {"test": {"b": 1, "d": 1}})
    with pytest.raises(DatasetError, match=r"only in test/ \['d'\]"):
        build_dataset(cfg.dataset, cfg.data, "test")


def test_folder_class_count_hidden_folders_stray_and_dangling_files(tmp_path):
    from vdg.core.errors import DatasetError
    from vdg.data.datasets import build_dataset

    root = image_folder(tmp_path, {"train": {"a": 2, "b": 2, "c": 2}, "test": {"a": 1, "b": 1, "c": 1}})
    with pytest.raises(DatasetError, match=r"train/ has 3 class folders \(\['a', 'b', 'c'\]\) "
                                           r"but dataset.num_classes=10; set dataset.num_classes=3"):
        build_dataset(folder_cfg(root, "dataset.num_classes=10").dataset, folder_cfg(root).data, "train")
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden: never a class (it would shift every label)
    (root / "train" / "a" / "._0.png").write_bytes(b"macOS resource fork")  # hidden: never an image
    cfg = folder_cfg(root)
    train = build_dataset(cfg.dataset, cfg.data, "train")
    assert train.classes == ["a", "b", "c"] and len(train) == 6
    (root / "train" / "stray.png").write_bytes((root / "train" / "a" / "0.png").read_bytes())
    with pytest.raises(DatasetError, match=r"1 image\(s\) lie directly in .*train \(e.g. \['stray.png'\]\), outside"):
        build_dataset(cfg.dataset, cfg.data, "train")
    (root / "train" / "stray.png").unlink()
    (root / "train" / "b" / "gone.png").symlink_to(root / "nowhere.png")
    with pytest.raises(DatasetError, match=r"dangling symlink .*gone.png: its target .*nowhere.png does not exist"):
        build_dataset(cfg.dataset, cfg.data, "train")


def test_images_of_every_mode_decode_to_the_right_rgb_or_are_refused(tmp_path):
    """16-bit PNGs used to be clipped by Pillow's convert('RGB'): 94% of a ramp's pixels became 255."""
    import numpy as np
    from PIL import Image

    from vdg.core.errors import ImageReadError
    from vdg.data.datasets import ImageFolderDataset

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    cases = {
        "gray16.png": (Image.fromarray(ramp), ramp.astype(np.float64) / 257),
        "gray16.tif": (Image.fromarray(ramp), ramp.astype(np.float64) / 257),
        "palette.png": (Image.new("P", (4, 4), 0), np.full((4, 4), 20.0)),
        "la.png": (Image.new("LA", (4, 4), (200, 10)), np.full((4, 4), 200.0)),
        "cmyk.jpg": (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), np.full((4, 4), 255.0)),
    }
    cases["palette.png"][0].putpalette([10, 20, 30] * 256)
    for name, (image, expected) in cases.items():
        folder = tmp_path / name / "train" / "x"
        folder.mkdir(parents=True)
        image.save(folder / name)
        rgb = np.asarray(ImageFolderDataset(tmp_path / name, "train").load(0), dtype=np.float64)
        assert rgb.shape == (*expected.shape, 3), name
        assert np.abs(rgb.mean(axis=2) - expected).max() <= 2, name  # JPEG: a rounding step
    folder = tmp_path / "float" / "train" / "x"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(folder / "f.tif")
    with pytest.raises(ImageReadError, match=r"f.tif: floating-point pixels \(Pillow mode F\) have no fixed range"):
        ImageFolderDataset(tmp_path / "float", "train").load(0)


def test_a_corrupt_image_read_in_a_worker_is_one_line_naming_the_file(tmp_path):
    from torch.utils.data import DataLoader

    from vdg.core.errors import ImageReadError
    from vdg.data.datasets import ImageFolderDataset

    root = image_folder(tmp_path, {"train": {"a": 2}})
    bad = root / "train" / "a" / "1.png"
    bad.write_bytes(os.urandom(300))
    loader = DataLoader(ImageFolderDataset(root, "train", transform=lambda im: torch.zeros(1)), num_workers=1)
    with pytest.raises(ImageReadError) as caught:
        list(loader)
    assert str(caught.value) == f"cannot read image {bad}: not an image Pillow can decode (cannot identify " \
                                f"image file '{bad}') (in a DataLoader worker)"
    from PIL import Image

    truncated = root / "train" / "a" / "0.png"
    Image.fromarray(torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8).numpy()).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:6000])  # pixel data cut short
    with pytest.raises(ImageReadError, match=rf"^cannot read image {truncated}: .*"):
        ImageFolderDataset(root, "train").load(0)


# ------------------------------------------------------------------------------------------------ storage
class FullDisk:
    """open() whose files take `room` bytes, then fail with ENOSPC as a full file system would."""

    def __init__(self, room: int) -> None:
        self.room = room

    def __call__(self, path, mode="r", *args, **kwargs):
        return _LimitedFile(open(path, mode, *args, **kwargs), self.room)  # noqa: SIM115 - closed by the caller


class _LimitedFile:
    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    """torch.save used to report ENOSPC as 'enforce fail at inline_container.cc: unexpected pos ...'."""
    from vdg.core.errors import StorageError
    from vdg.run import checkpoint_io
    from vdg.run.checkpoint_io import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    target.write_bytes(b"the previous checkpoint")
    monkeypatch.setattr(checkpoint_io, "open", FullDisk(1000), raising=False)
    with pytest.raises(StorageError, match=rf"^cannot write {target}: no space left on device \(.* MiB free there\); "
                                           r"the previous version of the file \(if any\) is intact"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(10_000)}, target)
    assert target.read_bytes() == b"the previous checkpoint"
    assert temp_files(tmp_path) == []


def test_load_backbone_on_a_bad_file_is_one_clear_line(tmp_path):
    import vdg

    weights = tmp_path / "x.pt"
    weights.write_bytes(os.urandom(4096))
    weights.with_suffix(".json").write_text(json.dumps({"format": "vdg-backbone", "branch": "dense"}))
    with pytest.raises(CheckpointError, match=rf"^cannot read {weights}: corrupt, truncated or not an exported"):
        vdg.load_backbone(weights)
    garbage = tmp_path / "y.safetensors"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=rf"^cannot read {garbage}: corrupt or not a safetensors file"):
        vdg.load_backbone(garbage)
    (tmp_path / "z.safetensors").write_bytes(b"")
    (tmp_path / "z.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"z.json: not a valid export JSON"):
        vdg.load_backbone(tmp_path / "z.safetensors")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    pretrain(compose_config([*TINY, f"run_dir={run_dir}", "probe.enabled=false", "checkpoint.export_backbone=false"]))
    return run_dir


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_exports_and_results_follow_the_umask(finished_run, tmp_path, umask, mode):
    """Exports and result JSONs used to be written 0600 (tempfile.mkstemp) whatever the umask."""
    from vdg.deploy.export import export_backbone
    from vdg.eval.results import write_json

    old = os.umask(umask)
    try:
        paths = export_backbone(finished_run / "checkpoints" / "last.ckpt", "gated", tmp_path / "export")
        paths["result"] = write_json({"a": 1}, tmp_path / "results" / "r.json")
    finally:
        os.umask(old)
    assert {k: oct(p.stat().st_mode & 0o777) for k, p in paths.items()} == dict.fromkeys(paths, oct(mode))


def test_orphan_temp_files_of_dead_writers_only_are_removed(tmp_path):
    from vdg.core.atomic import remove_orphans

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    names = [f".r.json.tmp-{int(dead.stdout)}-{host}", f".r.json.tmp-{os.getpid()}-{host}",
             f".r.json.tmp-{int(dead.stdout)}-other-node", "r.json"]
    for name in names:
        (tmp_path / name).write_text("x")
    assert [p.name for p in remove_orphans(tmp_path)] == [names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
    remove_orphans(tmp_path, any_writer=True)  # under the run-directory lock, nobody else can be writing
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_without_fcntl_locks_an_earlier_attempt_of_a_requeued_slurm_job_is_taken_over(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setattr(fcntl, "lockf", lambda *args: (_ for _ in ()).throw(OSError(errno.ENOLCK, "no locks")))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": 7, "host": "node-1", "slurm_job_id": "42", "slurm_restart_count": "0"}))
    with RunDirLock(tmp_path):
        assert json.loads(lock.read_text())["slurm_restart_count"] == "1"
    lock.write_text(json.dumps({"pid": 7, "host": "node-1", "slurm_job_id": "41", "slurm_restart_count": "0"}))
    with pytest.raises(RunDirError, match=r"in use by pid 7 on host node-1 \(SLURM job 41\)"):
        RunDirLock(tmp_path).acquire()


def test_nested_images_symlink_loops_image_size_and_a_corrupt_decode_cache(tmp_path):
    from vdg.core.errors import DatasetError
    from vdg.data.datasets import ImageFolderDataset, decode_folder
    from vdg.run.driver import prepare

    root = image_folder(tmp_path / "data", {"train": {"a": 2, "b": 2, "c": 2}, "test": {"a": 1, "b": 1, "c": 1}})
    nested = root / "train" / "a" / "more"
    nested.mkdir()
    (nested / "x.png").write_bytes((root / "train" / "a" / "0.png").read_bytes())
    assert len(ImageFolderDataset(root, "train")) == 7  # sub-folders of a class count, as torchvision's
    (nested / "loop").symlink_to(root / "train" / "a", target_is_directory=True)
    with pytest.raises(DatasetError, match=r"symlink loop: .*loop leads back to"):
        ImageFolderDataset(root, "train")
    (nested / "loop").unlink()
    cfg = compose_config([*(o for o in TINY if not o.startswith("dataset")), "dataset=folder", f"data.root={root}",
                          "dataset.num_classes=3", "data.batch_size=2", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(DatasetError, match=r"0.png is 8x8 but dataset.image_size=32 and dataset.eval_resize=null"):
        prepare(cfg)
    cache = tmp_path / "cache"
    decode_folder(ImageFolderDataset(root, "train"), 8, cache_dir=cache)
    (written,) = cache.iterdir()
    written.write_bytes(written.read_bytes()[:100])  # a truncated cache (a killed copy, a full disk elsewhere)
    with pytest.warns(UserWarning, match="ignoring the unreadable decode cache"):
        decoded = decode_folder(ImageFolderDataset(root, "train"), 8, cache_dir=cache)
    assert decoded.images.shape == (7, 3, 8, 8)
