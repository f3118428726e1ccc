"""Images per second of the linear protocol against a bare frozen feature-extraction pass on the same data.

    python scripts/bench_eval.py ckpt=runs/quickstart/checkpoints/last.ckpt [bench_epochs=3] [runs=5] [branch=both]

`bench_epochs` (timed epochs of the linear protocol, after one untimed warm-up epoch) and `repeats` (timed bare
passes) are this script's options; every other argument is a key of configs/linear_eval.yaml. Both measurements
read the checkpoint's train split and run the same branches with the same forward batch and memory layout:
- bare: the unaugmented train images, already normalised on the device, through each branch (no augmentation,
  no heads): what feature extraction alone costs;
- linear: the augmented protocol of scripts/linear_eval.py (views drawn on the device or in workers, every
  branch, `runs` heads), per epoch.
One image pass = one image through one network; the protocol's full time is projected from its epoch time.
Wall-clock figures depend on what else the machine runs: the load average and the process CPU time per epoch are
printed next to them. Prints a table, then one JSON line.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while they wait take the cores they wait for when the machine is shared: 2 threads at
# load 4.5 projected the default linear evaluation at 369 s, against 171 s with sleeping threads (bench_eval.py).
# The parallel regions here last milliseconds, so waking costs nothing that shows. Set before torch loads OpenMP;
# an OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without `pip install -e .`

from vdg.core import machine  # noqa: E402
from vdg.core.cli import USER_ERRORS, exit_with, split_options  # noqa: E402
from vdg.core.paths import CONFIG_DIR  # noqa: E402
from vdg.eval.features import channels_last, eval_mode  # noqa: E402
from vdg.eval.linear import train_linear_runs  # noqa: E402
from vdg.eval.protocols import Evaluation, linear_protocol  # noqa: E402
from vdg.eval.views import EpochFeatures  # noqa: E402

OPTIONS = {"bench_epochs": "3", "repeats": "3"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall and process-CPU seconds of a block, the device synchronised at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Clock:
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


@torch.no_grad()
def bare_pass(evaluation: Evaluation, repeats: int) -> dict[str, float]:
    """Seconds per pass of every branch over the unaugmented train split, held normalised on the device."""
    backbone, device, batch = evaluation.model.backbone, evaluation.device, int(evaluation.cfg.batch_size)
    images = torch.cat([x for x, _ in evaluation.loader("train")]).to(device)
    chunks = [x.contiguous(memory_format=torch.channels_last) for x in images.split(batch)]
    with eval_mode(backbone), channels_last(backbone):
        for x in chunks:  # warm-up: allocator, oneDNN/cuDNN kernel choice
            for branch in evaluation.branches:
                backbone(x, branch)
        with Clock(device) as clock:
            for _ in range(repeats):
                for x in chunks:
                    for branch in evaluation.branches:
                        backbone(x, branch)
    return {"images": len(images), "wall_s": clock.wall / repeats, "cpu_s": clock.cpu / repeats}


def linear_epochs(evaluation: Evaluation, epochs: int) -> dict[str, float]:
    """Seconds per epoch of the augmented linear protocol (views, every branch, every run's head)."""
    cfg, backbone, device = evaluation.cfg, evaluation.model.backbone, evaluation.device
    train = evaluation.augmented_views()
    with eval_mode(backbone), channels_last(backbone):
        test = {b: f for b, f in evaluation.all_features("test").items()}
        features = EpochFeatures(
            backbone, evaluation.branches, train.views, max(train.streams) + 1, device, torch.channels_last
        )
        stamps: list[tuple[float, float]] = []

        def stamp(_stats: Any) -> None:
            _sync(device)
            stamps.append((time.perf_counter(), time.process_time()))

        protocol = linear_protocol(OmegaConf.merge(cfg, {"epochs": epochs + 1}), train.seeds[0])
        train_linear_runs(
            features, train.labels, test, protocol, train.seeds, int(evaluation.dataset.num_classes),
            train.streams, on_epoch=stamp,
        )
    (wall0, cpu0), (wall1, cpu1) = stamps[0], stamps[-1]  # epoch 0 is the untimed warm-up
    return {
        "images": len(train.labels),
        "wall_s": (wall1 - wall0) / epochs,
        "cpu_s": (cpu1 - cpu0) / epochs,
        "backend": train.backend,
        "view_streams": max(train.streams) + 1,
    }


def main(argv: list[str]) -> int:
    options, overrides = split_options(argv, OPTIONS)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="linear_eval", overrides=overrides)
    try:
        evaluation = Evaluation(cfg)
        start = time.perf_counter()
        bare = bare_pass(evaluation, int(options["repeats"]))
        linear = linear_epochs(evaluation, int(options["bench_epochs"]))
        bench_s = time.perf_counter() - start
    except USER_ERRORS as err:
        exit_with(err)
    branches = len(evaluation.branches)
    bare_rate = bare["images"] * branches / bare["wall_s"]
    linear_rate = linear["images"] * branches / linear["wall_s"]
    epochs, runs = int(cfg.epochs), int(cfg.runs)
    row = {
        "ckpt": str(cfg.ckpt),
        "device": str(evaluation.device),
        "machine": machine.describe() if evaluation.device.type == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_1min": os.getloadavg()[0],
        "branches": [b.value for b in evaluation.branches],
        "runs": runs,
        "augment_backend": linear["backend"],
        "view_streams": linear["view_streams"],
        "train_images": bare["images"],
        "bare_image_passes_per_s": bare_rate,
        "bare_cpu_s_per_pass": bare["cpu_s"],
        "linear_image_passes_per_s": linear_rate,
        "linear_s_per_epoch": linear["wall_s"],
        "linear_cpu_s_per_epoch": linear["cpu_s"],
        "linear_over_bare": linear_rate / bare_rate,
        "projected_linear_s": epochs * linear["wall_s"],
        "bench_s": bench_s,
    }
    where = (f"{machine.cpu_model()}, oneDNN {machine.short_isa()}" if evaluation.device.type == "cpu"
             else row["machine"])
    print(f"{evaluation.dataset.name}, {bare['images']} train images, branches {row['branches']}, {runs} runs, "
          f"{evaluation.device} ({where}), {row['threads']} threads (OMP_WAIT_POLICY {row['omp_wait_policy']}), "
          f"load average {row['load_average_1min']:.1f}")
    print(f"  bare frozen features: {bare_rate:8.0f} image passes/s  ({bare['cpu_s']:.2f} CPU s per pass)")
    print(f"  linear protocol:      {linear_rate:8.0f} image passes/s  ({linear['cpu_s']:.2f} CPU s per epoch, "
          f"{linear['backend']} views, {linear['view_streams']} stream(s)) = {100 * row['linear_over_bare']:.0f}% "
          "of bare")
    print(f"  projected {epochs}-epoch linear evaluation: {row['projected_linear_s']:.0f} s "
          f"(+ loading and test features)")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
