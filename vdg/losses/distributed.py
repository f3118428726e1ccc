"""Process-group helpers: the differentiable gather for losses that need the global batch
(`method.gather_across_processes`), and a gather of Python objects for processes that must agree on a value.

Only collectives live here; when no process group is initialised (one process) every helper is the identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Processes in the default group; 1 when torch.distributed is unavailable or not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every process, in rank order ([obj] with one process). A collective: every process must call it.

    For small picklable values (RNG states, a backend choice), never for tensors in a training step: it copies
    through the host.
    """
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradient of every rank's copy and keeps this rank's rows.

    Every rank computes the same loss from the gathered batch, so this rank's rows receive a gradient from each
    of the world_size losses: their sum is world_size x dL/dz_local. DDP then averages parameter gradients over
    the ranks (divides by world_size), which gives exactly the single-process gradient of the global batch.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001 - autograd context
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001 - autograd context
        grad = grad.contiguous().clone()  # the collective writes in place; autograd may still hold `grad`
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate `x` [n, ...] of every rank along dim 0, in rank order -> [world_size * n, ...], differentiably.

    Every rank must pass the same shape (training drops the last partial batch). The identity with one process.
    Written here rather than taken from `torch.distributed.nn.functional.all_gather`, which recent torch
    releases deprecate (torch 2.14 warns on every call); the gradient is the same.
    """
    if world_size() == 1:
        return x
    return _GatherRows.apply(x)
