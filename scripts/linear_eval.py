"""Linear evaluation of a checkpoint's frozen backbone, per branch (paper Table 1; Table 2 with eval=transfer).

    python scripts/linear_eval.py ckpt=runs/.../checkpoints/last.ckpt [branch=gated] [runs=5] [augment=false]
    python scripts/linear_eval.py ckpt=PATH eval=transfer target=cifar10

Options: configs/linear_eval.yaml and configs/eval/{linear,transfer}.yaml. Writes one JSON record per branch to
<checkpoint dir>/results/ and prints a summary: one line per network (top-1 mean ± std over runs, FLOPs), or the
records with json=true. Progress (per epoch, with the time left) goes to stderr. The command is
`vdg.run.evaluate` (shared with knn_eval.py).
"""

import os

# OpenMP threads that spin while they wait take the cores they wait for when the machine is shared: 2 threads at
# load 4.5 projected the default linear evaluation at 369 s, against 171 s with sleeping threads (bench_eval.py).
# The parallel regions here last milliseconds, so waking costs nothing that shows. Set before torch loads OpenMP;
# an OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from vdg.core.paths import script_config_dir  # noqa: E402
from vdg.run.evaluate import evaluation_script  # noqa: E402

if __name__ == "__main__":
    evaluation_script("linear_eval", script_config_dir(__file__))
