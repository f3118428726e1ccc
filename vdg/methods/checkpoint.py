"""Safe loading of vdg pretraining checkpoints into their method: tensors and plain containers only, never pickled
code. The one checkpoint loader of vdg: evaluation, export, teachers, students and resume all read through here.

It reads checkpoints and builds the method they describe; it never writes them (Lightning does, `vdg.run`).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vdg.core.errors import CheckpointError
from vdg.methods.base import BaseMethod
from vdg.methods.registry import build_method
from vdg.models import Branch


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file with `weights_only=True`: a file that needs arbitrary unpickling is refused."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: ckpt={str(path)!r} is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = [line.strip() for line in str(err).splitlines() if "unsupported global" in line.lower()]
        if not unsafe:
            raise CheckpointError(f"cannot read checkpoint {path}: corrupt or not a torch checkpoint ({err})") from err
        raise CheckpointError(
            f"refusing to load {path}: it carries pickled Python objects beyond tensors and plain containers, "
            f"which could run code on load ({unsafe[0]}; torch.load(weights_only=True) rejected it)"
        ) from None
    except Exception as err:  # truncated zip, random bytes, ...
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt or not a torch checkpoint ({err})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a vdg checkpoint: it has no 'state_dict'")
    cfg = checkpoint.get("hyper_parameters", {}).get("cfg")
    if not isinstance(cfg, dict) or "method" not in cfg:
        raise CheckpointError(f"{path} is not a vdg checkpoint: it has no hyper_parameters.cfg with a method")
    return checkpoint


def checkpoint_config(checkpoint: dict[str, Any]) -> DictConfig:
    return OmegaConf.create(checkpoint["hyper_parameters"]["cfg"])


def load_method(path: str | Path, expected_method: str | None = None) -> BaseMethod:
    """Rebuild the pretraining LightningModule of a checkpoint and load its weights strictly (eval mode).

    Refuses a checkpoint of another method than `expected_method`, and weights that do not fit the
    architecture its config describes, naming the missing and unexpected keys.
    """
    try:
        return method_from_checkpoint(read_checkpoint(path), path, expected_method)
    except RuntimeError as err:  # anything else that does not fit the architecture the config describes
        first = str(err).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        raise CheckpointError(
            f"{path} does not fit the architecture its own config describes (edited or foreign weights): {detail}"
        ) from err


def method_from_checkpoint(
    checkpoint: dict[str, Any], path: str | Path, expected_method: str | None = None
) -> BaseMethod:
    """`load_method` on a checkpoint already read with `read_checkpoint` (`path` names it in errors)."""
    cfg = checkpoint_config(checkpoint)
    if expected_method is not None and cfg.method.name != expected_method:
        raise CheckpointError(f"{path} was trained with method {cfg.method.name!r}, expected {expected_method!r}")
    model = build_method(cfg)
    try:
        missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    except RuntimeError as err:  # same keys, other shapes (e.g. another width)
        raise CheckpointError(
            f"{path} does not fit a {cfg.method.name} model with backbone {model.backbone.arch_config()}: "
            f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}"
        ) from err
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit a {cfg.method.name} model with backbone {model.backbone.arch_config()}: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return model.eval()


def require_branch(model: Any, branch: str | Branch) -> Branch:
    """The branch by name, if the checkpoint's backbone serves it; else a clear error."""
    branch = Branch.parse(branch)
    if branch not in model.backbone.branches:
        served = [b.value for b in model.backbone.branches]
        raise CheckpointError(
            f"branch={branch.value!r} is not in this checkpoint ({model.cfg.method.name} serves {served})"
        )
    return branch
