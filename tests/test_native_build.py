"""What users' machines do to the compiled kernel's build and cache (vdg/deploy/native.py): a truncated, empty or
overwritten cached library, no compiler, a compiler that hangs, has no OpenMP or writes nothing, a cache folder
that cannot be written. Every case runs in a child process with a timeout, on real files: a library that crashes
the loader (SIGBUS) fails the test instead of killing the suite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

REAL_CC = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(REAL_CC is None, reason="no C compiler on PATH to build the kernel with")

# Builds the gated network's sparse execution with the kernel asked for and reports what it got: the kernel, the
# variant, the difference to the masked reference, the error (NativeKernelError) and the warnings logged.
CHILD = r"""
import io, json, logging, sys
import torch
from vdg.deploy import native
from vdg.deploy.sparse import FoldedResNet
from vdg.models import Branch, GatedResNet

stream = io.StringIO()
logging.basicConfig(stream=stream, level=logging.WARNING)
torch.manual_seed(0)
net = GatedResNet(width=4).eval()
result = {}
try:
    engine = FoldedResNet(net, Branch.GATED, kernel=sys.argv[1])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = net(x, Branch.GATED).features
    result["kernel"], result["isa"] = engine.kernel, engine.kernel_isa
    result["diff"] = ((engine(x) - reference).abs().max() / reference.abs().max()).item()
except native.NativeKernelError as err:
    result["error"] = str(err)
result["warnings"] = stream.getvalue()
print(json.dumps(result))
"""


def run_child(kernel: str, cache: Path, cc: str | Path, timeout: float = 240, **env: str) -> dict:
    environment = {**os.environ, "VDG_KERNEL_CACHE": str(cache), "VDG_CC": str(cc), **env}
    environment.pop("VDG_KERNEL_ISA", None)  # the widest variant: what a user gets
    done = subprocess.run(
        [sys.executable, "-c", CHILD, kernel], capture_output=True, text=True, timeout=timeout, env=environment
    )
    assert done.returncode == 0, f"the child died (status {done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def fake_compiler(path: Path, script: str) -> Path:
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return path


def cached(cache: Path) -> tuple[Path, Path]:
    [library] = cache.glob("sparse_block-*.so")
    return library, library.with_suffix(".json")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    """A kernel cache built once by a compiler named <tmp>/cc (the real one behind it): (cache, compiler)."""
    root = tmp_path_factory.mktemp("native-build")
    cc = fake_compiler(root / "cc", f'exec "{REAL_CC}" "$@"')
    result = run_child("native", root / "kernels", cc)
    assert result["kernel"] == "native" and result["diff"] <= 1e-4, result
    return root / "kernels", cc


@pytest.fixture
def built(pristine, tmp_path) -> Iterator[tuple[Path, Path]]:
    """A copy of the pristine cache for one test, found by the same compiler name (the cache key); the compiler
    script is restored afterwards, for tests that take it away."""
    cache, cc = pristine
    script = cc.read_text()
    shutil.copytree(cache, tmp_path / "kernels")
    yield tmp_path / "kernels", cc
    cc.write_text(script)


@needs_cc
@pytest.mark.parametrize("damage", ["truncated", "empty", "overwritten", "no sidecar"])
def test_a_bad_cached_library_is_rebuilt_not_loaded(built, damage):
    cache, cc = built
    library, sidecar = cached(cache)
    good = library.read_bytes()
    if damage == "truncated":  # loading this one used to end the process with SIGBUS
        library.write_bytes(good[: len(good) // 3])
    elif damage == "empty":  # used to poison the cache for ever
        library.write_bytes(b"")
    elif damage == "overwritten":  # same size, other bytes: only the checksum tells
        library.write_bytes(good[:-64] + bytes(64))
    else:
        sidecar.unlink()
    result = run_child("native", cache, cc)
    assert result["kernel"] == "native" and result["diff"] <= 1e-4, result
    library, sidecar = cached(cache)
    assert library.read_bytes() == good or json.loads(sidecar.read_text())["size"] == library.stat().st_size


@needs_cc
def test_a_cached_library_is_used_without_a_compiler_and_a_bad_one_then_falls_back_once(built):
    cache, cc = built
    fake_compiler(cc, "echo 'cc: command not found' >&2; exit 127")  # the compiler is gone (same name)
    result = run_child("auto", cache, cc)
    assert result["kernel"] == "native" and result["diff"] <= 1e-4 and not result["warnings"], result
    library, sidecar = cached(cache)
    record = json.loads(sidecar.read_text())
    assert record["compiler"] == str(cc) and record["compiler_version"] and "-fopenmp" in record["flags"]
    library.write_bytes(library.read_bytes()[:1000])  # now a bad cache and no compiler: rebuilt once, fails
    result = run_child("auto", cache, cc)
    assert result["kernel"] == "torch" and result["diff"] <= 1e-4, result
    assert result["warnings"].count("kernel='torch' (slower)") == 1 and "cc: command not found" in result["warnings"]
    result = run_child("native", cache, cc)
    assert "compiling sparse execution's kernel failed" in result["error"], result


@needs_cc
def test_a_compiler_without_openmp_builds_a_one_thread_kernel(tmp_path):
    cc = fake_compiler(
        tmp_path / "cc",
        'for a in "$@"; do [ "$a" = -fopenmp ] && { echo "unsupported option -fopenmp" >&2; exit 1; }; done\n'
        f'exec "{REAL_CC}" "$@"',
    )
    result = run_child("native", tmp_path / "kernels", cc)
    assert result["kernel"] == "native" and result["diff"] <= 1e-4, result
    assert "-fopenmp" not in json.loads(cached(tmp_path / "kernels")[1].read_text())["flags"]


@pytest.mark.parametrize(
    "script,message",
    [
        ("exit 0", "exited 0 but wrote no library"),  # a compiler that writes nothing
        ("sleep 30", "timed out after 2 s"),
        ("echo 'fake cc: cannot compile' >&2; exit 1", "(?s)compiling sparse execution's kernel failed.*fake cc"),
    ],
)
def test_a_broken_compiler_is_a_build_error_naming_it(tmp_path, script, message):
    cc = fake_compiler(tmp_path / "cc", script)
    env = {"VDG_COMPILE_TIMEOUT_S": "2"}
    native = run_child("native", tmp_path / "kernels", cc, **env)
    import re

    assert re.search(message, native["error"]) and "kernel='torch'" in native["error"], native
    assert str(cc) in native["error"] or "timed out" in native["error"]
    auto = run_child("auto", tmp_path / "kernels", cc, **env)
    assert auto["kernel"] == "torch" and auto["diff"] <= 1e-4 and auto["warnings"].count("(slower)") == 1, auto
    assert not [p for p in (tmp_path / "kernels").glob("*") if p.suffix in (".so", ".json", ".tmp")]


def test_no_compiler_and_an_unwritable_cache_run_the_pytorch_kernel_with_one_line(tmp_path):
    auto = run_child("auto", tmp_path / "kernels", "/nonexistent/cc")
    assert auto["kernel"] == "torch" and auto["diff"] <= 1e-4 and "needs a C compiler" in auto["warnings"], auto
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    auto = run_child("auto", blocker / "kernels", REAL_CC or "cc")  # a folder under a file: no one can create it
    assert auto["kernel"] == "torch" and auto["diff"] <= 1e-4, auto
    warning = auto["warnings"].strip()
    assert "cannot write the kernel cache" in warning and "VDG_KERNEL_CACHE" in warning and "\n" not in warning
