"""LARS (You et al., 2017) as the official VDG code applies it: SGD momentum with a per-tensor trust ratio.

An optimizer only; which parameters get LARS or weight decay is decided by the param groups (`param_groups`).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import torch
from torch import Tensor
from torch.optim import Optimizer

from vdg.core.errors import ConfigError


class LARS(Optimizer):
    """SGD with momentum whose update of each tensor is rescaled by a LARS trust ratio.

    For every parameter of a group with `lars=True` whose weight and gradient norms are both non-zero:
        trust = eta * ||w|| / (||g|| + weight_decay * ||w|| + 1e-8)
        g <- (g + weight_decay * w) * (min(trust / lr, 1) if clip_lr else trust)
    Groups with `lars=False` (biases and norm parameters, the online probes) take the plain gradient with no
    weight decay at all, as the official wrapper does (reference §1.9, §5.9). Then buf = momentum * buf + g and
    w <- w - lr * buf (PyTorch SGD semantics, no dampening, no Nesterov).

    Written here rather than taken from a library because no maintained package implements these exact
    semantics (clipping, the silent weight-decay removal on excluded tensors); the whole update is done with
    `torch._foreach_*` ops (the same kernels torch.optim uses) so there is no per-parameter Python kernel loop.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.02,
        clip_lr: bool = True,
        lars: bool = True,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ConfigError(
                f"invalid LARS hyper-parameters lr={lr} momentum={momentum} wd={weight_decay} eta={eta}"
            )
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip_lr=clip_lr, lars=lars
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's Optimizer signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["lars"]:
                grads = self._trust_scaled(params, grads, group)
            self._momentum_update(params, grads, group["momentum"], group["lr"])
        return loss

    @staticmethod
    def _trust_scaled(params: list[Tensor], grads: list[Tensor], group: dict) -> list[Tensor]:
        """New gradients (g + wd * w) * s: s the trust ratio where ||w|| > 0 and ||g|| > 0, else as if skipped.

        A skipped tensor keeps its plain gradient. It needs no branch on the host: with ||w|| = 0, w is zero and
        g + wd * w = g (s = 1); with ||g|| = 0 the official update is g = 0, which s = 0 gives too.
        """
        wd, eta, lr = group["weight_decay"], group["eta"], group["lr"]
        w_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads)).to(w_norm.dtype)
        trust = eta * w_norm / (g_norm + wd * w_norm + 1e-8)
        if group["clip_lr"]:
            trust = torch.clamp(trust / lr, max=1.0) if lr > 0 else torch.ones_like(trust)
        scale = torch.where(w_norm > 0, trust, torch.ones_like(trust))
        scale = torch.where(g_norm > 0, scale, torch.zeros_like(trust))
        if not wd:
            return torch._foreach_mul(grads, _per_tensor(scale, grads))
        scaled = torch._foreach_add(grads, params, alpha=wd)
        torch._foreach_mul_(scaled, _per_tensor(scale, scaled))
        return scaled

    def _momentum_update(self, params: list[Tensor], grads: list[Tensor], momentum: float, lr: float) -> None:
        """buf = momentum * buf + g (a new buffer starts as a copy of g, as in torch SGD); w -= lr * buf."""
        if momentum == 0:
            torch._foreach_add_(params, grads, alpha=-lr)
            return
        # The buffers live in self.state (what state_dict saves and Lightning moves between devices), so they
        # are looked up every step rather than cached in a list that those would silently leave stale.
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        old = [i for i, buf in enumerate(bufs) if buf is not None]
        if old:
            old_bufs = bufs if len(old) == len(bufs) else [bufs[i] for i in old]
            torch._foreach_mul_(old_bufs, momentum)
            torch._foreach_add_(old_bufs, grads if len(old) == len(bufs) else [grads[i] for i in old])
        if len(old) < len(bufs):  # new buffers, all at once: one foreach copy of their gradients
            new = [i for i, buf in enumerate(bufs) if buf is None]
            for i, buf in zip(new, torch._foreach_mul([grads[i] for i in new], 1.0), strict=True):
                self.state[params[i]]["momentum_buffer"] = bufs[i] = buf
        torch._foreach_add_(params, bufs, alpha=-lr)


def _per_tensor(scale: Tensor, like: list[Tensor]) -> list[Tensor]:
    """scale[i] filled into a tensor of like[i]'s shape and strides, for every i, without reading scale on the host.

    CUDA's `_foreach_mul` runs one fused kernel only when both lists hold tensors of equal shapes and strides; a
    list of 0-d factors sends it down the slow path, one kernel per tensor. One repeat_interleave writes all the
    factors into a flat buffer (one kernel, ~4 bytes per parameter) whose slices are viewed with like[i]'s layout.
    """
    numels = tuple(t.numel() for t in like)
    flat = scale.repeat_interleave(_counts(numels, scale.device), output_size=sum(numels))
    return [part.as_strided(t.shape, t.stride()) for part, t in zip(flat.split(numels), like, strict=True)]


@lru_cache(maxsize=32)
def _counts(numels: tuple[int, ...], device: torch.device) -> Tensor:
    """The repeat counts on the device, built once per parameter list (an upload every step would be a blocking
    host-to-device copy on CUDA). Made outside inference mode; callers must not modify it in place."""
    with torch.inference_mode(False):
        return torch.tensor(numels, device=device)
