"""Slim students shaped by a gate policy: `student.channels_from` -> `backbone.block_widths`, before a run starts.

The paper's Table 3 students are "sampled from R18's subspace with the number of filters for each basic block
derived from our gating network". This module resolves that shape into the config (so the saved config rebuilds
the student without the policy checkpoint); measuring the policy is `vdg.deploy.slim`'s job.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vdg.core.atomic import atomic_write_text
from vdg.core.errors import CheckpointError, ConfigError
from vdg.deploy.slim import checkpoint_profile, slim_widths
from vdg.methods.checkpoint import read_checkpoint
from vdg.methods.teachers import file_sha256

CACHE_NAME = "student_widths.json"  # in run_dir: a resumed run does not measure the policy again


def policy_widths(ckpt: str | Path, data: dict[str, Any]) -> dict[str, Any]:
    """The per-block conv1 widths of a gated checkpoint's policy on its own train split, with what they came from.

    Returns {"channels_from", "sha256", "budget", "width", "stem", "widths", "mean_active", "samples"}.
    """
    path = Path(ckpt).expanduser().resolve()
    saved = read_checkpoint(path)["hyper_parameters"]["cfg"]
    try:
        profile = checkpoint_profile(path, "train", data)
    except CheckpointError as err:
        raise ConfigError(f"student.channels_from={str(ckpt)!r}: {err}") from err
    return {
        "channels_from": str(path),
        "sha256": file_sha256(path),
        "budget": float(saved["budget"]),
        "width": int(profile.arch["width"]),
        "stem": str(profile.arch["stem"]),
        "widths": slim_widths(profile),
        "mean_active": [round(m, 3) for m in profile.mean_active],
        "samples": profile.samples,
    }


def _cached(cache: Path, ckpt: Path) -> dict[str, Any] | None:
    """The cached measurement of `ckpt`, if the cache describes this very file (same content hash)."""
    if not cache.is_file():
        return None
    try:
        record = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("channels_from") != str(ckpt) or record.get("sha256") != file_sha256(ckpt):
        return None
    return record


def resolve_student_widths(cfg: DictConfig) -> dict[str, Any] | None:
    """Set cfg.backbone.block_widths from cfg.student.channels_from (when set); returns the measurement record
    (`policy_widths`), which `save_student_record` keeps in run_dir for a resumed run.

    Refuses a policy trained for another t_d than student.budget, another backbone width or stem, and explicit
    backbone.block_widths that disagree with the policy.
    """
    student = cfg.get("student") or {}
    source = student.get("channels_from")
    if source is None:
        return None
    ckpt = Path(str(source)).expanduser().resolve()
    if not ckpt.is_file():
        raise ConfigError(
            f"student.channels_from={str(source)!r} is not a file: give a vdg checkpoint with a gated network"
        )
    cache = Path(cfg.run_dir) / CACHE_NAME
    record = _cached(cache, ckpt)
    if record is None:
        data = {"root": cfg.data.root, "download": cfg.data.download, "num_workers": cfg.data.num_workers}
        record = policy_widths(ckpt, data)
    budget = float(student.get("budget"))
    if not math.isclose(record["budget"], budget, abs_tol=1e-6):
        raise ConfigError(
            f"student.channels_from={str(source)!r} was trained for t_d={record['budget']:g}, but "
            f"student.budget={budget:g}: give the t_d={budget:g} run, or set student.budget={record['budget']:g}"
        )
    if record["width"] != int(cfg.backbone.width) or record["stem"] != str(cfg.dataset.stem):
        raise ConfigError(
            f"student.channels_from={str(source)!r} is a width-{record['width']} ResNet-18 with the {record['stem']} "
            f"stem; this run builds backbone.width={cfg.backbone.width} with dataset.stem={cfg.dataset.stem}: "
            "they must match (the widths are channel counts of that network)"
        )
    given = cfg.backbone.get("block_widths")
    if given is not None and [int(w) for w in given] != record["widths"]:
        raise ConfigError(
            f"backbone.block_widths={list(given)} disagrees with the policy of student.channels_from "
            f"({record['widths']}): set only one of them"
        )
    cfg.backbone.block_widths = list(record["widths"])
    cfg.student.channels_from = record["channels_from"]
    return record


def save_student_record(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write the policy measurement to run_dir/student_widths.json (what the student's shape came from)."""
    return atomic_write_text(Path(run_dir) / CACHE_NAME, json.dumps(record, indent=1) + "\n")
