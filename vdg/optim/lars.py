"""LARS (You et al., 2017) as the official VDG code applies it: SGD momentum with a per-tensor trust ratio.

An optimizer only; which parameters get LARS or weight decay is decided by the param groups (`param_groups`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer


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
            raise ValueError(
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
            lr = group["lr"]
            if group["lars"]:
                grads = self._trust_scaled(params, grads, group)
            self._momentum_update(params, grads, group["momentum"], lr)
        return loss

    @staticmethod
    def _trust_scaled(params: list[Tensor], grads: list[Tensor], group: dict) -> list[Tensor]:
        wd, eta, lr = group["weight_decay"], group["eta"], group["lr"]
        w_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads)).to(w_norm.dtype)
        apply = (w_norm > 0) & (g_norm > 0)
        trust = eta * w_norm / (g_norm + wd * w_norm + 1e-8)
        if group["clip_lr"]:
            trust = torch.clamp(trust / lr, max=1.0) if lr > 0 else torch.ones_like(trust)
        scale = torch.where(apply, trust, torch.ones_like(trust))
        decay = torch.where(apply, torch.full_like(trust, wd), torch.zeros_like(trust))
        scaled = torch._foreach_add(grads, torch._foreach_mul(params, list(decay.unbind())))
        torch._foreach_mul_(scaled, list(scale.unbind()))
        return scaled

    def _momentum_update(self, params: list[Tensor], grads: list[Tensor], momentum: float, lr: float) -> None:
        if momentum == 0:
            torch._foreach_add_(params, grads, alpha=-lr)
            return
        bufs = []
        for p, g in zip(params, grads, strict=True):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.clone(g).detach()
                bufs.append(None)
            else:
                bufs.append(state["momentum_buffer"])
        old = [(b, g) for b, g in zip(bufs, grads, strict=True) if b is not None]
        if old:
            old_bufs, old_grads = zip(*old, strict=True)
            torch._foreach_mul_(list(old_bufs), momentum)
            torch._foreach_add_(list(old_bufs), list(old_grads))
        torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params], alpha=-lr)
