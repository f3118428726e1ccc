"""Export one branch of a pretraining checkpoint as a plain backbone for downstream code, and load it back.

`export_backbone` writes the branch's weights (.pt and .safetensors) and a JSON describing them;
`load_backbone` rebuilds a ready-to-use module from those files (the format's reading side is
`vdg.models.exported`). Weights only: no pickled code is written or read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import Tensor

from vdg.core.atomic import atomic_write, remove_orphans
from vdg.core.errors import ConfigError
from vdg.core.options import check_bool, check_choice, check_data_overrides, check_known_keys, check_str
from vdg.core.paths import config_file
from vdg.core.rundir import check_writable
from vdg.deploy.slim import ChannelProfile, compact_gated, compaction, method_profile, slim_widths
from vdg.deploy.sparse import FoldedResNet
from vdg.deploy.to_onnx import OPSET, export_onnx
from vdg.methods.base import BaseMethod
from vdg.methods.checkpoint import method_from_checkpoint, read_checkpoint, require_branch
from vdg.models import Branch, GatedResNet
from vdg.models.encoder import BranchBackbone, branch_encoder
from vdg.models.exported import EXPORT_FORMAT, FORMAT_VERSION, METADATA_KEY, build_exported, open_export

EXECUTIONS = ("masked", "folded", "sparse")  # how `load_backbone` runs a network; see its docstring
FORMATS = ("torch", "onnx")  # torch: .pt + .safetensors + .json (load_backbone); onnx: one .onnx (vdg.deploy.to_onnx)
PROFILE_SPLITS = ("train", "test")  # splits `slim=true` may profile the gate policy on (evaluation transform)


def export_name(method: str, dataset: str, budget: float | None, branch: str | Branch) -> str:
    """`<method>-<dataset>-td<t_d>-<branch>`, e.g. vdg-cifar100-td0.3-gated; budget None (dense-only methods,
    where t_d means nothing) leaves the t_d part out: vicreg-cifar100-dense."""
    td = "" if budget is None else f"-td{float(budget):g}"
    return f"{method}-{dataset}{td}-{Branch.parse(branch).value}"


def _same_export(paths: dict[str, Path], metadata: dict[str, Any], state: dict[str, Tensor]) -> bool:
    """Whether the files at `paths` already hold exactly this export: the same JSON and the same weights."""
    try:
        if json.loads(paths["json"].read_text()) != metadata:
            return False
        saved = load_file(str(paths["safetensors"]))
    except (OSError, ValueError):  # unreadable or not JSON / not safetensors: not this export
        return False
    return saved.keys() == state.keys() and all(torch.equal(saved[k], state[k].cpu()) for k in state)


def export_backbone(
    ckpt: str | Path,
    branch: str | Branch,
    out_dir: str | Path | None = None,
    name: str | None = None,
    overwrite: bool = False,
    expected_method: str | None = None,
    execution: str | None = None,
    slim: bool = False,
    profile_split: str = "train",
    data: dict[str, Any] | None = None,
    output_format: str = "torch",
) -> dict[str, Path]:
    """Write one branch of a checkpoint's backbone as <name>.pt, <name>.safetensors and <name>.json.

    out_dir: default <checkpoint dir>/export; name: default `export_name` (+ "-slim"). When the files already hold
    exactly this export (same weights, source checkpoint and settings, as pretraining leaves them), nothing is
    rewritten; other existing files are refused unless `overwrite`. Returns {"pt": ..., "safetensors": ...,
    "json": ...} (+ "profile" when slim). The JSON holds the architecture (`GatedResNet.arch_config()`), the gate
    settings, t_d, the input normalisation, the source checkpoint and the default execution.

    execution: the default of `load_backbone` for this export ("masked" | "folded" | "sparse"; None = "masked").
    slim: export the compacted gated network instead (`vdg.deploy.slim.compact_gated`): the channels the gates
    never kept on the checkpoint's `profile_split` removed, the always-kept ones ungated; the channel profile is
    written to <name>.profile.json and the slim dense widths (the paper's Table 3 students) into the JSON.
    data: keys of the checkpoint's `data:` block to override for profiling (e.g. {"root": "/data"}).
    output_format: "torch" (the files above) or "onnx": one <name>.onnx (images -> features, dynamic batch) with
    the JSON in its metadata, checked against PyTorch with onnxruntime before it is written
    (`vdg.deploy.to_onnx`); returns {"onnx": path}. An existing file is refused unless `overwrite`. The gated
    network exports as its masked graph (every channel computed, then masked): ONNX cannot skip channels per sample.
    """
    check_format(output_format, execution)
    check_bool("slim", slim)
    check_choice("profile_split", profile_split, PROFILE_SPLITS)
    source = read_checkpoint(ckpt)  # read once: the method's weights and the provenance (epoch, step) come from it
    model = method_from_checkpoint(source, ckpt, expected_method)  # weights_only, strict, eval mode
    branch = require_branch(model, branch)
    if (execution == "sparse" or slim) and branch is not Branch.GATED:
        what = "execution=sparse" if execution == "sparse" else "slim=true"
        raise ConfigError(f"{what} needs the gated network (branch=gated): the dense network has no gates")
    encoder = branch_encoder(model.backbone, branch)
    profile = None
    if slim:
        profile = method_profile(model, profile_split, data)
        encoder = compact_gated(model.backbone, profile)
    out = Path(out_dir) if out_dir is not None else Path(ckpt).resolve().parent / "export"
    if output_format == "onnx":
        return write_onnx_export(
            model, encoder, branch, ckpt, source, out, name, slim, overwrite, profile, profile_split
        )
    paths = export_paths(model, branch, out, name, slim)
    metadata = export_metadata(model, encoder, branch, ckpt, source, paths, execution)
    if profile is not None:
        metadata["slim"] = {**slim_record(profile, profile_split), "profile": paths["profile"].name}
    state = {key: value.contiguous() for key, value in encoder.state_dict().items()}
    if _already_there(paths, metadata, state, overwrite):
        return paths  # this very export is there already (e.g. written by pretraining): nothing to do
    write_export(out, paths, state, metadata, profile)
    return paths


def write_onnx_export(
    model: BaseMethod,
    encoder: GatedResNet,
    branch: Branch,
    ckpt: str | Path,
    source: dict[str, Any],
    out: Path,
    name: str | None,
    slim: bool,
    overwrite: bool,
    profile: ChannelProfile | None,
    profile_split: str,
) -> dict[str, Path]:
    """`export_backbone(..., output_format="onnx")`: <out>/<name>.onnx, the export JSON in its metadata."""
    path = export_paths(model, branch, out, name, slim)["json"].with_suffix(".onnx")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists; pass overwrite=true to replace it, or out_dir=/name= to keep both"
        )
    metadata = export_metadata(model, encoder, branch, ckpt, source, {"onnx": path}, None)
    metadata.pop("execution")
    metadata["files"] = {"onnx": path.name}
    metadata["onnx"] = {
        "opset": OPSET,
        "input": "images [N, 3, H, W], normalised with `normalize`",
        "output": f"features [N, {encoder.feature_dim}]",
        "graph": "masked: every channel computed, then multiplied by 1[logit >= 0] (no per-sample skipping)"
        if encoder.gated
        else "static",
    }
    if profile is not None:
        metadata["slim"] = slim_record(profile, profile_split)
    check_writable(out, "out_dir")
    out.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)  # temp files of killed exports
    network = BranchBackbone(encoder, branch, metadata, check_inputs=False).eval()
    export_onnx(network, path, int(model.cfg.dataset.image_size), metadata)
    return {"onnx": path}


def export_paths(model: BaseMethod, branch: Branch, out: Path, name: str | None, slim: bool) -> dict[str, Path]:
    """{"pt", "safetensors", "json"} (+ "profile" when slim): `<out>/<name>.*`, by default
    `<out>/<export_name>[-slim].*`."""
    cfg = model.cfg
    budget = float(cfg.budget) if model.backbone.gated else None
    stem = name or export_name(str(cfg.method.name), str(cfg.dataset.name), budget, branch) + ("-slim" if slim else "")
    paths = {"pt": out / f"{stem}.pt", "safetensors": out / f"{stem}.safetensors", "json": out / f"{stem}.json"}
    if slim:
        paths["profile"] = out / f"{stem}.profile.json"
    return paths


def export_metadata(
    model: BaseMethod,
    encoder: GatedResNet,
    branch: Branch,
    ckpt: str | Path,
    source: dict[str, Any],
    paths: dict[str, Path],
    execution: str | None,
) -> dict[str, Any]:
    """The export JSON: architecture, gate settings, t_d, input normalisation, provenance, default execution."""
    cfg = model.cfg
    gate = encoder.blocks[0].gate
    return {
        "format": EXPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        "branch": branch.value,
        "arch": encoder.arch_config(),
        "feature_dim": encoder.feature_dim,
        "gate": None
        if gate is None
        else {
            "reduction": gate.reduction,
            "bias": gate.expand.bias is not None,
            "temperature": gate.temperature,  # of the training-time sampler; eval masks are 1[logit >= 0]
            "eval_mask": "1[logit >= 0]",
        },
        "budget": float(cfg.budget) if model.backbone.gated else None,  # t_d the run was trained for
        "method": str(cfg.method.name),
        "pretrain_dataset": str(cfg.dataset.name),
        "image_size": int(cfg.dataset.image_size),
        "normalize": {"mean": list(cfg.dataset.eval_mean), "std": list(cfg.dataset.eval_std)},
        "dense_macs": int(model.cost.dense_macs),
        "source": {
            "checkpoint": str(Path(ckpt).resolve()),
            "epoch": int(source.get("epoch", -1)),
            "global_step": int(source.get("global_step", -1)),
            "arch": model.backbone.arch_config(),
        },
        "files": {key: path.name for key, path in paths.items() if key in ("pt", "safetensors")},
        "execution": execution or "masked",
    }


def slim_record(profile: ChannelProfile, profile_split: str) -> dict[str, Any]:
    """What the export JSON says of a slim export: the profile it was compacted with and what was kept."""
    return {
        "profile_split": profile_split,
        "profile_samples": profile.samples,
        "channels": profile.channels,
        "kept": [len(row["kept"]) for row in compaction(profile)],
        "always_on": [len(row["always_on"]) for row in compaction(profile)],
        "slim_widths": slim_widths(profile),  # conv1 widths of the slim dense ResNet-18 (`slim_resnet`)
    }


def _already_there(paths: dict[str, Path], metadata: dict[str, Any], state: dict[str, Tensor], overwrite: bool) -> bool:
    """True when the files hold exactly this export; FileExistsError when they hold another one (and not
    `overwrite`); False when there is something to write."""
    existing = [p for p in paths.values() if p.exists()]
    if not existing or overwrite:
        return False
    if len(existing) == len(paths) and _same_export(paths, metadata, state):
        return True
    raise FileExistsError(
        f"{', '.join(map(str, existing))} already exist(s) and hold another export (its weights, source "
        "checkpoint or settings differ); pass overwrite=true to replace them, or out_dir=/name= to keep both"
    )


def write_export(
    out: Path, paths: dict[str, Path], state: dict[str, Tensor], metadata: dict[str, Any],
    profile: ChannelProfile | None,
) -> None:
    """Write the files of one export, each atomically (a reader never sees half a file; the mode follows the
    umask; a full disk is a one-line StorageError), after refusing a folder that cannot be written."""
    check_writable(out, "out_dir")
    out.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)  # temp files of killed exports
    atomic_write(paths["pt"], lambda tmp: torch.save(state, tmp))
    atomic_write(paths["safetensors"], lambda tmp: save_file(state, tmp, {METADATA_KEY: json.dumps(metadata)}))
    if profile is not None:
        atomic_write(paths["profile"], lambda tmp: profile.save(tmp))
    atomic_write(paths["json"], lambda tmp: Path(tmp).write_text(json.dumps(metadata, indent=2) + "\n"))


def check_format(output_format: Any, execution: Any) -> None:
    """`format` and `execution` of an export: known values, and no execution for an ONNX file."""
    check_choice("format", output_format, FORMATS)
    if execution is None:
        return
    check_choice("execution", execution, EXECUTIONS)
    if output_format == "onnx":
        raise ConfigError(
            f"execution={execution} is how load_backbone runs a format=torch export; an ONNX file runs in "
            "onnxruntime as the graph it holds: leave execution unset with format=onnx"
        )


def check_export_config(cfg: Any) -> None:
    """Every option of scripts/export.py (configs/export.yaml), before the checkpoint is read: unknown keys,
    types and values are one `ConfigError` line naming the key and the allowed values."""
    for key, what in (("ckpt", "ckpt=PATH: the pretraining checkpoint"), ("branch", "branch=dense|gated")):
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) is None:
            raise ConfigError(f"{what} is required")
    check_known_keys("", cfg, [k for k in OmegaConf.load(config_file("export.yaml")) if k != "defaults"])
    check_str("ckpt", cfg.ckpt)
    check_choice("branch", cfg.branch, [b.value for b in Branch])
    for key in ("expected_method", "out_dir", "name"):
        check_str(key, cfg.get(key), optional=True)
    check_bool("overwrite", cfg.overwrite)
    check_bool("slim", cfg.slim)
    check_format(cfg.format, cfg.execution)
    check_choice("profile_split", cfg.profile_split, PROFILE_SPLITS)
    check_data_overrides(cfg.get("data"))


def load_backbone(
    path: str | Path, branch: str | Branch | None = None, execution: str | None = None, kernel: str = "auto"
) -> BranchBackbone | FoldedResNet:
    """Load an export of scripts/export.py in eval mode: model(x) -> [N, 512] features, model.encode(x) -> masks.

    path: the .safetensors, .pt or .json of one export (the .json next to the weights describes them).
    branch: None, or the branch the caller expects ("dense" | "gated"); another branch is an error.
    execution: how the network runs (None = the export's own choice, "masked" unless exported otherwise):
        "masked": a `BranchBackbone`, the `GatedResNet` module as trained (the gated network computes every
            channel and multiplies by its mask); "folded": a `FoldedResNet`, the same computation with eval
            BatchNorm folded into prepacked oneDNN convolutions (faster on CPUs, inference only); "sparse":
            a `FoldedResNet` of the gated network that skips the work of gated-off channels
            (`vdg.deploy.sparse`). All three give the same features up to float round-off.
    kernel: the sparse execution's per-sample kernel: "auto" (the compiled one, `vdg.deploy.native`, where a C
        compiler builds it; else "torch" with a warning), "native" or "torch" (slower, no compiler needed).
    Weights are read with safetensors or `torch.load(weights_only=True)`, on the CPU.

        model = vdg.load_backbone("runs/.../export/vdg-cifar100-td0.3-gated.safetensors", execution="sparse")
        features = model(images)  # images normalised with model.config["normalize"]["mean"] / ["std"]
    """
    path = Path(path).expanduser()
    metadata, weights, state, exported = open_export(path, branch)
    execution = check_choice("execution", execution or metadata.get("execution") or "masked", EXECUTIONS)
    if execution == "sparse" and exported is not Branch.GATED:
        raise ConfigError(
            f"execution='sparse' skips gated-off channels, and {path} holds the dense network, which has no gates; "
            "use execution='folded' (or 'masked')"
        )
    encoder = build_exported(metadata, weights, state, exported)
    if execution == "masked":
        return BranchBackbone(encoder, exported, metadata).eval()
    return FoldedResNet(encoder, exported, skip_inactive=execution == "sparse", config=metadata, kernel=kernel)
