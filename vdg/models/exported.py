"""The reading side of vdg's backbone export format (what scripts/export.py writes): the export JSON, its weights,
and the one-branch encoder they describe, rebuilt and loaded strictly.

Models only: it reads files and builds a `GatedResNet`; writing exports and faster executions of them (folded,
sparse) are `vdg.deploy`. Weights are read with safetensors or `torch.load(weights_only=True)`, on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vdg.core.errors import CheckpointError, ConfigError
from vdg.models.branch import Branch
from vdg.models.encoder import BranchBackbone, build_encoder
from vdg.models.resnet import GatedResNet

EXPORT_FORMAT = "vdg-backbone"
FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".pt")
METADATA_KEY = "vdg_export"  # the export JSON, also stored in the .safetensors header


def read_export(path: Path) -> tuple[dict[str, Any], Path]:
    """The export JSON and the weights file for `path` (any of the three files of one export)."""
    if path.suffix not in (*WEIGHT_SUFFIXES, ".json"):
        raise CheckpointError(f"{path}: expected an exported .safetensors, .pt or .json file (scripts/export.py)")
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            metadata = json.loads(sidecar.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"cannot read {sidecar}: not a valid export JSON ({err})") from None
    elif path.suffix == ".safetensors" and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                header = (f.metadata() or {}).get(METADATA_KEY)
        except Exception as err:  # SafetensorError: a corrupt or foreign file
            raise CheckpointError(f"cannot read {path}: corrupt or not a safetensors file ({err})") from None
        if header is None:
            raise CheckpointError(f"{path} is not a vdg export: no {sidecar.name} and no vdg metadata in the file")
        metadata = json.loads(header)
    else:
        raise FileNotFoundError(f"{sidecar} not found: it describes the architecture of the exported weights")
    if not isinstance(metadata, dict) or metadata.get("format") != EXPORT_FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise CheckpointError(f"{sidecar} is not a vdg backbone export (format {found!r})")
    if path.suffix in WEIGHT_SUFFIXES:
        weights = path
    else:  # the JSON: prefer safetensors
        candidates = [path.with_suffix(suffix) for suffix in WEIGHT_SUFFIXES]
        weights = next((p for p in candidates if p.is_file()), candidates[0])
    if not weights.is_file():
        raise FileNotFoundError(f"exported weights not found: {weights}")
    return metadata, weights


def read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The exported state_dict (safetensors, or torch.load with weights_only); a bad file is one clear line."""
    try:
        if weights.suffix == ".safetensors":
            state = load_file(str(weights), device="cpu")
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, SafetensorError, a truncated zip: one line naming the file
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read {weights}: corrupt, truncated or not an exported backbone ({detail})") \
            from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{weights} does not hold a backbone state_dict (name -> tensor)")
    return state


def open_export(path: Path, branch: str | Branch | None = None) -> tuple[dict[str, Any], Path, dict, Branch]:
    """(export JSON, weights file, state_dict, exported branch) of the export at `path`, checked: the JSON names
    a branch and an architecture, and `branch` (when not None) is the one exported."""
    metadata, weights = read_export(path)
    state = read_weights(weights)
    missing = [key for key in ("branch", "arch") if not metadata.get(key)]
    if missing:
        raise CheckpointError(f"the export JSON of {weights} is incomplete: it has no {missing}")
    exported = Branch.parse(metadata["branch"])
    if branch is not None and Branch.parse(branch) is not exported:
        wanted = Branch.parse(branch).value
        raise ConfigError(
            f"{path} holds the {exported.value} branch, not {wanted!r}; export that one with "
            f"`python scripts/export.py ckpt={metadata['source']['checkpoint']} branch={wanted}`"
        )
    return metadata, weights, state, exported


def build_exported(metadata: dict[str, Any], weights: Path, state: dict, exported: Branch) -> GatedResNet:
    """The encoder an export's JSON describes, its weights loaded strictly, in eval mode."""
    gate = metadata.get("gate") or {}
    encoder = build_encoder(metadata["arch"], exported, gate.get("temperature", 2.0 / 3.0))
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = "; ".join(line.strip() for line in str(err).strip().splitlines()[:3])
        raise CheckpointError(f"{weights} does not fit the architecture in its JSON {metadata['arch']}: {detail}") \
            from err
    return encoder.eval()


def load_exported(path: str | Path, branch: str | Branch | None = None) -> BranchBackbone:
    """An export as the module it was trained as (`BranchBackbone`, eval mode): `load_backbone(path,
    execution="masked")` of `vdg.deploy.export`, for the layers below deploy (distillation teachers)."""
    path = Path(path).expanduser()
    metadata, weights, state, exported = open_export(path, branch)
    return BranchBackbone(build_exported(metadata, weights, state, exported), exported, metadata).eval()
