"""Safe loading of vdg checkpoints: tensors and plain containers only, never pickled code.

Every script that takes `ckpt=` goes through here; it reads checkpoints, it never writes them.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vdg.core.errors import CheckpointError
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


def load_method(path: str | Path, expected_method: str | None = None):  # noqa: ANN201 - BaseMethod
    """Rebuild the pretraining LightningModule of a checkpoint and load its weights strictly (eval mode).

    Refuses a checkpoint of another method than `expected_method`, and weights that do not fit the
    architecture its config describes, naming the missing and unexpected keys.
    """
    from vdg.methods import build_method

    checkpoint = read_checkpoint(path)
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


# Keys of the pretraining config that define what a run *is*: resuming with any of them changed would silently
# mix two experiments, so `resume=auto` refuses. Everything else (epochs, workers, logging...) may change.
# Every key that fixes a tensor's shape is here (the class count and probe layout set the online probes'; backbone
# and method the encoder's and projector's; student the widths it resolves to), so a changed one is named before
# any state is loaded, never found by load_state_dict.
RESUME_MUST_MATCH = ("method", "budget", "dataset.name", "dataset.image_size", "dataset.stem", "data.batch_size",
                     "dataset.num_classes", "dataset.subset_per_class", "dataset.test_subset_per_class",
                     "dataset.subset_seed", "dataset.validation_split", "backbone", "gating", "probe.enabled",
                     "probe.batchnorm",
                     "student.channels_from", "seed", "teacher.sha256", "teacher.format", "teacher.branch")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def config_differences(saved: dict[str, Any], current: dict[str, Any], keys=RESUME_MUST_MATCH) -> list[str]:
    """'key: saved -> current' for every differing leaf under `keys` (dotted paths into the two configs)."""
    diffs = []
    for key in keys:
        a, b = saved, current
        present = True
        for part in key.split("."):
            present = present and isinstance(a, dict) and part in a
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        if not present:  # a key added to vdg after that run (e.g. teacher.*): it cannot have changed
            continue
        flat_a, flat_b = _flatten(a, f"{key}."), _flatten(b, f"{key}.")
        # keys the saved config lacks were added to vdg after that run: they cannot have changed
        for leaf in sorted(set(flat_a) | set(flat_b)):
            if leaf in flat_a and flat_a.get(leaf) != flat_b.get(leaf):
                diffs.append(f"{leaf}: {flat_a.get(leaf)!r} -> {flat_b.get(leaf)!r}")
    return diffs
