"""The command of scripts/knn_eval.py and scripts/linear_eval.py: one Hydra entry point, which differs between
the two only in the config it composes (configs/knn_eval.yaml, configs/linear_eval.yaml).

It wires Hydra and prints; the evaluation itself is `vdg.eval.protocols.evaluate`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vdg.core.cli import report_user_errors
from vdg.eval.protocols import evaluate
from vdg.eval.summary import summary_lines
from vdg.run.cli import command_line


@report_user_errors
def evaluate_and_print(cfg: DictConfig) -> None:
    """Evaluate `cfg.ckpt` and print a summary (one line per network), or the records as JSON with json=true."""
    result = evaluate(cfg)
    if cfg.json:  # the records, one JSON list, for scripts and jq
        print(json.dumps(result.records, indent=2))
    else:
        print("\n".join(summary_lines(result.records, result.paths)))


def evaluation_script(config_name: str, config_dir: str | Path) -> None:
    """Run an evaluation script's command line: `python scripts/<config_name>.py ckpt=... [key=value ...]`.

    config_dir: the folder the script reads its configs from (its checkout's configs/). The command line is
    checked and its paths quoted (`command_line`) before Hydra reads it.
    """
    sys.argv = [sys.argv[0], *command_line(sys.argv[1:], config_name, config_dir)]
    hydra.main(config_path=str(config_dir), config_name=config_name, version_base="1.3")(evaluate_and_print)()
