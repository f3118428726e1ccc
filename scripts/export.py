"""Export one branch of a checkpoint as a backbone for downstream code (weights + architecture JSON):

    python scripts/export.py ckpt=runs/.../checkpoints/last.ckpt branch=gated [out_dir=DIR] [overwrite=true]

Options: configs/export.yaml. Writes <name>.pt, <name>.safetensors and <name>.json and prints their paths; load
them with `vdg.load_backbone(path)`. A thin wrapper over `vdg.deploy.export.export_backbone`.
"""

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from vdg.deploy.export import export_backbone
from vdg.run.cli import USER_ERRORS, quote_path_values
from vdg.run.config import check_bool


@hydra.main(config_path="../configs", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    for key, what in (("ckpt", "ckpt=PATH: the pretraining checkpoint"), ("branch", "branch=dense|gated")):
        if OmegaConf.is_missing(cfg, key):
            sys.exit(f"error: {what} is required")
    try:
        check_bool("overwrite", cfg.overwrite)
        paths = export_backbone(cfg.ckpt, cfg.branch, cfg.out_dir, cfg.name, bool(cfg.overwrite), cfg.expected_method)
    except (*USER_ERRORS, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(json.dumps({key: str(path) for key, path in paths.items()}, indent=2))


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *quote_path_values(sys.argv[1:])]  # ckpt=.../epoch=0009.ckpt needs no quoting
    main()
