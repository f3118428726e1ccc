"""The compiled kernel of sparse execution (vdg/deploy/native.py, csrc/sparse_block.c) on its own: every tail of
its tiles, every variant this CPU runs (AVX-512, AVX2, portable C; only `$VDG_KERNEL_ISA`'s when it is set, so
that CI can run the suite once per variant), its gate, its input checks and its build errors. The build's
reliability (bad caches, odd compilers) is tests/test_native_build.py."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F

from vdg.deploy import native, sparse
from vdg.deploy.native import NativeBlock, NativeKernelError
from vdg.deploy.sparse import FoldedResNet
from vdg.models import Branch, GatedResNet

pytestmark = pytest.mark.kernel


def _library_error() -> str:
    try:
        native.library()
    except NativeKernelError as err:
        return str(err)
    return ""


def kernel_variants() -> list:
    """The kernel variants to test, as pytest params: `$VDG_KERNEL_ISA`'s alone when it is set, else every variant
    this CPU runs; one skipped param, saying why, where the kernel cannot be built (no C compiler)."""
    if not native.available():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no compiled kernel here: {_library_error()}"))]
    if os.environ.get("VDG_KERNEL_ISA"):
        return [native.kernel_isa()]
    return list(native.ISAS[: native.ISAS.index(native.cpu_isa()) + 1])


VARIANTS = kernel_variants()
needs_kernel = pytest.mark.skipif(not native.available(), reason=f"no compiled kernel here: {_library_error()}")


def reference_block(x, mask, w1, b1, w2, b2, stride, downsample):
    """The masked computation in plain PyTorch: relu(conv2(relu(conv1(x) + b1) * mask) + b2 + shortcut(x))."""
    mid = torch.relu(F.conv2d(x, w1, b1, stride, 1)) * mask[:, :, None, None]
    shortcut = x if downsample is None else F.conv2d(x, downsample[0], downsample[1], stride)
    return torch.relu(F.conv2d(mid, w2, b2, 1, 1) + shortcut)


def run_native(block: NativeBlock, x, mask, threads, isa, use_gate=False):
    n, _, h, w = x.shape
    ho, wo = (h - 1) // block.stride + 1, (w - 1) // block.stride + 1
    out = torch.empty(n, ho, wo, block.c_out)
    scratch = torch.empty(block.scratch_size(ho, wo, threads))
    mask = mask.clone()
    block(x.permute(0, 2, 3, 1).contiguous(), out, mask, scratch, threads, use_gate=use_gate, isa=isa)
    return out.permute(0, 3, 1, 2), mask


def random_block(c_in, c, c_out, stride, seed):
    g = torch.Generator().manual_seed(seed)
    w1, b1 = torch.randn(c, c_in, 3, 3, generator=g) / (3 * c_in**0.5), torch.randn(c, generator=g)
    w2, b2 = torch.randn(c_out, c, 3, 3, generator=g) / (3 * c**0.5), torch.randn(c_out, generator=g)
    downsample = None
    if stride != 1 or c_in != c_out:
        downsample = (torch.randn(c_out, c_in, 1, 1, generator=g) / c_in**0.5, torch.randn(c_out, generator=g))
    rows = w1.permute(0, 2, 3, 1).reshape(c, -1).contiguous()
    return (w1, b1, w2, b2, downsample), NativeBlock(rows, b1, w2, b2, stride, downsample, None)


# channel counts off every vector (16) and tile (4 rows, 64 outputs) boundary, maps of 1 to 7 x 7 pixels
SHAPES = [  # (c_in, c, c_out, stride, size)
    (5, 3, 5, 1, 7),
    (16, 10, 16, 1, 5),
    (12, 7, 24, 2, 7),
    (48, 33, 70, 2, 4),
    (64, 64, 64, 1, 1),
    (20, 9, 130, 2, 3),
]


@pytest.mark.parametrize("c_in,c,c_out,stride,size", SHAPES)
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("batch,threads", [(1, 1), (1, 2), (3, 2), (5, 1)])
def test_kernel_equals_the_masked_convolutions(c_in, c, c_out, stride, size, isa, batch, threads):
    weights, block = random_block(c_in, c, c_out, stride, seed=c + c_out)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, c_in, size, size, generator=g)
    mask = torch.rand(batch, c, generator=g) < 0.4
    mask[0] = False  # a sample with every channel off: relu(b2 + shortcut)
    if batch > 1:
        mask[1] = True  # and one with every channel on
    out, _ = run_native(block, x, mask, threads, isa)
    expected = reference_block(x, mask.float(), *weights[:4], stride, weights[4])
    assert out.shape == expected.shape
    assert ((out - expected).abs().max() / expected.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("isa", VARIANTS)
def test_every_variant_agrees_with_the_portable_loops(isa):
    weights, block = random_block(40, 21, 64, 1, seed=3)
    x = torch.randn(2, 40, 6, 6)
    mask = torch.rand(2, 21) < 0.5
    fast, _ = run_native(block, x, mask, 2, isa)
    plain, _ = run_native(block, x, mask, 2, "portable")
    assert ((fast - plain).abs().max() / plain.abs().max()).item() <= 1e-5


@needs_kernel
def test_the_variant_follows_vdg_kernel_isa_and_a_missing_one_is_refused(monkeypatch):
    widest = native.cpu_isa()
    monkeypatch.delenv("VDG_KERNEL_ISA", raising=False)
    assert native.kernel_isa() == widest
    monkeypatch.setenv("VDG_KERNEL_ISA", "portable")
    assert native.kernel_isa() == "portable" and random_block(8, 4, 8, 1, seed=0)[1].isa == "portable"
    monkeypatch.setenv("VDG_KERNEL_ISA", "sse9")
    with pytest.raises(ValueError, match=r"allowed values \['portable', 'avx2', 'avx512'\]"):
        native.kernel_isa()
    with pytest.raises(ValueError, match="VDG_KERNEL_ISA"):
        FoldedResNet(GatedResNet(width=4).eval(), Branch.GATED)  # a typo in the variable is loud, even for auto
    if widest != "avx512":  # a variant this CPU lacks: named, with what it has
        monkeypatch.setenv("VDG_KERNEL_ISA", "avx512")
        with pytest.raises(ValueError, match=f"this CPU runs only .*{widest}"):
            native.kernel_isa()
    monkeypatch.delenv("VDG_KERNEL_ISA")
    _, block = random_block(8, 4, 8, 1, seed=0)
    x, out, mask = torch.randn(1, 3, 3, 8), torch.empty(1, 3, 3, 8), torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"isa='avx1024': allowed values"):
        block(x, out, mask, torch.empty(100), 1, use_gate=False, isa="avx1024")


@pytest.mark.parametrize("isa", VARIANTS)
def test_kernel_gate_equals_the_folded_gate(isa, monkeypatch):
    monkeypatch.setenv("VDG_KERNEL_ISA", isa)
    torch.manual_seed(0)
    net = GatedResNet(width=8, gate_bias_init=0.0, gate_reduction=2).eval()
    for p in net.parameters():  # random gates that keep some channels and not others
        p.data.normal_(0, 0.5)
    engine = FoldedResNet(net, Branch.GATED, kernel="native")
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        h = engine.stem(x.contiguous(memory_format=torch.channels_last), relu=True)
        for fb in engine.blocks:
            expected = fb.gate.mask(h)
            out, mask = fb.native_sampled(h)
            assert torch.equal(mask, expected) and 0 < mask.float().mean() < 1
            h = out


@needs_kernel
def test_bad_tensors_are_refused_before_the_kernel_runs():
    _, block = random_block(16, 8, 16, 1, seed=0)
    x = torch.randn(1, 5, 5, 16)
    out, mask, scratch = torch.empty(1, 5, 5, 16), torch.zeros(1, 8, dtype=torch.bool), torch.empty(400)
    with pytest.raises(ValueError, match=r"x: need a contiguous float32 CPU tensor of shape \[1, 5, 5, 16\]"):
        block(x[..., :8], out, mask, scratch, 1, use_gate=False)
    with pytest.raises(ValueError, match=r"out: need"):
        block(x, torch.empty(1, 5, 5, 8), mask, scratch, 1, use_gate=False)
    with pytest.raises(ValueError, match=r"mask: need a contiguous bool tensor \[1, 8\]"):
        block(x, out, mask.float(), scratch, 1, use_gate=False)
    with pytest.raises(ValueError, match=r"scratch: need >= 200"):
        block(x, out, mask, torch.empty(10), 1, use_gate=False)
    with pytest.raises(ValueError, match="the block was given no gate"):
        block(x, out, mask, scratch, 1, use_gate=True)
    w1, b1, w2, b2 = torch.randn(8, 16 * 9), torch.randn(8), torch.randn(32, 8, 3, 3), torch.randn(32)
    with pytest.raises(ValueError, match="an identity shortcut needs C_in == C_out and stride 1"):
        NativeBlock(w1, b1, w2, b2, 1, None, None)


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """The module as on first use, with an empty kernel cache: nothing built or failed yet."""
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setattr(sparse, "_kernel_warned", False)
    monkeypatch.setenv("VDG_KERNEL_CACHE", str(tmp_path / "kernels"))
    return tmp_path / "kernels"


@needs_kernel
def test_kernel_is_built_once_into_the_cache_keyed_by_source_flags_and_compiler_name(fresh_kernel, monkeypatch):
    assert native.available()
    built = list(fresh_kernel.glob("sparse_block-*.so"))
    assert len(built) == 1 and not list(fresh_kernel.glob("*.tmp"))  # built atomically: no temporary left
    assert native.library_path() == built[0] and native.is_valid(built[0])
    record = json.loads(native.sidecar_path(built[0]).read_text())
    assert record["size"] == built[0].stat().st_size and record["compiler_version"] != "unknown"
    name = native.compiler()
    monkeypatch.setenv("VDG_CC", "/nonexistent/cc")  # another compiler name, another library
    assert native.library_path() != built[0]
    monkeypatch.setattr(native, "compiler", lambda: name)  # the key never runs the compiler
    monkeypatch.setattr(native, "_compile", lambda *a: pytest.fail("a valid cached library was compiled again"))
    assert native.build() == built[0]


def test_without_a_compiler_auto_falls_back_to_torch_loudly_and_native_is_refused(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("VDG_CC", str(fresh_kernel / "no-such-cc"))
    net = GatedResNet(width=4).eval()
    with caplog.at_level(logging.WARNING, logger="vdg.deploy.sparse"):
        engine = FoldedResNet(net, Branch.GATED)
    assert engine.kernel == "torch"
    assert "kernel='torch' (slower)" in caplog.text and "needs a C compiler" in caplog.text
    with pytest.raises(NativeKernelError, match="needs a C compiler.*use the PyTorch kernel: kernel='torch'"):
        FoldedResNet(net, Branch.GATED, kernel="native")
    with pytest.raises(ValueError, match=r"unknown kernel='fast'; allowed values: \['auto', 'native', 'torch'\]"):
        FoldedResNet(net, Branch.GATED, kernel="fast")


@needs_kernel
def test_a_failing_compiler_is_reported_with_its_command_and_output(fresh_kernel, monkeypatch):
    fake = fresh_kernel.parent / "cc"
    fake.write_text("#!/bin/sh\necho 'fake cc: cannot compile' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("VDG_CC", str(fake))
    failed = "(?s)compiling sparse execution's kernel failed: .*fake cc: cannot compile"
    with pytest.raises(NativeKernelError, match=failed):
        native.library()
    assert not list(fresh_kernel.glob("*"))  # no half-built library left in the cache
