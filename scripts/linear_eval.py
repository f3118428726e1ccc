"""Linear evaluation of a checkpoint's frozen backbone, per branch (paper Table 1; Table 2 with eval=transfer).

    python scripts/linear_eval.py ckpt=runs/.../checkpoints/last.ckpt [branch=gated] [runs=5] [augment=false]
    python scripts/linear_eval.py ckpt=PATH eval=transfer target=cifar10

Options: configs/linear_eval.yaml and configs/eval/{linear,transfer}.yaml. Writes one JSON record per branch to
<checkpoint dir>/results/ and prints a summary: one line per network (top-1 mean ± std over runs, FLOPs), or the
records with json=true. Progress (per epoch, with the time left) goes to stderr. A thin wrapper over
`vdg.eval.protocols.evaluate`.
"""

import os

# OpenMP threads that spin while they wait take the cores they wait for when the machine is shared: 2 threads at
# load 4.5 projected the default linear evaluation at 369 s, against 171 s with sleeping threads (bench_eval.py).
# The parallel regions here last milliseconds, so waking costs nothing that shows. Set before torch loads OpenMP;
# an OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from vdg.core.cli import report_user_errors  # noqa: E402
from vdg.eval.protocols import evaluate  # noqa: E402
from vdg.eval.summary import summary_lines  # noqa: E402
from vdg.run.cli import command_line  # noqa: E402

SCRIPT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # what @hydra.main reads



@hydra.main(config_path="../configs", config_name="linear_eval", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    result = evaluate(cfg)
    if cfg.json:  # the records, one JSON list, for scripts and jq
        print(json.dumps(result.records, indent=2))
    else:
        print("\n".join(summary_lines(result.records, result.paths)))


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *command_line(sys.argv[1:], "linear_eval", SCRIPT_CONFIGS)]  # checks, quotes paths
    main()
