"""k-NN evaluation of a checkpoint's frozen backbone, per branch (paper Tables 3-6: k = 1, euclidean).

    python scripts/knn_eval.py ckpt=runs/.../checkpoints/last.ckpt [branch=gated] [k=20] [distance=cosine]
        [normalize=true]

Options: configs/knn_eval.yaml and configs/eval/knn.yaml. Writes one JSON record per branch to
<checkpoint dir>/results/ and prints a summary: one line per network (top-1, FLOPs), or the records with
json=true. The command is `vdg.run.evaluate` (shared with linear_eval.py).
"""

from vdg.core.paths import script_config_dir
from vdg.run.evaluate import evaluation_script

if __name__ == "__main__":
    evaluation_script("knn_eval", script_config_dir(__file__))
