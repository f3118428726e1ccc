"""vdg installs like a package: a wheel carries configs/ as vdg/configs/, and vdg.core.paths finds it there.

The wheel is built offline from a copy of the checkout (`pip wheel --no-deps --no-build-isolation`, with the
setuptools of this environment) and used unpacked, from another directory: what `pip install .` puts in
site-packages, without a venv or the network. ~10 s.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vdg.core.errors import ConfigError
from vdg.core.paths import CONFIG_DIR, config_file, find_config_dir, script_config_dir

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))


def test_config_dir_is_the_checkouts_configs():
    assert (CONFIG_DIR / "pretrain.yaml").is_file()
    assert CONFIG_DIR == (REPO / "configs").resolve()  # the tests import vdg from this checkout


def test_installed_configs_come_first_and_a_missing_folder_is_an_error(tmp_path):
    installed, checkout = tmp_path / "site" / "vdg" / "configs", tmp_path / "configs"
    for folder in (installed, checkout):
        folder.mkdir(parents=True)
        (folder / "pretrain.yaml").write_text("seed: 5\n")
    assert find_config_dir([installed, checkout]) == installed.resolve()
    (installed / "pretrain.yaml").unlink()
    assert find_config_dir([installed, checkout]) == checkout.resolve()
    (checkout / "pretrain.yaml").unlink()
    with pytest.raises(ConfigError, match=f"config folder is missing: no pretrain.yaml in {installed}, {checkout}"):
        find_config_dir([installed, checkout])


def test_a_missing_config_file_is_an_error_naming_it():
    assert config_file("logger", "wandb.yaml") == CONFIG_DIR / "logger" / "wandb.yaml"
    with pytest.raises(ConfigError, match=r"lacks logger/neptune.yaml: reinstall vdg"):
        config_file("logger", "neptune.yaml")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel offline needs setuptools (in the dev extra): pip install -e '.[dev]'")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for name in ("vdg", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), "."],
        cwd=source, check=True, capture_output=True, text=True,
    )
    (built,) = dist.glob("vdg-*.whl")
    return built


def test_the_wheel_ships_every_config_inside_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"vdg/configs/{name}" for name in CONFIGS} <= names
    assert not [n for n in names if n.startswith("configs/")]  # inside vdg/, not a top-level package
    assert {"vdg/data/imagenet100_classes.txt", "vdg/deploy/csrc/sparse_block.c"} <= names
    requires = [line for line in zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode().splitlines()
        if line.startswith("Requires-Dist:")]
    needed = [line for line in requires if "extra ==" not in line]
    assert not [line for line in needed if "wandb" in line or "fvcore" in line], needed  # optional / tests only
    # wandb is listed once, in the wandb extra; dev (the tests) asks for vdg[wandb]
    assert [line for line in requires if line.startswith("Requires-Dist: wandb")] == [
        'Requires-Dist: wandb; extra == "wandb"']


def test_installed_vdg_finds_its_configs_from_another_directory(wheel, tmp_path):
    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # before this checkout's editable install, if any
    printed = subprocess.run(
        [sys.executable, "-c", "import vdg.core.paths as p; print(p.__file__); print(p.CONFIG_DIR)"],
        cwd=elsewhere, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()
    assert printed == [str(site / "vdg/core/paths.py"), str((site / "vdg/configs").resolve())]
    # the quickstart, with the script's path, from there (tiny): its config checks read the installed configs
    tiny = ["backbone.width=4", "method.projector_hidden_dim=32", "method.projector_output_dim=32",
            "data.batch_size=16", "data.num_workers=0", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1", "scheduler.warmup_epochs=1", "trainer.enable_progress_bar=false"]
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts/pretrain.py"), "experiment=quickstart", *tiny],
        cwd=elsewhere, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (elsewhere / "runs/quickstart/summary.json").is_file()


def test_every_script_reads_the_configs_beside_it_by_one_rule(tmp_path):
    assert script_config_dir(REPO / "scripts" / "pretrain.py") == (REPO / "configs").resolve()
    fork = tmp_path / "fork"
    (fork / "configs").mkdir(parents=True)
    (fork / "configs" / "pretrain.yaml").write_text("seed: 1\n")
    assert script_config_dir(fork / "scripts" / "pretrain.py") == (fork / "configs").resolve()  # a fork's own
    assert script_config_dir(tmp_path / "elsewhere" / "scripts" / "x.py") == CONFIG_DIR  # no configs beside it
    for script in sorted((REPO / "scripts").glob("*.py")):  # nobody spells the path out again
        text = script.read_text()
        assert '"../configs"' not in text and '/ "configs"' not in text, script.name
