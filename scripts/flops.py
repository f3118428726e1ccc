"""Print the backbone's MACs as one JSON object: `python scripts/flops.py dataset=cifar10 [ckpt=PATH]`."""

import json

import hydra
from omegaconf import DictConfig

from vdg.flops_report import flops_summary


@hydra.main(config_path="../configs", config_name="flops", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(json.dumps(flops_summary(cfg)))


if __name__ == "__main__":
    main()
