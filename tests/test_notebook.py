"""notebooks/analysis.ipynb executes top to bottom (nbclient, kernel python3) on a tiny run made here first."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from vdg.run.driver import pretrain

from .conftest import TINY, compose_config

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"
PNG = b"\x89PNG\r\n\x1a\n"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)  # clean diffs
    assert "VDG_RUN_DIR" in code[0].source and "parameters" in code[0].metadata.get("tags", [])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 1-epoch VDG run (width 4, synthetic data) with a k-NN result JSON for the Pareto plot."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("notebook") / "run"
    cfg = compose_config([*TINY, f"run_dir={run_dir}", "evaluate=[{protocol: knn}]"])
    pretrain(cfg)
    return run_dir


def test_notebook_runs_top_to_bottom_on_a_tiny_run(tiny_run, monkeypatch):
    monkeypatch.setenv("VDG_RUN_DIR", str(tiny_run))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits this environment
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails

    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert f"run: {tiny_run.resolve()}" in text
    assert "no checkpoint" not in text  # the tiny run was loaded, not retrained
    assert "gated network:" in text and "(B4,L2)" in text  # channel usage of all 8 blocks
    assert "knn-k1-euclidean" in text  # the Pareto points came from the run's k-NN record
    images = [out for cell in nb.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(images) >= 4  # curves, channel usage, Pareto, UMAP
    for name in (
        "plots/umap.png",
        "plots/pareto-knn-k1-euclidean-synthetic.png",
        "checkpoints/results/channel_usage.png",
    ):
        assert (tiny_run / name).read_bytes().startswith(PNG), name
    report = json.loads((tiny_run / "checkpoints" / "results" / "flops_report.json").read_text())
    assert report["protocol"] == "flops" and len(report["blocks"]) == 8
