"""The commands and examples of the README and of docs/*.md work, and their tables match the code and records.

Every line of every ```bash block of every page (README.md, docs/*.md) is a command. Each `python ...` command
runs here, in this process, in a scratch directory, with tiny overrides appended (digits or synthetic data,
width 4, 1 epoch), except those in `PARSE_ONLY` (they need GPUs, a network or a paper-scale run), which are
composed with Hydra (`--cfg job`) or dry-run; `torchrun ...` and `srun python ...` count as the `python` command
they launch. `pip install`, `python -m pytest` and `pytest -m kernel` lines are what .ci/run executes;
`scripts/gpu_check.sh` needs a GPU and is only syntax-checked. A command this test does not know how to exercise
fails it. Every figure of the measured tables, wherever they live, is checked against its records. Also here:
the plot_pareto.py command's unit tests (vdg/report/pareto.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from omegaconf import OmegaConf

from vdg.report.mini_table import README_BEGIN, README_END, readme_block, replace_readme_block
from vdg.report.pareto import ours_points, paper_points, plot_pareto, record_panel
from vdg.report.quickstart import BEGIN, END, OTHER_SEEDS, figures_table, replace_table
from vdg.report.quickstart import commands as quickstart_commands
from vdg.report.tables import load_results

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]  # every page whose commands and figures are checked
PNG = b"\x89PNG\r\n\x1a\n"

INSTALL = ["pip install torch==2.14.1 torchvision==0.29.1", 'pip install -e ".[dev]"']
QUICKSTART = "python scripts/pretrain.py experiment=quickstart"
FRESH_MACHINE = [" && ".join([*INSTALL, QUICKSTART]), " && ".join([*INSTALL, "python -m pytest -q"])]

# Overrides appended to pretraining commands: a seconds-long run (width 4, 2 steps, 1 epoch).
TINY = [
    "backbone.width=4",
    "method.projector_hidden_dim=32",
    "method.projector_output_dim=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.pin_memory=false",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "scheduler.warmup_epochs=1",
]
SYNTHETIC = ["dataset=synthetic", "dataset.train_size=64", "dataset.test_size=32"]  # for datasets that download
TINY_EVAL = {
    "scripts/linear_eval.py": ["epochs=1", "runs=1", "batch_size=128"],
    "scripts/bench_eval.py": ["epochs=2", "runs=2", "batch_size=256", "bench_epochs=1", "repeats=1"],
    "scripts/umap_plot.py": ["max_samples=60"],
    "scripts/bench_inference.py": ["model.width=4", "rounds=1", "warmup=0", "calibration.images=16"],
    "scripts/flops.py": ["bench.images=2", "bench.rounds=1", "bench.warmup=0"],
}  # scripts/export.py runs as written: the quickstart exported already, exporting again must not fail
# Commands that cannot run here, with why, checked by composing their config instead.
PARSE_ONLY = {
    """python scripts/linear_eval.py ckpt=runs/vdg/cifar100/td0.3/seed5/checkpoints/last.ckpt """
    "eval=transfer target=cifar10": "needs a CIFAR-100 pretraining run",
    "python scripts/pretrain.py dataset=imagenet100 data.root=/data/imagenet100 trainer.devices=4 "
    "trainer.strategy=ddp": "needs 4 GPUs",
    "python scripts/pretrain.py dataset=cifar100 logger=wandb logger.wandb.mode=online logger.wandb.project=vdg": (
        "needs the network and a wandb login"
    ),
    "python scripts/pretrain.py -m +sweep=table1": "a full sweep: dry-run instead",
    "python scripts/pretrain.py method=seed dataset=cifar100 budget=0.3 teacher.path=moco_v2_800ep_pretrain.pth.tar "
    "student.channels_from=runs/vdg/cifar100/td0.3/seed5/checkpoints/last.ckpt": (
        "needs the MoCo authors' ResNet-50 file and a CIFAR-100 VDG run"
    ),
    "python scripts/pretrain.py -m +sweep=table4 seed=1,2,3": "a full sweep: dry-run instead",
    "python scripts/pretrain.py -m +sweep=table1_mini": "a 30-minute sweep that downloads CIFAR-10: dry-run instead",
    "python scripts/pretrain.py -m +sweep=table1_mini dataset=folder data.root=/tmp/cifar10": (
        "a 30-minute sweep on an unpacked CIFAR-10 folder: dry-run instead"
    ),
    "python scripts/pretrain.py -m +sweep=table1_mini seed=1,2,3": "a 90-minute sweep: dry-run instead",
    "python scripts/pretrain.py -m +sweep=table1_mini dataset=folder data.root=/tmp/cifar10 seed=1,2,3": (
        "a 90-minute sweep on an unpacked CIFAR-10 folder: dry-run instead"
    ),
    "python scripts/pretrain.py trainer.devices=4 trainer.strategy=ddp": "needs 4 GPUs",
    "python scripts/pretrain.py trainer.devices=4 trainer.num_nodes=2 trainer.strategy=ddp": "needs 2 nodes of 4 GPUs",
    "python scripts/pretrain.py trainer.devices=4 trainer.num_nodes=2 trainer.strategy=ddp "
    "method.gather_across_processes=true": "needs SLURM and 2 nodes of 4 GPUs",
}
# Commands of the docs that CI runs (.ci/run: the suite holds the kernel tests; then a forced-AVX2 pass of the
# whole suite and a portable pass of the kernel tests), and the first-GPU check, which needs a GPU.
CI_COMMANDS = {"pytest -m kernel", "VDG_KERNEL_ISA=avx2 pytest -m kernel", "VDG_KERNEL_ISA=portable pytest -m kernel"}
GPU_CHECK = "scripts/gpu_check.sh"


class Block(NamedTuple):
    info: str  # the fence's info string, e.g. "bash" or "python my_methods.py"
    body: str


def readme_blocks(text: str | None = None) -> list[Block]:
    """The fenced blocks of `text`, or of every page (README first) when None."""
    if text is None:
        return [block for page in PAGES for block in readme_blocks(page.read_text())]
    return [Block(m[1].strip(), m[2]) for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", text, re.M | re.S)]


def readme_commands(text: str | None = None) -> list[str]:
    """Every command line of the bash blocks (of every page when `text` is None): continuations joined, comments
    dropped, tokens normalised."""
    commands = []
    for block in readme_blocks(text):
        if block.info != "bash":
            continue
        for line in block.body.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(shlex.join(tokens))
    return commands


def command_parts(command: str) -> list[list[str]]:
    """A command split at `&&` into argument lists."""
    parts, current = [], []
    for token in shlex.split(command):
        if token == "&&":
            parts.append(current)
            current = []
        else:
            current.append(token)
    return [*parts, current]


def as_python(part: list[str]) -> list[str]:
    """A launcher's command as the `python <script> ...` it starts in each process: `srun python s.py a=1` and
    `torchrun --opt=v s.py a=1` become `python s.py a=1`; any other command is returned unchanged."""
    if part[:2] == ["srun", "python"]:
        return part[1:]
    if part[0] == "torchrun":
        script = next(i for i, token in enumerate(part) if i and not token.startswith("-"))
        return ["python", *part[script:]]
    return part


def page_with(marker: str) -> Path:
    """The one page that holds `marker` (a measured table's begin marker, a table's header)."""
    pages = [page for page in PAGES if marker in page.read_text()]
    assert len(pages) == 1, f"{marker!r} is in {[str(p.relative_to(REPO)) for p in pages]}: expected one page"
    return pages[0]


# every `python <script> ...` of the pages (not `python -m pytest`), in page order, README first
PYTHON_COMMANDS = list(
    dict.fromkeys(
        shlex.join(python)
        for command in readme_commands()
        for python in map(as_python, command_parts(command))
        if python[0] == "python" and python[1] != "-m"
    )
)


def run_python(argv: list[str], cwd: Path, capsys) -> str:
    """`python argv...` in this process from `cwd`; returns stdout. A non-zero exit fails the test."""
    script = cwd / argv[0] if (cwd / argv[0]).is_file() else REPO / argv[0]
    saved = sys.argv
    sys.argv = [str(script), *argv[1:]]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_info:
        if exit_info.code not in (0, None):
            captured = capsys.readouterr()
            pytest.fail(f"`python {shlex.join(argv)}` exited with {exit_info.code!r}\n{captured.err[-3000:]}")
    finally:
        sys.argv = saved
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch directory in which the README's quickstart has run (tiny), plus a k-NN result of it."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("readme")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        argv = [*shlex.split(QUICKSTART)[1:], *TINY, "trainer.enable_progress_bar=false"]
        saved = sys.argv
        sys.argv = [str(REPO / argv[0]), *argv[1:]]
        try:
            runpy.run_path(str(REPO / argv[0]), run_name="__main__")
        finally:
            sys.argv = saved
        from vdg.eval.api import evaluate_checkpoint

        evaluate_checkpoint(root / "runs/quickstart/checkpoints/last.ckpt", "knn")
    return root


@pytest.fixture
def quiet_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.delenv("WANDB_MODE", raising=False)


# ----- the fresh-machine commands ----------------------------------------------------------------------------


def test_fresh_machine_commands_are_single_readme_lines():
    blocks = readme_blocks(README.read_text())
    lines = [line.strip() for block in blocks if block.info == "bash" for line in block.body.splitlines()]
    for command in FRESH_MACHINE:
        assert command in lines, command


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    """.ci/run reads its command from the README: if the README's install line changes, CI installs the same;
    if the README lost or duplicated that line, CI would refuse to run (and this test fails first)."""
    import subprocess

    printed = subprocess.run(
        ["bash", str(REPO / ".ci" / "run"), "--print-command"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert printed == FRESH_MACHINE[1]
    # both fresh-machine lines install the same way (the demo must not need anything the tests do not)
    install = [c.rsplit(" && ", 1)[0] for c in FRESH_MACHINE]
    assert install[0] == install[1] == " && ".join(INSTALL)
    ci = (REPO / ".ci" / "run").read_text()
    assert "python3 -m venv" in ci and "--system-site-packages" not in ci.replace("no --system-site-packages", "")
    assert "mktemp -d" in ci and 'source "$room/venv/bin/activate"' in ci


def installed(module: str) -> bool:
    """Whether `module` can be imported. importlib.util.find_spec("a.b") *raises* ModuleNotFoundError when the
    parent package "a" is missing (e.g. no Hydra plugin at all under hydra_plugins), rather than returning None."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def test_every_readme_command_is_exercised_here_or_in_ci():
    known_scripts = {"my_methods.py"} | {f"scripts/{p.name}" for p in (REPO / "scripts").glob("*.py")}
    for command in readme_commands():
        for part in map(as_python, command_parts(command)):
            text = shlex.join(part)
            if part[0] == "pip":
                assert part in [shlex.split(step) for step in INSTALL], f"unknown install step in the README: {text}"
            elif part[:2] == ["python", "-m"]:
                assert text == "python -m pytest -q", f"unknown module command in the README: {text}"
            elif text in CI_COMMANDS or part[0] == GPU_CHECK:
                continue  # test_ci_runs_the_kernel_commands_of_the_docs, test_gpu_check_command_parses
            else:
                assert part[0] == "python", f"README command this test cannot run: {text}"
                script = next(t for t in part[1:] if not t.startswith("-"))
                assert script in known_scripts, f"README runs unknown script {script}"
                assert text in PYTHON_COMMANDS
    assert set(PARSE_ONLY) <= set(PYTHON_COMMANDS), "PARSE_ONLY names commands the pages no longer have"


def test_ci_runs_the_kernel_commands_of_the_docs():
    commands = {shlex.join(part) for command in readme_commands() for part in command_parts(command)}
    assert CI_COMMANDS <= commands, "CI_COMMANDS names commands the pages no longer have"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^    "kernel: ', pyproject, re.M)  # the marker `-m kernel` selects
    ci = (REPO / ".ci" / "run").read_text()
    # the whole suite (kernel tests included) runs first, then again with the AVX2 variant, then the portable loops
    assert "VDG_KERNEL_ISA=avx2 python -m pytest -q" in ci
    assert re.search(r"^VDG_KERNEL_ISA=portable python -m pytest .*-m kernel", ci, re.M)


def test_gpu_check_command_parses():
    """`scripts/gpu_check.sh DIR` needs a GPU; here it must at least exist, be executable and parse."""
    lines = [c for c in readme_commands() if c.startswith(GPU_CHECK)]
    assert lines and all(len(shlex.split(line)) == 2 for line in lines), lines
    script = REPO / GPU_CHECK
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)


# ----- every python command ----------------------------------------------------------------------------------


def tiny_overrides(argv: list[str], index: int) -> list[str]:
    """What to append to a README command so that it runs here in seconds."""
    script = argv[0]
    if script in ("scripts/pretrain.py", "my_methods.py"):
        if "-m" in argv:
            return []  # sweeps only dry-run here
        extra = [*TINY] if "experiment=quickstart" in argv else [*SYNTHETIC, *TINY]
        if not any(a.startswith("trainer.progress") for a in argv):
            extra.append("trainer.enable_progress_bar=false")
        return [*extra, f"run_dir=runs/readme/{index}"]
    return TINY_EVAL.get(script, [])


def parse_only(argv: list[str], cwd: Path, capsys) -> None:
    """Compose the command's config without running it: a sweep dry-runs, anything else prints `--cfg job`."""
    if "-m" in argv:
        out = run_python([*argv, "dry_run=true"], cwd, capsys)
        assert out.count("job: ") > 1
    else:
        out = run_python([*argv, "--cfg", "job"], cwd, capsys)
        config = OmegaConf.create(out)
        for override in argv[1:]:
            key, _, value = override.partition("=")
            chosen = OmegaConf.select(config, key) if "/" not in key and not key.startswith("+") else None
            if OmegaConf.is_config(chosen):  # a config group: its option names itself
                chosen = chosen.get("name")
            if chosen is not None:  # as Hydra reads the value: `true` is True
                assert str(chosen) == value.strip("\"'") or chosen == OmegaConf.create(f"v: {value}").v, override


@pytest.mark.parametrize("command", PYTHON_COMMANDS)
def test_readme_command(command, workdir, tmp_path, monkeypatch, capsys, quiet_wandb):
    argv = shlex.split(command)[1:]
    uses = " ".join(argv)
    if "logger=tensorboard" in uses and not installed("tensorboard"):
        pytest.skip("tensorboard is not installed (pip install -e '.[tensorboard]')")
    if command == QUICKSTART:  # the workdir fixture ran it (tiny)
        summary = json.loads((workdir / "runs/quickstart/summary.json").read_text())
        assert summary["method"] == "vdg" and summary["dataset"] == "digits" and "knn" in summary
        return
    cwd = workdir
    if argv[0] == "my_methods.py":
        cwd = make_fork(tmp_path)
    monkeypatch.chdir(cwd)
    if "hydra/launcher=submitit_slurm" in argv:
        return check_slurm_command(argv, cwd, capsys)
    if command in PARSE_ONLY:
        return parse_only(argv, cwd, capsys)
    if "runs/table1_mini" in argv:  # the mini sweep's own records (docs/results/) stand in for a 30-minute sweep
        shutil.copytree(MINI_FIGURES, cwd / "runs/table1_mini" / "folder", dirs_exist_ok=True)
    index = PYTHON_COMMANDS.index(command)
    try:
        out = run_python([*argv, *tiny_overrides(argv, index)], cwd, capsys)
    finally:
        if argv[0] == "my_methods.py":
            from vdg.methods import METHODS

            METHODS.pop("bt_gating", None)
    check_outputs(argv, out, cwd, index)


def check_outputs(argv: list[str], out: str, cwd: Path, index: int) -> None:
    """A few facts each kind of command must have produced, beyond exiting with 0."""
    script = argv[0]
    if script in ("scripts/pretrain.py", "my_methods.py") and "-m" not in argv:
        summary = json.loads((cwd / f"runs/readme/{index}/summary.json").read_text())
        method = next((a.split("=", 1)[1] for a in argv if a.startswith("method=")), "vdg")
        assert summary["method"] == method and summary["epochs"] == 1
        if method in ("simreg", "seed"):  # Table 3's evaluation, chained: the student is one dense network
            assert [(r["branch"], r["distance"], r["k"]) for r in summary["evaluations"]] == [("dense", "cosine", 1)]
        if "logger=wandb" in argv:
            assert list((cwd / f"runs/readme/{index}/wandb").glob("offline-run-*"))
        if "logger=tensorboard" in argv:
            assert list((cwd / f"runs/readme/{index}/tensorboard").glob("events.out.tfevents.*"))
        if "trainer.progress=plain" in argv:
            assert re.search(r"\[vdg\] epoch 1/1 done in ", out)
    elif "dry_run=true" in argv:
        jobs = {"+sweep=table1_mini": 21 if "seed=1,2,3" in argv else 7,  # the grids, as the README says
                "+sweep=table1": 26, "+sweep=table3": 17}
        assert out.count("job: ") == next(n for sweep, n in jobs.items() if sweep in argv)
    elif script in ("scripts/knn_eval.py", "scripts/linear_eval.py"):
        # a summary for people: one line per network, naming the record files (json=true would print them)
        branches = {"gated"} if "branch=gated" in argv else {"dense", "gated"}
        assert set(re.findall(r"^  (dense|gated)  top-1 \d+\.\d\d", out, re.M)) == branches, out
        folder, names = re.search(r"^records: (.*)/\{(.*)\} \(json=true prints them\)$", out, re.M).groups()
        records = [json.loads((cwd / folder / name).read_text()) for name in names.split(",")]
        assert {r["branch"] for r in records} == branches and all(0 <= r["value"] <= 100 for r in records)
        assert all(r["description"] in out for r in records)
        if "augment=false" in argv:
            assert all(name.endswith("-cached.json") for name in names.split(","))
    elif script == "scripts/bench_eval.py":
        row = json.loads(out.strip().splitlines()[-1])
        assert row["bare_image_passes_per_s"] > 0 and row["linear_image_passes_per_s"] > 0
        assert "image passes/s" in out and row["augment_backend"] == "batched"
    elif script == "scripts/flops.py":
        summary = json.loads(out)
        if "dataset=imagenet100" in argv:
            assert summary["dense_macs"] == 1_813_561_344  # the README's 1.81E9
        if "report=true" in argv:
            assert (cwd / "runs/quickstart/checkpoints/results/channel_usage.png").read_bytes().startswith(PNG)
        if "latency=true" in argv:
            assert summary["latency_ratio"] > 0 and summary["latency"]["max_rel_diff"] <= 1e-4
    elif script == "scripts/bench_inference.py":
        result = json.loads(out)
        assert result["masks"] == ("checkpoint" if any(a.startswith("ckpt=") for a in argv) else "calibrated")
        assert result["latency_ratio"] > 0 and result["max_rel_diff"] <= 1e-4
        assert Path(result["results"]).is_file()
    elif script == "scripts/umap_plot.py":
        plot = out.strip().rsplit(": ", 1)[1]
        assert out.startswith("UMAP (n_neighbors ") and (cwd / plot).read_bytes().startswith(PNG)
    elif script == "scripts/make_tables.py" and "table1_mini" in argv:  # the README's table, regenerated
        body = readme_block(MINI_FIGURES).removeprefix(f"{README_BEGIN}\n").removesuffix(f"\n{README_END}")
        records = load_results(MINI_FIGURES)
        filled = sum(r.get("branch") != "pixels" for r in records)  # the raw-pixel records fill the reference rows
        counts = f"{len(records)} result records under runs/table1_mini; {filled} fill a cell above"
        assert body in out and counts in out
    elif script == "scripts/make_tables.py":
        assert "Table 1" in out and (cwd / "runs/tables/table1.md").is_file()
        # the quickstart's digits records fill no paper table, and the script says so
        assert re.search(r"^\d+ matched no cell of table1, table4 .*digits", out, re.M)
    elif script == "scripts/plot_pareto.py":
        assert (cwd / "runs/plots/pareto-knn-k1-euclidean-digits.png").read_bytes().startswith(PNG)
    elif script == "scripts/export.py":
        paths = json.loads(out)
        assert all(Path(p).is_file() for p in paths.values())
        assert ("profile" in paths) == ("slim=true" in argv)


def check_slurm_command(argv: list[str], cwd: Path, capsys) -> None:
    """The SLURM form: its sweep dry-runs with the basic launcher; with hydra-submitit-launcher installed, the
    launcher's keys are also composed (`--cfg hydra`), which fails on a misspelt or unknown key."""
    launcher = [a for a in argv if a.startswith(("hydra/launcher=", "hydra.launcher."))]
    sweep = [a for a in argv if a not in launcher]
    assert run_python([*sweep, "dry_run=true"], cwd, capsys).count("job: ") == 26
    if not installed("hydra_plugins.hydra_submitit_launcher"):
        pytest.skip("hydra-submitit-launcher is not installed (pip install -e '.[slurm]'): launcher keys unchecked")
    out = run_python([a for a in argv if a != "-m"] + ["--cfg", "hydra"], cwd, capsys)
    launched = OmegaConf.create(out).hydra.launcher
    assert "SlurmLauncher" in launched._target_
    for override in launcher[1:]:
        key, _, value = override.partition("=")
        assert str(OmegaConf.select(launched, key.removeprefix("hydra.launcher."))) == value


# ----- the python and yaml examples --------------------------------------------------------------------------


def example(info: str) -> str:
    (block,) = [b for b in readme_blocks() if b.info == info]
    return block.body


def make_fork(root: Path) -> Path:
    """A fork as the README tells one to make it: my_methods.py in the root, the method yaml in configs/."""
    fork = root / "fork"
    shutil.copytree(REPO / "scripts", fork / "scripts")
    shutil.copytree(REPO / "configs", fork / "configs")
    (fork / "my_methods.py").write_text(example("python my_methods.py"))
    (fork / "configs/method/bt_gating.yaml").write_text(example("yaml configs/method/bt_gating.yaml"))
    return fork


def test_method_example_is_about_thirty_lines_and_registers_its_method(tmp_path):
    source = example("python my_methods.py")
    assert 25 <= len(source.splitlines()) <= 45
    from vdg.methods import METHODS

    namespace: dict = {"__name__": "my_methods", "__file__": str(tmp_path / "my_methods.py")}
    try:
        exec(compile(source, "my_methods.py", "exec"), namespace)
        assert METHODS["bt_gating"] is namespace["BTGating"]
        assert OmegaConf.create(example("yaml configs/method/bt_gating.yaml")).name == "bt_gating"
    finally:
        METHODS.pop("bt_gating", None)


def test_load_backbone_example_runs_on_an_export(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    run_python(["scripts/export.py", "ckpt=runs/quickstart/checkpoints/last.ckpt", "branch=gated"], workdir, capsys)
    exec(compile(example("python"), "README example", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    assert printed.startswith("torch.Size([8, 32]) gated 0.5 [")  # width 4 here: 32-d features, t_d of quickstart


# ----- the README's measured figures --------------------------------------------------------------------------

FIGURES = REPO / "docs" / "results" / "quickstart"


def test_quickstart_figures_are_those_its_commands_wrote():
    """Every figure of the README's quickstart table is rendered from docs/results/quickstart/, the files the
    command named on its row wrote (scripts/readme_figures.py copies them there and rewrites the table)."""
    assert figures_table(FIGURES) in page_with(BEGIN).read_text()
    assert set(quickstart_commands()) <= set(PYTHON_COMMANDS)  # each runs as written in test_readme_command
    summary = json.loads((FIGURES / "summary.json").read_text())
    assert (summary["method"], summary["dataset"], summary["width"]) == ("vdg", "digits", 8)
    for branch in ("dense", "gated"):  # knn_eval.py agrees with the k-NN the quickstart printed
        knn = json.loads((FIGURES / f"knn-k1-euclidean-digits-{branch}.json").read_text())
        assert knn["value"] == pytest.approx(summary["knn"][branch], abs=1e-6)
        for name, augment in ((f"linear-digits-{branch}.json", True), (f"linear-digits-{branch}-cached.json", False)):
            record = json.loads((FIGURES / name).read_text())
            assert record["ckpt"].endswith("runs/quickstart/checkpoints/last.ckpt")
            assert record["eval_config"]["augment"] is augment and record["eval_config"]["runs"] == 5
            assert record["eval_config"]["epochs"] == 100 and record["branch"] == branch
        assert knn["random_init"]["seeds"] == [0, 1, 2]  # the table's random-init column
        assert summary["knn"]["random_init"][branch]["top1_mean"] == pytest.approx(knn["random_init"]["top1_mean"])
    cached = json.loads((FIGURES / "linear-digits-dense-cached.json").read_text())
    assert cached["random_init"]["seeds"] == [0, 1, 2]
    for seed in OTHER_SEEDS:  # the seeds row: the same command, another pretraining seed, nothing else changed
        other = json.loads((FIGURES / f"summary-seed{seed}.json").read_text())
        assert other["seed"] == seed and other["run_dir"].endswith(f"runs/quickstart_seed{seed}")
        same = ("method", "dataset", "budget", "width", "epochs", "steps")
        assert {k: other[k] for k in same} == {k: summary[k] for k in same}


def test_readme_figures_script(tmp_path, capsys):
    script = runpy.run_path(str(REPO / "scripts" / "readme_figures.py"))
    assert script["main"](["--check"]) == 0
    with pytest.raises(SystemExit):  # a run without the evaluations: it names the commands to run first
        script["main"](["--run", str(tmp_path)])
    assert "python scripts/knn_eval.py ckpt=runs/quickstart/checkpoints/last.ckpt" in capsys.readouterr().err
    text = f"intro\n{BEGIN}\nold\n{END}\noutro\n"
    assert replace_table(text, "NEW") == "intro\nNEW\noutro\n"


MINI_FIGURES = REPO / "docs" / "results" / "table1_mini"
MINI_SWEEP = "python scripts/pretrain.py -m +sweep=table1_mini dataset=folder data.root=/tmp/cifar10"


def test_mini_table_is_rendered_from_the_records_its_sweep_wrote():
    """The reduced-scale Table 1 (in the README and docs/results.md) is the table make_tables renders from
    docs/results/table1_mini/, the records (and run summaries) of one table1_mini sweep, copied there by
    scripts/readme_figures.py --mini."""
    pages = [page for page in PAGES if README_BEGIN in page.read_text()]
    assert [page.name for page in pages] == ["README.md", "results.md"]
    assert readme_block(MINI_FIGURES, compact=True) in pages[0].read_text()  # ours and the reference rows
    assert readme_block(MINI_FIGURES) in pages[1].read_text()  # with the paper's rows and the scale notes
    assert "random init, 1-NN" in pages[0].read_text() and "raw pixels (no network), 1-NN" in pages[0].read_text()
    assert MINI_SWEEP in pages[1].read_text() and MINI_SWEEP in PYTHON_COMMANDS
    records = load_results(MINI_FIGURES)
    sweep = OmegaConf.load(REPO / "configs" / "sweep" / "table1_mini.yaml")
    runs = {(r["method"], r["budget"], r["seed"]) for r in records}
    assert {(m, b) for m, b, _ in runs} == {("vicreg", 0.3)} | {
        (m, b) for m in ("vicreg_gating", "vdg") for b in (0.1, 0.3, 0.5)
    }
    for record in records:  # every figure comes from a run of the sweep as committed
        assert record["dataset"] == "folder" and record["subset_per_class"] == sweep.dataset.subset_per_class
        assert record["backbone_width"] == sweep.backbone.width
        assert record["pretrain_epochs"] == sweep.trainer.max_epochs
        assert record["num_train"] == 10 * sweep.dataset.subset_per_class and record["num_test"] == 10000
    summaries = [json.loads(p.read_text()) for p in MINI_FIGURES.rglob("summary.json")]
    assert len(summaries) == len(runs)
    text = f"a\n{README_BEGIN}\nold\n{README_END}\nb\n"
    assert replace_readme_block(text, "NEW") == "a\nNEW\nb\n"


@pytest.mark.skipif(
    not os.environ.get("VDG_README_RERUN"),
    reason="reruns the real quickstart (~1.5 min on an idle 2-core CPU); set VDG_README_RERUN=1 to compare its "
    "k-NN figures with the README's",
)
def test_the_quickstart_command_reproduces_the_readmes_knn_figures(tmp_path):
    # A fresh process, as a user runs it: torch's default thread count, not the suite's one thread (the float
    # summation order, hence the 20-epoch trajectory, depends on it; see the README's quickstart notes)
    command = [sys.executable, str(REPO / "scripts/pretrain.py"), *shlex.split(QUICKSTART)[2:],
               "trainer.enable_progress_bar=false"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = json.loads((tmp_path / "runs/quickstart/summary.json").read_text())["knn"]
    recorded = json.loads((FIGURES / "summary.json").read_text())["knn"]
    for key in ("dense", "gated"):
        assert f"{fresh[key]:.2f}" == f"{recorded[key]:.2f}", key
    assert f"{fresh['flops_ratio']:.3f}" == f"{recorded['flops_ratio']:.3f}"


# ----- tables of the README against the code -----------------------------------------------------------------


def section(title: str) -> str:
    """The README text under `## title`, up to the next section."""
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_config_group_table_lists_every_option():
    rows = re.findall(r"^\| `(\w+)/` \| (.*?) \|", section("Configuration"), re.M)
    groups = {p.name for p in (REPO / "configs").iterdir() if p.is_dir()}
    assert {group for group, _ in rows} == groups
    for group, options in rows:
        assert re.findall(r"`([\w+-]+)`", options) and set(re.findall(r"`([\w+-]+)`", options)) == {
            p.stem for p in (REPO / "configs" / group).glob("*.yaml")
        }, group


def test_config_group_defaults_come_first():
    defaults = {}
    for entry in OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "pretrain.yaml").defaults):
        if isinstance(entry, dict):  # `optional recipe: ${method}` follows the method: no default of its own
            # `override hydra/...` entries set Hydra's own options (job logging), not a group of configs/
            defaults.update({k: v for k, v in entry.items()
                             if v and not str(v).startswith("${") and not k.startswith("override hydra/")})
    rows = dict(re.findall(r"^\| `(\w+)/` \| `([\w+-]+)`", section("Configuration"), re.M))
    for group, option in defaults.items():
        assert rows[group] == option, group


def test_package_map_covers_every_module():
    text = page_with("| module | what it holds |").read_text()
    mapped = set(re.findall(r"^\| `(vdg/[\w/]+\.py)` \|", text, re.M))
    modules = {str(p.relative_to(REPO)) for p in (REPO / "vdg").rglob("*.py") if p.name != "__init__.py"}
    modules.add("vdg/methods/__init__.py")  # the registry is worth its own line
    assert mapped == modules, f"missing: {sorted(modules - mapped)}, stale: {sorted(mapped - modules)}"
    scripts = {p.stem for p in (REPO / "scripts").glob("*.py")}
    (line,) = [line for line in text.splitlines() if line.startswith("| `scripts/` |")]
    assert scripts <= set(re.findall(r"\w+", line)), sorted(scripts - set(re.findall(r"\w+", line)))


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces as '-'."""
    headings = re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_point_to_files_and_headings():
    for page in PAGES:
        for target, anchor in re.findall(r"\]\((?!https?:)([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            path = (page.parent / target).resolve() if target else page
            if path == REPO / "docs" / "architecture.md" and not path.exists():
                continue  # written with the layering work (issue 25, items 1-3)
            assert path.exists(), f"{page.relative_to(REPO)}: {target}"
            if anchor and path.suffix == ".md":
                assert anchor in anchors(path), f"{page.relative_to(REPO)}: {target}#{anchor}"


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250


def test_readme_parsers():
    text = "x\n```bash\npython a.py k=1 \\\n    j=2  # note\n# only a comment\n\n```\n```python f.py\nprint(1)\n```\n"
    assert readme_commands(text) == ["python a.py k=1 j=2"]
    assert readme_blocks(text)[1] == Block("python f.py", "print(1)\n")
    assert command_parts("pip install x && python -m pytest -q") == [
        ["pip", "install", "x"],
        ["python", "-m", "pytest", "-q"],
    ]


# ----- plot_pareto.py and vdg/report/pareto.py -----------------------------------------------------------------


def record(method: str, branch: str, budget: float | None, value: float, reduction: float, **extra) -> dict:
    return {
        "protocol": "linear",
        "method": method,
        "method_config": {},
        "pretrain_dataset": "cifar10",
        "dataset": "cifar10",
        "budget": budget,
        "seed": 5,
        "branch": branch,
        "metric": "top1",
        "value": value,
        "runs": [value],
        "flops_reduction": reduction,
        **extra,
    }


def write_records(folder: Path, records: list[dict]) -> Path:
    for i, r in enumerate(records):
        (folder / f"{i}.json").write_text(json.dumps(r))
    return folder


def test_ours_points_pool_runs_per_budget_and_branch():
    records = [
        record("vdg", "gated", 0.3, 90.0, 0.66, runs=[89.0, 91.0]),
        record("vdg", "gated", 0.3, 92.0, 0.68),  # a second record of the same cell is pooled
        record("vdg", "dense", 0.3, 91.0, 0.0),
        record("vicreg", "dense", 0.3, 93.0, 0.0),
        record("vdg", "gated", 0.3, 50.0, 0.6, protocol="transfer", dataset="stl10"),  # not same-dataset
        {"protocol": "flops", "method": "vdg", "dataset": "cifar10", "pretrain_dataset": "cifar10"},
    ]
    points = {(p.model, p.branch, p.budget): p for p in ours_points(records)}
    assert set(points) == {("vdg", "gated", 0.3), ("vdg", "dense", 0.3), ("vicreg", "dense", None)}
    gated = points[("vdg", "gated", 0.3)]
    assert gated.top1 == pytest.approx(92.0 * 1 / 3 + 90.0 * 2 / 3) and gated.runs == 3
    assert gated.flops_reduction == pytest.approx(67.0) and gated.panel == "linear" and gated.source == "ours"
    assert points[("vdg", "dense", 0.3)].flops_reduction == 0.0


def test_record_panels():
    assert record_panel(record("vdg", "gated", 0.3, 1, 0)) == "linear"
    knn = dict(record("vdg", "gated", 0.3, 1, 0), protocol="knn", k=1, distance="euclidean")
    assert record_panel(knn) == "knn-k1-euclidean"
    assert record_panel({**knn, "normalize": True}) == "knn-k1-euclidean-l2"
    assert record_panel({**knn, "distance": "cosine", "k": 20}) == "knn-k20-cosine"
    assert record_panel({**knn, "dataset": "stl10"}) is None


def test_paper_points_are_the_papers_numbers():
    points = paper_points("linear", "cifar10", {"vdg", "vicreg"})
    gated = sorted((p.budget, p.top1, p.flops_reduction) for p in points if p.branch == "gated")
    assert gated == [(0.1, 88.94, 81.49), (0.3, 90.27, 66.43), (0.5, 90.40, 49.02)]  # paper Table 1
    dense = sorted((p.model, p.budget, p.top1, p.flops_reduction) for p in points if p.branch == "dense")
    assert dense == [
        ("vdg", 0.1, 88.99, 0.0),
        ("vdg", 0.3, 90.38, 0.0),
        ("vdg", 0.5, 90.20, 0.0),
        ("vicreg", None, 91.11, 0.0),
    ]
    knn = paper_points("knn-k1-euclidean", "cifar100", {"vdg"})  # Tables 4-6 repeat VDG: each cell once
    assert len(knn) == 6 and {p.top1 for p in knn if p.branch == "gated"} == {54.66, 55.53, 57.25}
    assert paper_points("knn-k1-cosine", "cifar100", {"vdg"}) == []  # Table 3 prints no FLOPs reduction
    assert paper_points("linear", "digits", {"vdg"}) == []


def test_plot_pareto_writes_one_png_per_protocol_and_dataset(tmp_path):
    knn = dict(record("vdg", "gated", 0.3, 55.0, 0.66), protocol="knn", k=1, distance="euclidean")
    write_records(tmp_path, [record("vdg", "gated", 0.3, 90.0, 0.66), record("vdg", "dense", 0.3, 91.0, 0.0), knn])
    paths = plot_pareto(tmp_path)
    assert [p.name for p in paths] == ["pareto-knn-k1-euclidean-cifar10.png", "pareto-linear-cifar10.png"]
    assert all(p.parent == tmp_path / "plots" and p.read_bytes().startswith(PNG) for p in paths)
    assert load_results(tmp_path)  # the plots folder holds no JSON that could be mistaken for results


def test_plot_pareto_without_records_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="no linear or k-NN result records"):
        plot_pareto(tmp_path)
    script = runpy.run_path(str(REPO / "scripts" / "plot_pareto.py"))
    with pytest.raises(SystemExit) as exit_info:
        script["main"]([str(tmp_path)])
    assert exit_info.value.code == 2 and "no linear or k-NN result records" in capsys.readouterr().err
