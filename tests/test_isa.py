"""CPUs without AVX-512: the oneDNN AVX2 crash of the strided 1x1 weight gradient is routed around, training the
shapes that hit it neither crashes nor hangs, and a stop signal always ends a process stuck in native code.

Every training here runs in a child process under ONEDNN_MAX_CPU_ISA=AVX2 with a time limit, whatever CPU runs
the suite, so a segfault or a hang fails one test instead of killing or stalling the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from vdg.models.resnet import ShortcutConv

ROOT = Path(__file__).resolve().parents[1]
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def child(code: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; a crash is a return code, a hang a failed test."""
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
            timeout=timeout, env={**os.environ, **AVX2, **(env or {})},
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the child process hung for {timeout} s (a native op that never returns?):\n{err.stderr}")


def test_shortcut_conv_equals_the_strided_conv_it_replaces():
    """Values and gradients of the strided 1x1 convolution, against a float64 reference (which oneDNN does not
    run: the float32 channels_last one is the very kernel that crashes under AVX2)."""
    torch.manual_seed(0)
    for channels_last in (False, True):
        for c_in, size in ((4, 34), (6, 17), (8, 16)):
            reference = nn.Conv2d(c_in, 2 * c_in, 1, 2, bias=False).double()
            routed = ShortcutConv(c_in, 2 * c_in, 1, 2, bias=False)
            routed.load_state_dict(reference.state_dict())
            x = torch.randn(3, c_in, size, size)
            xa = x.double().requires_grad_()
            xb = (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
            ya, yb = reference(xa), routed(xb)
            torch.testing.assert_close(yb, ya.float())
            ya.square().sum().backward()
            yb.square().sum().backward()
            torch.testing.assert_close(xb.grad, xa.grad.float())
            torch.testing.assert_close(routed.weight.grad, reference.weight.grad.float())


def test_the_strided_1x1_weight_gradient_survives_avx2():
    """The shapes of the oneDNN bug (2-7 input channels, stride 2, channels_last, batch 1-32), through the route
    the model takes, 3 times each: without the route it crashed or hung on the first shapes."""
    result = child(
        """
        import torch
        from vdg.models.resnet import ShortcutConv
        torch.manual_seed(0)
        for c_in in range(1, 9):
            for size in (17, 30, 66):
                for batch in (1, 16, 32):
                    for _ in range(3):
                        conv = ShortcutConv(c_in, 8, 1, 2, bias=False).to(memory_format=torch.channels_last)
                        x = torch.randn(batch, c_in, size, size).contiguous(memory_format=torch.channels_last)
                        conv(x.requires_grad_()).square().sum().backward()
        print("ok")
        """,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_training_the_affected_shapes_under_avx2(tmp_path):
    """Widths 4 and 8, both stems, channels_last on and off: each trains (2 epochs) under oneDNN's AVX2 kernels."""
    result = child(
        f"""
        import json
        from pathlib import Path
        import torch
        from hydra import compose, initialize_config_dir
        from tests.conftest import CONFIG_DIR, TINY
        from vdg.run.driver import pretrain
        torch.set_num_threads(1)
        done = []
        for width in (4, 8):
            for stem, size in (("cifar", 32), ("imagenet", 96)):  # first shortcuts at 34 -> 17 and 24 -> 12 px
                for channels_last in ("true", "false"):
                    name = f"w{{width}}-{{stem}}-cl{{channels_last}}"
                    overrides = [*TINY, "dataset.train_size=32", "dataset.test_size=16", "trainer.max_epochs=2",
                                 "final_knn.enabled=false", f"backbone.width={{width}}", f"dataset.stem={{stem}}",
                                 f"dataset.image_size={{size}}",
                                 f"trainer.channels_last={{channels_last}}", f"run_dir={tmp_path}/" + name]
                    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                        cfg = compose(config_name="pretrain", overrides=overrides)
                    summary = pretrain(cfg)
                    assert summary["epochs"] == 2 and summary["steps"] == 4, summary
                    done.append(name)
        print(json.dumps(done))
        """,
        timeout=300,
    )
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stderr[-4000:]}"
    assert len(json.loads(result.stdout.strip().splitlines()[-1])) == 8


# A main thread stuck in native code with the GIL released: the signals are blocked in that thread, so the
# kernel delivers them to another thread, and libc's pause() never returns (as oneDNN's spinning kernel did).
GUARDED = """
import ctypes, signal, sys, time
from vdg.run.hardstop import hard_stop
with hard_stop(grace_s={grace}):
{body}
"""
NATIVE = """
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT, signal.SIGTERM])
    print("ready", flush=True)
    ctypes.CDLL(None).pause()
"""
# Lightning's way during fit: its handler on top, chaining the one it found (the guard's).
GRACEFUL = """
    found = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda s, f: (print("graceful", flush=True), found(s, f)))
    print("ready", flush=True)
    time.sleep(60)
"""
SLEEPING = """
    print("ready", flush=True)
    time.sleep(60)
"""


def start(body: str, grace: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", GUARDED.format(grace=grace, body=body)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # let it reach the blocking call: a signal before it is handled in Python (acknowledged)
    return proc


def finish(proc: subprocess.Popen, within: float) -> tuple[int, str, float]:
    began = time.monotonic()
    try:
        _, err = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the process outlived its stop signal by {within} s")
    return proc.returncode, err, time.monotonic() - began


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_unacknowledged_stop_ends_a_process_stuck_in_native_code(signum):
    proc = start(NATIVE, grace=1.0)
    proc.send_signal(signum)
    code, err, took = finish(proc, within=30)
    assert code == 128 + signum, err
    assert f"vdg: {signal.Signals(signum).name} was not acknowledged within 1 s" in err
    assert "most recent call first" in err  # where the threads were stuck
    assert took >= 0.5  # the graceful stop had its chance first


def test_a_second_signal_ends_the_process_at_once():
    """The first SIGTERM is acknowledged (the graceful handler ran; the run would go on to finish its step); a
    second one ends the process without waiting for the grace period."""
    proc = start(GRACEFUL, grace=600.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().strip() == "graceful"
    time.sleep(0.5)
    assert proc.poll() is None  # acknowledged: no hard stop
    proc.send_signal(signal.SIGTERM)
    code, err, took = finish(proc, within=30)
    assert code == 128 + signal.SIGTERM and "SIGTERM arrived a second time" in err, err
    assert took < 20


def test_without_a_graceful_handler_sigterm_keeps_its_usual_action():
    """Outside Lightning's fit nothing stops gracefully on SIGTERM: the guard must not swallow it."""
    proc = start(SLEEPING, grace=600.0)
    proc.send_signal(signal.SIGTERM)
    code, _, _ = finish(proc, within=30)
    assert code == -signal.SIGTERM
