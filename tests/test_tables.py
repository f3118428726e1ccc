"""Tests for the paper-number transcription and the paper-layout tables built from result JSONs.

Fixture records are written into tmp_path by the tests; nothing here reads real runs.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vdg.report.mini_table import build_mini_table
from vdg.report.paper_results import (
    DENSE_FLOPS,
    PAPER_TABLES,
    TABLE1,
    TABLE2,
    TABLE3,
    TABLE4,
    TABLE5,
    TABLE6,
    CellKey,
    PaperValue,
)
from vdg.report.tables import (
    Table,
    build_table,
    describe_record,
    load_results,
    make_tables,
    record_key,
    render_csv,
    render_markdown,
    unmatched_records,
)

REPO = Path(__file__).resolve().parents[1]
_STL10_KNN = {
    "protocol": "knn",
    "k": 1,
    "distance": "euclidean",
    "pretrain_dataset": "stl10",
    "dataset": "stl10",
}


def _record(method: str, branch: str, budget: float, value: float, **extra: Any) -> dict[str, Any]:
    """A linear-eval CIFAR-10 record of the evaluation scripts' schema; `extra` overrides any field."""
    record: dict[str, Any] = {
        "protocol": "linear",
        "method": method,
        "method_config": {"invariance_weight": 25.0},
        "pretrain_dataset": "cifar10",
        "dataset": "cifar10",
        "budget": budget,
        "seed": 5,
        "branch": branch,
        "metric": "top1",
        "value": value,
        "std": 0.0,
        "runs": [value],
        "seeds": [0],
        "flops_reduction": 0.0,
        "dense_macs": 703560448,
        "gated_macs": 703560448,
        "ckpt": "runs/x/last.ckpt",
        "config_hash": "ab12cd34",
    }
    record.update(extra)
    return record


def _write(folder: Path, records: list[dict[str, Any]]) -> Path:
    for i, record in enumerate(records):
        path = folder / record["protocol"] / f"{record['method']}_{i}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
    return folder


def _cifar10_table1_records() -> list[dict[str, Any]]:
    """Every Table 1 CIFAR-10 cell; the 30% VDG gated cell has two pretraining seeds of two runs each."""
    records = [_record("vicreg", "dense", 0.3, 91.1, runs=[91.0, 91.2], std=0.14)]
    for budget, b2, b2_fr, dense in [
        (0.1, 87.75, 0.8592, 88.99),
        (0.3, 89.49, 0.6927, 90.38),
        (0.5, 90.7, 0.5162, 90.2),
    ]:
        records.append(_record("vicreg_gating", "gated", budget, b2, flops_reduction=b2_fr))
        records.append(_record("vdg", "dense", budget, dense))
    records += [
        _record("vdg", "gated", 0.1, 89.0, runs=[88.9, 89.1], flops_reduction=0.8100),
        _record("vdg", "gated", 0.30000001, 90.25, runs=[90.2, 90.3], seed=0, flops_reduction=0.6650),
        _record("vdg", "gated", 0.3, 90.35, runs=[90.3, 90.4], seed=1, flops_reduction=0.6636),
        _record("vdg", "gated", 0.5, 90.4, flops_reduction=0.4902),
    ]
    return records


def _row(table: Table, *labels: str) -> list[str]:
    """The cells (CSV form: ours, paper, Δ per column) of the row whose first cells are `labels`."""
    (row,) = [row for row in table.rows if row[: len(labels)] == list(labels)]
    return row


# ---- paper numbers -----------------------------------------------------------------------------------------


def test_paper_spot_values() -> None:
    assert TABLE1[CellKey("vdg", "gated", "cifar10", "cifar10", 0.3)] == PaperValue(90.27, 0.03, 66.43)
    assert TABLE1[CellKey("vicreg", "dense", "stl10", "stl10")] == PaperValue(86.15, 0.10)
    assert TABLE1[CellKey("vicreg_gating", "gated", "imagenet100", "imagenet100", 0.5)] == PaperValue(
        75.83, 0.07, 50.11
    )
    assert TABLE2[CellKey("vdg", "gated", "cifar100", "imagenet100", 0.5)].top1 == 40.68
    assert CellKey("vdg", "dense", "imagenet100", "stl10", 0.1) not in TABLE2  # printed "-"
    assert TABLE3[CellKey("seed", "dense", "imagenet1k", "imagenet100", 0.5)].top1 == 67.50
    assert TABLE3[CellKey("vdg", "gated", "cifar100", "cifar100", 0.1)].top1 == 56.57
    assert TABLE4[CellKey("bt_dual", "gated", "stl10", "stl10", 0.3)] == PaperValue(76.02, None, 64.12)
    assert TABLE5[CellKey("vdg_2x", "dense", "cifar100", "cifar100", 0.1)].top1 == 53.85
    assert TABLE6[CellKey("vdg_no_invariance", "gated", "stl10", "stl10", 0.1)] == PaperValue(
        18.02, flops_reduction=90.71
    )
    assert DENSE_FLOPS == {"cifar10": 7.03e8, "stl10": 3.33e8, "cifar100": 7.03e8, "imagenet100": 1.81e9}


def test_paper_table_sizes_and_shared_knn_numbers() -> None:
    sizes = {name: len(cells) for name, cells in PAPER_TABLES.items()}
    # T1: 4 VICReg + 11 rows x 3; T2: 6 VICReg + 3 pairs x 6 + 3 pairs x 4 (no 10%); T3: 15; T4-6: 2 x 12
    assert sizes == {"table1": 37, "table2": 36, "table3": 15, "table4": 24, "table5": 24, "table6": 24}
    key = CellKey("vdg", "gated", "cifar100", "cifar100", 0.5)
    assert TABLE4[key] == TABLE5[key] == TABLE6[key] == PaperValue(57.25, flops_reduction=49.06)
    assert TABLE1[key].flops_reduction == 49.06  # Table 1's linear probe shares the checkpoint's F_R


# ---- loading ----------------------------------------------------------------------------------------------


def test_load_results_recurses_and_skips_foreign_json(tmp_path: Path) -> None:
    _write(tmp_path, [_record("vdg", "gated", 0.3, 90.0)])
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "r.json").write_text(json.dumps(_record("vdg", "dense", 0.3, 89.0)))
    (tmp_path / "args.json").write_text(json.dumps({"lr": 0.3}))
    (tmp_path / "list.json").write_text("[1, 2]")
    assert sorted(r["branch"] for r in load_results(tmp_path)) == ["dense", "gated"]


def test_corrupt_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "broken_record.json").write_text('{"protocol": "linear", ')
    with pytest.raises(ValueError, match="broken_record.json"):
        load_results(tmp_path)
    with pytest.raises(ValueError, match="broken_record.json"):
        make_tables(tmp_path)


def test_missing_results_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / "nope")


def test_record_key() -> None:
    assert record_key(_record("vicreg", "dense", 0.3, 91.0)).budget is None  # VICReg's budget is irrelevant
    no_inv = _record("vdg", "gated", 0.1, 6.0, method_config={"invariance_weight": 0.0})
    assert record_key(no_inv) == CellKey("vdg_no_invariance", "gated", "cifar10", "cifar10", 0.1)
    assert record_key(_record("vdg", "gated", 0.1, 6.0)).model == "vdg"


# ---- tables -----------------------------------------------------------------------------------------------


def _table1(folder: Path) -> Table:
    return build_table("table1", load_results(_write(folder, _cifar10_table1_records())))


def test_table1_cifar10_exact_cells(tmp_path: Path) -> None:
    table = _table1(tmp_path)
    assert _row(table, "CIFAR-10", "30%") == [
        "CIFAR-10", "30%",
        "91.10 ± 0.14", "91.11 ± 0.03", "-0.01",  # VICReg dense
        "7.04E8", "7.03E8", "+0.08%",  # dense FLOPs
        "89.49", "89.49 ± 0.04", "+0.00",  # VICReg-Gating gated
        "69.27%", "69.27%", "+0.00",  # its FLOPs R.
        "90.38", "90.38 ± 0.04", "+0.00",  # VDG dense
        "90.30 ± 0.08", "90.27 ± 0.03", "+0.03",  # VDG gated: 4 runs over 2 seeds, t_d 0.30000001 included
        "66.43%", "66.43%", "+0.00",  # VDG FLOPs R.
    ]  # fmt: skip
    vdg_gated_10 = _row(table, "CIFAR-10", "10%")[17:23]  # VDG gated and its FLOPs R.
    assert vdg_gated_10 == ["89.00 ± 0.14", "88.94 ± 0.06", "+0.06", "81.00%", "81.49%", "-0.49"]
    vdg_50 = _row(table, "CIFAR-10", "50%")[14:20]
    assert vdg_50 == ["90.20", "90.20 ± 0.02", "+0.00", "90.40", "90.40 ± 0.06", "+0.00"]


def test_missing_runs_show_a_dash(tmp_path: Path) -> None:
    table = _table1(tmp_path)
    stl = _row(table, "STL-10", "10%")
    assert stl[2:8] == ["—", "86.15 ± 0.10", "—", "—", "3.33E8", "—"]
    assert stl[-3:] == ["—", "78.34%", "—"]
    empty = build_table("table2", [])
    imagenet_to_stl = empty.rows[3]
    assert imagenet_to_stl[:5] == ["ImageNet-100 → STL-10", "—", "72.80", "—", "—"]
    assert imagenet_to_stl[5:8] == ["—", "—", "—"]  # the paper printed "-" for t_d 10%


def test_seeds_aggregate_to_mean_and_std() -> None:
    knn = _STL10_KNN
    records = [
        _record("bt_dual", "dense", 0.5, 76.0, seed=1, runs=None, **knn),
        _record("bt_dual", "dense", 0.5, 77.0, seed=2, runs=None, **knn),
    ]
    row = build_table("table4", records).rows[5]
    assert row[:5] == ["STL-10", "50%", "76.50 ± 0.71", "76.99", "-0.49"]


def test_other_protocols_do_not_leak(tmp_path: Path) -> None:
    leak = {"pretrain_dataset": "cifar100", "dataset": "cifar100", "flops_reduction": 0.5}
    records = [
        _record("vdg", "gated", 0.3, 11.0, protocol="knn", k=1, distance="euclidean", **leak),
        _record("vdg", "gated", 0.3, 22.0, protocol="transfer", **leak),
        _record("vdg", "gated", 0.3, 33.0, protocol="knn", k=20, distance="euclidean", **leak),
        _record("vdg", "gated", 0.3, 44.0, protocol="knn", k=1, distance="cosine", **leak),
        _record("vdg", "gated", 0.3, 55.0, **leak),  # linear
    ]
    tables = {name: build_table(name, records) for name in ("table1", "table3", "table4")}
    assert _row(tables["table1"], "CIFAR-100", "30%")[17] == "55.00"
    assert tables["table3"].rows[11][5:8] == ["44.00", "58.49", "-14.49"]  # l2-normalised k-NN only
    vdg_cifar100_30 = tables["table4"].rows[1][11:20]  # VICReg-Dual dense, gated, FLOPs R.
    assert vdg_cifar100_30 == ["—", "56.34", "—", "11.00", "55.53", "-44.53", "50.00%", "66.83%", "-16.83"]
    assert tables["table3"].rows[0][5:8] == ["—", "37.32", "—"]  # SimReg: no student run among the records


def test_table3_kd_students_are_dense_rows_keyed_by_their_teachers_pretraining_data() -> None:
    """A SEED student distilled on CIFAR-100 from an ImageNet-1K teacher fills the "ImageNet-1K -> CIFAR-100" row."""
    cosine = {"protocol": "knn", "k": 1, "distance": "cosine", "pretrain_dataset": "cifar100", "dataset": "cifar100"}
    records = [
        _record("seed", "dense", 0.3, 36.0, teacher={"pretrain_dataset": "imagenet1k"}, **cosine),
        _record("seed", "dense", 0.5, 99.0, teacher={"pretrain_dataset": None}, **cosine),  # unknown: no row
        _record("simreg", "dense", 0.1, 40.0, teacher={"pretrain_dataset": "cifar100"}, **cosine),
        _record("simreg", "gated", 0.1, 77.0, teacher={"pretrain_dataset": "cifar100"}, **cosine),  # not a student
    ]
    rows = {(row[0], row[1], row[2], row[4]): row[5:8] for row in build_table("table3", records).rows}
    assert rows[("SEED", "ImageNet-1K", "CIFAR-100", "R18 (30%)")] == ["36.00", "35.29", "+0.71"]
    assert rows[("SEED", "ImageNet-1K", "CIFAR-100", "R18 (50%)")] == ["—", "38.22", "—"]
    assert rows[("SimReg", "CIFAR-100", "CIFAR-100", "R18 (10%)")] == ["40.00", "37.32", "+2.68"]
    assert rows[("Ours (Gated)", "CIFAR-100", "CIFAR-100", "R18 (10%)")][0] == "—"


def test_table6_splits_on_invariance_weight() -> None:
    knn = _STL10_KNN
    records = [
        _record("vdg", "gated", 0.1, 76.0, **knn),
        _record("vdg", "gated", 0.1, 18.0, method_config={"invariance_weight": 0}, **knn),
    ]
    row = build_table("table6", records).rows[3]
    assert row[5:8] == ["76.00", "76.45", "-0.45"]
    assert row[14:17] == ["18.00", "18.02", "-0.02"]


def test_render_csv_matches_table() -> None:
    table = build_table("table5", [])
    rows = list(csv.reader(io.StringIO(render_csv(table))))
    assert rows[0] == table.header and rows[1:] == table.rows
    dense_header = [f"1×ResNet-18 dense: {part}" for part in ("ours", "paper", "Δ")]
    assert rows[0][:5] == ["Dataset", "t_d", *dense_header]
    assert rows[1][:5] == ["CIFAR-100", "10%", "—", "54.92", "—"]
    assert all(len(row) == len(table.header) for row in rows)


def test_unknown_table_name_lists_allowed() -> None:
    with pytest.raises(ValueError, match="table7.*table1, table2, table3, table4, table5, table6"):
        build_table("table7", [])


def test_make_tables_writes_every_table(tmp_path: Path) -> None:
    _write(tmp_path, _cifar10_table1_records())
    paths = make_tables(tmp_path)
    expected = [f"table{i}" for i in range(1, 7)] + ["table1_mini"]
    assert sorted(paths) == sorted(f"{name}.{ext}" for name in expected for ext in ("md", "csv"))
    assert all(path.parent == tmp_path / "tables" and path.is_file() for path in paths.values())
    assert VDG_30_LINES in paths["table1.md"].read_text(encoding="utf-8")
    assert sorted(make_tables(tmp_path, tmp_path / "other", ["table4"])) == ["table4.csv", "table4.md"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "scripts/make_tables.py", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)


# Table 1's CIFAR-10 30% setting as printed: one column per network or FLOPs figure, ours / paper / Δ rows.
VDG_30_LINES = """\
| CIFAR-10 | 30% | ours | 91.10 ± 0.14 | 7.04E8 | 89.49 | 69.27% | 90.38 | 90.30 ± 0.08 | 66.43% |
|  |  | paper | 91.11 ± 0.03 | 7.03E8 | 89.49 ± 0.04 | 69.27% | 90.38 ± 0.04 | 90.27 ± 0.03 | 66.43% |
|  |  | Δ | -0.01 | +0.08% | +0.00 | +0.00 | +0.00 | +0.03 | +0.00 |"""


def test_markdown_is_one_column_per_figure_with_paper_rows_for_settings_without_runs(tmp_path: Path) -> None:
    markdown = render_markdown(_table1(tmp_path))
    lines = markdown.splitlines()
    header = lines[lines.index(next(line for line in lines if line.startswith("| Dataset")))]
    assert header == (
        "| Dataset | t_d |  | VICReg dense | VICReg FLOPs | VICReg-Gating gated | VICReg-Gating FLOPs R. | VDG dense | "
        "VDG gated | VDG FLOPs R. |"
    )  # 10 columns where the CSV has 23
    assert VDG_30_LINES in markdown
    assert "| STL-10 | 10% | paper | 86.15 ± 0.10 | 3.33E8 |" in markdown  # no run of ours: the paper's row only
    assert not [line for line in lines if line.startswith("| STL-10") and "| ours |" in line]
    assert "No result record matched" not in markdown
    assert "_No result record matched this table: it shows the paper's numbers only._" in render_markdown(
        build_table("table1", [])
    )


def test_records_that_match_no_table_are_named() -> None:
    digits = _record("vdg", "gated", 0.5, 61.7, protocol="knn", k=1, distance="euclidean",
                     pretrain_dataset="digits", dataset="digits")
    cifar = _cifar10_table1_records()
    assert unmatched_records([digits, *cifar]) == [digits]
    assert describe_record(digits) == "knn k=1 euclidean, vdg t_d 0.5 gated, digits"
    assert unmatched_records(cifar, ["table4"]) == cifar  # linear records fill no k-NN table
    assert build_table("table1", cifar).matched == len(cifar) and build_table("table4", cifar).matched == 0


def test_linear_records_without_augmentation_fill_no_paper_cell() -> None:
    cached = _record("vdg", "gated", 0.3, 99.0, augment=False, flops_reduction=0.66)
    old_style = _record("vdg", "gated", 0.3, 98.0, eval_config={"augment": False})  # before the `augment` field
    table = build_table("table1", [cached, old_style])
    assert table.matched == 0 and _row(table, "CIFAR-10", "30%")[17] == "—"
    assert describe_record(cached) == "linear (augment=false), vdg t_d 0.3 gated, cifar10"


def test_cli_says_when_records_matched_no_table(tmp_path: Path) -> None:
    digits = _record("vdg", "dense", 0.5, 73.1, protocol="knn", k=1, distance="euclidean",
                     pretrain_dataset="digits", dataset="digits")
    _write(tmp_path, [digits])
    done = _cli(str(tmp_path), "--tables", "table1,table4")
    assert done.returncode == 0, done.stderr
    assert "1 result records under" in done.stdout and "0 fill a cell above" in done.stdout
    assert "1 matched no cell of table1, table4" in done.stdout and "knn k=1 euclidean, vdg t_d 0.5 dense, digits" \
        in done.stdout


def test_cli_prints_markdown(tmp_path: Path) -> None:
    _write(tmp_path, _cifar10_table1_records())
    done = _cli(str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "### Table 1" in done.stdout and "### Table 6" in done.stdout
    assert VDG_30_LINES in done.stdout
    assert "11 result records under" in done.stdout and "; 11 fill a cell above" in done.stdout
    assert "matched no cell" not in done.stdout
    assert (tmp_path / "tables" / "table6.csv").is_file()
    subset = _cli(str(tmp_path), "--out", str(tmp_path / "o"), "--tables", "table4")
    assert subset.returncode == 0, subset.stderr
    assert "### Table 4" in subset.stdout and "### Table 1" not in subset.stdout
    assert sorted(path.name for path in (tmp_path / "o").iterdir()) == ["table4.csv", "table4.md"]
    bad = _cli(str(tmp_path), "--tables", "table9")
    assert bad.returncode != 0 and "table9" in bad.stderr


def _mini(method: str, branch: str, budget: float, value: float, seed: int, **extra: Any) -> dict[str, Any]:
    """A reduced-scale record as configs/sweep/table1_mini.yaml writes them (width 8, 500 images per class)."""
    fields = {"backbone_width": 8, "subset_per_class": 500, "pretrain_epochs": 30, "num_train": 5000,
              "num_test": 10000, "augment": False, "seed": seed, "runs": [value, value], "std": 0.0}
    return _record(method, branch, budget, value, **{**fields, **extra})


def _mini_records() -> list[dict[str, Any]]:
    records = []
    for seed, shift in ((1, 0.0), (2, 2.0)):
        records += [
            _mini("vicreg", "dense", 0.3, 50.0 + shift, seed),
            _mini("vdg", "dense", 0.3, 48.0 + shift, seed),
            _mini("vdg", "gated", 0.3, 44.0 + shift, seed, flops_reduction=0.70 + shift / 100),
            _mini("vdg", "gated", 0.3, 40.0 + shift, seed, protocol="knn", k=1, distance="euclidean",
                  flops_reduction=0.70 + shift / 100),
        ]
    records.append(_mini("vicreg_gating", "gated", 0.1, 30.0, 1, dataset="folder", pretrain_dataset="folder",
                         flops_reduction=0.88))
    return records


def test_reduced_scale_records_fill_only_the_mini_table_with_the_spread_over_seeds(tmp_path: Path) -> None:
    mini = _mini_records()
    assert build_table("table1", mini).matched == 0  # never next to the paper's numbers with a Δ
    assert unmatched_records([*mini, *_cifar10_table1_records()]) == []
    paths = make_tables(_write(tmp_path, mini), names=["table1_mini"])
    text = paths["table1_mini.md"].read_text(encoding="utf-8")
    assert "Δ" not in text.split("\n- The scales differ")[0] + text.split("| t_d |")[1]  # the note names it, no column
    assert "reduced scale" in text and "full scale" in text and "no Δ column" in text
    assert "500 train images per class" in text and "width 8" in text and "seed(s) 1, 2" in text
    rows = list(csv.reader(io.StringIO(paths["table1_mini.csv"].read_text(encoding="utf-8"))))
    assert rows[0] == ["t_d", "", "VICReg dense", "VICReg-Gating gated", "VICReg-Gating FLOPs R.", "VDG dense",
                       "VDG gated", "VDG FLOPs R."]
    linear30 = next(r for r in rows if r[:2] == ["30%", "ours, linear"])
    # mean ± sample std over the two pretraining seeds: 51 ± 1.41 (VICReg), 45 ± 1.41, F_R 71 ± 1.41
    assert linear30 == ["30%", "ours, linear", "51.00 ± 1.41 (n=2)", "—", "—", "49.00 ± 1.41 (n=2)",
                        "45.00 ± 1.41 (n=2)", "71.00 ± 1.41% (n=2)"]
    knn30 = rows[rows.index(linear30) + 1]
    assert knn30[1] == "ours, 1-NN" and knn30[6] == "41.00 ± 1.41 (n=2)"
    paper30 = rows[rows.index(linear30) + 2]
    assert paper30 == ["", "paper (full scale), linear", "91.11 ± 0.03", "89.49 ± 0.04", "69.27%", "90.38 ± 0.04",
                       "90.27 ± 0.03", "66.43%"]
    linear10 = next(r for r in rows if r[:2] == ["10%", "ours, linear"])
    assert linear10[3:5] == ["30.00", "88.00%"]  # an image folder (CIFAR-10 as JPEGs) counts; one seed: no ±
    assert "data cifar10/folder" in text


def test_mini_table_shows_the_random_init_and_raw_pixel_references_over_seeds(tmp_path: Path) -> None:
    records = _mini_records()
    plain = build_mini_table("table1_mini", records).rows
    assert not any("random init" in r[1] or "raw pixels" in r[1] for r in plain)
    for seed, shift in ((1, 0.0), (2, 1.0)):
        knn = {"protocol": "knn", "k": 1, "distance": "euclidean"}
        records += [
            _mini("vicreg", "dense", 0.3, 33.0, seed, **knn, random_init={"top1_mean": 18.0 + shift}),
            _mini("vdg", "gated", 0.1, 31.0, seed, **knn, random_init={"top1_mean": 17.0 + shift}),
            _mini("vdg", "gated", 0.5, 32.0, seed, **knn, random_init={"top1_mean": 19.0 + shift}),
            _mini("vicreg", "pixels", 0.3, 27.0 + shift, seed, **knn, features="pixels", flops_reduction=None),
        ]
    rows = build_mini_table("table1_mini", records).rows
    random_knn = next(r for r in rows if r[1] == "random init, 1-NN")
    # per column, each seed's references averaged over its budgets, then mean ± std over the seeds
    assert random_knn == ["", "random init, 1-NN", "18.50 ± 0.71 (n=2)", "—", "", "—", "18.50 ± 0.71 (n=2)", ""]
    pixels = next(r for r in rows if r[1] == "raw pixels (no network), 1-NN")
    assert pixels == ["", "raw pixels (no network), 1-NN", *(["27.50 ± 0.71 (n=2)"] * 2 + [""]) * 2]
    assert not any(r[1] in ("random init, linear", "raw pixels (no network), linear") for r in rows)  # no records
    # a trained cell keeps the trained figure (33), never the reference, and pixel records fill no network's cell
    knn30 = rows[rows.index(next(r for r in rows if r[:2] == ["30%", "ours, linear"])) + 1]
    assert knn30[:3] == ["", "ours, 1-NN", "33.00 ± 0.00 (n=2)"]
