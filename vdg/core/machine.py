"""Which machine a figure came from: the CPU model, the widest vector ISA the CPU offers, and the ISA that
oneDNN and ATen actually dispatch to (which `ONEDNN_MAX_CPU_ISA` / `ATEN_CPU_CAPABILITY` can lower).

Every speed figure vdg writes names these, because the same "AMD EPYC" can be an AVX-512 or an AVX2-only CPU
and the figures differ several-fold. Plumbing only: imports nothing from vdg.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

import torch

ISA_FLAGS = (("avx512f", "avx512"), ("avx2", "avx2"), ("avx", "avx"), ("sse4_2", "sse4.2"), ("asimd", "neon"))


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_model() -> str:
    """'AMD EPYC', 'Intel(R) Core(TM) i7-...', or what `platform` knows where /proc/cpuinfo is missing."""
    for line in _cpuinfo():
        if line.startswith(("model name", "Model", "Hardware")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The widest vector ISA the CPU itself offers (avx512 | avx2 | avx | sse4.2 | neon | unknown)."""
    flags = set()
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return next((name for flag, name in ISA_FLAGS if flag in flags), "unknown")


def aten_isa() -> str:
    """The capability ATen's own CPU kernels were dispatched to (AVX512, AVX2, DEFAULT, ...)."""
    return torch.backends.cpu.get_cpu_capability()


@functools.lru_cache(maxsize=1)
def onednn_isa() -> str:
    """The ISA oneDNN runs its kernels with, as oneDNN itself reports it in its verbose header (e.g. 'Intel
    AVX2', 'Intel AVX-512 with Intel DL Boost and bfloat16 support'), read once per process by running one small
    convolution with verbose output on and the C-level stdout captured."""
    if not torch.backends.mkldnn.is_available():
        return "none (no oneDNN in this torch)"
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 1)
        try:
            x = torch.randn(4, 16, 32, 32).contiguous(memory_format=torch.channels_last)
            w = torch.randn(16, 16, 3, 3).contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                torch.nn.functional.conv2d(x, w)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode(errors="replace")
    found = re.search(r"onednn_verbose,(?:v1,)?info,cpu,isa:([^\n]+)", text)
    if found:
        return found.group(1).strip()
    kernel = re.search(r"exec,cpu,convolution,([^,]+),", text)  # the header went out earlier in this process
    return f"kernel {kernel.group(1)}" if kernel else "unknown"


def describe() -> dict[str, str | int]:
    """What a benchmark record says about its machine."""
    limits = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if os.environ.get(k)}
    return {
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "onednn_isa": onednn_isa(),
        "aten_isa": aten_isa(),
        "isa_limits": " ".join(f"{k}={v}" for k, v in limits.items()) or "none",
        "torch_threads": torch.get_num_threads(),
    }


def short_isa() -> str:
    """One token for a table cell: the ISA oneDNN used, e.g. 'avx512', 'avx2'."""
    isa = onednn_isa().lower()
    for token, name in (("avx-512", "avx512"), ("avx512", "avx512"), ("avx2", "avx2"), ("avx", "avx"),
                        ("sse", "sse4.1")):
        if token in isa:
            return name
    return isa or "unknown"


ISA_RANK = {"sse4.1": 0, "sse4.2": 0, "avx": 1, "avx2": 2, "avx512": 3}  # the ISA names of this module


def onednn_capped() -> bool:
    """Whether oneDNN runs a narrower ISA than the CPU offers (`ONEDNN_MAX_CPU_ISA`: an emulated CPU)."""
    used, widest = short_isa(), cpu_isa()
    return used in ISA_RANK and widest in ISA_RANK and ISA_RANK[used] < ISA_RANK[widest]
