"""Optimisation: the LARS optimizer, parameter grouping and learning-rate schedules."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vdg.core.errors import ConfigError
from vdg.models.gates import ChannelGate
from vdg.optim.lars import LARS
from vdg.optim.schedule import INTERVALS, SCHEDULERS, warmup_cosine

__all__ = ["LARS", "INTERVALS", "OPTIMIZERS", "SCHEDULERS", "build_optimizer", "warmup_cosine", "lars_param_groups"]

# lars: the official VDG optimizer; sgd: plain SGD with momentum (the SimReg and SEED recipes)
OPTIMIZERS = ("lars", "sgd")


def build_optimizer(
    name: str, groups: list[dict], lr: float, momentum: float, weight_decay: float, eta: float, clip_lr: bool
) -> torch.optim.Optimizer:
    """`name` over the param groups of `lars_param_groups` (each group keeps its own weight decay).

    sgd ignores the groups' `lars` flags and `eta`/`clip_lr`: every group gets its own weight decay, so with
    optimizer.exclude_bias_n_norm=false every tensor is decayed, as torch.optim.SGD(model.parameters()) does.
    """
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip_lr=clip_lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer.name {name!r}; allowed values: {list(OPTIMIZERS)}")


def lars_param_groups(
    modules: Iterable[tuple[str, nn.Module]],
    weight_decay: float,
    exclude_bias_n_norm: bool = True,
    no_decay_modules: tuple[type[nn.Module], ...] = (ChannelGate,),
) -> list[dict]:
    """Split parameters the way the official code treats them (reference §1.9).

    - 1-D tensors (biases, BN scales and shifts) with `exclude_bias_n_norm`: neither LARS nor weight decay;
    - parameters of a `no_decay_modules` instance (the gating networks, `ChannelGate`): LARS, no weight decay;
    - everything else: LARS + `weight_decay`.
    Gates are recognised by their module type, not by name: a name test ("gate" in the name) also caught the
    gated branch's BatchNorms (`norms.gated.*`), 32 tensors that lost their decay with exclude_bias_n_norm=false.
    """
    decay, no_decay, excluded = [], [], []
    for _name, module in modules:  # (name, module) pairs as from named_children(); names are not needed
        gate_params = {id(p) for m in module.modules() if isinstance(m, no_decay_modules) for p in m.parameters()}
        for param in module.parameters():
            if not param.requires_grad:
                continue
            if exclude_bias_n_norm and param.ndim <= 1:
                excluded.append(param)
            elif id(param) in gate_params:
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lars": True},
        {"name": "gates", "params": no_decay, "weight_decay": 0.0, "lars": True},
        {"name": "bias_and_norm", "params": excluded, "weight_decay": 0.0, "lars": False},
    ]
    return [g for g in groups if g["params"]]
