"""Linear evaluation of a checkpoint's frozen backbone, per branch (paper Table 1; Table 2 with eval=transfer).

    python scripts/linear_eval.py ckpt=runs/.../checkpoints/last.ckpt [branch=gated] [runs=5] [augment=false]
    python scripts/linear_eval.py ckpt=PATH eval=transfer target=cifar10

Options: configs/linear_eval.yaml and configs/eval/{linear,transfer}.yaml. Prints and writes one JSON record
per branch to <checkpoint dir>/results/. A thin wrapper over `vdg.eval.protocols.run_evaluation`.
"""

import json
import sys

import hydra
from omegaconf import DictConfig

from vdg.eval.protocols import run_evaluation
from vdg.run.cli import USER_ERRORS


@hydra.main(config_path="../configs", config_name="linear_eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        records = run_evaluation(cfg)
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
    for record in records:
        print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
