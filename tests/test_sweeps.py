"""Tests for the paper-table sweeps (configs/sweep/) and scripts/pretrain.py's dry run and job skipping.

The dry runs list each sweep's jobs in a subprocess; one tiny 2-job sweep trains for real on synthetic data.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from omegaconf import OmegaConf

from vdg.report.tables import load_results, make_tables

from .conftest import TINY, compose_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "pretrain.py"
QUIET = ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
# One torch thread per subprocess: width-4 models gain nothing from more, and on shared busy cores they thrash.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
BUDGETS = ("0.1", "0.3", "0.5")
KNN_DATASETS = (("cifar100", BUDGETS), ("stl10", BUDGETS))


def run_sweep(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "-m", *args, f"hydra.sweep.dir={cwd / 'multirun'}", *QUIET]
    done = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


class Job(NamedTuple):
    overrides: dict[str, str]
    run_dir: str


def dry_run(tmp_path: Path, table: str, *extra: str) -> list[Job]:
    """The jobs `-m +sweep=<table> dry_run=true` prints: "job: key=value ...  # run_dir: DIR" per job; then
    one count line on stderr. It launches nothing and leaves no folder (Hydra's launcher made one per job)."""
    done = run_sweep(tmp_path, f"+sweep={table}", "dry_run=true", *extra)
    (tmp_path / "stderr.txt").write_text(done.stderr)
    out = done.stdout
    assert not (tmp_path / "multirun").exists() and "Launching" not in done.stderr
    count = out.count("job: ")
    assert done.stderr.strip().splitlines()[-1].startswith(f"{count} jobs (")
    jobs = []
    for line in out.splitlines():
        if line.startswith("job: "):
            overrides, _, run_dir = line.removeprefix("job: ").partition("  # run_dir: ")
            jobs.append(Job(dict(o.split("=", 1) for o in shlex.split(overrides)), run_dir))
    return jobs


def grid(methods: tuple[str, ...], datasets: tuple[tuple[str, tuple[str, ...]], ...], **fixed: str) -> list[dict]:
    return [
        {"method": m, "dataset": d, "budget": b, **fixed} for m in methods for d, budgets in datasets for b in budgets
    ]


def as_set(jobs: list[dict[str, str]]) -> set[frozenset]:
    return {frozenset(job.items()) for job in jobs}


# The paper's grids, written from its tables. vicreg (dense) runs once per dataset, at the default budget 0.3.
ALL_DATASETS = ("cifar10", "stl10", "cifar100", "imagenet100")
EXPECTED: dict[str, list[dict[str, str]]] = {
    "table1": grid(("vicreg",), tuple((d, ("0.3",)) for d in ALL_DATASETS))
    + grid(
        ("vicreg_gating", "vdg"),
        (("cifar10", BUDGETS), ("stl10", BUDGETS), ("cifar100", BUDGETS), ("imagenet100", ("0.3", "0.5"))),
    ),
    "table2": grid(("vicreg",), (("cifar100", ("0.3",)), ("imagenet100", ("0.3",))))
    + grid(("vdg",), (("cifar100", BUDGETS), ("imagenet100", ("0.3", "0.5")))),
    "table3": grid(("vicreg",), (("cifar100", ("0.3",)), ("imagenet100", ("0.3",))))  # the SimReg teachers
    + grid(("vdg", "simreg", "seed"), (("cifar100", BUDGETS), ("imagenet100", ("0.3", "0.5")))),
    "table4": grid(("bt_dual", "vdg"), KNN_DATASETS),
    "table5": grid(("vdg", "vdg_2x"), KNN_DATASETS),
    "table6": grid(("vdg",), KNN_DATASETS, invariance="with") + grid(("vdg",), KNN_DATASETS, invariance="without"),
}
JOB_COUNTS = {"table1": 26, "table2": 7, "table3": 17, "table4": 12, "table5": 12, "table6": 12}


# ----- dry runs list exactly the paper's grid --------------------------------------------------------------
# Table 3's dry run also adds a pretraining-seed sweep (one subprocess fewer): the grid once per seed.
SEEDS = {"table3": ("1", "2")}


@pytest.mark.parametrize("table", sorted(EXPECTED))
def test_dry_run_lists_the_papers_grid_with_one_run_dir_per_job(table, tmp_path):
    seeds = SEEDS.get(table)
    jobs = dry_run(tmp_path, table, *([f"seed={','.join(seeds)}"] if seeds else []))
    expected = [{**job, "seed": s} for job in EXPECTED[table] for s in seeds] if seeds else EXPECTED[table]
    assert len(jobs) == JOB_COUNTS[table] * len(seeds or [None]) == len(expected)
    if table == "table1":  # the README's count: 36 combinations, 10 that the paper did not run
        assert "26 jobs (36 combinations, 10 skipped by sweep_skip)" in (tmp_path / "stderr.txt").read_text()
    assert all(job.overrides.pop("+sweep") == table for job in jobs)
    assert as_set([job.overrides for job in jobs]) == as_set(expected)
    assert len({job.run_dir for job in jobs}) == len(jobs)  # run_dir names method, dataset, budget, seed
    assert not (tmp_path / "runs").exists()  # nothing trained


def job_config(table: str, job: dict[str, str], *extra: str):  # noqa: ANN201 - DictConfig
    return compose_config([f"+sweep={table}", *(f"{k}={v}" for k, v in job.items()), *extra])


KNN_EUCLIDEAN = [{"protocol": "knn", "k": 1, "distance": "euclidean"}]
# One job per table (both pretraining datasets for Table 2) and the evaluation it must chain.
EVALUATE = [
    ("table1", {"method": "vicreg_gating", "dataset": "stl10", "budget": "0.1"}, [{"protocol": "linear"}]),
    (
        "table2",
        {"method": "vdg", "dataset": "cifar100", "budget": "0.1"},
        [{"protocol": "transfer", "target": t} for t in ("stl10", "cifar10", "imagenet100")],
    ),
    (
        "table2",
        {"method": "vicreg", "dataset": "imagenet100", "budget": "0.3"},
        [{"protocol": "transfer", "target": t} for t in ("stl10", "cifar10", "cifar100")],
    ),
    (
        "table3",
        {"method": "vdg", "dataset": "imagenet100", "budget": "0.5"},
        [{"protocol": "knn", "k": 1, "distance": "cosine"}],
    ),
    ("table4", {"method": "bt_dual", "dataset": "cifar100", "budget": "0.3"}, KNN_EUCLIDEAN),
    ("table5", {"method": "vdg_2x", "dataset": "stl10", "budget": "0.5"}, KNN_EUCLIDEAN),
    ("table6", {"method": "vdg", "dataset": "stl10", "budget": "0.1", "invariance": "without"}, KNN_EUCLIDEAN),
]


@pytest.mark.parametrize("table, job, expected", EVALUATE)
def test_each_sweep_chains_its_tables_evaluation(table, job, expected):
    cfg = job_config(table, job)
    assert cfg.method.name == job["method"] and cfg.dataset.name == job["dataset"]
    assert OmegaConf.to_container(cfg.evaluate, resolve=True) == expected


def test_table3_kd_jobs_name_their_teacher_and_policy():
    """SimReg: Table 1's VICReg run of the same dataset; SEED: the MoCo-v2 file (unset: the job stops at once);
    both students take the widths of the VDG run at their t_d. The gated rows and teachers distil nothing."""
    simreg = job_config("table3", {"method": "simreg", "dataset": "cifar100", "budget": "0.1"})
    assert simreg.teacher.path == "runs/vicreg/cifar100/td0.3/seed5/checkpoints/last.ckpt"
    assert simreg.student.channels_from == "runs/vdg/cifar100/td0.1/seed5/checkpoints/last.ckpt"
    assert simreg.student.budget == 0.1 and simreg.teacher.pretrain_dataset is None  # read from the vicreg run
    assert simreg.teacher.path.removesuffix("/checkpoints/last.ckpt") == job_config(
        "table1", {"method": "vicreg", "dataset": "cifar100", "budget": "0.3"}
    ).run_dir
    assert simreg.student.channels_from.startswith(job_config("table3", {"method": "vdg", "dataset": "cifar100",
                                                                           "budget": "0.1"}).run_dir)
    seed = job_config("table3", {"method": "seed", "dataset": "imagenet100", "budget": "0.5"}, "moco_v2_r50=/m.tar")
    assert (seed.teacher.path, seed.teacher.pretrain_dataset) == ("/m.tar", "imagenet1k")
    assert seed.optimizer.name == "sgd" and seed.trainer.max_epochs == 200  # SEED's recipe
    assert simreg.optimizer.name == "sgd" and simreg.trainer.max_epochs == 130
    for method in ("vicreg", "vdg"):
        cfg = job_config("table3", {"method": method, "dataset": "cifar100", "budget": "0.3"})
        assert cfg.teacher.path is None and cfg.student.channels_from is None and cfg.optimizer.name == "lars"


def test_table3_dry_run_flags_the_seed_jobs_without_their_teacher_file():
    missing_teacher = load_script().missing_teacher
    job = {"dataset": "cifar100", "budget": "0.3"}
    assert missing_teacher(job_config("table3", {**job, "method": "seed"}))
    assert not missing_teacher(job_config("table3", {**job, "method": "seed"}, "moco_v2_r50=/m.tar"))
    assert not any(missing_teacher(job_config("table3", {**job, "method": m})) for m in ("simreg", "vdg", "vicreg"))


def test_table6_variants_set_the_invariance_weight_and_keep_their_runs_apart():
    job = {"method": "vdg", "dataset": "cifar100", "budget": "0.1"}
    with_mse = job_config("table6", {**job, "invariance": "with"})
    without = job_config("table6", {**job, "invariance": "without"})
    assert with_mse.method.invariance_weight == 25.0 and without.method.invariance_weight == 0.0
    # the "with" runs are Table 4/5's vdg runs; "without" runs have their own directory
    plain = compose_config([f"{k}={v}" for k, v in job.items()])  # the same job outside any sweep
    assert with_mse.run_dir == job_config("table4", job).run_dir == plain.run_dir
    assert without.run_dir != with_mse.run_dir and "no_invariance" in without.run_dir


def test_shared_pretraining_runs_across_tables():
    """Tables 2-6 evaluate Table 1's runs where the paper did: the same job config gives the same run_dir."""
    vdg = {"method": "vdg", "dataset": "cifar100", "budget": "0.3"}
    dirs = {job_config(t, vdg).run_dir for t in ("table1", "table2", "table3", "table4", "table5")}
    assert len(dirs) == 1
    vicreg = {"method": "vicreg", "dataset": "imagenet100", "budget": "0.3"}
    assert job_config("table1", vicreg).run_dir == job_config("table2", vicreg).run_dir


def load_script():  # noqa: ANN201 - module
    spec = importlib.util.spec_from_file_location("pretrain_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_skip_rule_matches_every_key_of_an_entry():
    skip_rule = load_script().skip_rule
    cfg = OmegaConf.create(
        {
            "method": {"name": "vicreg"},
            "dataset": {"name": "cifar10"},
            "budget": 0.1,
            "sweep_skip": [{"method.name": "vicreg", "budget": 0.5}, {"dataset.name": "cifar10", "budget": 0.1}],
        }
    )
    assert skip_rule(cfg) == {"dataset.name": "cifar10", "budget": 0.1}
    cfg.budget = 0.3
    assert skip_rule(cfg) is None
    cfg.budget = 0.5
    assert skip_rule(cfg) == {"method.name": "vicreg", "budget": 0.5}
    assert skip_rule(OmegaConf.create({"budget": 0.1})) is None  # no sweep_skip: nothing is skipped


# ----- a tiny sweep end to end -----------------------------------------------------------------------------
def api_available() -> bool:
    try:
        return importlib.util.find_spec("vdg.eval.api") is not None
    except ModuleNotFoundError:
        return False


class TinySweep:
    """Two 1-epoch vdg runs (budget 0.3 and 0.5) on synthetic data, trained by a background `-m` sweep."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        args = [*TINY, "budget=0.3,0.5", "final_knn.enabled=true"]
        if api_available():
            args.append("evaluate=[{protocol:knn,k:1,distance:euclidean}]")
        command = [sys.executable, str(SCRIPT), "-m", *args, f"hydra.sweep.dir={cwd / 'multirun'}", *QUIET]
        self.log = open(cwd / "sweep.log", "w")  # closed in wait() or at teardown
        self.process = subprocess.Popen(command, cwd=cwd, env=ENV, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 300) -> Path:
        if self.process.returncode is None:
            self.process.wait(timeout=timeout)
            self.log.close()
        assert self.process.returncode == 0, (self.cwd / "sweep.log").read_text()[-3000:]
        return self.cwd


@pytest.fixture(scope="module", autouse=True)
def background_sweep(tmp_path_factory) -> Iterator[TinySweep]:
    """Started with the module, so the tiny sweep trains while the dry-run tests run (2 cores, not 1)."""
    sweep = TinySweep(tmp_path_factory.mktemp("sweep"))
    yield sweep
    if sweep.process.poll() is None:
        sweep.process.kill()
        sweep.process.wait()
    sweep.log.close()


@pytest.fixture
def tiny_sweep(background_sweep: TinySweep) -> Path:
    return background_sweep.wait()


def run_dirs(cwd: Path) -> list[Path]:
    return sorted(p.parent for p in (cwd / "runs").rglob("summary.json"))


def test_tiny_sweep_trains_one_run_per_job(tiny_sweep):
    dirs = run_dirs(tiny_sweep)
    assert [d.relative_to(tiny_sweep).as_posix() for d in dirs] == [
        "runs/vdg/synthetic/td0.3/seed5",
        "runs/vdg/synthetic/td0.5/seed5",
    ]
    for d in dirs:
        summary = json.loads((d / "summary.json").read_text())
        assert summary["method"] == "vdg" and summary["epochs"] == 1
        assert (d / "checkpoints" / "last.ckpt").is_file()


def stl10_cells(table_csv: Path, column: str) -> dict[str, str]:
    """t_d -> cell of `column` in the STL-10 rows of a rendered k-NN table."""
    header, *rows = [line.split(",") for line in table_csv.read_text(encoding="utf-8").splitlines()]
    return {row[1]: row[header.index(column)] for row in rows if row[0] == "STL-10"}


def test_tiny_sweep_results_render_into_the_papers_table(tiny_sweep, tmp_path):
    """Result records written for the sweep's runs (as the evaluation would) fill Table 4's VDG cells.

    The synthetic data set has no row in the paper's tables, so the records are filed under STL-10.
    """
    for d in run_dirs(tiny_sweep):
        summary = json.loads((d / "summary.json").read_text())
        for branch in ("dense", "gated"):
            record = {
                "protocol": "knn",
                "k": 1,
                "distance": "euclidean",
                "method": summary["method"],
                "method_config": {"invariance_weight": 25.0},
                "pretrain_dataset": "stl10",
                "dataset": "stl10",
                "budget": summary["budget"],
                "branch": branch,
                "metric": "top1",
                "value": summary["knn"][branch],
                "flops_reduction": summary["knn"]["flops_reduction"] if branch == "gated" else None,
            }
            (tmp_path / f"{d.parent.name}_{branch}.json").write_text(json.dumps(record))
    paths = make_tables(tmp_path, tmp_path / "tables", ["table4"])
    gated = stl10_cells(paths["table4.csv"], "VICReg-Dual gated: ours")
    reduction = stl10_cells(paths["table4.csv"], "VICReg-Dual FLOPs R.: ours")
    for d in run_dirs(tiny_sweep):
        summary = json.loads((d / "summary.json").read_text())
        td = f"{summary['budget']:.0%}"
        assert gated[td] == f"{summary['knn']['gated']:.2f}"
        assert reduction[td] == f"{100 * summary['knn']['flops_reduction']:.2f}%"
    assert gated["10%"] == "—"  # no run at t_d 10%


def test_tiny_sweep_chains_the_evaluation(tiny_sweep, tmp_path):
    """With the evaluation API present, `evaluate=[{protocol: knn, ...}]` leaves records Table 4 can read."""
    pytest.importorskip("vdg.eval.api")
    records = [r for r in load_results(tiny_sweep / "runs") if r["protocol"] == "knn"]
    assert {(r["budget"], r["branch"]) for r in records} >= {(b, br) for b in (0.3, 0.5) for br in ("dense", "gated")}
    for i, record in enumerate(records):  # synthetic has no row in the paper: file the records under STL-10, at
        # the paper's width (the plumbing is under test; a width-4 record would only fill reduced-scale tables)
        record.update(pretrain_dataset="stl10", dataset="stl10", backbone_width=64)
        (tmp_path / f"record_{i}.json").write_text(json.dumps(record))
    paths = make_tables(tmp_path, tmp_path / "tables", ["table4"])
    gated = stl10_cells(paths["table4.csv"], "VICReg-Dual gated: ours")
    for record in records:
        if record["branch"] == "gated":
            assert gated[f"{record['budget']:.0%}"] != "—"
