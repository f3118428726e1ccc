"""Print the backbone's MACs as one JSON object: `python scripts/flops.py dataset=cifar10 [ckpt=PATH]`.

With `ckpt=PATH report=true` also the per-block channel usage of the gated network on the test split, written
to <checkpoint dir>/results/flops_report.json and channel_usage.png; with `latency=true` the measured latency
ratio of sparse over dense execution next to the FLOPs ratio (vdg.deploy.bench). Options: configs/flops.yaml.
"""

import json
import sys

import hydra
from omegaconf import DictConfig

from vdg.core.cli import report_user_errors
from vdg.core.paths import script_config_dir
from vdg.report.flops import flops_summary
from vdg.run.cli import command_line

SCRIPT_CONFIGS = script_config_dir(__file__)  # what @hydra.main reads



@hydra.main(config_path=str(SCRIPT_CONFIGS), config_name="flops", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    summary = flops_summary(cfg)
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *command_line(sys.argv[1:], "flops", SCRIPT_CONFIGS)]  # checks, quotes paths
    main()
