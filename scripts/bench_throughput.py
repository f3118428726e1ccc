"""Training throughput of vicreg and vdg: pairs/s, s/epoch, peak memory and MFU, per data backend and compile.

    python scripts/bench_throughput.py dataset=folder data.root=/tmp/data/cifar10 steps=50      # GPU, the paper
    python scripts/bench_throughput.py dataset=synthetic backbone.width=8 data.batch_size=64 steps=5 \\
        methods=[vdg] backends=[cpu,gpu] compile=[false]                                     # CPU smoke run

Options (every other argument is a Hydra override of configs/pretrain.yaml):
    methods=[vicreg,vdg] backends=[cpu,gpu] compile=[false,true]: the grid measured, one row per cell.
    steps=20 warmup=5: timed and untimed (first: compilation, cuDNN autotuning, caches) training steps.
    fit_epochs=0: also time this many epochs of a full Lightning `Trainer.fit` (after one untimed epoch), to
        show the loop's overhead (logging, callbacks, validation) over the bare step.
    profile=false: true records a torch.profiler table of the top ops of the first cell's step.
    peak_tflops=null: the device's peak dense TFLOP/s at the run's precision, for MFU; null looks the GPU up in
        PEAK_TFLOPS (bf16/fp16 tensor cores for mixed precision, TF32 for 32-true: cuDNN convolutions use TF32).
    results=benchmarks/results.md: the markdown file rows are appended to (created with a header); none: skip.

A step is the real one: `training_step` (autocast as the Trainer would) + backward + LARS step + zero_grad, on
batches from `PretrainDataModule` (cpu: DataLoader workers and a pinned copy to the device; gpu: device slices
augmented on the device), with the device synchronised before each clock read, and cuDNN autotuning set as the
Trainer sets it (trainer.benchmark). Not timed: Lightning's loop (see fit_epochs, which reuses the cell's data
module: one device copy of the split). s/epoch = the measured time per step x steps per epoch of the chosen
dataset and batch. Each cell starts from a fresh dynamo cache (torch._dynamo.reset()), so compiled cells never
hit the recompile limit of an earlier cell and silently run eagerly.

Model FLOPs per pair = 2 FLOPs/MAC x 3 (forward + backward ~ 2 forwards) x the forward MACs of the step's
backbone passes, from `vdg.models.network_cost` (convolutions only; gates, projector and probes not counted):
dense MACs for each dense pass, and for each gated pass the realised gated MACs (F_R, measured as the mean
FLOPs ratio over the timed steps x dense MACs). MFU = model FLOP/s / peak. The gated pass is executed densely
(its masks multiply channels, they skip no work), so HFU (hardware FLOPs: every pass counted dense) is reported
too; for vicreg the two agree.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import resource
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from vdg.core import machine
from vdg.core.cli import exit_on_user_error, split_options
from vdg.core.paths import CONFIG_DIR
from vdg.data import PretrainDataModule
from vdg.methods import BaseMethod, build_method
from vdg.models import Branch
from vdg.run.callbacks import EpochTimer
from vdg.run.driver import trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {
    "methods": "[vicreg,vdg]",
    "backends": "[cpu,gpu]",
    "compile": "[false,true]",
    "steps": "20",
    "warmup": "5",
    "fit_epochs": "0",
    "profile": "false",
    "peak_tflops": "null",
    "results": "benchmarks/results.md",
}
# Peak dense (no sparsity) tensor-core TFLOP/s from NVIDIA's data sheets (half of the "with sparsity" figures),
# per precision kind: "bf16" (bf16-mixed, 16-mixed: fp16 has the same peak) and "tf32" (32-true: cuDNN runs fp32
# convolutions on TF32 tensor cores by default). Matched in this order against torch.cuda.get_device_name();
# pass peak_tflops= for anything else.
PEAK_TFLOPS = {
    "H100 NVL": {"bf16": 835.0, "tf32": 417.5},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0},
    "H200 NVL": {"bf16": 835.0, "tf32": 417.5},
    "H200": {"bf16": 989.0, "tf32": 494.5},
    "H100": {"bf16": 989.0, "tf32": 494.5},
    "A100": {"bf16": 312.0, "tf32": 156.0},
}
RESULTS_HEADER = """# Training throughput (scripts/bench_throughput.py)

One row per (method, data backend, compile) cell, appended by each run. Columns:
- date, device (GPU name, or the CPU model, the ISA oneDNN ran, 'forced' under ONEDNN_MAX_CPU_ISA, and its torch
  threads), torch version; method, data backend (cpu: DataLoader
  workers; gpu: on-device augmentation), compile (trainer.compile), dataset, backbone width, per-device batch.
- pairs/s: augmented image pairs trained per second by the bare step (training_step + backward + LARS), timed
  over `steps` steps after `warmup` untimed ones, the device synchronised before each clock read.
- s/epoch: time per step x steps per epoch of the dataset at this batch; fit s/epoch: a full Lightning
  `Trainer.fit` epoch (loop, logging, validation; blank unless fit_epochs > 0).
- peak MiB: torch.cuda.max_memory_allocated during the timed steps (GPU), or the process's peak RSS (CPU).
- MFU / HFU: model / hardware FLOP/s over the device's peak dense FLOP/s at the run's precision (bf16 tensor
  cores for mixed precision, TF32 for 32-bit; blank when unknown). Model
  FLOPs = 2 x 3 x forward MACs per pair (convolutions, `vdg.models.network_cost`) with the gated passes at their
  realised MACs (F_R); HFU counts the gated passes dense, as they execute. TFLOP/s: achieved model TFLOP/s.

Rows measured on a CPU come from smoke runs at tiny settings (they check the script; shared machines make them
noisy): compare GPU rows of the same device only.

| date | device | torch | method | backend | compile | dataset | width | batch | pairs/s | s/epoch | fit s/epoch \
| peak MiB | MFU | HFU | TFLOP/s |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def parse_list(value: str) -> list[str]:
    return [v.strip() for v in value.strip("[]").split(",") if v.strip()]


def parse_bool(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise SystemExit(f"expected true or false, got {value!r}")
    return value.lower() == "true"


def significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with the ISA oneDNN ran (a forced one marked) and the torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    forced = " forced" if os.environ.get("ONEDNN_MAX_CPU_ISA") else ""
    return f"{machine.cpu_model()} ({machine.short_isa()}{forced}, {torch.get_num_threads()} torch threads)"


def precision_kind(precision: str) -> str:
    """Which tensor-core peak a Trainer precision runs at: "bf16" (bf16 and fp16 mixed) or "tf32" (32-bit)."""
    return "tf32" if str(precision) in ("32-true", "32") else "bf16"


def peak_tflops(device: torch.device, override: str, precision: str = "bf16-mixed") -> float | None:
    if override.lower() not in ("null", "none", ""):
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peaks = next((peaks for key, peaks in PEAK_TFLOPS.items() if key in name), None)
    return None if peaks is None else peaks[precision_kind(precision)]


def autocast(cfg: DictConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast the Trainer's precision plugin would use for trainer.precision (auto: bf16 on CUDA)."""
    precision = trainer_kwargs(cfg)["precision"]
    if precision in ("bf16-mixed", "bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision in ("32-true", "32", 32):
        return contextlib.nullcontext()
    raise SystemExit(f"bench_throughput supports trainer.precision auto, bf16-mixed or 32-true, not {precision!r}")


def prepare_model(cfg: DictConfig, device: torch.device) -> tuple[BaseMethod, torch.optim.Optimizer]:
    """The method as the Trainer sets it up: configure_model (channels_last, compile), on the device, train mode,
    and its LARS optimizer. The schedule is left out (scheduler.name=constant): it needs a Trainer and does not
    change the speed."""
    model = build_method(OmegaConf.merge(cfg, {"scheduler": {"name": "constant"}}))
    model.configure_model()
    model.to(device)
    model.train()
    return model, model.configure_optimizers()


def batches(module: PretrainDataModule, device: torch.device):  # noqa: ANN201 - iterator of training batches
    """Training batches of either backend, epochs back to back, as `training_step` receives them."""
    loader = module.train_dataloader()
    for batch in itertools.chain.from_iterable(iter(loader) for _ in itertools.count()):
        if module.backend == "gpu":
            yield module.augment(batch)
        else:
            views, labels = batch
            yield [v.to(device, non_blocking=True) for v in views], labels.to(device, non_blocking=True)


def count_passes(model: BaseMethod) -> tuple[Counter, Any]:
    """Spy on `encode` (every method's backbone entry point) to count the backbone passes of a step by branch."""
    passes: Counter = Counter()
    encode = model.encode

    def counted(x, branch):  # noqa: ANN001, ANN202
        passes[Branch.parse(branch)] += 1
        return encode(x, branch)

    model.encode = counted
    return passes, lambda: delattr(model, "encode")


def train_step(model: BaseMethod, optimizer: torch.optim.Optimizer, batch: Any, amp: Any) -> dict[str, Any]:
    with amp:
        out = model.training_step(batch, 0)
    out["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def profile_steps(
    model: BaseMethod, optimizer: torch.optim.Optimizer, stream: Any, amp: Any, device: torch.device, steps: int
) -> str:
    """torch.profiler table of the top ops over `steps` steps (device time on CUDA, CPU time otherwise)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(model, optimizer, next(stream), amp)
        synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=30)


class EpochWall(pl.Callback):
    """Wall-clock seconds of each whole epoch (training, validation, hooks), the device synchronised."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def _stamp(self, module: pl.LightningModule) -> None:
        synchronize(module.device)
        self.stamps.append(time.perf_counter())

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stamp(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stamp(pl_module)


def fit_timing(cfg: DictConfig, epochs: int, module: PretrainDataModule) -> dict[str, float]:
    """Mean s/epoch of `epochs` Lightning epochs after an untimed first one (compilation, worker start-up).

    `module` is the cell's data module, already set up: a new one would hold a second device copy of the split.
    """
    wall, timer = EpochWall(), EpochTimer()
    kwargs = {**trainer_kwargs(cfg), "max_epochs": epochs + 1, "enable_progress_bar": False}
    trainer = pl.Trainer(**kwargs, callbacks=[wall, timer], logger=False, enable_checkpointing=False)
    trainer.fit(build_method(cfg), datamodule=module)
    whole = [b - a for a, b in itertools.pairwise(wall.stamps)][1:]
    return {
        "fit_s_per_epoch": round(sum(whole) / len(whole), 3),
        "fit_train_s_per_epoch": round(sum(timer.durations[1:]) / len(timer.durations[1:]), 3),
    }


def bench(cfg: DictConfig, options: dict[str, str], profile: bool) -> dict[str, Any]:
    """One cell: time `steps` training steps after `warmup`; optionally profile and time a Lightning fit."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch._dynamo.reset()  # a fresh compile cache and recompile budget per cell
    torch.backends.cudnn.benchmark = bool(trainer_kwargs(cfg)["benchmark"])
    module = PretrainDataModule(cfg, device=device)
    module.setup("fit")
    model, optimizer = prepare_model(cfg, device)
    amp = autocast(cfg, device)
    stream = batches(module, device)
    steps, warmup = int(options["steps"]), max(int(options["warmup"]), 1)

    passes, stop_counting = count_passes(model)
    start = time.perf_counter()
    train_step(model, optimizer, next(stream), amp)
    stop_counting()
    for _ in range(warmup - 1):
        train_step(model, optimizer, next(stream), amp)
    synchronize(device)
    warmup_s = time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ratio_sum = torch.zeros((), device=device)  # accumulated on the device: no host read inside the loop
    start = time.perf_counter()
    for _ in range(steps):
        out = train_step(model, optimizer, next(stream), amp)
        if "flops_ratio" in out["terms"]:
            ratio_sum += out["terms"]["flops_ratio"].detach()
    synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB

    batch = module.batch_size
    flops_ratio = float(ratio_sum) / steps if passes[Branch.GATED] else None
    dense = model.cost.dense_macs
    gated = dense * (flops_ratio or 0.0)
    model_flops = 2 * 3 * (passes[Branch.DENSE] * dense + passes[Branch.GATED] * gated)
    hardware_flops = 2 * 3 * (passes[Branch.DENSE] + passes[Branch.GATED]) * dense
    pairs_per_s = steps * batch / seconds
    precision = trainer_kwargs(cfg)["precision"]
    peak = peak_tflops(device, options["peak_tflops"], precision)
    row: dict[str, Any] = {
        "method": cfg.method.name,
        "backend": module.backend,
        "compile": bool(cfg.trainer.compile),
        "dataset": cfg.dataset.name,
        "width": int(cfg.backbone.width),
        "batch_size": batch,
        "precision": precision,
        "device": device_name(device),
        "machine": machine.describe() if device.type == "cpu" else None,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "steps": steps,
        "warmup_s": round(warmup_s, 2),
        "pairs_per_s": round(pairs_per_s, 1),
        "s_per_step": round(seconds / steps, 5),
        "steps_per_epoch": len(module.train_dataloader()),
        "s_per_epoch": round(seconds / steps * len(module.train_dataloader()), 3),
        "peak_memory_mib": round(peak_mib, 1),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        "passes_per_step": {b.value: n for b, n in passes.items()},
        "flops_ratio": None if flops_ratio is None else round(flops_ratio, 4),
        "model_gflop_per_pair": significant(model_flops / 1e9),
        "model_tflops_per_s": significant(pairs_per_s * model_flops / 1e12),
        "peak_tflops": peak,
        "mfu": None if peak is None else significant(pairs_per_s * model_flops / (peak * 1e12)),
        "hfu": None if peak is None else significant(pairs_per_s * hardware_flops / (peak * 1e12)),
    }
    if profile:
        row["profile"] = profile_steps(model, optimizer, stream, amp, device, min(steps, 10))
    fit_epochs = int(options["fit_epochs"])
    if fit_epochs > 0:
        del stream  # the step loop's batches; the data module itself is reused
        row.update(fit_timing(cfg, fit_epochs, module))
    return row


def markdown_row(r: dict[str, Any]) -> str:
    def show(value: Any, fmt: str = "{}") -> str:
        return "" if value is None else fmt.format(value)

    cells = [
        r["date"], r["device"], r["torch"], r["method"], r["backend"], str(r["compile"]).lower(), r["dataset"],
        r["width"], r["batch_size"], show(r["pairs_per_s"], "{:.1f}"), show(r["s_per_epoch"], "{:.3f}"),
        show(r.get("fit_s_per_epoch"), "{:.3f}"), show(r["peak_memory_mib"], "{:.0f}"), show(r["mfu"], "{:.3g}"),
        show(r["hfu"], "{:.3g}"), show(r["model_tflops_per_s"], "{:.3g}"),
    ]  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |\n"


def append_results(path: Path, rows: list[dict[str, Any]]) -> None:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(RESULTS_HEADER)
    with open(path, "a") as f:
        f.writelines(markdown_row(r) for r in rows)


def main(argv: list[str]) -> list[dict[str, Any]]:
    options, overrides = split_options(argv, OPTIONS)
    methods, backends = parse_list(options["methods"]), parse_list(options["backends"])
    compiles = [parse_bool(c) for c in parse_list(options["compile"])]
    if sorted(set(backends) - {"cpu", "gpu"}):
        raise SystemExit(f"unknown backends {backends}; allowed values: ['cpu', 'gpu']")
    profile = parse_bool(options["profile"])
    # training_step logs through self.log, which without a Trainer only warns; the step itself is what we time
    warnings.filterwarnings("ignore", message=".*self.log.*")
    rows = []
    for method, backend, compiled in itertools.product(methods, backends, compiles):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="pretrain", overrides=[f"method={method}", *overrides])
        cfg = OmegaConf.merge(cfg, {"data": {"backend": backend}, "trainer": {"compile": compiled}})
        row = bench(cfg, options, profile and not rows)
        table = row.pop("profile", None)
        print(json.dumps(row), flush=True)
        if table is not None:
            print(f"\ntorch.profiler, {method} / {backend} / compile={str(compiled).lower()}:\n{table}", flush=True)
        rows.append(row)
    print(f"\n{'method':8} {'backend':7} {'compile':7} {'pairs/s':>10} {'s/epoch':>8} {'peak MiB':>9} {'MFU':>6}")
    for r in rows:
        mfu = "" if r["mfu"] is None else f"{r['mfu']:.3g}"
        print(
            f"{r['method']:8} {r['backend']:7} {str(r['compile']).lower():7} {r['pairs_per_s']:>10.1f} "
            f"{r['s_per_epoch']:>8.3f} {r['peak_memory_mib']:>9.0f} {mfu:>6}"
        )
    if options["results"].lower() not in ("none", "null", ""):
        path = Path(options["results"])
        append_results(path if path.is_absolute() else ROOT / path, rows)
    return rows


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
