"""Export one branch of a pretraining checkpoint as a plain backbone for downstream code, and load it back.

`export_backbone` writes the branch's weights (.pt and .safetensors) and a JSON describing them;
`load_backbone` rebuilds a ready-to-use module from those files. Weights only: no pickled code is written or read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vdg.core.errors import CheckpointError, ConfigError
from vdg.core.options import check_bool, check_choice
from vdg.deploy.sparse import FoldedResNet
from vdg.models import Branch
from vdg.models.encoder import BranchBackbone, branch_encoder, build_encoder
from vdg.run.checkpoint import load_method, read_checkpoint, require_branch

EXPORT_FORMAT = "vdg-backbone"
EXECUTIONS = ("masked", "folded", "sparse")  # how `load_backbone` runs a network; see its docstring
FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".pt")
METADATA_KEY = "vdg_export"  # the export JSON, also stored in the .safetensors header


def export_name(method: str, dataset: str, budget: float | None, branch: str | Branch) -> str:
    """`<method>-<dataset>-td<t_d>-<branch>`, e.g. vdg-cifar100-td0.3-gated; budget None (dense-only methods,
    where t_d means nothing) leaves the t_d part out: vicreg-cifar100-dense."""
    td = "" if budget is None else f"-td{float(budget):g}"
    return f"{method}-{dataset}{td}-{Branch.parse(branch).value}"


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(temp_path)` into the target folder, then rename: a reader never sees half a file; the file's mode
    follows the umask (colleagues can read exports); a full disk is a one-line StorageError."""
    from vdg.core.atomic import atomic_write

    atomic_write(path, write)


def _same_export(paths: dict[str, Path], metadata: dict[str, Any], state: dict[str, Tensor]) -> bool:
    """Whether the files at `paths` already hold exactly this export: the same JSON and the same weights."""
    from safetensors.torch import load_file

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
    """
    from safetensors.torch import save_file

    if execution is not None:
        check_choice("execution", execution, EXECUTIONS)
    check_bool("slim", slim)
    check_choice("profile_split", profile_split, PROFILE_SPLITS)
    model = load_method(ckpt, expected_method)  # weights_only, strict, eval mode
    branch = require_branch(model, branch)
    if (execution == "sparse" or slim) and branch is not Branch.GATED:
        what = "execution=sparse" if execution == "sparse" else "slim=true"
        raise ConfigError(f"{what} needs the gated network (branch=gated): the dense network has no gates")
    encoder = branch_encoder(model.backbone, branch)
    slim_info = None
    if slim:
        from vdg.deploy.slim import checkpoint_profile, compact_gated, compaction, slim_widths

        profile = checkpoint_profile(ckpt, profile_split, data)
        encoder = compact_gated(model.backbone, profile)
        slim_info = {
            "profile_split": profile_split,
            "profile_samples": profile.samples,
            "channels": profile.channels,
            "kept": [len(row["kept"]) for row in compaction(profile)],
            "always_on": [len(row["always_on"]) for row in compaction(profile)],
            "slim_widths": slim_widths(profile),  # conv1 widths of the slim dense ResNet-18 (`slim_resnet`)
        }
    source = read_checkpoint(ckpt)
    cfg = model.cfg
    budget = float(cfg.budget) if model.backbone.gated else None
    stem = name or export_name(str(cfg.method.name), str(cfg.dataset.name), budget, branch) + ("-slim" if slim else "")
    out = Path(out_dir) if out_dir is not None else Path(ckpt).resolve().parent / "export"
    paths = {"pt": out / f"{stem}.pt", "safetensors": out / f"{stem}.safetensors", "json": out / f"{stem}.json"}
    if slim:
        paths["profile"] = out / f"{stem}.profile.json"
    gate = encoder.blocks[0].gate
    metadata = {
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
        "budget": budget,  # t_d the run was trained for (None for dense-only methods)
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
    if slim_info is not None:
        metadata["slim"] = {**slim_info, "profile": paths["profile"].name}
    state = {key: value.contiguous() for key, value in encoder.state_dict().items()}
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        if len(existing) == len(paths) and _same_export(paths, metadata, state):
            return paths  # this very export is there already (e.g. written by pretraining): nothing to do
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist(s) and hold another export (its weights, source "
            "checkpoint or settings differ); pass overwrite=true to replace them, or out_dir=/name= to keep both"
        )
    from vdg.core.atomic import remove_orphans
    from vdg.core.rundir import check_writable

    check_writable(out, "out_dir")
    out.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)  # temp files of killed exports
    _atomic_write(paths["pt"], lambda tmp: torch.save(state, tmp))
    _atomic_write(paths["safetensors"], lambda tmp: save_file(state, tmp, {METADATA_KEY: json.dumps(metadata)}))
    if slim:
        _atomic_write(paths["profile"], lambda tmp: profile.save(tmp))
    _atomic_write(paths["json"], lambda tmp: Path(tmp).write_text(json.dumps(metadata, indent=2) + "\n"))
    return paths


PROFILE_SPLITS = ("train", "test")  # splits `slim=true` may profile the gate policy on (evaluation transform)


def check_export_config(cfg: Any) -> None:
    """Every option of scripts/export.py (configs/export.yaml), before the checkpoint is read: unknown keys,
    types and values are one `ConfigError` line naming the key and the allowed values."""
    from omegaconf import OmegaConf

    from vdg.core.errors import ConfigError
    from vdg.core.options import check_data_overrides, check_known_keys, check_str
    from vdg.core.paths import CONFIG_DIR

    for key, what in (("ckpt", "ckpt=PATH: the pretraining checkpoint"), ("branch", "branch=dense|gated")):
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) is None:
            raise ConfigError(f"{what} is required")
    config = CONFIG_DIR / "export.yaml"
    if config.is_file():
        check_known_keys("", cfg, [k for k in OmegaConf.load(config) if k != "defaults"])
    check_str("ckpt", cfg.ckpt)
    check_choice("branch", cfg.branch, [b.value for b in Branch])
    for key in ("expected_method", "out_dir", "name"):
        check_str(key, cfg.get(key), optional=True)
    check_bool("overwrite", cfg.overwrite)
    check_bool("slim", cfg.slim)
    if cfg.execution is not None:
        check_choice("execution", cfg.execution, EXECUTIONS)
    check_choice("profile_split", cfg.profile_split, PROFILE_SPLITS)
    check_data_overrides(cfg.get("data"))


def _read_export(path: Path) -> tuple[dict[str, Any], Path]:
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
        from safetensors import safe_open

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


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The exported state_dict (safetensors, or torch.load with weights_only); a bad file is one clear line."""
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

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
    metadata, weights = _read_export(path)
    state = _read_weights(weights)
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
    execution = check_choice("execution", execution or metadata.get("execution") or "masked", EXECUTIONS)
    if execution == "sparse" and exported is not Branch.GATED:
        raise ConfigError(
            f"execution='sparse' skips gated-off channels, and {path} holds the dense network, which has no gates; "
            "use execution='folded' (or 'masked')"
        )
    gate = metadata.get("gate") or {}
    encoder = build_encoder(metadata["arch"], exported, gate.get("temperature", 2.0 / 3.0))
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = "; ".join(line.strip() for line in str(err).strip().splitlines()[:3])
        raise CheckpointError(f"{weights} does not fit the architecture in its JSON {metadata['arch']}: {detail}") \
            from err
    encoder.eval()
    if execution == "masked":
        return BranchBackbone(encoder, exported, metadata).eval()
    return FoldedResNet(encoder, exported, skip_inactive=execution == "sparse", config=metadata, kernel=kernel)
