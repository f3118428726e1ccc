"""UMAP of a checkpoint's test features, dense and gated side by side (paper Figure 2):

    python scripts/umap_plot.py ckpt=runs/.../checkpoints/last.ckpt [max_samples=2000] [output=umap.png]

Options: configs/umap.yaml. Writes <checkpoint dir>/results/umap-<dataset>.png and prints where, or a JSON summary
with json=true.
A thin wrapper over `vdg.report.umap.umap_plot`.
"""

import json
import sys

import hydra
from omegaconf import DictConfig

from vdg.core.cli import report_user_errors
from vdg.core.paths import script_config_dir
from vdg.eval.summary import display_path
from vdg.report.umap import umap_plot
from vdg.run.cli import command_line

SCRIPT_CONFIGS = script_config_dir(__file__)  # what @hydra.main reads



@hydra.main(config_path=str(SCRIPT_CONFIGS), config_name="umap", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    summary = umap_plot(cfg)
    if cfg.json:  # the summary as one JSON object, for scripts
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"UMAP (n_neighbors {summary['n_neighbors']}) of {summary['num_samples']} {summary['dataset']} test "
            f"images, {' and '.join(summary['branches'])} side by side: {display_path(summary['plot'])}"
        )


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *command_line(sys.argv[1:], "umap", SCRIPT_CONFIGS)]  # checks, quotes paths
    main()
