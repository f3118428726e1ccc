"""What every execution of an exported network accepts, checked in one place so that masked, folded and sparse
execution (`vdg.deploy`) take exactly the same inputs and refuse exactly the same ones:

- a tensor [N, 3, H, H] with N >= 1 (square images: the folded engines plan each block's work per image size);
- floating point (float16, bfloat16, float32, float64 are computed in float32, the weights' type); integer and
  bool images are refused, since they are not normalised yet (`config["normalize"]` of the export);
- every value finite: a NaN or Inf is refused, not propagated into features. Checked for CPU tensors only: on a
  GPU the check would cost a host synchronisation on every call (a distillation teacher runs once per step);
- on the network's device.

A refusal is an `InputError` (a ValueError) naming what was given and what to do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vdg.core.errors import VdgError


class InputError(VdgError, ValueError):
    """The images given to an exported network do not fit it; the message says what was given and the fix."""


def check_images(x: Any, device: torch.device, channels: int = 3) -> Tensor:
    """`x` as the float32 tensor the network computes on, or an `InputError`."""
    if not isinstance(x, Tensor):
        raise InputError(f"images must be a torch.Tensor [N, {channels}, H, H], got {type(x).__name__}")
    if x.ndim != 4 or x.shape[0] < 1 or x.shape[1] != channels or x.shape[2] != x.shape[3] or x.shape[2] < 1:
        raise InputError(f"images must be [N >= 1, {channels}, H, H] (square), got {list(x.shape)}")
    if not x.is_floating_point():
        raise InputError(
            f"images must be floating point and normalised (the export's config['normalize'] mean/std), got "
            f"{x.dtype}; e.g. (x.float() / 255 - mean) / std"
        )
    if x.device != torch.device(device):
        raise InputError(f"images on {x.device}, network on {device}: move one, e.g. x.to({str(device)!r})")
    x = x.float()
    if x.device.type == "cpu" and not torch.isfinite(x).all():
        raise InputError("images hold NaN or Inf values: features of such an input would be NaN or meaningless")
    return x
