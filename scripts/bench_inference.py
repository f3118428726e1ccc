"""Inference latency of the gated network executed dense, masked, sparse and slim: `python scripts/bench_inference.py`.

    python scripts/bench_inference.py                                   # batch 1, 2 threads, calibrated masks
    python scripts/bench_inference.py batch_size=64
    python scripts/bench_inference.py ckpt=runs/quickstart/checkpoints/last.ckpt   # the checkpoint's own masks

Options: configs/bench_inference.yaml. Prints one JSON object (`dense_ms`, `masked_ms`, `sparse_ms`, `slim_ms`,
`flops_ratio`, `latency_ratio` = sparse / dense, `max_abs_diff` sparse vs masked, ...) and appends a row to
benchmarks/inference.md. The measurement is `vdg.deploy.bench.measure`.
"""

import json
import sys

import hydra
from omegaconf import DictConfig

from vdg.core.cli import USER_ERRORS, exit_with, quote_path_values
from vdg.core.paths import script_config_dir
from vdg.deploy.bench import append_row, run_benchmark


@hydra.main(config_path=str(script_config_dir(__file__)), config_name="bench_inference", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        result = run_benchmark(cfg)
    except (*USER_ERRORS, ValueError) as err:
        exit_with(err)
    if cfg.results:
        result["results"] = str(append_row(result, cfg.results))
    print(json.dumps(result))


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *quote_path_values(sys.argv[1:])]  # ckpt=.../epoch=0009.ckpt needs no quoting
    main()
