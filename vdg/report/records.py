"""The result records every report reads: one JSON object per evaluation, written by the evaluation protocols.

Shared by the paper tables (`tables`), the reduced-scale table (`mini_table`) and the Pareto plot, which must
all read the same files the same way. Reading only: nothing here renders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vdg.core.errors import RecordError

Record = dict[str, Any]
MISSING = "—"  # no matching run, or no number printed in the paper
BUDGET_TOL = 1e-4  # t_d 0.3 and 0.30000001 are the same budget


def load_results(results_dir: str | Path) -> list[Record]:
    """Every `*.json` under `results_dir` (recursively) whose top-level object has a "protocol" key.

    Other JSON files are skipped; a file that is not valid JSON raises RecordError naming it.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results directory not found: {root}")
    records = []
    for path in sorted(root.rglob("*.json")):
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RecordError(f"cannot parse result file {path}: {err}") from err
        if isinstance(obj, dict) and "protocol" in obj:
            records.append(obj)
    return records
