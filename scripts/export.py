"""Export one branch of a checkpoint as a backbone for downstream code (weights + architecture JSON):

    python scripts/export.py ckpt=runs/.../checkpoints/last.ckpt branch=gated [out_dir=DIR] [overwrite=true]
    python scripts/export.py ckpt=... branch=gated execution=sparse   # load_backbone runs it sparse by default
    python scripts/export.py ckpt=... branch=gated slim=true          # the compacted gated network + its profile
    python scripts/export.py ckpt=... branch=dense format=onnx        # one .onnx, checked with onnxruntime

Options: configs/export.yaml. Writes <name>.pt, <name>.safetensors and <name>.json (+ <name>.profile.json with
slim=true) and prints their paths; load them with `vdg.load_backbone(path)`. A thin wrapper over
`vdg.deploy.export.export_backbone`.
"""

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from vdg.core.cli import USER_ERRORS, exit_with, report_user_errors
from vdg.core.paths import script_config_dir
from vdg.deploy.export import check_export_config, export_backbone
from vdg.deploy.to_onnx import read_onnx_metadata
from vdg.run.cli import command_line

SCRIPT_CONFIGS = script_config_dir(__file__)  # what @hydra.main reads



@hydra.main(config_path=str(SCRIPT_CONFIGS), config_name="export", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    try:
        check_export_config(cfg)
        paths = export_backbone(
            cfg.ckpt,
            cfg.branch,
            cfg.out_dir,
            cfg.name,
            bool(cfg.overwrite),
            cfg.expected_method,
            execution=cfg.execution,
            slim=bool(cfg.slim),
            profile_split=str(cfg.profile_split),
            data=OmegaConf.to_container(cfg.data, resolve=True),
            output_format=str(cfg.format),
        )
    except (*USER_ERRORS, FileExistsError, ValueError) as err:
        exit_with(err)
    if "onnx" in paths:  # what the graph was checked against, for people (stdout stays the paths' JSON)
        check = read_onnx_metadata(paths["onnx"])["onnx_check"]
        batches = " and ".join(str(n) for n in check["batches"])
        print(f"checked with {check['runtime']} against PyTorch at batch {batches}: max relative difference "
              f"{check['max_rel_diff']:.1e}", file=sys.stderr)
    print(json.dumps({key: str(path) for key, path in paths.items()}, indent=2))


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *command_line(sys.argv[1:], "export", SCRIPT_CONFIGS)]  # checks, quotes paths
    main()
