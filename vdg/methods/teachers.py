"""Frozen teacher networks for self-supervised distillation, built from the files researchers actually have.

`load_teacher(path, format="auto")` detects the file's format (or checks the one named) and returns a `Teacher`
in eval mode without gradients. Every file is read with `torch.load(weights_only=True)` or safetensors; nothing
is downloaded. This module builds and loads networks only: distillation lives in `vdg.methods.distill`.
It sits with the methods, above the models it builds: a vdg_checkpoint teacher is a whole pretraining method.

Formats (`TEACHER_FORMATS`):
    vdg_checkpoint  a vdg pretraining checkpoint (.ckpt), or its run directory (checkpoints/last.ckpt): the
                    network named by `branch` and the method's projector as the head (e.g. a VICReg run)
    vdg_export      a backbone export of scripts/export.py (.safetensors, .pt or .json): no head
    solo_learn      a solo-learn checkpoint: `state_dict` keys under `backbone.` (a torchvision ResNet), head
                    from `projector.`
    moco            a MoCo checkpoint in the MoCo authors' format: `state_dict` keys under `module.encoder_q.`
                    (a torchvision ResNet-50 for the public MoCo-v2 files), head from its `fc` (the MLP of v2)
    torchvision     a torchvision ResNet `state_dict` (conv1.weight, layer1.0..., fc.* is a classifier: dropped)
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from vdg.core.errors import CheckpointError, TeacherError
from vdg.methods.checkpoint import load_method, require_branch
from vdg.models.encoder import BranchBackbone, branch_encoder
from vdg.models.exported import load_exported

TEACHER_FORMATS = ("vdg_checkpoint", "vdg_export", "solo_learn", "moco", "torchvision")
TEACHER_OUTPUTS = ("features", "embedding")
# torchvision's and the MoCo authors' input normalisation (ImageNet statistics)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (block kind, blocks per stage) -> torchvision builder
_RESNETS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


@dataclass(frozen=True)
class TeacherInfo:
    """Where a teacher came from and what it outputs (recorded with the student's checkpoints).

    feature_dim: pooled backbone features; embedding_dim: the head's output (None without a head).
    mean/std: the input normalisation it was trained with (None: unknown, the student's is used).
    """

    path: str
    format: str
    sha256: str
    arch: str
    feature_dim: int
    embedding_dim: int | None
    pretrain_dataset: str | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def output_dim(self, output: str) -> int:
        if output == "features":
            return self.feature_dim
        if self.embedding_dim is None:
            raise TeacherError(
                f"the teacher {self.path} ({self.format}) has no projection head, so it has no embedding to distil; "
                "set method.teacher_output=features to distil its pooled backbone features"
            )
        return self.embedding_dim


class Renormalize(nn.Module):
    """Per-channel affine map from inputs normalised with (mean_in, std_in) to (mean_out, std_out):
    x_out = (x_in * std_in + mean_in - mean_out) / std_out, as buffers (they follow the module's device)."""

    def __init__(self, mean_in: Any, std_in: Any, mean_out: Any, std_out: Any) -> None:
        super().__init__()
        column = lambda v: torch.tensor([float(x) for x in v]).view(1, -1, 1, 1)  # noqa: E731
        self.register_buffer("scale", column(std_in) / column(std_out))
        self.register_buffer("shift", (column(mean_in) - column(mean_out)) / column(std_out))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


class Teacher(nn.Module):
    """A frozen backbone (x [N, 3, H, W] -> features [N, feature_dim]) and its optional head (-> embedding).

    Always in eval mode (BatchNorm uses its running statistics, gates their deterministic masks) with
    `requires_grad=False`: `train()` keeps it in eval mode.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None, info: TeacherInfo) -> None:
        super().__init__()
        self.backbone, self.head, self.info = backbone, head, info
        self.renormalize: Renormalize | None = None
        self.requires_grad_(False)
        self.eval()

    def expect_inputs(self, mean: Any, std: Any) -> None:
        """Inputs will arrive normalised with (mean, std): convert them to the teacher's own normalisation
        (`info.mean`/`info.std`) first. Nothing to do when those are unknown or the same."""
        same = self.info.mean is None or (
            tuple(map(float, mean)) == self.info.mean and tuple(map(float, std)) == self.info.std
        )
        self.renormalize = None if same else Renormalize(mean, std, self.info.mean, self.info.std)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # a teacher never trains, whatever `mode` asks

    @torch.no_grad()
    def forward(self, x: Tensor, output: str = "features") -> Tensor:
        """`output`: "features" (pooled backbone features) or "embedding" (after the head)."""
        if self.renormalize is not None:
            x = self.renormalize(x)
        features = self.backbone(x)
        if output == "features":
            return features
        if self.head is None:
            self.info.output_dim(output)  # raises the explanation
        return self.head(features)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def teacher_file(path: str | Path) -> Path:
    """The file behind `teacher.path`: the path itself, or a run directory's checkpoints/last.ckpt."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate.resolve()
        raise TeacherError(f"teacher.path={str(path)!r} is a directory without checkpoints/last.ckpt")
    if not path.is_file():
        raise TeacherError(f"teacher file not found: teacher.path={str(path)!r}")
    return path.resolve()


# ----- reading and recognising a file ------------------------------------------------------------------------
def _read(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise TeacherError(
            f"refusing to load the teacher {path}: it holds pickled Python objects beyond tensors and plain "
            f"containers, which could run code on load (torch.load(weights_only=True) rejected it: "
            f"{str(err).splitlines()[0]})"
        ) from None
    except Exception as err:  # truncated zip, random bytes, ...
        raise TeacherError(f"cannot read the teacher {path}: corrupt or not a torch file ({err})") from err


def _is_export_sidecar(path: Path) -> bool:
    sidecar = path.with_suffix(".json")
    try:
        return sidecar.is_file() and json.loads(sidecar.read_text()).get("format") == "vdg-backbone"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _prefixes(keys: Any, limit: int = 8) -> list[str]:
    """Distinct first two dotted parts of `keys`, e.g. ['module.encoder_q', 'backbone.layer1']: what a file holds."""
    return sorted({".".join(str(k).split(".")[:2]) for k in keys})[:limit]


def _is_vdg_checkpoint(obj: Mapping) -> bool:
    cfg = (obj.get("hyper_parameters") or {}).get("cfg") if isinstance(obj.get("hyper_parameters"), dict) else None
    # vdg's cfg has a method block and t_d; solo-learn's cfg names its method with a plain string
    return isinstance(cfg, dict) and isinstance(cfg.get("method"), dict) and "budget" in cfg


def classify(obj: Any) -> tuple[str | None, str]:
    """(format or None, a description of what the loaded object holds, for error messages)."""
    if not isinstance(obj, Mapping):
        return None, f"a {type(obj).__name__}, not a dict"
    state = obj.get("state_dict")
    if isinstance(state, Mapping):
        found = f"a dict with keys {sorted(map(str, obj))[:8]} and state_dict keys under {_prefixes(state)}"
        if _is_vdg_checkpoint(obj):
            return "vdg_checkpoint", found
        if any(str(k).startswith("module.encoder_q.") for k in state):
            return "moco", found
        if any(str(k).startswith("backbone.") for k in state):
            return "solo_learn", found
        return None, found
    found = f"a dict with keys under {_prefixes(obj)}"
    if all(isinstance(v, Tensor) for v in obj.values()) and "conv1.weight" in obj and "layer1.0.conv1.weight" in obj:
        return "torchvision", found
    return None, found


# ----- building networks from state dicts ---------------------------------------------------------------------
def resnet_from_state(state: Mapping[str, Tensor], where: str) -> tuple[nn.Module, str]:
    """A torchvision ResNet (fc = Identity) with `state` loaded strictly, its depth read from the keys.

    A 3x3 conv1 is the CIFAR stem of solo-learn and vdg (3x3, stride 1, padding 2, no max-pool); 7x7 keeps
    torchvision's. Built with `weights=None`: nothing is downloaded. fc.* (a classifier) is not loaded.
    """
    depths = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    name = _RESNETS.get((kind, depths))
    if name is None or "conv1.weight" not in state:
        raise TeacherError(
            f"{where}: not a torchvision ResNet-18/34/50/101/152 ({kind} blocks, {depths} per stage; "
            f"keys under {_prefixes(state)})"
        )
    net = getattr(torchvision.models, name)(weights=None)
    conv1 = state["conv1.weight"]
    if conv1.shape[-1] == 3:
        net.conv1 = nn.Conv2d(3, conv1.shape[0], 3, 1, 2, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    try:
        net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=True)
    except RuntimeError as err:
        detail = "; ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise TeacherError(f"{where}: the weights do not fit a torchvision {name}: {detail}") from err
    stem = "cifar stem" if conv1.shape[-1] == 3 else "imagenet stem"
    return net, f"{name} ({stem})"


def sequential_from_state(state: Mapping[str, Tensor], where: str) -> nn.Module | None:
    """An MLP head rebuilt from its keys ("0.weight", "1.running_mean", "2.weight"... or a bare "weight").

    2-D weights are Linear layers, running statistics BatchNorm1d (affine when it has a weight); an index with
    no parameters is a ReLU, the activation of MoCo-v2's and solo-learn's heads. None when `state` is empty.
    """
    if not state:
        return None
    if "weight" in state:
        w = state["weight"]
        layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in state)
        layer.load_state_dict(dict(state))
        return layer
    layers: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        index, _, param = key.partition(".")
        if not index.isdigit():
            raise TeacherError(f"{where}: cannot rebuild the head from key {key!r}")
        layers.setdefault(int(index), {})[param] = value
    modules: list[nn.Module] = []
    for i in range(max(layers) + 1):
        params = layers.get(i)
        if params is None:
            modules.append(nn.ReLU())
        elif "running_mean" in params:
            modules.append(nn.BatchNorm1d(params["running_mean"].numel(), affine="weight" in params))
        elif params.get("weight") is not None and params["weight"].ndim == 2:
            modules.append(nn.Linear(params["weight"].shape[1], params["weight"].shape[0], bias="bias" in params))
        else:
            raise TeacherError(f"{where}: cannot rebuild head layer {i} from {sorted(params)}")
    head = nn.Sequential(*modules)
    head.load_state_dict({k: v for k, v in state.items()}, strict=True)
    return head


def _under(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _out_dim(head: nn.Module | None, feature_dim: int) -> int | None:
    if head is None:
        return None
    with torch.no_grad():
        return int(head.eval()(torch.zeros(2, feature_dim)).shape[1])


def _stats(values: Any) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


# ----- one loader per format ---------------------------------------------------------------------------------
def _vdg_checkpoint(path: Path, branch: str) -> tuple[nn.Module, nn.Module | None, dict[str, Any]]:
    try:
        model = load_method(path)
        chosen = require_branch(model, branch)
    except CheckpointError as err:
        raise TeacherError(f"teacher.path: {err}") from err
    encoder = branch_encoder(model.backbone, chosen)
    head = getattr(model, "dense_projector", None) if chosen.value == "dense" else None
    head = head if head is not None else getattr(model, "projector", None)
    cfg = model.cfg
    widths = "" if encoder.block_widths is None else ", slim"
    meta = {
        "arch": f"{cfg.method.name} resnet18 width {encoder.width}{widths}, {chosen.value} network",
        "pretrain_dataset": str(cfg.dataset.name),
        "mean": cfg.dataset.mean,
        "std": cfg.dataset.std,
    }
    return BranchBackbone(encoder, chosen, check_inputs=False), head, meta


def _vdg_export(path: Path) -> tuple[nn.Module, nn.Module | None, dict[str, Any]]:
    try:
        # masked whatever the export's default: a teacher is an nn.Module in a training step (train()/eval(),
        # autograd-compatible tensors); FoldedResNet (folded, sparse) is inference-only and returns inference tensors
        backbone = load_exported(path)
    except (ValueError, FileNotFoundError) as err:
        raise TeacherError(f"teacher.path: {err}") from err
    backbone.check_inputs = False  # the training step's views: see BranchBackbone
    meta = backbone.config
    norm = meta.get("normalize") or {}
    info = {
        "arch": f"{meta.get('method', 'vdg')} resnet18 width {meta['arch']['width']}, {meta['branch']} network",
        "pretrain_dataset": meta.get("pretrain_dataset"),
        "mean": norm.get("mean"),
        "std": norm.get("std"),
    }
    return backbone, None, info


def _state_dict_teacher(
    state: Mapping[str, Tensor], fmt: str, where: str
) -> tuple[nn.Module, nn.Module | None, dict[str, Any]]:
    prefix, head_prefix = {"moco": ("module.encoder_q.", "fc."), "solo_learn": ("backbone.", None)}.get(fmt, ("", None))
    weights = _under(state, prefix)
    if fmt == "solo_learn":
        head_state = _under(state, "projector.")
    elif head_prefix is not None:
        head_state = _under(weights, head_prefix)
    else:
        head_state = {}  # torchvision: fc is a supervised classifier, not an embedding head
    backbone, arch = resnet_from_state(weights, where)
    head = sequential_from_state(head_state, f"{where} (head)")
    imagenet = fmt in ("moco", "torchvision")  # the MoCo authors and torchvision normalise with ImageNet's stats
    meta = {
        "arch": arch,
        "pretrain_dataset": None,
        "mean": IMAGENET_MEAN if imagenet else None,
        "std": IMAGENET_STD if imagenet else None,
    }
    return backbone, head, meta


def detect_format(path: str | Path) -> str:
    """The format of a teacher file (see the module docstring); TeacherError naming what was found otherwise."""
    return _open(teacher_file(path), "auto")[0]


def _open(path: Path, fmt: str) -> tuple[str, Any]:
    """(format, loaded object or None for exports): detected, or checked against the `fmt` asked for."""
    if fmt != "auto" and fmt not in TEACHER_FORMATS:
        raise TeacherError(f"unknown teacher.format {fmt!r}; allowed values: {['auto', *TEACHER_FORMATS]}")
    if path.suffix in (".json", ".safetensors") or (path.suffix == ".pt" and _is_export_sidecar(path)):
        found, obj, what = "vdg_export", None, f"a vdg backbone export ({path.suffix})"
    else:
        obj = _read(path)
        found, what = classify(obj)
    if fmt == "auto" and found is None:
        raise TeacherError(
            f"teacher.path={str(path)!r} is not a teacher file vdg knows: it holds {what}. Expected one of "
            f"{list(TEACHER_FORMATS)} (vdg checkpoint or run directory, backbone export, solo-learn checkpoint "
            "with backbone.* keys, MoCo checkpoint with module.encoder_q.* keys, torchvision ResNet state_dict)"
        )
    if fmt != "auto" and found != fmt:
        kind = f"a {found}" if found else "not a known"
        raise TeacherError(f"teacher.format={fmt} but {path} is {kind} file: it holds {what}")
    return found, obj


def load_teacher(
    path: str | Path,
    format: str = "auto",
    branch: str = "dense",
    mean: Any = None,
    std: Any = None,
    pretrain_dataset: str | None = None,
) -> Teacher:
    """Build the frozen teacher stored at `path` (a file, or a vdg run directory).

    format: "auto" (detected) or one of `TEACHER_FORMATS`, checked against the file. branch: which network of a
    vdg checkpoint teaches ("dense" | "gated"; an export holds one network, the one exported).
    mean/std/pretrain_dataset: override what the file says (or does not say).
    """
    file = teacher_file(path)
    fmt, obj = _open(file, format)
    where = f"teacher {file} ({fmt})"
    if fmt == "vdg_checkpoint":
        backbone, head, meta = _vdg_checkpoint(file, branch)
    elif fmt == "vdg_export":
        backbone, head, meta = _vdg_export(file)
    else:
        state = obj["state_dict"] if fmt in ("moco", "solo_learn") else obj
        backbone, head, meta = _state_dict_teacher(state, fmt, where)
    backbone.eval()
    with torch.no_grad():
        feature_dim = int(backbone(torch.zeros(2, 3, 32, 32)).shape[1])
    info = TeacherInfo(
        path=str(file),
        format=fmt,
        sha256=file_sha256(file),
        arch=str(meta["arch"]),
        feature_dim=feature_dim,
        embedding_dim=_out_dim(head, feature_dim),
        pretrain_dataset=pretrain_dataset if pretrain_dataset is not None else meta["pretrain_dataset"],
        mean=_stats(mean if mean is not None else meta["mean"]),
        std=_stats(std if std is not None else meta["std"]),
    )
    return Teacher(backbone, head, info)
