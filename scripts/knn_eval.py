"""k-NN evaluation of a checkpoint's frozen backbone, per branch (paper Tables 3-6: k = 1, euclidean).

    python scripts/knn_eval.py ckpt=runs/.../checkpoints/last.ckpt [branch=gated] [k=20] [distance=cosine]
        [normalize=true]

Options: configs/knn_eval.yaml and configs/eval/knn.yaml. Prints and writes one JSON record per branch to
<checkpoint dir>/results/. A thin wrapper over `vdg.eval.protocols.run_evaluation`.
"""

import json
import sys

import hydra
from omegaconf import DictConfig

from vdg.eval.protocols import run_evaluation
from vdg.run.cli import USER_ERRORS


@hydra.main(config_path="../configs", config_name="knn_eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        records = run_evaluation(cfg)
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
    for record in records:
        print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
