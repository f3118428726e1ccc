"""Pretrain a method: `python scripts/pretrain.py dataset=cifar100 budget=0.3` (Hydra overrides)."""

import json

import hydra
from omegaconf import DictConfig

from vdg.train import pretrain


@hydra.main(config_path="../configs", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    summary = pretrain(cfg)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
