"""One base for user errors: every error class vdg defines is a `VdgError`, the scripts report any of them as one
`error:` line with exit status 2, and `vdg.core` imports nothing from the rest of vdg (it is the bottom layer)."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vdg.core.cli import USER_ERROR_STATUS, exit_with, user_errors
from vdg.core.errors import VdgError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vdg"


def defined_error_classes() -> list[tuple[str, str]]:
    found = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Interrupted")):
                found.append((module, node.name))
    return found


def test_every_error_class_of_vdg_is_a_vdg_error():
    classes = defined_error_classes()
    assert len(classes) >= 12  # the AST walk found them (ConfigError, CheckpointError, NativeKernelError, ...)
    for module, name in classes:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, VdgError), f"{module}.{name} is not a VdgError: scripts would show a traceback"
    assert VdgError in user_errors()


def test_the_bottom_layer_imports_nothing_from_vdg():
    for path in (PACKAGE / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
            if isinstance(node, ast.ImportFrom) and (node.level or module.startswith("vdg")) and not (
                    module.startswith("vdg.core")):
                pytest.fail(f"{path.relative_to(ROOT)} imports {node.module} (vdg.core is the bottom layer)")
            if isinstance(node, ast.Import) and any(a.name.startswith("vdg") for a in node.names):
                pytest.fail(f"{path.relative_to(ROOT)} imports vdg (vdg.core is the bottom layer)")


def test_exit_with_prints_one_line_and_exits_2(capsys):
    from vdg.core.errors import ConfigError

    with pytest.raises(SystemExit) as stop:
        exit_with(ConfigError("budget=2.0 must be in (0, 1]"))
    assert stop.value.code == USER_ERROR_STATUS == 2
    assert str(stop.value) == "error: budget=2.0 must be in (0, 1]"
    assert capsys.readouterr().err == "error: budget=2.0 must be in (0, 1]\n"


def test_a_script_reports_a_user_error_in_one_line_with_status_2(tmp_path):
    missing = tmp_path / "none.ckpt"
    result = subprocess.run([sys.executable, "scripts/knn_eval.py", f"ckpt={missing}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: checkpoint not found") and "Traceback" not in result.stderr


@pytest.mark.parametrize("change", ["dataset.num_classes=5", "probe.batchnorm=false", "method.projector_output_dim=16",
                                    "backbone.width=8"])
def test_resume_names_every_key_that_fixes_a_tensor_shape_before_loading(tiny_cfg, change):
    from vdg.core.errors import CheckpointError
    from vdg.run.driver import pretrain

    quick = ("trainer.limit_train_batches=1", "final_knn.enabled=false")
    pretrain(tiny_cfg(*quick))
    key = change.split("=")[0]
    with pytest.raises(CheckpointError, match=rf"refusing to resume .*{key.replace('.', r'[.]')}"):
        pretrain(tiny_cfg(*quick, "trainer.max_epochs=2", "resume=extend", change))


@pytest.mark.parametrize("args, expected", [
    (["budget=["], r"^error: cannot read the override 'budget=\[' \(.*\); write key=value, and quote"),
    (["budget=${oc.env:VDG_SURELY_UNSET}", "dry_run=true"],
     r"^error: .*Environment variable 'VDG_SURELY_UNSET' not found.*must name an existing config key"),
])
def test_hydra_and_omegaconf_errors_are_one_line_with_status_2(args, expected):
    result = subprocess.run([sys.executable, "scripts/pretrain.py", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={k: v for k, v in os.environ.items() if k != "VDG_TRACEBACK"})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(expected, lines[0]), result.stderr[-2000:]


def test_library_errors_from_user_input_are_translated_and_bugs_are_not():
    from omegaconf import OmegaConf

    from vdg.core.cli import as_user_error

    cfg = OmegaConf.create({"run_dir": "${nowhere}"})
    with pytest.raises(Exception) as interpolation:
        OmegaConf.to_container(cfg, resolve=True)
    translated = as_user_error(interpolation.value)
    assert isinstance(translated, VdgError) and "run_dir" in str(translated) and "nowhere" in str(translated)
    refused = as_user_error(PermissionError(13, "Permission denied", "/root/x/summary.json"))
    assert isinstance(refused, VdgError) and str(refused).startswith("/root/x/summary.json: Permission denied")
    assert as_user_error(ZeroDivisionError("a bug")) is None
    assert as_user_error(KeyError("a bug")) is None


BARE = {"ValueError", "RuntimeError", "TypeError", "KeyError"}


def test_no_bare_builtin_error_is_raised_for_user_input():
    """Every `raise ValueError/RuntimeError/...` in vdg/ is either a VdgError subclass (the user's input: one
    `error:` line) or marked `# not user input: <why>` on the line above (an API misuse or a bug: a traceback)."""
    unmarked = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = call.id if isinstance(call, ast.Name) else None
            if name in BARE and "# not user input:" not in lines[node.lineno - 2]:
                unmarked.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()[:90]}")
    assert not unmarked, "raise a VdgError subclass, or say why it is not user input:\n" + "\n".join(unmarked)
