"""Folded and sparse execution (vdg/deploy/sparse.py, kernels.py) and compacted gated networks (vdg/deploy/slim.py):
each equals the masked eval forward of the `GatedResNet` it was built from."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vdg.deploy.bench import calibrate_gates, distinct_mask_fraction
from vdg.deploy.kernels import Workspace, fold_batchnorm, im2col_hwc
from vdg.deploy.slim import FORCED_LOGIT, compact_gated, compaction, profile_from_masks, slim_resnet
from vdg.deploy.sparse import AUTO_NATIVE_ISAS, BlockPath, FoldedBlock, FoldedResNet
from vdg.models import Branch, GatedResNet

from .test_export import randomise_norms
from .test_native import VARIANTS, needs_kernel

ALL_OFF, ALL_ON = 2, 5  # blocks whose gates are forced shut / open in `gated_network`
SAMPLE, MASKED = [BlockPath.SAMPLE] * 8, [BlockPath.MASKED] * 8


def kernel_params() -> list:
    """The per-sample path's kernels: "torch", and "native:<variant>" for every variant of the compiled kernel under
    test (tests/test_native.py's VARIANTS: `$VDG_KERNEL_ISA`'s, else every one this CPU runs; skipped without a
    C compiler), marked `kernel` so that CI can rerun them per variant."""
    params = [pytest.param("torch", id="torch")]
    for variant in VARIANTS:
        if isinstance(variant, str):
            params.append(pytest.param(f"native:{variant}", marks=pytest.mark.kernel, id=f"native-{variant}"))
        else:  # the skipped param of a machine without the kernel
            params.append(pytest.param("native:", marks=[pytest.mark.kernel, *variant.marks], id="native"))
    return params


KERNELS = kernel_params()
NATIVE_VARIANTS = [v for v in VARIANTS if isinstance(v, str)]


def select_kernel(kernel: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """"native:<variant>" -> "native", with VDG_KERNEL_ISA set to the variant for the engines built next."""
    name, _, variant = kernel.partition(":")
    if variant:
        monkeypatch.setenv("VDG_KERNEL_ISA", variant)
    return name


def gated_network(stem: str = "cifar", size: int = 32, width: int = 4, seed: int = 0) -> GatedResNet:
    """A dual-branch network with random BatchNorm statistics whose gates keep ~40% of channels (masks differ
    between samples), except block ALL_OFF (every channel off) and block ALL_ON (every channel on)."""
    torch.manual_seed(seed)
    # gate_reduction=1: at width 4 the default bottleneck has one hidden unit, which random BN statistics can kill
    net = GatedResNet(width=width, stem=stem, gate_bias_init=0.0, gate_reduction=1).eval()
    randomise_norms(net, seed)
    density = [0.4] * 8
    density[ALL_OFF], density[ALL_ON] = 0.0, 1.0
    calibrate_gates(net, torch.randn(48, 3, size, size, generator=torch.Generator().manual_seed(seed + 1)), density)
    for index, sign in ((ALL_OFF, -1), (ALL_ON, 1)):  # for every input, not only the calibration images
        net.blocks[index].gate.expand.weight.data.zero_()
        net.blocks[index].gate.expand.bias.data.fill_(sign * FORCED_LOGIT)
    return net


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("stem,size", [("cifar", 32), ("imagenet", 64)])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_every_execution_equals_the_masked_eval_forward(stem, size, batch, kernel, monkeypatch):
    kernel = select_kernel(kernel, monkeypatch)
    net = gated_network(stem, size)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        reference = net(x, Branch.GATED)
    density = [m.mean().item() for m in reference.masks]
    assert density[ALL_OFF] == 0.0 and density[ALL_ON] == 1.0
    mixed = [0.0 < d < 1.0 for i, d in enumerate(density) if i not in (ALL_OFF, ALL_ON)]
    assert all(mixed) if batch > 1 else any(mixed)  # one sample may keep all (or none) of a block's 4 channels
    engine = FoldedResNet(net, Branch.GATED, kernel=kernel)
    assert engine.kernel == kernel and all(b.kernel == kernel for b in engine.blocks)
    for paths in (SAMPLE, MASKED, None):  # None: the default plan for this batch size
        out = engine.encode(x, paths)
        assert all(torch.equal(a, b) for a, b in zip(out.masks, reference.masks, strict=True)), paths
        assert relative_difference(out.features, reference.features) <= 1e-4, paths
    assert torch.equal(engine(x), engine.encode(x).features)
    with torch.no_grad():
        dense = net(x, Branch.DENSE).features
    dense_engine = FoldedResNet(net, Branch.DENSE, kernel=kernel)
    assert relative_difference(dense_engine(x), dense) <= 1e-4
    assert relative_difference(dense_engine.encode(x, SAMPLE).features, dense) <= 1e-4  # every channel, per sample


def test_torch_kernel_shares_one_gathered_call_between_samples_with_identical_masks(monkeypatch):
    net = gated_network()
    base = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    x = base[[0, 1, 0, 2, 1, 0]]  # 6 samples, 3 distinct images, so at most 3 distinct masks per block
    calls = []
    original = FoldedBlock.sample
    counted = lambda self, xs, active: calls.append(len(xs)) or original(self, xs, active)
    monkeypatch.setattr(FoldedBlock, "sample", counted)
    out = FoldedResNet(net, Branch.GATED, kernel="torch").encode(x, SAMPLE)
    with torch.no_grad():
        reference = net(x, Branch.GATED)
    assert relative_difference(out.features, reference.features) <= 1e-4
    distinct = sum(torch.unique(m, dim=0).shape[0] for m in reference.masks)
    assert len(calls) == distinct <= 3 * 8 and sum(calls) == 6 * 8


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("batch", [1, 7])
def test_per_sample_path_splits_work_over_threads_with_the_same_result(kernel, batch, monkeypatch):
    kernel = select_kernel(kernel, monkeypatch)
    net = gated_network()
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        reference = net(x, Branch.GATED).features
    engine = FoldedResNet(net, Branch.GATED, kernel=kernel)
    torch.set_num_threads(2)  # the conftest fixture sets 1 again for the next test
    out = engine.encode(x, SAMPLE).features
    assert torch.get_num_threads() == 2  # restored after the parallel section
    assert relative_difference(out, reference) <= 1e-4


def test_tune_measures_a_path_per_block_and_keeps_it_for_that_batch_size():
    net = gated_network()
    engine = FoldedResNet(net, Branch.GATED)
    x = torch.randn(2, 3, 32, 32)
    chosen = engine.tune(x, repeats=1)
    assert len(chosen) == 8 and all(isinstance(p, BlockPath) for p in chosen)
    assert engine.paths(2, 32) == chosen
    with torch.no_grad():
        assert relative_difference(engine(x), net(x, Branch.GATED).features) <= 1e-4
    with pytest.raises(ValueError, match="one path per block"):
        engine.set_plan(4, ["sample"])
    assert FoldedResNet(net, Branch.GATED, skip_inactive=False).paths(1, 32) == MASKED


def test_folded_engine_is_for_inference_only():
    engine = FoldedResNet(gated_network(), Branch.GATED)
    with pytest.raises(ValueError, match="inference only"):
        engine.train()
    with pytest.raises(ValueError, match="this backbone|serves"):
        FoldedResNet(GatedResNet(width=4, branches=("dense",)), Branch.GATED)


def test_slim_network_folded_equals_its_eager_forward():
    slim = slim_resnet([1, 2, 3, 4, 5, 6, 7, 8], width=4).eval()
    randomise_norms(slim, 3)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert relative_difference(FoldedResNet(slim, Branch.DENSE)(x), slim(x).features) <= 1e-4


def test_fold_batchnorm_and_patches():
    conv, bn = torch.nn.Conv2d(3, 5, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(5).eval()
    randomise_norms(bn)
    x = torch.randn(2, 3, 6, 6)
    weight, bias = fold_batchnorm(conv, bn)
    with torch.no_grad():
        assert torch.allclose(F.conv2d(x, weight, bias, 1, 1), bn(conv(x)), atol=1e-5)
    workspace = Workspace()  # shared by calls with 3 and 2 channels, as the per-sample path shares it
    for stride, channels in ((1, 3), (2, 3), (1, 2), (2, 2)):
        images = x[:, :channels]
        cols, ho, wo = im2col_hwc(images.permute(0, 2, 3, 1).contiguous(), stride, workspace, "x", max_channels=3)
        unfold = F.unfold(images, 3, padding=1, stride=stride)  # [N, (c, kh, kw), L]
        expected = unfold.view(2, channels, 9, ho * wo).permute(0, 3, 2, 1).reshape(2 * ho * wo, 9 * channels)
        assert torch.equal(cols, expected)  # columns (kh, kw, c), zero padding


@pytest.mark.parametrize("stem,size", [("cifar", 32), ("imagenet", 64)])
def test_compacted_network_equals_the_gated_network_on_the_profiled_data(stem, size, monkeypatch):
    net = gated_network(stem, size, width=8)
    # blocks 1 and 6: a quarter of the channels never on, a quarter always on, the rest data-dependent
    for index in (1, 6):
        frequency = torch.full((net.blocks[index].mid_planes,), 0.5)
        quarter = len(frequency) // 4
        frequency[:quarter], frequency[quarter : 2 * quarter] = 0.0, 1.0
        density = [None] * 8
        density[index] = frequency
        calibrate_gates(net, torch.randn(48, 3, size, size), density)
    images = torch.randn(64, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = net(images, Branch.GATED)
    profile = profile_from_masks(reference.masks, net.arch_config())
    plan = compaction(profile)
    compact = compact_gated(net, profile)
    kept = [len(row["kept"]) for row in plan]
    assert [b.mid_planes for b in compact.blocks] == [max(k, 1) for k in kept]
    assert kept[ALL_OFF] == 0 and len(plan[ALL_ON]["always_on"]) == plan[ALL_ON]["channels"]
    assert [len(plan[i]["removed"]) for i in (1, 6)] == [len(plan[i]["always_on"]) for i in (1, 6)] == [2, 16]
    for block, row in zip(compact.blocks, plan, strict=True):  # always-active channels are ungated
        forced = [row["kept"].index(c) for c in row["always_on"]]
        assert not block.gate.expand.weight[forced].any() and (block.gate.expand.bias[forced] == FORCED_LOGIT).all()
    engines = [FoldedResNet(compact, Branch.GATED, kernel="torch")]
    for variant in NATIVE_VARIANTS:  # the compiled kernel's variants under test (none without a C compiler)
        monkeypatch.setenv("VDG_KERNEL_ISA", variant)
        engines.append(FoldedResNet(compact, Branch.GATED, kernel="native"))
    for batch in (1, 3, 64):  # profiled samples, alone or batched
        x = images[:batch]
        with torch.no_grad():
            expected, out = net(x, Branch.GATED), compact(x, Branch.GATED)
        assert relative_difference(out.features, expected.features) <= 1e-4, batch
        for mask, full, row in zip(out.masks, expected.masks, plan, strict=True):
            if row["kept"]:  # the compact masks are the full masks on the kept channels
                assert torch.equal(mask, full[:, row["kept"]])
        for engine in engines:  # its sparse execution too (odd channel counts: the kernels' tails)
            for paths in (SAMPLE, MASKED, None):
                features = engine.encode(x, paths).features
                assert relative_difference(features, expected.features) <= 1e-4, (batch, paths, engine.kernel)
    with pytest.raises(ValueError, match="channels per block"):
        compact_gated(GatedResNet(width=4), profile)


def test_calibrated_gates_reproduce_the_density_with_masks_that_differ_between_samples():
    torch.manual_seed(0)
    net = GatedResNet(width=8, gate_bias_init=0.0).eval()
    calibration = torch.randn(200, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    per_channel = torch.linspace(0.0, 1.0, 8)  # a per-channel profile for block 0, a density elsewhere
    calibrate_gates(net, calibration, [per_channel] + [0.3] * 7)
    with torch.no_grad():
        masks = net(calibration, Branch.GATED).masks
    assert torch.allclose(masks[0].mean(0), (per_channel * 200).round() / 200)
    for mask in masks[1:]:
        assert torch.allclose(mask.mean(0), torch.full((mask.shape[1],), 60 / 200))  # round(0.3 * 200) images
    active = torch.stack([m.sum(1) for m in masks[1:]], 1)
    assert active.std(0).min() > 0  # samples keep different numbers of channels
    assert distinct_mask_fraction(masks[1:]) > 0.5  # and different channels
    with torch.no_grad():  # unseen images: about the same density
        unseen = net(torch.randn(200, 3, 32, 32, generator=torch.Generator().manual_seed(2)), Branch.GATED).masks
    assert all(abs(m.mean().item() - 0.3) < 0.1 for m in unseen[1:])
    with pytest.raises(ValueError, match="gate_bias_init=0.0"):
        calibrate_gates(GatedResNet(width=4).eval(), calibration[:4], [0.3] * 8)


@needs_kernel
def test_default_paths_follow_the_measured_rule():
    native_wide = FoldedResNet(GatedResNet(width=64, branches=("gated",)).eval(), Branch.GATED, kernel="native")
    assert native_wide.paths(1, 32) == SAMPLE and native_wide.paths(64, 32) == SAMPLE  # compiled: per sample
    small = FoldedResNet(GatedResNet(width=8, branches=("gated",)).eval(), Branch.GATED, kernel="native")
    assert small.paths(1, 32) == SAMPLE
    dense = FoldedResNet(GatedResNet(width=8, branches=("dense",)).eval(), Branch.DENSE, kernel="native")
    assert dense.paths(1, 32) == MASKED  # networks without gates: oneDNN unless a plan says otherwise
    # the PyTorch kernel's rule
    wide = FoldedResNet(GatedResNet(width=64, branches=("gated",)).eval(), Branch.GATED, kernel="torch")
    assert wide.block_pixels(32) == [34 * 34] * 2 + [17 * 17] * 2 + [9 * 9] * 2 + [5 * 5] * 2
    assert wide.paths(1, 32) == SAMPLE  # batch 1: per sample everywhere
    assert wide.paths(64, 32) == [BlockPath.SAMPLE] * 6 + [BlockPath.MASKED] * 2  # 5 x 5 maps: batch the weights
    wide.set_plan(64, MASKED)
    assert wide.paths(64, 32) == MASKED and wide.paths(2, 32)[0] is BlockPath.SAMPLE  # a plan is per batch size
    small = FoldedResNet(GatedResNet(width=8, branches=("gated",)).eval(), Branch.GATED, kernel="torch")
    assert small.paths(1, 32) == MASKED  # blocks too small for the per-sample call's fixed cost
    assert FoldedResNet(GatedResNet(width=64, stem="imagenet").eval(), Branch.GATED).block_pixels(224)[-1] == 49


@needs_kernel
@pytest.mark.kernel
def test_auto_takes_the_compiled_kernel_only_in_the_variants_measured_faster_than_dense(monkeypatch):
    net = GatedResNet(width=4).eval()
    for variant in NATIVE_VARIANTS:
        monkeypatch.setenv("VDG_KERNEL_ISA", variant)
        auto = FoldedResNet(net, Branch.GATED)
        if variant in AUTO_NATIVE_ISAS:  # AVX-512, AVX2: faster than dense in every block (docs/deploy.md)
            assert auto.kernel == "native" and auto.kernel_isa == variant
        else:  # the portable loops: slower than dense, so auto runs the PyTorch kernel's measured rule
            assert auto.kernel == "torch" and auto.kernel_isa is None
        assert FoldedResNet(net, Branch.GATED, kernel="native").kernel_isa == variant  # asked for: any variant


@needs_kernel
def test_native_sampled_refuses_inputs_the_kernel_cannot_read():
    engine = FoldedResNet(gated_network(), Branch.GATED, kernel="native")
    block = engine.blocks[0]
    x = torch.randn(2, block.in_planes, 8, 8).contiguous(memory_format=torch.channels_last)
    out, mask = block.native_sampled(x)
    assert out.shape == (2, block.planes, 8, 8) and mask.shape == (2, block.mid)
    for bad in (x.double(), x.contiguous(), x[:, :, ::2], x[:, :1], x[0]):
        with pytest.raises(ValueError, match="channels_last float32 CPU tensor"):
            block.native_sampled(bad)
    torch_block = FoldedResNet(gated_network(), Branch.GATED, kernel="torch").blocks[0]
    with pytest.raises(ValueError, match="needs the compiled kernel"):
        torch_block.native_sampled(x)
