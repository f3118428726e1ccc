"""What resuming a run compares: the keys of a pretraining config that define the experiment, and their differences
between a checkpoint's config and the current one. Reading checkpoints is `vdg.methods.checkpoint`.
"""

from __future__ import annotations

from typing import Any

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
