"""Augmented pairs per second of each data backend on one dataset, as JSON lines and a small table.

    python scripts/bench_data.py dataset=digits batches=20 backends=[cpu,gpu] data.num_workers=4
    python scripts/bench_data.py dataset=folder data.root=/tmp/c10/cifar10 data.batch_size=256

`batches`, `warmup` (untimed batches first: worker start-up, caches) and `backends` are this script's options;
every other argument is a Hydra override of configs/pretrain.yaml. cpu times the full DataLoader path (workers,
transforms, collate); gpu times slicing + `GPUMultiViewAugment` on CUDA when available, else on the CPU, with
the device synchronised before each clock read. Setup (loading, decoding, the copy to the device) is reported
apart as setup_s.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vdg.core.cli import exit_on_user_error, int_option, split_options
from vdg.core.paths import CONFIG_DIR
from vdg.data.module import PretrainDataModule
from vdg.run.config import validate_pretrain_config

OPTIONS = {"batches": "20", "warmup": "2", "backends": "[cpu,gpu]"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(cfg: Any, backend: str, batches: int, warmup: int) -> dict[str, Any]:
    """Time `batches` augmented batches of one backend after `warmup` untimed ones."""
    device = torch.device("cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu")
    cfg = OmegaConf.merge(cfg, {"data": {"backend": backend}})
    start = time.perf_counter()
    module = PretrainDataModule(cfg, device=device)
    module.setup("fit")
    _sync(device)
    setup_s = time.perf_counter() - start

    loader = module.train_dataloader()
    produce = (lambda batch: module.augment(batch)) if backend == "gpu" else (lambda batch: batch)
    stream = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())  # epochs back to back
    for _ in range(warmup):
        produce(next(stream))
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        views, _labels = produce(next(stream))
    _sync(device)
    seconds = time.perf_counter() - start
    pairs = batches * module.batch_size
    return {
        "backend": backend,
        "dataset": cfg.dataset.name,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "workers": int(cfg.data.num_workers) if backend == "cpu" else 0,
        "threads": torch.get_num_threads(),
        "images_per_epoch": len(loader) * module.batch_size,
        "batch_size": module.batch_size,
        "view_shape": list(views[0].shape[1:]),
        "batches": batches,
        "seconds": round(seconds, 3),
        "pairs_per_s": round(pairs / seconds, 1),
        "setup_s": round(setup_s, 2),
    }


def main(argv: list[str]) -> list[dict[str, Any]]:
    options, overrides = split_options(argv, OPTIONS)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=overrides)
    validate_pretrain_config(cfg)
    batches, warmup = int_option(options, "batches", 1), int_option(options, "warmup")
    backends = [b.strip() for b in options["backends"].strip("[]").split(",") if b.strip()]
    unknown = sorted(set(backends) - {"cpu", "gpu"})
    if unknown:
        raise SystemExit(f"unknown backends {unknown}; allowed values: ['cpu', 'gpu']")
    rows = []
    for backend in backends:
        row = bench(cfg, backend, batches, warmup)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'backend':8} {'device':24} {'workers':>7} {'batch':>6} {'pairs/s':>10} {'setup s':>8}")
    for r in rows:
        print(
            f"{r['backend']:8} {r['device'][:24]:24} {r['workers']:>7} {r['batch_size']:>6} "
            f"{r['pairs_per_s']:>10.1f} {r['setup_s']:>8.2f}"
        )
    return rows


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
