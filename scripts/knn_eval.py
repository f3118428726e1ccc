"""k-NN evaluation of a checkpoint's frozen backbone, per branch (paper Tables 3-6: k = 1, euclidean).

    python scripts/knn_eval.py ckpt=runs/.../checkpoints/last.ckpt [branch=gated] [k=20] [distance=cosine]
        [normalize=true]

Options: configs/knn_eval.yaml and configs/eval/knn.yaml. Writes one JSON record per branch to
<checkpoint dir>/results/ and prints a summary: one line per network (top-1, FLOPs), or the records with
json=true. A thin wrapper over `vdg.eval.protocols.evaluate`.
"""

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vdg.core.cli import report_user_errors
from vdg.eval.protocols import evaluate
from vdg.eval.summary import summary_lines
from vdg.run.cli import command_line

SCRIPT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # what @hydra.main reads



@hydra.main(config_path="../configs", config_name="knn_eval", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    result = evaluate(cfg)
    if cfg.json:  # the records, one JSON list, for scripts and jq
        print(json.dumps(result.records, indent=2))
    else:
        print("\n".join(summary_lines(result.records, result.paths)))


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *command_line(sys.argv[1:], "knn_eval", SCRIPT_CONFIGS)]  # checks, quotes paths
    main()
