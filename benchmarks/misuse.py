"""Misuse and fault harness: real commands, real signals, real full disks; one verdict per case.

    python benchmarks/misuse.py [--repo DIR] [--only SUBSTRING] [--jobs N] [--keep]

Each case runs the project's own scripts (or `vdg.load_backbone`) the way a hostile but fair user on a shared,
pre-emptible cluster would, and judges the outcome:

    ok          a clear one-line refusal before any work, or the right result
    loss        a record (metrics.csv rows, summary.json, checkpoint, export) was lost
    wrong       the command succeeded but the result is silently wrong (or a refusal changed the run directory)
    traceback   the user saw a Python traceback
    misleading  it failed without a traceback, but the message does not say what is wrong
    late        a clear error, but only after the work (training, feature extraction) was done
    skip        the case needs something this machine lacks (root for tmpfs / read-only mounts)

`--repo` points at the checkout to judge (default: this one), so the same cases can be run on an older commit.
Cases that need a full disk or a read-only file system mount a small tmpfs (root only; skipped otherwise).
This is a tool for the maintainers, not a test: the fast, lasting cases live in tests/test_reliability.py and
tests/test_config_errors.py, and docs/validation.md lists every case with the message a user sees.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "dataset=synthetic",
    "dataset.train_size=64",
    "dataset.test_size=32",
    "backbone.width=4",
    "method.projector_hidden_dim=32",
    "method.projector_output_dim=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.pin_memory=false",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "scheduler.warmup_epochs=1",
    "seed=3",
]
OUTCOMES = ("ok", "loss", "wrong", "traceback", "misleading", "late", "skip")

# Installed in a child process before the script runs (`--hook module:function=ACTION`): when the function is
# first called, the process sends itself the signal (a real signal, delivered by the kernel), or prints a marker
# so the harness can tell that the expensive work had started.
BOOTSTRAP = r"""
import importlib, os, runpy, signal, sys
for hook in [h for h in os.environ.get("MISUSE_HOOKS", "").split(";") if h]:
    target, action = hook.split("=")
    action, _, nth = action.partition("@")
    module_name, path = target.split(":")
    owner = importlib.import_module(module_name)
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    original = getattr(owner, attr)
    calls = [0]
    def wrapper(*args, __original=original, __action=action, __target=target, __nth=int(nth or 1), __calls=calls,
                **kwargs):
        __calls[0] += 1
        if __action == "MARK":
            print(f"MISUSE-MARK {__target}", file=sys.stderr, flush=True)
        elif __calls[0] == __nth:
            print(f"MISUSE-FIRED {__action} at {__target} call {__nth}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), getattr(signal, __action))
            if __action == "SIGKILL":
                signal.pause()
        return __original(*args, **kwargs)
    setattr(owner, attr, wrapper)
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
"""


@dataclass
class Result:
    rc: int
    out: str
    err: str
    seconds: float

    @property
    def output(self) -> str:
        return self.out + self.err

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.output or "Error executing job" in self.output

    def last_line(self) -> str:
        lines = [line for line in self.err.strip().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        return (errors or lines or ["<no output>"])[-1][:300]


@dataclass
class Verdict:
    outcome: str
    detail: str = ""


@dataclass
class Case:
    kind: str
    name: str
    run: Callable[[Context], Verdict]


@dataclass
class Context:
    repo: Path
    work: Path
    templates: dict[str, Path] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VDG_FAULT", "MISUSE_"))}
        env.update(PYTHONPATH=str(self.repo), PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0", **extra)
        return env

    def run(
        self,
        script: str,
        *args: str,
        env: dict[str, str] | None = None,
        hooks: tuple[str, ...] = (),
        timeout: float = 300,
        cwd: Path | None = None,
        user: int | None = None,
        umask: int | None = None,
    ) -> Result:
        """scripts/<script>.py with `args` (or `python -c CODE` when script is "-c"), in its own process."""
        extra = dict(env or {})
        if script == "-c":
            cmd = [sys.executable, "-c", args[0], *args[1:]]
        elif hooks:
            extra["MISUSE_HOOKS"] = ";".join(hooks)
            cmd = [sys.executable, "-c", BOOTSTRAP, str(self.repo / "scripts" / f"{script}.py"), *args]
        else:
            cmd = [sys.executable, str(self.repo / "scripts" / f"{script}.py"), *args]

        def preexec() -> None:
            # a harness started in the background inherits SIGINT ignored; a user's shell delivers it
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if umask is not None:
                os.umask(umask)
            if user is not None:  # drop root for permission cases
                os.setgid(user)
                os.setuid(user)
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=cwd or self.work, env=self.env(**extra), capture_output=True, text=True,
                timeout=timeout, preexec_fn=preexec,
            )
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out, err = -999, str(exc.stdout or ""), f"{exc.stderr or ''}\nHARNESS: timed out"
        return Result(rc, out, err, time.perf_counter() - start)

    def pretrain(self, run_dir: Path, *args: str, **kwargs) -> Result:
        base = TINY
        if any(a.startswith("dataset=") for a in args):  # another dataset group: no synthetic-only keys
            base = [a for a in TINY if not a.startswith("dataset")]
        return self.run("pretrain", *base, f"run_dir={run_dir}", *args, **kwargs)

    def path(self, name: str) -> Path:
        """A fresh path under the work folder named after a case (only characters Hydra takes unquoted)."""
        return self.work / re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:80]

    def copy(self, template: str, name: str) -> Path:
        target = self.path(name)
        shutil.copytree(self.templates[template], target, symlinks=True)
        return target

    def fresh(self, name: str) -> Path:
        path = self.path(name)
        path.mkdir(parents=True, exist_ok=True)
        return path


# ------------------------------------------------------------------------------------------------ judging
def refused(res: Result, pattern: str | None = None, work_done: bool = False) -> Verdict:
    """A refusal is ok when it exits non-zero, shows no traceback, matches `pattern` and did no work first."""
    if res.rc == 0:
        return Verdict("wrong", "accepted (exit 0): " + res.last_line())
    if res.rc == -999:
        return Verdict("misleading", "hung: " + res.last_line())
    if res.traceback:
        return Verdict("traceback", res.last_line())
    if pattern and not re.search(pattern, res.output, re.IGNORECASE | re.DOTALL):
        return Verdict("misleading", res.last_line())
    if work_done:
        return Verdict("late", res.last_line())
    return Verdict("ok", res.last_line())


def succeeded(res: Result, what: str = "") -> Verdict | None:
    """None when the command succeeded, else the verdict of its failure."""
    if res.rc == 0:
        return None
    if res.traceback:
        return Verdict("traceback", f"{what}: {res.last_line()}")
    return Verdict("misleading", f"{what} failed: {res.last_line()}")


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (directories as 'dir')."""
    if not folder.exists():
        return {}
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def train_epochs(run_dir: Path) -> list[int]:
    """Epochs with a train/loss row in metrics.csv, in file order."""
    return [int(float(r["epoch"])) for r in metrics_rows(run_dir) if r.get("train/loss") and r.get("epoch")]


def last_ckpt(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


def ckpt_epoch(ctx: Context, path: Path) -> int | None:
    code = f"import torch; print(torch.load({str(path)!r}, map_location='cpu', weights_only=True)['epoch'])"
    res = ctx.run("-c", code)
    return int(res.out.strip()) if res.rc == 0 else None


def orphans(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


@contextlib.contextmanager
def tmpfs(path: Path, size_kb: int):
    """A small tmpfs at `path` (root only): writes beyond its size fail with ENOSPC, for real."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(tempfile.mkdtemp(prefix="misuse-mount-"))
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
    if ok.returncode == 0:
        subprocess.run(["umount", str(probe)], check=False)
    probe.rmdir()
    return ok.returncode == 0


def fill(folder: Path, leave_bytes: int) -> None:
    """Fill the file system of `folder` until about `leave_bytes` remain free."""
    free = shutil.disk_usage(folder).free
    (folder / "filler").write_bytes(b"\0" * max(free - leave_bytes, 0))


def make_image_folder(root: Path, train: dict[str, int], test: dict[str, int], size: int = 32) -> Path:
    """root/{train,test}/<class>/<i>.png with class-coloured noise images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in (("train", train), ("test", test)):
        for ci, (name, count) in enumerate(sorted(classes.items())):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.array([(ci * 80) % 256, (ci * 150) % 256, (ci * 40) % 256], dtype=np.float64)
                pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


FOLDER = ["dataset=folder", "dataset.num_classes=3", "data.batch_size=8", "dataset.image_size=32"]
THREE = {"a": 8, "b": 8, "c": 8}
THREE_TEST = {"a": 4, "b": 4, "c": 4}


# ------------------------------------------------------------------------------------------------ the cases
CASES: list[Case] = []


def case(kind: str, name: str):
    def register(fn: Callable[[Context], Verdict]) -> Callable[[Context], Verdict]:
        CASES.append(Case(kind, name, fn))
        return fn

    return register


def bad_pretrain(kind: str, name: str, args: list[str], pattern: str | None, template: str | None = None):
    """A pretraining command that must be refused before any training (no checkpoint written)."""

    def run(ctx: Context) -> Verdict:
        run_dir = ctx.copy(template, name) if template else ctx.path(name)
        before = last_ckpt(run_dir).read_bytes() if template else None
        res = ctx.pretrain(run_dir, *args)
        work = last_ckpt(run_dir).exists() and (before is None or last_ckpt(run_dir).read_bytes() != before)
        return refused(res, pattern, work_done=work)

    CASES.append(Case(kind, name, run))


def bad_eval(kind: str, name: str, script: str, args: list[str], pattern: str | None, ckpt: str = "finished"):
    """An evaluation command that must be refused before extracting any feature."""

    def run(ctx: Context) -> Verdict:
        run_dir = ctx.copy(ckpt, name)
        hooks = ("vdg.eval.features:extract_features=MARK",)
        res = ctx.run(script, f"ckpt={last_ckpt(run_dir)}", *args, hooks=hooks)
        return refused(res, pattern, work_done="MISUSE-MARK" in res.err)

    CASES.append(Case(kind, name, run))


# 1. ---- records lost --------------------------------------------------------------------------------------
@case("1 data loss", "SIGKILL in the sanity check of a resumed run keeps earlier metrics.csv rows")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.copy("unfinished", "kill-resume")
    before = train_epochs(run_dir)
    # the first validation step of a resumed run is its sanity check: before any new row is written
    res = ctx.pretrain(run_dir, "trainer.max_epochs=3", hooks=("vdg.methods.base:BaseMethod.validation_step=SIGKILL",))
    if res.rc != -9:
        return Verdict("misleading", f"fault hook did not fire (rc {res.rc}): {res.last_line()}")
    after = train_epochs(run_dir)
    if not set(before) <= set(after):
        return Verdict("loss", f"metrics.csv train epochs {before} -> {after}")
    return Verdict("ok", f"train epochs kept: {after}")


@case("1 data loss", "SIGKILL at the start of a finished run's rerun keeps metrics.csv")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.copy("finished", "kill-rerun")
    before = train_epochs(run_dir)
    hook = "pytorch_lightning.loggers.csv_logs:ExperimentWriter.log_hparams=SIGKILL"  # the logger has just started
    res = ctx.pretrain(run_dir, "trainer.max_epochs=2", hooks=(hook,))
    if res.rc != -9:
        return Verdict("misleading", f"hook did not fire (rc {res.rc}): {res.last_line()}")
    after = train_epochs(run_dir)
    return Verdict("ok", f"{after}") if set(before) <= set(after) else Verdict("loss", f"{before} -> {after}")


@case("1 data loss", "full disk while rerunning a finished run keeps metrics.csv and summary.json")
def _(ctx: Context) -> Verdict:
    if not ctx.templates.get("mount"):
        return Verdict("skip", "needs root to mount a tmpfs")
    with tmpfs(ctx.work / "disk-rerun", 4096) as disk:
        run_dir = disk / "run"
        shutil.copytree(ctx.templates["finished"], run_dir)
        shutil.rmtree(run_dir / "checkpoints" / "export", ignore_errors=True)
        rows, summary = metrics_rows(run_dir), (run_dir / "summary.json").read_text()
        fill(disk, 2048)
        res = ctx.pretrain(run_dir, "trainer.max_epochs=2")
        lost = []
        if len(metrics_rows(run_dir)) < len(rows):
            lost.append(f"metrics.csv {len(rows)} -> {len(metrics_rows(run_dir))} rows")
        text = (run_dir / "summary.json").read_text() if (run_dir / "summary.json").exists() else ""
        if not text or json.loads(text or "{}").get("epochs") != json.loads(summary)["epochs"]:
            lost.append("summary.json lost or truncated")
        if lost:
            return Verdict("loss", "; ".join(lost) + f" ({res.last_line()})")
        return refused(res, r"no space|full") if res.rc else Verdict("ok", "nothing needed writing")


@case("1 data loss", "full disk during a checkpoint write: one line, last.ckpt intact, no orphan")
def _(ctx: Context) -> Verdict:
    if not ctx.templates.get("mount"):
        return Verdict("skip", "needs root to mount a tmpfs")
    size = last_ckpt(ctx.templates["finished"]).stat().st_size
    with tmpfs(ctx.work / "disk-ckpt", (3 * size) // 1024 + 200) as disk:
        run_dir = disk / "run"
        res = ctx.pretrain(run_dir, "trainer.max_epochs=3", "checkpoint.every_n_epochs=1")
        if res.rc == 0:
            return Verdict("wrong", "a disk too small for the checkpoints raised nothing")
        epoch = ckpt_epoch(ctx, last_ckpt(run_dir)) if last_ckpt(run_dir).exists() else None
        if epoch is None:
            return Verdict("loss", f"last.ckpt unreadable after ENOSPC ({res.last_line()})")
        if orphans(run_dir):
            return Verdict("wrong", f"orphans {orphans(run_dir)}")
        return refused(res, r"no space left")


@case("1 data loss", "SIGINT mid-training: non-zero exit, no summary claiming a finished run, resumable")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.work / "sigint"
    res = ctx.pretrain(run_dir, "trainer.max_epochs=3", hooks=("vdg.optim.lars:LARS.step=SIGINT@6",))
    if "MISUSE-FIRED" not in res.err:
        return Verdict("misleading", f"hook did not fire: {res.last_line()}")
    if res.rc == 0 or (run_dir / "summary.json").exists():
        return Verdict("wrong", f"rc {res.rc}, summary.json written after an interrupt")
    if res.traceback:
        return Verdict("traceback", res.last_line())
    again = ctx.pretrain(run_dir, "trainer.max_epochs=3")
    return succeeded(again, "resume after SIGINT") or Verdict("ok", res.last_line())


@case("1 data loss", "SIGTERM (pre-emption) mid-training exits non-zero")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.work / "sigterm"
    res = ctx.pretrain(run_dir, "trainer.max_epochs=3", hooks=("vdg.optim.lars:LARS.step=SIGTERM@6",))
    if "MISUSE-FIRED" not in res.err:
        return Verdict("misleading", f"hook did not fire: {res.last_line()}")
    if res.rc == 0:
        return Verdict("wrong", "exit 0 after SIGTERM: a job chain would go on with an unfinished run")
    if res.traceback:
        return Verdict("traceback", res.last_line())
    if (run_dir / "summary.json").exists():
        return Verdict("wrong", "summary.json written after SIGTERM")
    return Verdict("ok", res.last_line())


@case("1 data loss", "SIGINT during the final k-NN: one line, rerun finishes")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.copy("finished", "sigint-knn")
    res = ctx.pretrain(run_dir, "trainer.max_epochs=2", "final_knn.enabled=true",
                       hooks=("vdg.eval.knn:knn_accuracy=SIGINT",))
    if "MISUSE-FIRED" not in res.err:
        return Verdict("misleading", f"hook did not fire: {res.last_line()}")
    if res.rc == 0:
        return Verdict("wrong", "exit 0 after SIGINT")
    if res.traceback:
        return Verdict("traceback", res.last_line())
    again = ctx.pretrain(run_dir, "trainer.max_epochs=2", "final_knn.enabled=true")
    return succeeded(again, "rerun") or Verdict("ok", res.last_line())


@case("1 data loss", "SIGKILL during the end-of-run export keeps the previous exports loadable")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.copy("finished", "kill-export")
    res = ctx.pretrain(run_dir, "trainer.max_epochs=2", hooks=("safetensors.torch:save_file=SIGKILL",))
    if res.rc != -9:
        return Verdict("misleading", f"hook did not fire: {res.last_line()}")
    exports = sorted((run_dir / "checkpoints" / "export").glob("*.safetensors"))
    code = "import sys, vdg; [vdg.load_backbone(p) for p in sys.argv[1:]]"
    check = ctx.run("-c", code, *map(str, exports))
    if not exports or check.rc:
        return Verdict("loss", f"exports unloadable after a kill: {check.last_line()}")
    return Verdict("ok", f"{len(exports)} exports intact")


@case("1 data loss", "a second process in the same run directory fails at once, naming the holder")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.work / "two"
    # 40 tiny epochs (~20 s on an idle 2-core CPU): the first run must still hold the directory when the second,
    # started after its first checkpoint, has imported torch (a 4-epoch run used to finish first on an idle machine,
    # and the second then correctly found a finished run: a race of the harness, not of vdg)
    first = subprocess.Popen(
        [sys.executable, str(ctx.repo / "scripts" / "pretrain.py"), *TINY, f"run_dir={run_dir}",
         "trainer.max_epochs=40"], cwd=ctx.work, env=ctx.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and not last_ckpt(run_dir).exists():
        time.sleep(0.2)
    second = ctx.pretrain(run_dir, "trainer.max_epochs=40")
    out, err = first.communicate(timeout=300)
    epochs = train_epochs(run_dir)
    if second.rc == 0 or len(epochs) != len(set(epochs)):
        return Verdict("loss", f"both trained; metrics.csv train epochs {epochs}")
    if first.returncode != 0:
        return Verdict("loss", f"the first run failed: {err.strip().splitlines()[-1:]}")
    return refused(second, r"in use|lock|pid")


@case("1 data loss", "a stale lock of a SIGKILLed run is taken over; the rerun resumes")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.work / "stale"
    killed = ctx.pretrain(run_dir, "trainer.max_epochs=3", env={"VDG_FAULT_KILL_AT_STEP": "6"})
    if killed.rc != -9:
        return Verdict("misleading", f"fault hook did not fire: {killed.last_line()}")
    again = ctx.pretrain(run_dir, "trainer.max_epochs=3")
    return succeeded(again, "rerun after a kill") or Verdict("ok", f"resumed, epochs {train_epochs(run_dir)}")


@case("1 data loss", "a lock left by a dead process on another host is taken over when the kernel lock is free")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.copy("unfinished", "foreign-lock")
    for name in (".vdg.lock", "vdg.lock", ".lock"):
        (run_dir / name).write_text(json.dumps({"pid": 999999, "host": "node-that-died", "started": "earlier"}))
    again = ctx.pretrain(run_dir, "trainer.max_epochs=3")
    return succeeded(again, "rerun over a stale foreign lock") or Verdict("ok", "taken over")


# 2. ---- a refused rerun leaves the run directory unchanged -------------------------------------------------
def refused_rerun(name: str, args: list[str], pattern: str, template: str = "finished") -> None:
    def run(ctx: Context) -> Verdict:
        run_dir = ctx.copy(template, name)
        before = snapshot(run_dir)
        res = ctx.pretrain(run_dir, *args)
        diff = changed(before, snapshot(run_dir))
        if res.rc == 0:
            return Verdict("wrong", "accepted")
        if diff:
            return Verdict("wrong", f"refused, but changed {diff[:6]}")
        return refused(res, pattern)

    CASES.append(Case("2 refused rerun", name, run))


refused_rerun("changed budget", ["trainer.max_epochs=2", "budget=0.5"], r"budget: 0.3 -> 0.5")
refused_rerun("changed width", ["trainer.max_epochs=2", "backbone.width=8"], r"backbone.width")
refused_rerun("changed method", ["trainer.max_epochs=2", "method=vicreg_gating"], r"method")
refused_rerun("changed dataset size", ["trainer.max_epochs=2", "dataset.image_size=16"], r"image_size")
refused_rerun("resume=never", ["trainer.max_epochs=2", "resume=never"], r"resume=never")
refused_rerun("invalid value on an existing run", ["trainer.max_epochs=2", "budget=2"], r"budget")
refused_rerun("invalid seed on an existing run", ["trainer.max_epochs=2", "seed=1.5"], r"seed")
refused_rerun("changed seed, same run_dir", ["trainer.max_epochs=2", "seed=4"], r"seed")
refused_rerun("extending a finished run", ["trainer.max_epochs=4"], r"max_epochs|extend")
refused_rerun("changed optimizer.lr", ["trainer.max_epochs=2", "optimizer.lr=0.6"], r"optimizer.lr|lr")
refused_rerun("a typo'd key on an existing run", ["trainer.max_epochs=2", "+trainer.max_epoch=4"], r"max_epoch")
refused_rerun("missing data on an existing run", ["trainer.max_epochs=2", "dataset.train_size=8"],
              r"batch|train_size|images")
if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
    refused_rerun("a logger whose package is missing", ["trainer.max_epochs=2", "logger=tensorboard"], r"tensorboard")
if shutil.which("nvidia-smi") is None:
    refused_rerun("trainer settings Lightning refuses", ["trainer.max_epochs=2", "trainer.strategy=fsdp"], r"fsdp")


# 4. ---- extending -----------------------------------------------------------------------------------------
def lr_of_epochs(run_dir: Path) -> dict[int, float]:
    out = {}
    for row in metrics_rows(run_dir):
        if row.get("lr-LARS/decay") and row.get("step"):
            out.setdefault(len(out), float(row["lr-LARS/decay"]))
    return out


@case("4 extending", "max_epochs=4 on a finished 2-epoch run never trains at lr 0")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.copy("finished", "extend-4")
    res = ctx.pretrain(run_dir, "trainer.max_epochs=4")
    if res.rc:
        return refused(res, r"extend")
    lrs = lr_of_epochs(run_dir)
    if any(v == 0 for k, v in lrs.items() if k >= 2):
        return Verdict("wrong", f"epochs after 2 train at lr 0: {lrs}")
    return Verdict("ok", f"lrs {lrs}")


@case("4 extending", "max_epochs=5 on an unfinished 3-epoch run does not silently change the schedule")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.copy("unfinished", "extend-unfinished")
    res = ctx.pretrain(run_dir, "trainer.max_epochs=5")
    return refused(res, r"extend|max_epochs")


@case("4 extending", "max_epochs=1 on a finished 2-epoch run is not reported as a 1-epoch run")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.copy("finished", "shorter")
    res = ctx.pretrain(run_dir, "trainer.max_epochs=1")
    return refused(res, r"max_epochs")


@case("4 extending", "resume=extend continues a finished run on a recomputed schedule")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.copy("finished", "extend-explicit")
    res = ctx.pretrain(run_dir, "trainer.max_epochs=4", "resume=extend")
    bad = succeeded(res, "resume=extend")
    if bad:
        return bad
    lrs = lr_of_epochs(run_dir)
    later = [v for k, v in lrs.items() if k >= 2]
    if not later or any(v <= 0 for v in later[:-1]):
        return Verdict("wrong", f"lrs {lrs}")
    return Verdict("ok", f"lrs {lrs}")


@case("4 extending", "resume=extend with a lower max_epochs is refused")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.copy("finished", "extend-lower")
    return refused(ctx.pretrain(run_dir, "trainer.max_epochs=1", "resume=extend"), r"max_epochs")


# 5. ---- class lists ---------------------------------------------------------------------------------------
def folder_case(name: str, train: dict[str, int], test: dict[str, int], args: list[str], pattern: str,
                tweak: Callable[[Path], None] | None = None) -> None:
    def run(ctx: Context) -> Verdict:
        root = make_image_folder(ctx.path(f"{name}-data"), train, test)
        if tweak:
            tweak(root)
        res = ctx.pretrain(ctx.path(name), *FOLDER, f"data.root={root}", "trainer.max_epochs=1", *args)
        return refused(res, pattern, work_done=last_ckpt(ctx.path(name)).exists())

    CASES.append(Case("5 class lists", name, run))


folder_case("test/ lacks a class", THREE, {"a": 4, "c": 4}, [], r"\bb\b.*(missing|lacks)|missing.*\bb\b")
folder_case("test/ has an extra class", THREE, {**THREE_TEST, "d": 4}, [], r"\bd\b")
folder_case("class names differ in case", THREE, {"A": 4, "b": 4, "c": 4}, [], r"\bA\b|\ba\b")
folder_case("more folders than dataset.num_classes", {**THREE, "d": 8}, {**THREE_TEST, "d": 4}, [],
            r"num_classes")
folder_case("fewer folders than dataset.num_classes", {"a": 8, "b": 8}, {"a": 4, "b": 4}, [], r"num_classes")
folder_case(
    "images directly in train/", THREE, THREE_TEST, [], r"class folder",
    tweak=lambda root: shutil.copy(root / "train" / "a" / "0.png", root / "train" / "stray.png"),
)


@case("5 class lists", "a hidden folder in train/ is not a class")
def _(ctx: Context) -> Verdict:
    root = make_image_folder(ctx.work / "hidden-data", THREE, THREE_TEST)
    shutil.copytree(root / "train" / "a", root / "train" / ".ipynb_checkpoints")
    code = (
        "from vdg.data.datasets import ImageFolderDataset as D; import sys; "
        "print(D(sys.argv[1], 'train').classes, D(sys.argv[1], 'test').classes)"
    )
    res = ctx.run("-c", code, str(root))
    if res.rc:
        return Verdict("traceback" if res.traceback else "misleading", res.last_line())
    train, test = res.out.strip().split("] [")
    return Verdict("ok" if ".ipynb" not in train else "wrong", res.out.strip())


@case("5 class lists", "knn_eval on a folder whose test/ lacks a class is refused")
def _(ctx: Context) -> Verdict:
    root = make_image_folder(ctx.work / "eval-missing-data", THREE, THREE_TEST)
    run_dir = ctx.work / "eval-missing"
    res = ctx.pretrain(run_dir, *FOLDER, f"data.root={root}", "trainer.max_epochs=1")
    if res.rc:
        return Verdict("skip", f"setup failed: {res.last_line()}")
    shutil.rmtree(root / "test" / "a")
    res = ctx.run("knn_eval", f"ckpt={last_ckpt(run_dir)}")
    return refused(res, r"\ba\b")


# 6. ---- image modes ---------------------------------------------------------------------------------------
IMAGE_CHECK = r"""
import sys, numpy as np
from PIL import Image
from vdg.data.datasets import ImageFolderDataset
root, expected = sys.argv[1], float(sys.argv[2])
try:
    image = ImageFolderDataset(root, "train").load(0)
except Exception as err:
    print("REFUSED", type(err).__name__, err)
    raise SystemExit(3)
pixels = np.asarray(image)
print("MEAN", pixels.mean(), pixels.shape, image.mode)
"""


def image_case(name: str, make: Callable[[Path], float | None]) -> None:
    """`make(path)` writes one image and returns its expected mean RGB value (None: it must be refused)."""

    def run(ctx: Context) -> Verdict:
        folder = ctx.path(f"img-{name}") / "train" / "a"
        folder.mkdir(parents=True)
        expected = make(folder)
        res = ctx.run("-c", IMAGE_CHECK, str(folder.parents[1]), str(expected if expected is not None else -1))
        if "REFUSED" in res.out:
            if expected is None:
                return Verdict("ok", res.out.strip())
            return Verdict("misleading", "a readable mode was refused: " + res.out.strip())
        if res.rc:
            return Verdict("traceback" if res.traceback else "misleading", res.last_line())
        mean = float(re.search(r"MEAN (\S+)", res.out).group(1))
        shape = re.search(r"\((\d+), (\d+), (\d+)\)", res.out)
        if expected is None:
            return Verdict("wrong", f"an unconvertible mode was silently decoded to mean {mean:.1f}")
        if not shape or shape.group(3) != "3" or abs(mean - expected) > 2:
            return Verdict("wrong", f"mean {mean:.1f}, expected {expected:.1f} ({res.out.strip()})")
        return Verdict("ok", f"mean {mean:.1f}")

    CASES.append(Case("6 image modes", name, run))


def _gray16(folder: Path) -> float:
    import numpy as np
    from PIL import Image

    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(values).save(folder / "x.png")
    return float((values / 257.0).mean())


def _tiff16(folder: Path) -> float:
    import numpy as np
    from PIL import Image

    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(values).save(folder / "x.tif")
    return float((values / 257.0).mean())


def _mode(mode: str, value, expected: float | None, fmt: str = "png"):
    def make(folder: Path) -> float | None:
        from PIL import Image

        image = Image.new(mode, (16, 16), value)
        if mode == "P":
            image.putpalette([10, 20, 30] * 256)
        image.save(folder / f"x.{fmt}")
        return expected

    return make


def _float_tiff(folder: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)).save(folder / "x.tif")


def _int32_tiff(folder: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((16, 16), 100000, dtype=np.int32)).save(folder / "x.tif")


image_case("16-bit grayscale PNG", _gray16)
image_case("16-bit grayscale TIFF", _tiff16)
image_case("palette PNG", _mode("P", 0, 20.0))
image_case("LA PNG", _mode("LA", (200, 128), 200.0))
image_case("RGBA PNG", _mode("RGBA", (10, 20, 30, 40), 20.0))
image_case("CMYK JPEG", _mode("CMYK", (0, 0, 0, 0), 255.0, "jpg"))
image_case("1-bit PNG", _mode("1", 1, 255.0))
image_case("float TIFF (mode F)", _float_tiff)
image_case("32-bit integer TIFF (mode I)", _int32_tiff)


# 7. ---- values silently coerced ---------------------------------------------------------------------------
for args, pattern in [
    (["seed=1.5"], r"seed"),
    (["seed=true"], r"seed"),
    (["seed=-1"], r"seed"),
    (["seed=abc"], r"seed"),
    (["seed=99999999999"], r"seed"),
    (["trainer.max_epochs=true"], r"max_epochs"),
    (["trainer.max_epochs=2.5"], r"max_epochs"),
    (["data.num_workers=true"], r"num_workers"),
    (["data.batch_size=16.5"], r"batch_size"),
    (["optimizer.lr=true"], r"optimizer.lr"),
    (["optimizer.lr=inf"], r"optimizer.lr"),
    (["budget=true"], r"budget"),
    (["checkpoint.every_n_epochs=1.5"], r"every_n_epochs"),
    (["guard.check_every_n_steps=0"], r"check_every_n_steps"),
    (["gating.bound_loss=no"], r"bound_loss"),
    (["data.pin_memory=maybe"], r"pin_memory"),
    (["final_knn.k=1.5", "final_knn.enabled=true"], r"final_knn.k"),
    (["dataset.num_classes=10.5"], r"num_classes"),
    (["method.projector_output_dim=32.5"], r"projector_output_dim"),
    (["scheduler.warmup_epochs=abc"], r"warmup_epochs"),
]:
    bad_pretrain("7 coerced values", "pretrain " + " ".join(args), ["trainer.max_epochs=1", *args], pattern)

for script, args, pattern in [
    ("linear_eval", ["epochs=2.5", "runs=1"], r"epochs"),
    ("linear_eval", ["runs=true", "epochs=1"], r"runs"),
    ("linear_eval", ["batch_size=12.5", "runs=1", "epochs=1"], r"batch_size"),
    ("linear_eval", ["augment=sometimes", "runs=1", "epochs=1"], r"augment"),
    ("knn_eval", ["k=true"], r"\bk\b"),
    ("knn_eval", ["normalize=yes"], r"normalize"),
    ("umap_plot", ["max_samples=20.5"], r"max_samples"),
]:
    bad_eval("7 coerced values", f"{script} " + " ".join(args), script, args, pattern)


# 8. ---- errors only after the work ------------------------------------------------------------------------
for args, pattern in [
    (["evaluate=[{protocol: linaer}]"], r"linaer"),
    (["evaluate=[{protocol: knn, k: 0}]"], r"\bk\b"),
    (["evaluate=[{protocol: linear, lr: -0.1}]"], r"\blr\b"),
    (["evaluate=[{protocol: linear, epochz: 2}]"], r"epochz"),
    (["evaluate=[{protocol: transfer, target: stl10}]", "data.download=false"], r"stl10"),
    (["final_knn.enabled=true", "final_knn.k=0"], r"final_knn.k"),
    (["final_knn.enabled=true", "final_knn.k=1000"], r"final_knn.k|1000"),
    (["final_knn.enabled=true", "final_knn.distance=manhattan"], r"manhattan"),
    (["evaluate=[{protocol: knn, k: 1000}]"], r"1000"),
]:
    bad_pretrain("8 late errors", "pretrain " + " ".join(args), ["trainer.max_epochs=1", *args], pattern)

for script, args, pattern in [
    ("linear_eval", ["lr=-0.1", "runs=1", "epochs=1"], r"\blr\b"),
    ("linear_eval", ["momentum=-1", "runs=1", "epochs=1"], r"momentum"),
    ("linear_eval", ["gamma=0", "runs=1", "epochs=1"], r"gamma"),
    ("linear_eval", ["weight_decay=-1", "runs=1", "epochs=1"], r"weight_decay"),
    ("linear_eval", ["device=cuda", "runs=1", "epochs=1"], r"cuda|device"),
    ("linear_eval", ["results_dir=/proc/vdg-results", "runs=1", "epochs=1"], r"results_dir|/proc"),
    ("knn_eval", ["k=1000"], r"\bk\b.*1000|1000"),
    ("knn_eval", ["weighting=exp", "temperature=0"], r"temperature"),
    ("knn_eval", ["results_dir=/proc/vdg-results"], r"results_dir|/proc"),
    ("umap_plot", ["max_samples=1"], r"max_samples|3 samples"),
    ("umap_plot", ["n_neighbors=1", "max_samples=20"], r"n_neighbors"),
    ("umap_plot", ["results_dir=/proc/vdg-results", "max_samples=20"], r"results_dir|/proc"),
    ("flops", ["report=true", "results_dir=/proc/vdg-results"], r"results_dir|/proc"),
]:
    bad_eval("8 late errors", f"{script} " + " ".join(args), script, args, pattern)


@case("1 data loss", "SIGINT during validation: one line, nothing written")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.path("sigint-validation")
    res = ctx.pretrain(run_dir, "trainer.max_epochs=1", hooks=("vdg.run.config:validate_pretrain_config=SIGINT",))
    if "MISUSE-FIRED" not in res.err:
        return Verdict("misleading", f"hook did not fire: {res.last_line()}")
    if run_dir.exists():
        return Verdict("wrong", f"left {sorted(p.name for p in run_dir.rglob('*'))}")
    return refused(res, r"interrupt")


@case("1 data loss", "SIGINT during a k-NN evaluation: one line")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.copy("finished", "sigint-knn-eval")
    res = ctx.run("knn_eval", f"ckpt={last_ckpt(run_dir)}", hooks=("vdg.eval.knn:knn_accuracy=SIGINT",))
    if "MISUSE-FIRED" not in res.err:
        return Verdict("misleading", f"hook did not fire: {res.last_line()}")
    return refused(res, r"interrupt")


bad_pretrain("8 late errors", "pretrain with a chained evaluation into an unwritable results_dir",
             ["trainer.max_epochs=1", "evaluate=[{protocol: knn, results_dir: /proc/vdg-results}]"], r"/proc")
bad_eval("9 tracebacks", "export overwrite=yes", "export", ["branch=gated", "overwrite=yes"], r"overwrite")


@case("9 tracebacks", "knn_eval on an export instead of a checkpoint")
def _(ctx: Context) -> Verdict:
    export = os.environ.get("MISUSE_EXPORT")
    if not export:
        return Verdict("skip", "the template run wrote no export")
    return refused(ctx.run("knn_eval", f"ckpt={export}"), r"checkpoint")


@case("8 late errors", "pretrain into an unwritable run_dir")
def _(ctx: Context) -> Verdict:
    return refused(ctx.pretrain(Path("/proc/vdg-run"), "trainer.max_epochs=1"), r"/proc|writ")


@case("8 late errors", "export into an unwritable out_dir")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.copy("finished", "export-ro")
    res = ctx.run("export", f"ckpt={last_ckpt(run_dir)}", "branch=gated", "out_dir=/proc/vdg-export")
    return refused(res, r"/proc|writ")


@case("8 late errors", "make_tables into an unwritable --out")
def _(ctx: Context) -> Verdict:
    results = ctx.copy("results", "tables-ro")
    return refused(ctx.run("make_tables", str(results), "--out", "/proc/vdg-tables"), r"/proc|writ")


@case("8 late errors", "plot_pareto into an unwritable --out")
def _(ctx: Context) -> Verdict:
    results = ctx.copy("results", "pareto-ro")
    return refused(ctx.run("plot_pareto", str(results), "--out", "/proc/vdg-plots"), r"/proc|writ")


# 9. ---- raw tracebacks ------------------------------------------------------------------------------------
def broken_image_case(name: str, breaker: Callable[[Path], Path], workers: int = 2, harmless: bool = False) -> None:
    """A folder with one bad entry: refused in one line naming it (or, when `harmless`, trained on correctly)."""

    def run(ctx: Context) -> Verdict:
        root = make_image_folder(ctx.path(f"{name}-data"), THREE, THREE_TEST)
        bad = breaker(root / "train" / "b")
        res = ctx.pretrain(ctx.path(name), *FOLDER, f"data.root={root}", "trainer.max_epochs=1",
                           f"data.num_workers={workers}")
        if harmless:
            return succeeded(res, "a harmless entry") or Verdict("ok", "trained")
        return refused(res, re.escape(bad.name))

    CASES.append(Case("9 tracebacks", name, run))


def _corrupt(folder: Path) -> Path:
    path = folder / "0.png"
    path.write_bytes(os.urandom(300))
    return path


def _truncated(folder: Path) -> Path:
    from PIL import Image

    path = folder / "0.jpg"
    Image.open(folder / "0.png").convert("RGB").resize((256, 256)).save(path, quality=95)
    (folder / "0.png").unlink()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def _empty(folder: Path) -> Path:
    path = folder / "0.png"
    path.write_bytes(b"")
    return path


def _dangling(folder: Path) -> Path:
    path = folder / "zz.png"
    path.symlink_to(folder / "does-not-exist.png")
    return path


def _directory(folder: Path) -> Path:
    path = folder / "zz.png"
    path.mkdir()
    return path


broken_image_case("corrupt image (random bytes) in a worker", _corrupt)
broken_image_case("truncated JPEG in a worker", _truncated)
broken_image_case("zero-byte image in a worker", _empty)
broken_image_case("dangling symlink image", _dangling)
broken_image_case("an empty sub-folder named like an image is no image", _directory, harmless=True)
broken_image_case("corrupt image, no workers", _corrupt, workers=0)

for args, pattern in [
    (["backbone.name=resnet50"], r"backbone.name"),
    (["trainer.accelerator=gpu"], r"accelerator|cuda|gpu"),
    (["trainer.precision=fp8"], r"precision"),
    (["data.batch_size=128"], r"batch_size|images"),
    (["dataset.std=[0,0,0]"], r"std"),
    (["dataset.mean=[0.5,0.5]"], r"mean"),
    (["gating.bound_target=cube"], r"bound_target"),
    (["method.variance_reduction=median"], r"variance_reduction"),
    (["+trainer.max_epoch=3"], r"max_epoch"),
    (["+method.invariance_weigth=5"], r"invariance_weigth"),
    (["+data.batchsize=32"], r"batchsize"),
    (["backbone.gate_reduction=0"], r"gate_reduction"),
    (["backbone.block_widths=[4,4]"], r"block_widths"),
    (["data.gpu_memory_fraction=2"], r"gpu_memory_fraction"),
    (["dataset.augment=[{crop_min_scale: 0.2}]"], r"augment"),
    (["+dataset.augment.0.crop_scale=0.2"], r"crop_scale|augment"),
    (["trainer.devices=0"], r"devices"),
    (["trainer.log_every_n_steps=0"], r"log_every_n_steps"),
    (["trainer.check_val_every_n_epoch=0"], r"check_val_every_n_epoch"),
    (["optimizer.momentum=1.5"], r"momentum"),
    (["dataset.eval_std=[0.2,0,0.2]"], r"eval_std"),
    (["trainer.limit_train_batches=0"], r"limit_train_batches"),
    (["data.batch_size=15", "trainer.devices=2", "trainer.accelerator=cpu"], r"batch_size"),
]:
    bad_pretrain("9 tracebacks", "pretrain " + " ".join(args), ["trainer.max_epochs=1", *args], pattern)


@case("9 tracebacks", "run_dir is an existing file")
def _(ctx: Context) -> Verdict:
    path = ctx.work / "a-file"
    path.write_text("not a folder")
    return refused(ctx.pretrain(path, "trainer.max_epochs=1"), r"a-file")


@case("9 tracebacks", "a read-only run directory (read-only mount)")
def _(ctx: Context) -> Verdict:
    if not ctx.templates.get("mount"):
        return Verdict("skip", "needs root to mount a tmpfs")
    with tmpfs(ctx.work / "ro", 4096) as disk:
        run_dir = disk / "run"
        shutil.copytree(ctx.templates["unfinished"], run_dir)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        before = snapshot(run_dir)
        res = ctx.pretrain(run_dir, "trainer.max_epochs=3")
        if changed(before, snapshot(run_dir)):
            return Verdict("loss", "a read-only run directory changed?")
        return refused(res, r"read-only|writ")


@case("9 tracebacks", "a read-only run directory (permissions, non-root user)")
def _(ctx: Context) -> Verdict:
    user = 65534 if os.geteuid() == 0 else None  # root ignores permission bits: run as nobody
    try:
        usable = user is None or ctx.run("-c", "import vdg", user=user).rc == 0
    except OSError:  # the interpreter itself is not executable for that user
        usable = False
    if not usable:
        return Verdict("skip", "user nobody cannot run this Python or read the checkout")
    run_dir = ctx.copy("unfinished", "ro-perm")
    for path in [run_dir, *run_dir.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    ctx.work.chmod(0o755)
    res = ctx.pretrain(run_dir, "trainer.max_epochs=3", user=user)
    return refused(res, r"writ|permission|read-only")


@case("9 tracebacks", "full disk on the first checkpoint")
def _(ctx: Context) -> Verdict:
    if not ctx.templates.get("mount"):
        return Verdict("skip", "needs root to mount a tmpfs")
    with tmpfs(ctx.work / "disk-first", 256) as disk:
        res = ctx.pretrain(disk / "run", "trainer.max_epochs=1")
        return refused(res, r"no space left")


@case("9 tracebacks", "full disk while writing result JSONs")
def _(ctx: Context) -> Verdict:
    if not ctx.templates.get("mount"):
        return Verdict("skip", "needs root to mount a tmpfs")
    run_dir = ctx.copy("finished", "disk-results")
    with tmpfs(ctx.work / "disk-results-out", 64) as disk:
        fill(disk, 1024)
        res = ctx.run("knn_eval", f"ckpt={last_ckpt(run_dir)}", f"results_dir={disk}")
        return refused(res, r"no space left")


LOAD = "import sys, vdg; vdg.load_backbone(sys.argv[1])"


def load_backbone_case(name: str, make: Callable[[Path], Path], pattern: str) -> None:
    def run(ctx: Context) -> Verdict:
        folder = ctx.fresh(f"load-{name.replace(' ', '-')}")
        res = ctx.run("-c", LOAD, str(make(folder)))
        if res.rc == 0:
            return Verdict("wrong", "loaded a bad file")
        lines = [line for line in res.err.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        # a Python API raises: the traceback is expected; its last line must be one clear, typed message
        if re.search(r"UnpicklingError|SafetensorError|JSONDecodeError|KeyError|RuntimeError|HeaderTooLarge", last):
            return Verdict("traceback", last[:300])
        if not re.search(pattern, last, re.IGNORECASE):
            return Verdict("misleading", last[:300])
        return Verdict("ok", last[:300])

    CASES.append(Case("9 tracebacks", "vdg.load_backbone: " + name, run))


def _export_copy(ctx_folder: Path, suffix: str, mangle: Callable[[Path], None]) -> Path:
    source = Path(os.environ["MISUSE_EXPORT"])
    for file in source.parent.glob(source.stem + ".*"):
        shutil.copy(file, ctx_folder / file.name)
    target = ctx_folder / (source.stem + suffix)
    mangle(target)
    return target


load_backbone_case("random bytes .pt", lambda d: _write(d / "x.pt", os.urandom(4096), {"format": "vdg-backbone"}),
                   r"x\.pt")
load_backbone_case("random bytes .safetensors", lambda d: _write(d / "x.safetensors", os.urandom(4096)),
                   r"x\.safetensors")
load_backbone_case("corrupt .json sidecar", lambda d: _write(d / "x.safetensors", b"", None, b"{not json"),
                   r"x\.json")
load_backbone_case("truncated export .pt", lambda d: _export_copy(d, ".pt", _halve), r"\.pt")
load_backbone_case("truncated export .safetensors", lambda d: _export_copy(d, ".safetensors", _halve),
                   r"\.safetensors")
load_backbone_case("a pretraining checkpoint", lambda d: Path(os.environ["MISUSE_CKPT"]), r"export")
load_backbone_case("a missing file", lambda d: d / "nothing.safetensors", r"nothing")


def _write(path: Path, data: bytes, sidecar: dict | None = None, raw_sidecar: bytes | None = None) -> Path:
    path.write_bytes(data)
    if sidecar is not None:
        path.with_suffix(".json").write_text(json.dumps(sidecar))
    if raw_sidecar is not None:
        path.with_suffix(".json").write_bytes(raw_sidecar)
    return path


def _halve(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# 10. ---- small traps --------------------------------------------------------------------------------------
@case("10 small traps", "periodic checkpoints can be passed as ckpt= without quoting")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.work / "periodic"
    res = ctx.pretrain(run_dir, "trainer.max_epochs=1", "checkpoint.every_n_epochs=1")
    if res.rc:
        return Verdict("misleading", res.last_line())
    periodic = [p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    if not periodic:
        return Verdict("wrong", "no periodic checkpoint")
    return succeeded(ctx.run("knn_eval", f"ckpt={periodic[0]}"), f"ckpt={periodic[0].name}") or Verdict("ok")


@case("10 small traps", "an old epoch=NNNN.ckpt name still works as ckpt=")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.copy("finished", "old-name")
    old = run_dir / "checkpoints" / "epoch=0001.ckpt"
    shutil.copy(last_ckpt(run_dir), old)
    return succeeded(ctx.run("knn_eval", f"ckpt={old}"), "ckpt=.../epoch=0001.ckpt") or Verdict("ok")


def mode_case(name: str, produce: Callable[[Context, Path, int], list[Path]], umask: int, expect_mode: int) -> None:
    def run(ctx: Context) -> Verdict:
        files = produce(ctx, ctx.copy("finished", name), umask)
        if not files:
            return Verdict("misleading", "nothing written")
        modes = {f.name: oct(f.stat().st_mode & 0o777) for f in files}
        wrong = {k: v for k, v in modes.items() if int(v, 8) != expect_mode}
        return Verdict("wrong", f"modes {wrong}, umask {oct(umask)}") if wrong else Verdict("ok", f"{modes}")

    CASES.append(Case("10 small traps", name, run))


def _exports(ctx: Context, run_dir: Path, umask: int) -> list[Path]:
    out = run_dir / "fresh-export"
    ctx.run("export", f"ckpt={last_ckpt(run_dir)}", "branch=gated", f"out_dir={out}", umask=umask)
    return sorted(out.glob("*"))


def _results(ctx: Context, run_dir: Path, umask: int) -> list[Path]:
    ctx.run("knn_eval", f"ckpt={last_ckpt(run_dir)}", umask=umask)
    return sorted((run_dir / "checkpoints" / "results").glob("*.json"))


mode_case("exports are group/world readable under umask 022", _exports, 0o022, 0o644)
mode_case("result JSONs are group/world readable under umask 022", _results, 0o022, 0o644)
mode_case("exports stay private under umask 077", _exports, 0o077, 0o600)


@case("10 small traps", "an orphan last.ckpt.tmp-<pid> of a killed save is removed by the next run")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.work / "orphan-ckpt"
    killed = ctx.pretrain(run_dir, "trainer.max_epochs=3", env={"VDG_FAULT_KILL_IN_SAVE": "2"})
    if killed.rc != -9 or not orphans(run_dir):
        return Verdict("misleading", f"no orphan produced (rc {killed.rc})")
    again = ctx.pretrain(run_dir, "trainer.max_epochs=3")
    bad = succeeded(again, "rerun")
    if bad:
        return bad
    left = orphans(run_dir)
    return Verdict("wrong", f"orphans left: {left}") if left else Verdict("ok", "cleaned")


@case("10 small traps", "an orphan result temp file of a killed evaluation is removed by the next one")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.copy("finished", "orphan-result")
    killed = ctx.run("knn_eval", f"ckpt={last_ckpt(run_dir)}", hooks=("os:replace=SIGKILL",))
    results = run_dir / "checkpoints" / "results"
    if killed.rc != -9 or not orphans(results):
        return Verdict("misleading", f"no orphan produced (rc {killed.rc})")
    again = ctx.run("knn_eval", f"ckpt={last_ckpt(run_dir)}")
    bad = succeeded(again, "rerun")
    if bad:
        return bad
    return Verdict("wrong", f"orphans left: {orphans(results)}") if orphans(results) else Verdict("ok", "cleaned")


@case("10 small traps", "a run that fails validation leaves no run folder")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.work / "never-created" / "run"
    res = ctx.pretrain(run_dir, "budget=2")
    if run_dir.exists() or run_dir.parent.exists():
        return Verdict("wrong", f"left {sorted(p.name for p in run_dir.parent.rglob('*'))}")
    return refused(res, r"budget")


@case("10 small traps", "a run refused for missing data leaves no run folder")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.work / "no-data" / "run"
    res = ctx.pretrain(run_dir, "dataset=folder", f"data.root={ctx.work / 'nowhere'}")
    if run_dir.exists():
        return Verdict("wrong", f"left {sorted(p.name for p in run_dir.rglob('*'))}")
    return refused(res, r"nowhere")


@case("10 small traps", "hydra.job.chdir=true does not nest the run directory")
def _(ctx: Context) -> Verdict:
    cwd = ctx.fresh("chdir")
    res = ctx.run("pretrain", *TINY, "run_dir=runs/x", "trainer.max_epochs=1", "hydra.job.chdir=true", cwd=cwd)
    bad = succeeded(res, "hydra.job.chdir=true")
    if bad:
        return bad
    nested = list(cwd.rglob("runs/x/runs"))
    if nested or not last_ckpt(cwd / "runs" / "x").exists():
        return Verdict("wrong", f"nested: {nested}")
    return Verdict("ok")


@case("10 small traps", "run_dir with an '=' in it")
def _(ctx: Context) -> Verdict:
    res = ctx.pretrain(ctx.work / "lr=0.1", "trainer.max_epochs=1")
    return succeeded(res, "run_dir=.../lr=0.1") or Verdict("ok")


# 11. ---- round 3: every mistake is one `error:` line with exit status 2 ----------------------------------
def one_line(res: Result, pattern: str, work_done: bool = False) -> Verdict:
    """`refused`, and stricter: exit status 2 (a user error) and the message on one stderr line."""
    verdict = refused(res, pattern, work_done)
    if verdict.outcome != "ok":
        return verdict
    lines = [line for line in res.err.strip().splitlines() if line.strip()]
    if res.rc != 2:
        return Verdict("misleading", f"exit {res.rc}, not 2: {res.last_line()}")
    if len([line for line in lines if not line.startswith(("warning", "  warnings.warn", "/"))]) > 1:
        return Verdict("misleading", f"{len(lines)} lines: {' | '.join(lines)[:300]}")
    return verdict


def user_error_case(kind: str, name: str, script: str, args: list[str], pattern: str, ckpt: bool = False) -> None:
    """A command refused at once with one line (no training, no feature extraction)."""

    def run(ctx: Context) -> Verdict:
        extra = []
        if ckpt:
            extra = [f"ckpt={last_ckpt(ctx.copy('finished', name))}"]
        elif script == "pretrain":
            extra = [*TINY, f"run_dir={ctx.path(name)}", "trainer.max_epochs=1"]
        hooks = ("vdg.eval.features:extract_features=MARK",) if ckpt else ()
        res = ctx.run(script, *extra, *args, hooks=hooks)
        return one_line(res, pattern, work_done="MISUSE-MARK" in res.err)

    CASES.append(Case(kind, name, run))


UNSET = "MISUSE_SURELY_UNSET_VARIABLE"
for args, pattern in [
    (["budget=["], r"cannot read the override 'budget=\['"),
    (["budget=0.3)"], r"cannot read the override"),
    (["data.batch_size=[1,2"], r"cannot read the override 'data.batch_size=\[1,2'"),
    (["trainer.max_epochs=${oc.env:" + UNSET + "}"], UNSET),
    (["run_dir=${nowhere}"], r"nowhere"),
    (["budget=${oc.env:HOME}"], r"budget=.*must be a number"),
    (["method=nope"], r"method/nope.*allowed values: \[.*vdg"),
    (["dataset=nope"], r"dataset/nope.*allowed values"),
    (["+sweep=nope"], r"sweep/nope.*allowed values: \[.*table1"),
    (["optimizer=nope"], r"optimizer/nope.*allowed values"),
    (["logger=nope"], r"logger/nope.*allowed values"),
    (["trainer.max_epoch=3"], r"unknown key trainer.max_epoch .*did you mean trainer.max_epochs"),
    (["gating.budget_wieght=1"], r"unknown key gating.budget_wieght"),
    (["data.batch_size=[1,2]"], r"batch_size"),
    (["budget=nan"], r"budget"),
    (["budget=1e309"], r"budget"),
    (["data.batch_size=0"], r"batch_size"),
    (["trainer.max_epochs=-1"], r"max_epochs"),
]:
    user_error_case("11 grammar and values", "pretrain " + " ".join(args), "pretrain", args, pattern)

for script, args, pattern in [
    ("knn_eval", ["k=["], r"cannot read the override 'k=\['"),
    ("knn_eval", ["kk=3"], r"unknown key kk"),
    ("knn_eval", ["k=${oc.env:" + UNSET + "}"], UNSET),
    ("knn_eval", ["k=0"], r"\bk\b"),
    ("knn_eval", ["distance=manhattan"], r"manhattan"),
    ("linear_eval", ["epochz=3"], r"unknown key epochz .*did you mean epochs"),
    ("linear_eval", ["eval=nope"], r"eval/nope.*allowed values"),
    ("export", ["branch=[gated"], r"cannot read the override"),
    ("export", ["brnch=gated"], r"unknown key brnch .*did you mean branch"),
    ("flops", ["ckpt={a"], r"cannot read the override 'ckpt={a'"),
    ("umap_plot", ["max_sample=5"], r"unknown key max_sample .*did you mean max_samples"),
]:
    user_error_case("11 grammar and values", f"{script} " + " ".join(args), script, args, pattern, ckpt=True)


# resume: every key that fixes a tensor's shape is named before any state is loaded
for change in ["dataset.num_classes=5", "probe.batchnorm=false", "probe.enabled=false",
               "method.projector_output_dim=16", "backbone.width=8"]:
    named = r"refusing to resume.*" + re.escape(change.split("=")[0])
    bad_pretrain("11 resume shapes", "resume=extend with " + change, ["trainer.max_epochs=3", "resume=extend", change],
                 named, template="finished")


@case("11 paths", "run_dir with a component longer than the file system allows")
def _(ctx: Context) -> Verdict:
    return one_line(ctx.pretrain(ctx.work / ("x" * 300) / "run", "trainer.max_epochs=1"), r"x{20}")


@case("11 paths", "export out_dir below a file")
def _(ctx: Context) -> Verdict:
    run_dir = ctx.copy("finished", "export-below-file")
    blocker = ctx.fresh("export-below-file-blocker") / "a-file"
    blocker.write_text("not a folder")
    res = ctx.run("export", f"ckpt={last_ckpt(run_dir)}", "branch=gated", f"out_dir={blocker / 'sub'}")
    return one_line(res, r"a-file")


@case("11 paths", "knn_eval ckpt= a directory")
def _(ctx: Context) -> Verdict:
    return one_line(ctx.run("knn_eval", f"ckpt={ctx.fresh('ckpt-is-a-dir')}"), r"ckpt-is-a-dir")


@case("11 paths", "folder dataset whose data.root is a file")
def _(ctx: Context) -> Verdict:
    root = ctx.fresh("root-is-a-file") / "images.tar"
    root.write_text("not a folder")
    return one_line(ctx.pretrain(ctx.path("root-is-a-file-run"), "dataset=folder", f"data.root={root}",
                                 "trainer.max_epochs=1"), r"images\.tar")


# 12. ---- a crash in native code never takes the process down ----------------------------------------------
@case("12 native code", "width 4 (the documented minimum) trains under oneDNN's AVX2 kernels")
def _(ctx: Context) -> Verdict:
    res = ctx.pretrain(ctx.path("width4-avx2"), "trainer.max_epochs=2",
                       env={"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"})
    if res.rc < 0:
        return Verdict("traceback", f"killed by signal {-res.rc}: {res.last_line()}")
    return succeeded(res, "width 4 under AVX2") or Verdict("ok")


@case("12 native code", "SIGTERM to a run stuck in native code ends it within seconds")
def _(ctx: Context) -> Verdict:
    code = ("import ctypes, signal\nfrom vdg.run.hardstop import hard_stop\nwith hard_stop(grace_s=2):\n"
            "    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])\n    print('ready', flush=True)\n"
            "    ctypes.CDLL(None).pause()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ctx.work, env=ctx.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        return Verdict("misleading", "the stuck child did not start")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return Verdict("wrong", "still running 30 s after SIGTERM")
    if proc.returncode != 128 + signal.SIGTERM or "not acknowledged" not in err:
        return Verdict("misleading", f"exit {proc.returncode}: {err.strip().splitlines()[:1]}")
    return Verdict("ok", err.strip().splitlines()[0][:200])


# ---------------------------------------------------------------------------------------------- the driver
def build_templates(ctx: Context) -> None:
    finished = ctx.work / "_finished"
    res = ctx.pretrain(finished, "trainer.max_epochs=2")
    if res.rc:
        raise SystemExit(f"template run failed:\n{res.err[-3000:]}")
    unfinished = ctx.work / "_unfinished"
    res = ctx.pretrain(unfinished, "trainer.max_epochs=3", env={"VDG_FAULT_KILL_AT_STEP": "6"})
    if res.rc != -9:
        raise SystemExit(f"unfinished template: expected a SIGKILL, got {res.rc}:\n{res.err[-3000:]}")
    results = ctx.work / "_results"
    shutil.copytree(finished, results / "run")
    ctx.run("knn_eval", f"ckpt={last_ckpt(results / 'run')}")
    ctx.templates.update(finished=finished, unfinished=unfinished, results=results)
    exports = sorted((finished / "checkpoints" / "export").glob("*gated.safetensors"))
    os.environ["MISUSE_EXPORT"] = str(exports[0]) if exports else ""
    os.environ["MISUSE_CKPT"] = str(last_ckpt(finished))
    ctx.templates["mount"] = can_mount()  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose scripts are judged")
    parser.add_argument("--only", default="", help="comma-separated: run the cases whose kind or name contains one")
    parser.add_argument("--jobs", type=int, default=1, help="cases run in parallel")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the verdicts here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vdg-misuse-"))
    work.chmod(0o755)
    ctx = Context(args.repo.resolve(), work)
    wanted = [w.strip().lower() for w in args.only.split(",")]
    selected = [c for c in CASES if any(w in (c.kind + " " + c.name).lower() for w in wanted)]
    print(f"{len(selected)} cases against {ctx.repo} in {work}", file=sys.stderr)
    build_templates(ctx)

    def judge(c: Case) -> tuple[Case, Verdict, float]:
        start = time.perf_counter()
        try:
            verdict = c.run(ctx)
        except Exception as err:  # a broken case must not hide the others
            verdict = Verdict("misleading", f"HARNESS ERROR {type(err).__name__}: {err}")
        return c, verdict, time.perf_counter() - start

    rows = []
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        for c, verdict, seconds in pool.map(judge, selected):
            rows.append((c, verdict))
            print(f"{verdict.outcome:10s} [{c.kind}] {c.name} ({seconds:.0f} s): {verdict.detail}", flush=True)
    counts = Counter(v.outcome for _, v in rows)
    print("\n" + ", ".join(f"{k}: {counts.get(k, 0)}" for k in OUTCOMES) + f" (of {len(rows)})")
    by_kind: dict[str, Counter] = {}
    for c, v in rows:
        by_kind.setdefault(c.kind, Counter())[v.outcome] += 1
    for kind in sorted(by_kind, key=lambda k: int(k.split()[0])):
        print(f"  {kind:20s} " + ", ".join(f"{k} {n}" for k, n in sorted(by_kind[kind].items())))
    if args.json:
        args.json.write_text(json.dumps([{"kind": c.kind, "name": c.name, **vars(v)} for c, v in rows], indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
