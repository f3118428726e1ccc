"""The paper's reported numbers (Tables 1-6 of "Unifying Synergies between SSL and Dynamic Computation").

Source: the paper's table numbers, transcribed once; compute nothing here and never edit a value to fit a run.

Units: top-1 accuracy and its std in percent, FLOPs reduction F_R = 1 - gated/dense FLOPs also in **percent**
(as printed: 66.43 means 66.43%), dense FLOPs as a count per image. t_d is a fraction (0.3 means 30%).
"""

from __future__ import annotations

from dataclasses import dataclass

TABLE_NAMES: tuple[str, ...] = ("table1", "table2", "table3", "table4", "table5", "table6")

DATASET_NAMES: dict[str, str] = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "stl10": "STL-10",
    "imagenet100": "ImageNet-100",
    "imagenet1k": "ImageNet-1K",
}

# Table 1 "FLOPs" column: the dense ResNet-18 per image at the dataset's resolution (the code counts MACs).
DENSE_FLOPS: dict[str, float] = {
    "cifar10": 7.03e8,
    "stl10": 3.33e8,
    "cifar100": 7.03e8,
    "imagenet100": 1.81e9,
}


@dataclass(frozen=True)
class CellKey:
    """One branch of one model, pretrained on `pretrain_dataset`, evaluated on `dataset`, at budget t_d.

    model: a record's `method` ("vicreg", "vicreg_gating", "vdg", "bt_dual", "vdg_2x"), or "vdg_no_invariance"
    (vdg with invariance weight 0, Table 6) or "simreg" / "seed" (the KD students of Table 3: a dense network,
    so branch "dense"; pretrain_dataset is the teacher's D_Pretrain, dataset the student's D_Target).
    budget: t_d as a fraction (a KD student's: the t_d of the gate policy that shaped it); None for dense VICReg.
    """

    model: str
    branch: str  # "dense" | "gated"
    pretrain_dataset: str
    dataset: str
    budget: float | None = None


@dataclass(frozen=True)
class PaperValue:
    """A printed number: top-1 in percent, its ± (Table 1 only), and F_R in percent (gated cells only)."""

    top1: float
    std: float | None = None
    flops_reduction: float | None = None


# ---- Table 1: linear top-1, mean ± std of 5 runs ----------------------------------------------------------
_T1_VICREG = {  # Baseline-1, dense: top-1, ±
    "cifar10": (91.11, 0.03),
    "stl10": (86.15, 0.10),
    "cifar100": (65.86, 0.10),
    "imagenet100": (77.74, 0.12),
}
_T1_ROWS = [
    # dataset, t_d, | VICReg-Gating gated, ±, FLOPs R. | VDG dense, ± | VDG gated, ± | VDG FLOPs R.
    ("cifar10", 0.1, 87.75, 0.03, 85.92, 88.99, 0.04, 88.94, 0.06, 81.49),
    ("cifar10", 0.3, 89.49, 0.04, 69.27, 90.38, 0.04, 90.27, 0.03, 66.43),
    ("cifar10", 0.5, 90.70, 0.04, 51.62, 90.20, 0.02, 90.40, 0.06, 49.02),
    ("stl10", 0.1, 82.48, 0.15, 82.85, 84.29, 0.21, 83.29, 0.05, 78.34),
    ("stl10", 0.3, 84.16, 0.11, 68.38, 84.90, 0.05, 84.85, 0.04, 65.24),
    ("stl10", 0.5, 85.40, 0.20, 49.93, 85.75, 0.02, 85.72, 0.02, 48.41),
    ("cifar100", 0.1, 63.12, 0.09, 84.82, 65.21, 0.06, 64.31, 0.08, 81.71),
    ("cifar100", 0.3, 65.41, 0.09, 68.68, 65.90, 0.10, 65.64, 0.00, 66.83),
    ("cifar100", 0.5, 65.75, 0.12, 50.04, 66.41, 0.05, 66.40, 0.14, 49.06),
    ("imagenet100", 0.3, 74.04, 0.09, 67.95, 75.12, 0.07, 75.04, 0.10, 64.98),
    ("imagenet100", 0.5, 75.83, 0.07, 50.11, 76.42, 0.26, 76.24, 0.12, 47.69),
]

# ---- Table 2: transfer, linear top-1 (no std printed); "-" in the paper is None ----------------------------
_T2_ROWS = [
    # from, to, VICReg dense, (VDG dense, gated) at t_d = 10%, 30%, 50%
    ("cifar100", "stl10", 70.37, (64.69, 64.29), (65.63, 65.93), (66.52, 67.30)),
    ("cifar100", "cifar10", 80.08, (80.56, 79.92), (80.23, 80.24), (80.16, 80.09)),
    ("cifar100", "imagenet100", 39.45, (35.88, 36.31), (38.49, 38.20), (39.41, 40.68)),
    ("imagenet100", "stl10", 72.80, None, (65.86, 65.01), (67.74, 67.15)),
    ("imagenet100", "cifar10", 55.12, None, (53.38, 49.41), (54.01, 49.80)),
    ("imagenet100", "cifar100", 31.42, None, (28.81, 25.55), (28.75, 25.14)),
]
_T2_BUDGETS = (0.1, 0.3, 0.5)

# ---- Table 3: 1-NN top-1 of KD students vs our gated network (l2-normalised features) ---------------------
# "Ours" on CIFAR-100 (56.57/58.49/59.83) differs from Table 4's gated 1-NN (54.66/55.53/57.25):
# Table 3 l2-normalises features, Tables 4-6 do not. The ImageNet-100 rows equal the official k-NN JSONs.
KD_MODELS = frozenset({"simreg", "seed"})  # Table 3's distilled students (vdg.methods.simreg, vdg.methods.seed)
TABLE3_TEACHERS: dict[str, str] = {
    "simreg": "VICReg (R18), 500 ep",
    "seed": "MoCo-v2 (R50), 800 ep",
    "vdg": "VICReg (R18), 500 ep",
}
_T3_ROWS = [
    # model, D_Pretrain, D_Target, student t_d, 1-NN
    ("simreg", "cifar100", "cifar100", 0.1, 37.32),
    ("simreg", "cifar100", "cifar100", 0.3, 45.71),
    ("simreg", "cifar100", "cifar100", 0.5, 48.99),
    ("simreg", "imagenet100", "imagenet100", 0.3, 63.80),
    ("simreg", "imagenet100", "imagenet100", 0.5, 65.78),
    ("seed", "imagenet1k", "cifar100", 0.1, 31.54),
    ("seed", "imagenet1k", "cifar100", 0.3, 35.29),
    ("seed", "imagenet1k", "cifar100", 0.5, 38.22),
    ("seed", "imagenet1k", "imagenet100", 0.3, 64.38),
    ("seed", "imagenet1k", "imagenet100", 0.5, 67.50),
    ("vdg", "cifar100", "cifar100", 0.1, 56.57),  # "Ours (Gated)": D_Target = D_Pretrain
    ("vdg", "cifar100", "cifar100", 0.3, 58.49),
    ("vdg", "cifar100", "cifar100", 0.5, 59.83),
    ("vdg", "imagenet100", "imagenet100", 0.3, 65.54),
    ("vdg", "imagenet100", "imagenet100", 0.5, 67.72),
]

# ---- Tables 4-6: 1-NN top-1 (features not l2-normalised) --------------------------------------------------
# dataset, t_d, dense, gated, FLOPs R.
_VDG_KNN = [  # VICReg-Dual, 1x ResNet-18, w/ invariance: the same numbers in Tables 4, 5 and 6
    ("cifar100", 0.1, 54.92, 54.66, 81.71),
    ("cifar100", 0.3, 56.34, 55.53, 66.83),
    ("cifar100", 0.5, 56.83, 57.25, 49.06),
    ("stl10", 0.1, 76.61, 76.45, 78.27),
    ("stl10", 0.3, 78.55, 78.80, 65.17),
    ("stl10", 0.5, 79.69, 79.95, 48.39),
]
_BT_DUAL_KNN = [  # Table 4
    ("cifar100", 0.1, 53.64, 53.01, 80.60),
    ("cifar100", 0.3, 55.03, 54.89, 66.09),
    ("cifar100", 0.5, 55.63, 55.39, 47.64),
    ("stl10", 0.1, 73.45, 73.49, 76.74),
    ("stl10", 0.3, 75.51, 76.02, 64.12),
    ("stl10", 0.5, 76.99, 77.10, 48.32),
]
_VDG_2X_KNN = [  # Table 5, 2x ResNet-18
    ("cifar100", 0.1, 53.85, 52.44, 85.77),
    ("cifar100", 0.3, 55.65, 55.52, 70.07),
    ("cifar100", 0.5, 55.64, 55.71, 52.60),
    ("stl10", 0.1, 74.93, 74.89, 82.48),
    ("stl10", 0.3, 76.83, 76.71, 69.26),
    ("stl10", 0.5, 77.74, 78.00, 51.10),
]
_VDG_NO_INV_KNN = [  # Table 6, w/o invariance
    ("cifar100", 0.1, 4.06, 6.31, 93.77),
    ("cifar100", 0.3, 4.84, 4.89, 82.72),
    ("cifar100", 0.5, 2.79, 4.15, 49.05),
    ("stl10", 0.1, 11.79, 18.02, 90.71),
    ("stl10", 0.3, 12.25, 17.89, 74.96),
    ("stl10", 0.5, 12.81, 15.72, 51.91),
]


def _table1() -> dict[CellKey, PaperValue]:
    cells = {CellKey("vicreg", "dense", ds, ds): PaperValue(m, s) for ds, (m, s) in _T1_VICREG.items()}
    for ds, td, b2, b2_std, b2_fr, dense, dense_std, gated, gated_std, fr in _T1_ROWS:
        cells[CellKey("vicreg_gating", "gated", ds, ds, td)] = PaperValue(b2, b2_std, b2_fr)
        cells[CellKey("vdg", "dense", ds, ds, td)] = PaperValue(dense, dense_std)
        cells[CellKey("vdg", "gated", ds, ds, td)] = PaperValue(gated, gated_std, fr)
    return cells


def _table2() -> dict[CellKey, PaperValue]:
    cells: dict[CellKey, PaperValue] = {}
    for src, dst, vicreg, *per_budget in _T2_ROWS:
        cells[CellKey("vicreg", "dense", src, dst)] = PaperValue(vicreg)
        for td, pair in zip(_T2_BUDGETS, per_budget, strict=True):
            if pair is not None:
                cells[CellKey("vdg", "dense", src, dst, td)] = PaperValue(pair[0])
                cells[CellKey("vdg", "gated", src, dst, td)] = PaperValue(pair[1])
    return cells


def _table3() -> dict[CellKey, PaperValue]:
    return {
        CellKey(m, "dense" if m in KD_MODELS else "gated", src, dst, td): PaperValue(top1)
        for m, src, dst, td, top1 in _T3_ROWS
    }


def _dual(model: str, rows: list[tuple[str, float, float, float, float]]) -> dict[CellKey, PaperValue]:
    cells: dict[CellKey, PaperValue] = {}
    for ds, td, dense, gated, fr in rows:
        cells[CellKey(model, "dense", ds, ds, td)] = PaperValue(dense)
        cells[CellKey(model, "gated", ds, ds, td)] = PaperValue(gated, flops_reduction=fr)
    return cells


TABLE1 = _table1()
TABLE2 = _table2()
TABLE3 = _table3()
TABLE4 = {**_dual("bt_dual", _BT_DUAL_KNN), **_dual("vdg", _VDG_KNN)}
TABLE5 = {**_dual("vdg", _VDG_KNN), **_dual("vdg_2x", _VDG_2X_KNN)}
TABLE6 = {**_dual("vdg", _VDG_KNN), **_dual("vdg_no_invariance", _VDG_NO_INV_KNN)}

PAPER_TABLES: dict[str, dict[CellKey, PaperValue]] = dict(
    zip(TABLE_NAMES, (TABLE1, TABLE2, TABLE3, TABLE4, TABLE5, TABLE6), strict=True)
)
