"""Inference kernels of the deployment engines: eval BatchNorm folded into convolutions, oneDNN-prepacked weights,
and the per-sample gathered convolutions of sparse execution.

Eval mode only: everything here reads frozen weights and never trains. Why hand-written: on a CPU, PyTorch's
eager `conv2d` reorders every weight into oneDNN's blocked layout on every call (and at batch 1 routes small
late-stage convolutions to an im2col + BLAS path), which costs as much as the convolution itself. oneDNN's
prepacked convolution (`torch.ops.mkldnn._convolution_pointwise`, what `torch.compile` emits on CPUs) does that
reorder once; its fused bias + ReLU and bias + residual + ReLU save the elementwise passes. Sparse execution
cannot prepack (its weights change per sample): its PyTorch kernel (`kernel="torch"`) gathers rows of plain
weight matrices and multiplies them with oneDNN's matmul (`_linear_pointwise`); the compiled kernel
(vdg/deploy/native.py) reads the active rows in place instead.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def onednn_ops_available(device: torch.device) -> bool:
    """Whether the prepacked oneDNN ops exist here: CPU builds of PyTorch with MKLDNN (the wheels on PyPI)."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """conv followed by eval-mode BN as one convolution: (weight * s, beta - mean * s), s = gamma / sqrt(var + eps).

    Equal to bn(conv(x)) up to float round-off (one multiplication moves into the weights).
    """
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale[:, None, None, None]
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight.detach().float().contiguous(), bias.detach().float().contiguous()


class FoldedConv:
    """A convolution with its BatchNorm folded in, run through oneDNN with weights prepacked once per input shape.

    __call__(x [N, C, H, W] channels_last, relu, residual) = relu?(conv(x) + bias (+ residual)). Without oneDNN
    (GPU, or a CPU build without MKLDNN) it is F.conv2d plus the elementwise ops.
    """

    def __init__(self, weight: Tensor, bias: Tensor, stride: int, padding: int) -> None:
        self.weight = weight.contiguous(memory_format=torch.channels_last)
        self.bias = bias
        self.stride, self.padding = stride, padding
        self._packed: dict[tuple[int, ...], Tensor] = {}
        self._lock = threading.Lock()  # the per-sample path calls it from several threads

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def to(self, device: torch.device) -> FoldedConv:
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)
        self._packed.clear()
        return self

    def packed(self, shape: torch.Size) -> Tensor:
        """The weight in the blocked layout oneDNN picks for this input shape, reordered once and kept."""
        key = tuple(shape)
        with self._lock:
            if key not in self._packed:
                if len(self._packed) > 8:  # a few batch sizes at most; drop the oldest, never grow without bound
                    self._packed.pop(next(iter(self._packed)))
                pad, stride = [self.padding] * 2, [self.stride] * 2
                self._packed[key] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    self.weight.contiguous().to_mkldnn(), pad, stride, [1, 1], 1, list(shape)
                )
            return self._packed[key]

    def __call__(self, x: Tensor, relu: bool = False, residual: Tensor | None = None) -> Tensor:
        if onednn_ops_available(x.device) and x.dtype == torch.float32:
            args = ([self.padding] * 2, [self.stride] * 2, [1, 1], 1)
            weight = self.packed(x.shape)
            if residual is None:
                unary = "relu" if relu else "none"
                return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *args, unary, [], "")
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, weight, self.bias, *args, "add", 1.0, "relu" if relu else None, [], ""
            )
        out = F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.stride, self.padding)
        if residual is not None:
            out = out + residual
        return torch.relu(out) if relu else out


def linear(x: Tensor, weight: Tensor, bias: Tensor, relu: bool = False, residual: Tensor | None = None) -> Tensor:
    """relu?(x @ weight.T + bias (+ residual)) with plain (not prepacked) weights; oneDNN's matmul on CPUs.

    x [M, K], weight [N, K] (any strides), bias [N], residual [M, N].
    """
    if onednn_ops_available(x.device) and x.dtype == torch.float32:
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")
        out = torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    else:
        out = torch.addmm(bias, x, weight.t()) if residual is None else torch.addmm(residual + bias, x, weight.t())
    return out.relu_() if relu else out


class Workspace:
    """Scratch buffers kept between calls. Fresh multi-megabyte tensors on every call are page-faulted in by the
    kernel each time (glibc hands large blocks back to the OS), which costs as much as the copies themselves."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._bordered: dict[tuple[str, tuple[int, ...]], Tensor] = {}

    def get(self, name: str, numel: int, like: Tensor) -> Tensor:
        """A flat buffer of at least `numel` elements (contents undefined), reused by later calls with `name`."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(max(numel, 1), dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:numel]

    def zero_bordered(self, name: str, shape: tuple[int, int, int, int], like: Tensor) -> Tensor:
        """A [M, H + 2, W + 2, C] buffer whose one-pixel border is zero, made once per shape: callers write only
        the interior, so the border never needs clearing again."""
        key = (name, shape)
        buf = self._bordered.get(key)
        if buf is None or buf.dtype != like.dtype or buf.device != like.device:
            if len(self._bordered) >= 32:  # group sizes vary with the batch; keep the memory bounded
                self._bordered.clear()
            buf = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self._bordered[key] = buf
        return buf

    def clear(self) -> None:
        self._buffers.clear()
        self._bordered.clear()


def im2col_hwc(
    x: Tensor, stride: int, workspace: Workspace, name: str, max_channels: int | None = None
) -> tuple[Tensor, int, int]:
    """3x3 patches (padding 1) of images x [M, H, W, C] as a matrix [M * Ho * Wo, 9 * C], columns (kh, kw, c).

    Written into workspace buffers: x into the interior of a zero-bordered copy (sized for `max_channels`, so
    that calls with different C share it), then the patch matrix. Returns (cols, Ho, Wo).
    """
    m, h, w, c = x.shape
    padded = workspace.zero_bordered(name, (m, h + 2, w + 2, max_channels or c), x)[..., :c]
    padded[:, 1 : h + 1, 1 : w + 1].copy_(x)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    s0, s1, s2, s3 = padded.stride()
    patches = padded.as_strided((m, ho, wo, 3, 3, c), (s0, s1 * stride, s2 * stride, s1, s2, s3))
    cols = workspace.get(name + ".cols", m * ho * wo * 9 * c, x)
    cols.view(m, ho, wo, 3, 3, c).copy_(patches)
    return cols.view(m * ho * wo, 9 * c), ho, wo
