"""Pretrain a method: `python scripts/pretrain.py dataset=cifar100 budget=0.3` (Hydra overrides).

Sweeps reproduce the paper's tables: `python scripts/pretrain.py -m +sweep=table1` (configs/sweep/); add
`dry_run=true` to print one line per job (its overrides and run_dir) and exit. This file wires Hydra to
`vdg.run.driver.pretrain` and decides which sweep jobs run; it holds no training logic.
"""

from __future__ import annotations

import json
import shlex
import sys
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


def job_overrides() -> list[str]:
    """This job's command-line overrides, sweep values included (`dry_run` itself left out)."""
    return [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~") != "dry_run"]


def skip_rule(cfg: DictConfig) -> dict[str, Any] | None:
    """The first `sweep_skip` entry whose every key (a dotted config path) equals this job's value, or None.

    Hydra's basic sweeper runs the full product of `hydra.sweeper.params`; a sweep config lists under
    `sweep_skip` the combinations the paper did not run (e.g. `{dataset.name: imagenet100, budget: 0.1}`).
    """
    for rule in OmegaConf.select(cfg, "sweep_skip", default=None) or []:
        if all(OmegaConf.select(cfg, str(key)) == value for key, value in rule.items()):
            return OmegaConf.to_container(rule)
    return None


def missing_teacher(cfg: DictConfig) -> bool:
    """A distillation job (its method distils a `method.teacher_output`) whose teacher.path is still unset."""
    distills = OmegaConf.select(cfg, "method.teacher_output", default=None) is not None
    return distills and OmegaConf.select(cfg, "teacher.path", default=None) is None


@hydra.main(config_path="../configs", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    overrides = " ".join(shlex.quote(o) for o in job_overrides())
    rule = skip_rule(cfg)
    if rule is not None:
        print(f"skipped (sweep_skip {rule}): {overrides}", file=sys.stderr)
        return
    if cfg.dry_run:  # the overrides reproduce the job alone; the shell comment says where it would write
        OmegaConf.to_container(cfg, resolve=True)  # a broken interpolation fails now, not hours into a job
        print(f"job: {overrides}  # run_dir: {cfg.run_dir}", flush=True)
        if missing_teacher(cfg):
            print(f"  note: {overrides}: teacher.path is not set, so this job will stop at once (the teacher is a "
                  "file you supply: see the sweep's config)", file=sys.stderr, flush=True)
        return
    # imported here: a dry run lists a sweep without loading torch
    from vdg.run.cli import USER_ERRORS
    from vdg.run.driver import describe_summary, pretrain

    try:
        summary = pretrain(cfg)
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
    print(json.dumps(summary, indent=2))
    print(describe_summary(summary))


if __name__ == "__main__":
    main()
