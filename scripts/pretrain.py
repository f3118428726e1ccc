"""Pretrain a method: `python scripts/pretrain.py dataset=cifar100 budget=0.3` (Hydra overrides).

Sweeps reproduce the paper's tables: `python scripts/pretrain.py -m +sweep=table1` (configs/sweep/); add
`dry_run=true` to print one line per job (its overrides and run_dir) and exit. This file wires Hydra to
`vdg.run.driver.pretrain` and decides which sweep jobs run; it holds no training logic.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vdg.core.cli import report_user_errors
from vdg.core.paths import script_config_dir
from vdg.run.cli import command_line


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


MULTIRUN_FLAGS = ("-m", "--multirun")
SCRIPT_CONFIGS = script_config_dir(__file__)  # what @hydra.main reads


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Each job's overrides of `-m <overrides>`, expanded as Hydra's basic sweeper does.

    The sweep's `hydra.sweeper.params` come first, then the command line (whose values replace a parameter's
    list); the jobs are the product of every key's values, in the sweeper's order.
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    task = [o.input_line for o in parsed if not o.is_hydra_override()]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override() and o.input_line in task]
    fixed += [o.input_line for o in parsed if o.is_hydra_override() and o.key_or_group.startswith("hydra.sweeper.")]
    with initialize_config_dir(config_dir=str(SCRIPT_CONFIGS), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=fixed, return_hydra_config=True)
    params = [f"{key}={value}" for key, value in (cfg.hydra.sweeper.params or {}).items()]
    (jobs,) = BasicSweeper.split_arguments(parser.parse_overrides([*params, *task]), None)
    return jobs


def sweep_dry_run(argv: list[str]) -> bool:
    """`-m ... dry_run=true`: print one line per job that would run, then a count; start nothing, write nothing.

    Hydra's launcher would create an output folder per job (skipped ones included) and announce every
    combination of the grid; this lists only the jobs that pass `sweep_skip`. Returns False, doing nothing,
    when argv is not such a dry run (or carries other Hydra flags), so that Hydra handles it as usual.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    flags = {a for a in argv if a.startswith("-")}
    if not flags or not flags <= set(MULTIRUN_FLAGS):
        return False
    overrides = [a for a in argv if not a.startswith("-")]
    dry = [o for o in OverridesParser.create().parse_overrides(overrides) if o.key_or_group == "dry_run"]
    if not dry or dry[-1].is_sweep_override() or dry[-1].value() is not True:
        return False
    jobs, skipped = sweep_jobs(overrides), 0
    with initialize_config_dir(config_dir=str(SCRIPT_CONFIGS), version_base="1.3"):
        for job in jobs:
            cfg = compose(config_name="pretrain", overrides=job)
            if skip_rule(cfg) is not None:
                skipped += 1
                continue
            OmegaConf.to_container(cfg, resolve=True)  # a broken interpolation fails now, not hours into a job
            shown = " ".join(shlex.quote(o) for o in job if o.split("=", 1)[0].lstrip("+~") != "dry_run")
            print(f"job: {shown}  # run_dir: {cfg.run_dir}", flush=True)
            if missing_teacher(cfg):
                print(f"  note: {shown}: teacher.path is not set, so this job will stop at once (the teacher is a "
                      "file you supply: see the sweep's config)", file=sys.stderr, flush=True)
    print(
        f"{len(jobs) - skipped} jobs ({len(jobs)} combinations, {skipped} skipped by sweep_skip); dry run: nothing "
        "was started or written",
        file=sys.stderr,
    )
    return True


def hydra_files(cfg: DictConfig) -> dict[str, str]:
    """The record Hydra would write to <output dir>/.hydra/, for the driver to write into run_dir only once the
    run is accepted (Hydra itself writes nothing there: a refused or invalid run must leave no trace)."""
    hydra_cfg = HydraConfig.get()
    return {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml({"hydra": hydra_cfg}),
        "overrides.yaml": OmegaConf.to_yaml(list(hydra_cfg.overrides.task)),
    }


def anchor_paths(cfg: DictConfig) -> None:
    """With hydra.job.chdir=true (or a custom hydra.run.dir) the job runs in another working directory: relative
    paths of the command line still mean the directory the command was typed in, never one nested in it; a
    leading ~ is the home folder, never a folder named "~"."""
    from hydra.utils import get_original_cwd, to_absolute_path

    moved = Path.cwd() != Path(get_original_cwd())
    for key in ("run_dir", "data.root", "data.cache_dir"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and value.startswith("~"):  # a quoted ~ reaches us unexpanded by the shell
            OmegaConf.update(cfg, key, str(Path(value).expanduser()))
        elif isinstance(value, str) and value and moved:
            OmegaConf.update(cfg, key, to_absolute_path(value))




@hydra.main(config_path=str(SCRIPT_CONFIGS), config_name="pretrain", version_base="1.3")
@report_user_errors  # vdg's errors, Hydra's and OmegaConf's: one `error:` line, exit 2 (a stopped run: 130)
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
    from vdg.run.driver import describe_summary, pretrain
    from vdg.run.logging import quiet_known_warnings

    quiet_known_warnings()
    anchor_paths(cfg)
    try:
        summary = pretrain(cfg, hydra_files(cfg))
    except KeyboardInterrupt:  # between the driver's own handlers (e.g. while the lock is released)
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    if cfg.get("json", False):  # the machine record (also in run_dir/summary.json)
        print(json.dumps(summary, indent=2))
    else:
        print(describe_summary(summary))


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *command_line(sys.argv[1:], "pretrain", SCRIPT_CONFIGS)]
    if not sweep_dry_run(sys.argv[1:]):
        main()
