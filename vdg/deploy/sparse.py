"""Inference engines of one `GatedResNet` network that skip the work of gated-off channels (eval mode only).

`FoldedResNet` runs a network with eval BatchNorm folded into its convolutions: the dense network, a slim one,
or the gated network in one of two executions per block, `BlockPath.MASKED` (every channel computed, then
multiplied by the mask, as the training code does) or `BlockPath.SAMPLE` (per sample, conv1 only for the active
output channels, BN1 + ReLU on those, conv2 reading only those channels). The per-sample path has two kernels:
the compiled one (`vdg.deploy.native`: the gate and the whole block in one call, reading only the active
weights in place) and a PyTorch one (gathered weight copies times oneDNN matmuls; no compiler needed, slower).
It never trains and never changes the encoder it was built from.

Equality with the masked reference `GatedResNet(x, "gated")` in eval mode: the features agree up to float
round-off (folding moves one multiplication into the weights; skipped channels are exactly the masked ones),
provided every sample gets the same masks, i.e. no gate logit lies within round-off of 0 (then the two
computations may keep different channels, as two GPUs may). Channels are never skipped approximately.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from enum import Enum
from statistics import median
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vdg.core.errors import ConfigError
from vdg.deploy import native
from vdg.deploy.kernels import FoldedConv, Workspace, fold_batchnorm, im2col_hwc, linear, onednn_ops_available
from vdg.models import BackboneOutput, Branch, BranchNorm, GatedBasicBlock, GatedResNet
from vdg.models.flops import conv_out
from vdg.models.inputs import check_images

log = logging.getLogger(__name__)


class BlockPath(str, Enum):
    """How one block of the gated network executes a batch."""

    MASKED = "masked"  # all conv1 channels computed by prepacked oneDNN convolutions, then multiplied by the mask
    SAMPLE = "sample"  # per sample: gathered conv1 rows / conv2 columns of the active channels only


def branch_norm(norm: BranchNorm, branch: Branch) -> nn.BatchNorm2d:
    return norm.norms[branch.value if norm.split else "shared"]


class FoldedGate:
    """`ChannelGate`'s eval-mode logits with its BatchNorm folded: GAP -> W_r (BN folded) -> ReLU -> W_e (+ b)."""

    def __init__(self, gate: nn.Module) -> None:
        bn = gate.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        self.reduce_weight = (gate.reduce.weight.flatten(1) * scale[:, None]).detach().float().contiguous()
        self.reduce_bias = (bn.bias - bn.running_mean * scale).detach().float().contiguous()
        self.expand_weight = gate.expand.weight.flatten(1).detach().float().contiguous()
        bias = gate.expand.bias
        self.expand_bias = (
            bias.detach().float().contiguous() if bias is not None else torch.zeros(self.expand_weight.shape[0])
        )

    def to(self, device: torch.device) -> FoldedGate:
        for name in ("reduce_weight", "reduce_bias", "expand_weight", "expand_bias"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def mask(self, x: Tensor) -> Tensor:
        """Deterministic eval mask 1[logit >= 0], bool [N, C_b], from the block input x [N, C_in, H, W]."""
        z = x.mean(dim=(2, 3))
        hidden = torch.addmm(self.reduce_bias, z, self.reduce_weight.t()).relu_()
        return torch.addmm(self.expand_bias, hidden, self.expand_weight.t()) >= 0


class FoldedBlock:
    """One `GatedBasicBlock` of one branch, BN folded, ready for both block paths."""

    def __init__(self, block: GatedBasicBlock, branch: Branch, gated: bool) -> None:
        self.stride = block.stride
        self.in_planes, self.mid, self.planes = block.in_planes, block.mid_planes, block.planes
        w1, b1 = fold_batchnorm(block.conv1, branch_norm(block.bn1, branch))
        w2, b2 = fold_batchnorm(block.conv2, branch_norm(block.bn2, branch))
        self.conv1 = FoldedConv(w1, b1, block.stride, 1)
        self.conv2 = FoldedConv(w2, b2, 1, 1)
        self.shortcut: FoldedConv | None = None
        self._downsample: tuple[Tensor, Tensor] | None = None
        if block.downsample is not None:
            wd, bd = fold_batchnorm(block.downsample, branch_norm(block.downsample_bn, branch))
            self.shortcut = FoldedConv(wd, bd, block.stride, 0)
            self._downsample = (wd, bd)
        self.gate = FoldedGate(block.gate) if gated else None
        # Per-sample layouts: gathering the active channels must copy contiguous rows. conv1's rows are output
        # channels, columns (kh, kw, c_in) as `im2col_hwc` orders patches; conv2 is kept as [tap, c_mid, c_out]
        # so that its active input channels are rows too and the gathered [9 * k, c_out] block needs no copy.
        self.w1_rows = w1.permute(0, 2, 3, 1).reshape(self.mid, -1).contiguous()
        self.b1 = b1
        self.w2_taps = w2.permute(2, 3, 1, 0).reshape(9, self.mid, self.planes).contiguous()
        self.b2 = b2
        self._local = threading.local()  # one Workspace per thread: the per-sample path runs samples in parallel
        self._w2 = w2
        self.native: native.NativeBlock | None = None  # the compiled kernel's weights, when it is in use

    @property
    def kernel(self) -> str:
        """The per-sample path's kernel: "native" (`vdg.deploy.native`) or "torch"."""
        return "native" if self.native is not None else "torch"

    def use_kernel(self, kernel: str) -> None:
        if kernel == "native" and self.native is None:
            g = self.gate
            weights = None if g is None else (g.reduce_weight, g.reduce_bias, g.expand_weight, g.expand_bias)
            self.native = native.NativeBlock(
                self.w1_rows, self.b1, self._w2, self.b2, self.stride, self._downsample, weights
            )
        elif kernel == "torch":
            self.native = None

    def to(self, device: torch.device) -> FoldedBlock:
        for conv in (self.conv1, self.conv2, self.shortcut):
            if conv is not None:
                conv.to(device)
        if self.gate is not None:
            self.gate.to(device)
        for name in ("w1_rows", "b1", "w2_taps", "b2"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        self._local = threading.local()
        return self

    @property
    def workspace(self) -> Workspace:
        workspace = getattr(self._local, "workspace", None)
        if workspace is None:
            workspace = self._local.workspace = Workspace()
        return workspace

    # ----- masked-dense path: the whole batch at once -----------------------------------------------------------
    def masked(self, x: Tensor, mask: Tensor | None) -> Tensor:
        out = self.conv1(x, relu=True)
        if mask is not None:
            out.mul_(mask[:, :, None, None].to(out.dtype))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.conv2(out, relu=True, residual=shortcut)

    # ----- per-sample path --------------------------------------------------------------------------------------
    def sample(self, x: Tensor, active: Tensor) -> Tensor:
        """Images x [M, H, W, C_in] (contiguous) that share the active conv1 channels `active` [k]
        -> block output [M * Ho * Wo, C_out]: conv1 rows and conv2 columns of those k channels only."""
        ws, k = self.workspace, active.numel()
        m, h, w, c_in = x.shape
        ho, wo = (h - 1) // self.stride + 1, (w - 1) // self.stride + 1
        if k == 0:  # every channel off: conv2 sees zeros, the block is relu(BN2 bias + shortcut)
            return (self._shortcut_rows(x) + self.b2).relu_()
        w1 = torch.index_select(self.w1_rows, 0, active, out=ws.get("w1", k * 9 * c_in, x).view(k, -1))
        b1 = self.b1.index_select(0, active)
        w2 = torch.index_select(self.w2_taps, 1, active, out=ws.get("w2", 9 * k * self.planes, x).view(9, k, -1))
        if ho * wo >= CONV_KERNEL_MIN_PIXELS:
            # Large maps: oneDNN's direct convolution on the gathered weights beats patches + matmul (the patch
            # matrix is 9x the map). The gathered rows are already the layouts it reads: conv1 [k, kh, kw, c_in]
            # is a channels_last weight, conv2 [kh, kw, k, c_out] a strided one.
            images = x.permute(0, 3, 1, 2)  # [M, C_in, H, W] channels_last, no copy
            mid = F.conv2d(images, w1.view(k, 3, 3, c_in).permute(0, 3, 1, 2), b1, self.stride, 1).relu_()
            shortcut = images if self.shortcut is None else self.shortcut(images)
            out = F.conv2d(mid, w2.view(3, 3, k, -1).permute(3, 2, 0, 1), self.b2, 1, 1).add_(shortcut).relu_()
            return out.permute(0, 2, 3, 1).reshape(m * ho * wo, self.planes)
        cols, _, _ = im2col_hwc(x, self.stride, ws, "x")
        mid = linear(cols, w1, b1, relu=True)  # [M * Ho * Wo, k]
        cols2, _, _ = im2col_hwc(mid.view(m, ho, wo, k), 1, ws, "mid", max_channels=self.mid)
        return linear(cols2, w2.view(9 * k, -1).t(), self.b2, relu=True, residual=self._shortcut_rows(x))

    def _shortcut_rows(self, x: Tensor) -> Tensor:
        """The shortcut of images x [M, H, W, C_in] as rows [M * Ho * Wo, C_out] (the 1x1 downsample prepacked)."""
        m, h, w, c_in = x.shape
        if self.shortcut is None:
            return x.reshape(m * h * w, c_in)
        return self.shortcut(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(-1, self.planes)

    def sampled(self, x: Tensor, mask: Tensor) -> Tensor:
        """The per-sample path over a batch x [N, C_in, H, W] (channels_last).

        kernel "native": one call of the compiled kernel for the batch (`vdg.deploy.native`); kernel "torch": one
        `sample` call per distinct mask, so that samples with identical masks share one gathered matmul."""
        n, _, h, w = x.shape
        ho, wo = (h - 1) // self.stride + 1, (w - 1) // self.stride + 1
        x_hwc = x.permute(0, 2, 3, 1)  # a contiguous view of channels_last
        if n == 1:  # the rows are already the channels_last output: no copy
            rows = self.sample(x_hwc, torch.nonzero(mask[0]).flatten())
            return rows.view(1, ho, wo, self.planes).permute(0, 3, 1, 2)
        out = torch.empty(n, self.planes, ho, wo, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        out_hwc = out.permute(0, 2, 3, 1)
        patterns, group = torch.unique(mask, dim=0, return_inverse=True)
        groups = [(torch.nonzero(group == g).flatten(), torch.nonzero(p).flatten()) for g, p in enumerate(patterns)]

        def run(part: list[tuple[Tensor, Tensor]]) -> None:
            with torch.inference_mode():  # worker threads do not inherit the caller's mode
                for members, active in part:
                    result = self.sample(x_hwc.index_select(0, members), active)
                    out_hwc.index_copy_(0, members, result.view(-1, ho, wo, self.planes))

        threads = min(torch.get_num_threads(), len(groups))
        if threads == 1:
            run(groups)
        else:  # one sample's kernels are too small to share out; samples are not (see `in_parallel`)
            in_parallel(run, [groups[t::threads] for t in range(threads)])
        return out

    def native_sampled(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The per-sample path over a batch x [N, C_in, H, W] (channels_last, CPU, float32) with the compiled
        kernel, gate included: one call for the batch. Returns (output, mask). A block without a gate (dense and
        slim networks) runs every channel: the same kernel as a plain convolution pair."""
        if self.native is None:
            # not user input: a caller of the block API (FoldedResNet chooses the kernel)
            raise ValueError("native_sampled needs the compiled kernel: use_kernel('native') first")
        if (
            x.ndim != 4
            or x.shape[1] != self.in_planes
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or not x.is_contiguous(memory_format=torch.channels_last)
        ):
            # not user input: a caller of the block API (FoldedResNet lays inputs out)
            raise ValueError(
                f"block input: need a channels_last float32 CPU tensor [N, {self.in_planes}, H, W], got "
                f"{x.dtype} {list(x.shape)} on {x.device}"
            )
        n, _, h, w = x.shape
        ho, wo = (h - 1) // self.stride + 1, (w - 1) // self.stride + 1
        out = torch.empty(n, self.planes, ho, wo, dtype=x.dtype, memory_format=torch.channels_last)
        gated = self.gate is not None
        mask = torch.empty(n, self.mid, dtype=torch.bool) if gated else self._all_on(n)
        threads = torch.get_num_threads()
        scratch = self.workspace.get("native.mid", self.native.scratch_size(ho, wo, threads), x)
        # every tensor here was made (or checked) to the kernel's shapes just above: the checked call would repeat it
        self.native.run_trusted(x.permute(0, 2, 3, 1), out.permute(0, 2, 3, 1), mask, scratch, threads, gated)
        return out, mask if gated else None

    def _all_on(self, n: int) -> Tensor:
        ones = getattr(self._local, "all_on", None)
        if ones is None or ones.shape[0] < n:
            ones = self._local.all_on = torch.ones(n, self.mid, dtype=torch.bool)
        return ones[:n]

    def forward(self, x: Tensor, path: BlockPath) -> tuple[Tensor, Tensor | None]:
        if (
            path is BlockPath.SAMPLE
            and self.native is not None
            and x.device.type == "cpu"
            and x.dtype == torch.float32
        ):
            return self.native_sampled(x)
        mask = None if self.gate is None else self.gate.mask(x)
        if path is BlockPath.SAMPLE and mask is not None:
            return self.sampled(x, mask), mask
        return self.masked(x, mask), mask


KERNELS = ("auto", "native", "torch")
_kernel_warned = False


def resolve_kernel(kernel: str) -> str:
    """The per-sample path's kernel: "native" (the compiled one, `vdg.deploy.native`), "torch" (gathered weights
    and oneDNN matmuls: no compiler needed, slower) or "auto". Both give the same outputs up to float round-off.

    "auto": native where its variant for this CPU (`native.kernel_isa`) was measured faster than the dense
    network, i.e. the AVX-512 and AVX2 tiles; the portable C loops (CPUs without AVX2, or VDG_KERNEL_ISA=portable)
    ran 3-6x the dense network's time at width 64 (docs/deploy.md), so auto takes the PyTorch kernel there. When
    the kernel cannot be built or loaded, auto warns once, saying why, and takes the PyTorch kernel."""
    global _kernel_warned
    if kernel not in KERNELS:
        raise ConfigError(f"unknown kernel={kernel!r}; allowed values: {list(KERNELS)}")
    if kernel == "torch":
        return kernel
    try:
        isa = native.kernel_isa()
    except native.NativeKernelError as err:
        if kernel == "native":
            raise
        if not _kernel_warned:
            _kernel_warned = True
            log.warning("sparse execution uses kernel='torch' (slower): %s", err)
        return "torch"
    if kernel == "auto" and isa not in AUTO_NATIVE_ISAS:
        return "torch"
    return "native"


# The kernel variants that kernel="auto" runs: measured faster than the dense network in every block of the width-8
# and width-64 CIFAR ResNet-18 at batch 1 and 64 (docs/deploy.md, "Which kernel auto takes").
AUTO_NATIVE_ISAS = ("avx512", "avx2")


_POOLS: dict[int, ThreadPoolExecutor] = {}


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def in_parallel(work: Callable[[Any], None], parts: Sequence[Any]) -> None:
    """work(part) for every part, each in its own thread, every kernel on one intra-op thread meanwhile.

    Why: the per-sample path is many small kernels; split over threads inside each kernel (PyTorch's default)
    they synchronise at every kernel, and on a shared machine one descheduled thread stalls the other at each
    barrier. A batch at 2 threads ran 7x slower than dense that way, 1.3x with samples split over two threads
    (width 64, batch 64, loaded 2-core machine). ATen kernels release the GIL, so the threads do run together.
    The intra-op thread count is process-wide: other threads using torch meanwhile also run on one.
    """
    pool = _POOLS.get(len(parts) - 1)
    if pool is None:
        pool = _POOLS[len(parts) - 1] = ThreadPoolExecutor(len(parts) - 1, thread_name_prefix="vdg-sample")
    with intra_op_threads(1):
        futures = [pool.submit(work, part) for part in parts[1:]]
        work(parts[0])
        for future in futures:
            future.result()


def default_path(block: FoldedBlock, batch_size: int, pixels: int, device: torch.device) -> BlockPath:
    """The path of a gated block for a batch of `batch_size` whose output maps have `pixels` pixels, unless a plan
    (`FoldedResNet.tune`) says otherwise. Which path wins where (docs/deploy.md has the timings):

    - blocks without a gate (dense and slim networks), no oneDNN (GPUs, CPU builds without MKLDNN): masked;
      per-sample kernels on a GPU would be launch-bound;
    - the compiled kernel (`kernel="native"`): per-sample in every block at every batch size. Measured (2-core
      AMD EPYC, 2 threads, calibrated masks at density 0.33): width 64, the block time against the masked path's
      was 0.39-0.56 at batch 1 and 0.48-0.82 at batch 64, in every block; width 8 (the quickstart), whole
      network, 0.29 ms against 0.97 ms masked at batch 1 and 7.0 ms against 8.4 ms at batch 64;
    the rest is the rule of the PyTorch kernel (`kernel="torch"`):
    - blocks under `SAMPLE_MIN_MACS` per sample (e.g. every block of a width-8 network): masked; the per-sample
      path's fixed cost per call (gathers, a dozen small ops) exceeds what skipping channels saves;
    - batch 1: per-sample, in every block (it reads only the active weights; the dense kernels read all);
    - larger batches: per-sample where the output map has at least `SAMPLE_MIN_PIXELS_BATCHED` pixels, masked in
      smaller ones. A 3x3 conv does (pixels) MACs per weight it reads: with few pixels (the last stage, 5 x 5 at
      CIFAR size) the per-sample path's gather of the weights for every sample costs more than the saved MACs,
      while the masked path's prepacked weights serve the whole batch.
    """
    if block.gate is None or not onednn_ops_available(device):
        return BlockPath.MASKED
    if block.kernel == "native":
        return BlockPath.SAMPLE
    if pixels * 9 * block.mid * (block.in_planes + block.planes) < SAMPLE_MIN_MACS:
        return BlockPath.MASKED
    if batch_size == 1 or pixels >= SAMPLE_MIN_PIXELS_BATCHED:
        return BlockPath.SAMPLE
    return BlockPath.MASKED


# Per-sample MACs of a block below which its masked path is the default: the per-sample path costs ~0.14 ms per
# block and call more than its MACs (measured on the width-8 quickstart, 1 thread), worth ~16M MACs at the speed
# of these kernels when two thirds of the channels are skipped. Width-64 ResNet-18 blocks: 85M to 120M MACs.
SAMPLE_MIN_MACS = 16_000_000

# Output maps of at least this many pixels keep the per-sample path at batch sizes above 1. Per-block timings
# (width 64, CIFAR input, calibrated masks at density 0.33, 1 thread, 2-core AMD EPYC shared with other jobs):
# sample / masked time was 0.60-0.93 in every block at batch 1; at batches 2-64 it stayed 0.71-1.01 in the
# blocks with 34 x 34, 17 x 17 and 9 x 9 maps and rose to 1.06-1.48 in the two 5 x 5 blocks.
SAMPLE_MIN_PIXELS_BATCHED = 64

# Output maps of at least this many pixels (34 x 34 = 1156 in a CIFAR ResNet-18's first stage) run the per-sample
# path as gathered convolutions; smaller ones (17 x 17 = 289 and below) as patches + matmul, which won there
# (per-block timings, 1 thread, width 64, 2-core AMD EPYC; see docs/deploy.md).
CONV_KERNEL_MIN_PIXELS = 512


class FoldedResNet(nn.Module):
    """One network of a `GatedResNet` (branch "dense" or "gated") with eval BatchNorm folded, for inference.

    forward(x [N, 3, H, W]) -> features [N, feature_dim]; `encode(x)` -> `BackboneOutput` with the gated
    branch's masks. Gated blocks run `BlockPath.SAMPLE` or `BlockPath.MASKED` per block and batch size, as
    `plan` says (a mapping {batch_size: [path per block]}) or, for batch sizes it does not list, `default_path`.
    `tune(x)` measures both paths per block on this machine and fills `plan`. skip_inactive=False: every block
    masked (the "folded" execution of `load_backbone`). Outputs are inference tensors (`torch.inference_mode`).
    The weights are copied from `encoder` when built: later changes to the encoder are not seen.
    """

    def __init__(
        self,
        encoder: GatedResNet,
        branch: str | Branch,
        plan: Mapping[int, Sequence[str | BlockPath]] | None = None,
        config: dict[str, Any] | None = None,
        skip_inactive: bool = True,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        self.skip_inactive = skip_inactive
        self.branch = Branch.parse(branch)
        if self.branch not in encoder.branches:
            raise ConfigError(f"the encoder serves {[b.value for b in encoder.branches]}, not {self.branch.value!r}")
        self.feature_dim = encoder.feature_dim
        self.config = dict(config or {})
        self.stem_kind = encoder.stem_kind
        conv = encoder.conv1
        self.stem_geometry = (conv.kernel_size[0], conv.stride[0], conv.padding[0])
        w, b = fold_batchnorm(encoder.conv1, branch_norm(encoder.bn1, self.branch))
        self.stem = FoldedConv(w, b, encoder.conv1.stride[0], encoder.conv1.padding[0])
        gated = self.branch is Branch.GATED
        self.blocks = [FoldedBlock(block, self.branch, gated) for block in encoder.blocks]
        # Dense and slim networks run oneDNN's prepacked convolutions (BlockPath.MASKED) unless a plan says
        # "sample" for a block and kernel="native" is asked: then the compiled kernel with every channel on.
        if kernel not in KERNELS:
            raise ConfigError(f"unknown kernel={kernel!r}; allowed values: {list(KERNELS)}")
        wants_native = (gated and skip_inactive) or kernel == "native"
        self.kernel = resolve_kernel(kernel) if wants_native else "torch"
        for block in self.blocks:
            block.use_kernel(self.kernel)
        self.plan: dict[int, list[BlockPath]] = {}
        self._default_paths: dict[tuple[int, int, torch.device], list[BlockPath]] = {}
        for batch_size, paths in (plan or {}).items():
            self.set_plan(int(batch_size), paths)
        self.device = encoder.conv1.weight.device  # where the folded weights were made
        self.eval()

    @property
    def gated(self) -> bool:
        return self.branch is Branch.GATED

    @property
    def kernel_isa(self) -> str | None:
        """The compiled kernel's variant (`native.ISAS`) the blocks run, or None with the PyTorch kernel."""
        return self.blocks[0].native.isa if self.kernel == "native" else None

    def set_plan(self, batch_size: int, paths: Sequence[str | BlockPath]) -> None:
        if len(paths) != len(self.blocks):
            # not user input: plans come from the engine's own tuning
            raise ValueError(f"a plan needs one path per block ({len(self.blocks)}), got {len(paths)}")
        self.plan[batch_size] = [BlockPath(p) for p in paths]

    def block_pixels(self, image_size: int) -> list[int]:
        """Output pixels of every block for a square input of `image_size` pixels."""
        kernel, stride, padding = self.stem_geometry
        size = conv_out(image_size, kernel, stride, padding)
        if self.stem_kind == "imagenet":
            size = conv_out(size, 3, 2, 1)
        pixels = []
        for block in self.blocks:
            size = conv_out(size, 3, block.stride, 1)
            pixels.append(size * size)
        return pixels

    def paths(self, batch_size: int, image_size: int) -> list[BlockPath]:
        """The path of every block for a batch of `batch_size` square images: the plan's, else `default_path`."""
        if not self.skip_inactive:
            return [BlockPath.MASKED] * len(self.blocks)
        if batch_size in self.plan:
            return self.plan[batch_size]
        key = (batch_size, image_size, self.device)
        if key not in self._default_paths:  # the rule is fixed per shape and device: worked out once
            pixels = self.block_pixels(image_size)
            paths = [default_path(b, batch_size, p, self.device) for b, p in zip(self.blocks, pixels, strict=True)]
            self._default_paths[key] = paths
        return self._default_paths[key]

    def to(self, *args: Any, **kwargs: Any) -> FoldedResNet:  # noqa: D102 - the folded weights are not parameters
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype != torch.float32:
            # not user input: an engine converted with .half()/.double() by its caller
            raise ValueError("FoldedResNet runs in float32")
        if device is not None and torch.device(device) != self.device:
            self.device = torch.device(device)
            self.stem.to(self.device)
            for block in self.blocks:
                block.to(self.device)
        return self

    def train(self, mode: bool = True) -> FoldedResNet:
        if mode:
            # not user input: an engine switched to .train() by its caller
            raise ValueError("FoldedResNet is for inference only (eval-mode BatchNorm and gates are folded in)")
        return super().train(False)

    @torch.inference_mode()
    def encode(self, x: Tensor, paths: Sequence[BlockPath] | None = None) -> BackboneOutput:
        features, masks = self._run(x, paths)
        return BackboneOutput(features, tuple(m.float() for m in masks) if self.gated else None)

    @torch.inference_mode()
    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, None)[0]

    def _run(self, x: Tensor, paths: Sequence[BlockPath] | None) -> tuple[Tensor, list[Tensor]]:
        """(features, the gated blocks' bool masks) of images x."""
        x = check_images(x, self.device)  # what every execution accepts (vdg.models.inputs)
        paths = paths or self.paths(x.shape[0], x.shape[-1])
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x, relu=True)
        if self.stem_kind == "imagenet":
            x = F.max_pool2d(x, 3, 2, 1)
        masks = []
        for block, path in zip(self.blocks, paths, strict=True):
            x, mask = block.forward(x, path)
            masks.append(mask)
        return x.mean(dim=(2, 3)), masks

    @torch.inference_mode()
    def tune(self, x: Tensor, repeats: int = 5) -> list[BlockPath]:
        """Time both paths of every gated block on the batch x and keep the faster one for x's batch size.

        Block by block, on the activations the batch really produces, the median of `repeats` interleaved runs.
        Returns the chosen paths (also stored in `plan`). A network without gates has only the masked (oneDNN)
        path unless it was built with kernel="native", whose per-sample path then runs every channel.
        """
        if not self.gated and self.kernel != "native":
            self.plan[x.shape[0]] = [BlockPath.MASKED] * len(self.blocks)
            return self.plan[x.shape[0]]
        batch_size = x.shape[0]
        x = x.float().to(self.device).contiguous(memory_format=torch.channels_last)
        x = self.stem(x, relu=True)
        if self.stem_kind == "imagenet":
            x = F.max_pool2d(x, 3, 2, 1)
        chosen = []
        for block in self.blocks:
            runs = {path: (lambda p=path, b=block, x=x: b.forward(x, p)) for path in BlockPath}
            times = interleaved_times(runs, repeats, warmup=1)
            chosen.append(min(times, key=lambda p: median(times[p])))
            x, _ = block.forward(x, chosen[-1])
        self.plan[batch_size] = chosen
        return chosen


def interleaved_times(
    runs: Mapping[Any, Callable[[], Any]], repeats: int, warmup: int = 1, rotate: bool = False
) -> dict[Any, list[float]]:
    """Wall-clock seconds of each run, `repeats` times, the runs taking turns so that load changes hit all alike.

    rotate: start each round with the next run, so that no run always follows the same one (caches, clocks).
    """
    keys = list(runs)
    for _ in range(warmup):
        for key in keys:
            runs[key]()
    times: dict[Any, list[float]] = {key: [] for key in keys}
    for r in range(repeats):
        shift = r % len(keys) if rotate else 0
        for key in keys[shift:] + keys[:shift]:
            start = time.perf_counter()
            runs[key]()
            times[key].append(time.perf_counter() - start)
    return times
