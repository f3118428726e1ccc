"""Measured inference latency of one network's executions (dense, masked, sparse, slim): scripts/bench_inference.py.

It builds or loads the networks, sets gates to a stated density profile when asked (`calibrate_gates`), times the
executions interleaved and reports medians; it never trains and never writes weights.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from vdg.core.atomic import atomic_write_text
from vdg.core.errors import ConfigError
from vdg.core.machine import aten_isa, cpu_isa, cpu_model, onednn_capped, onednn_isa, short_isa
from vdg.core.options import check_choice, check_int, check_known_keys, check_number, check_str
from vdg.core.paths import config_file
from vdg.core.rundir import check_writable
from vdg.data.datasets import SPLITS
from vdg.data.module import eval_loader
from vdg.deploy import native
from vdg.deploy.native import NativeKernelError
from vdg.deploy.slim import ChannelProfile, gated_checkpoint, profile_from_masks, slim_resnet, slim_widths
from vdg.deploy.sparse import KERNELS, BlockPath, FoldedResNet, interleaved_times
from vdg.deploy.to_onnx import EXTRA, OnnxEngine, onnx_available, onnxruntime_version
from vdg.models import Branch, GatedResNet, network_cost
from vdg.models.encoder import BranchBackbone, branch_encoder
from vdg.models.resnet import STEMS

log = logging.getLogger(__name__)

# Executions timed, in this order within a round (rotated every round): the fast engines, then the eager modules.
EXECUTIONS = (
    "dense", "dense_native", "dense_onnx", "masked", "sparse", "slim", "slim_native", "slim_onnx", "masked_onnx",
    "dense_eager", "masked_eager", "slim_eager",
)  # fmt: skip
# dense / slim: `FoldedResNet` on oneDNN's prepacked convolutions; dense_native / slim_native: the same networks on
# the compiled kernel of sparse execution with every channel on (`vdg.deploy.native`); dense_onnx / slim_onnx: the
# same networks exported to ONNX and run by onnxruntime (`vdg.deploy.to_onnx`; CPU only; left out without
# onnxruntime, and where oneDNN is capped below the CPU, since onnxruntime has no such cap). A network's latency
# (`dense_ms`, `slim_ms`) is the fastest of its engines, round by round: the gated network is never compared with
# a dense one run slower than it could be. masked_onnx: the gated network's ONNX graph (every channel computed,
# then masked), what a user of ONNX gets; reported, never a dense engine.
ENGINES = {"native": "the compiled kernel", "onnx": "onnxruntime"}  # a network's engines besides oneDNN

PLANS = ("default", "tune", "sample", "masked")  # how the sparse execution picks each block's path


@dataclass
class BenchSetup:
    """What is timed: the gated network and a dense one of the same architecture, and the images they see.

    gated / dense: single-branch `GatedResNet`s in eval mode; images [M, 3, H, W] (already normalised);
    masks: "checkpoint" (a trained network's own gates) or "calibrated" (`calibrate_gates`); notes: provenance.
    """

    gated: GatedResNet
    dense: GatedResNet
    images: Tensor
    masks: str
    notes: dict[str, Any] = field(default_factory=dict)


def _block_inputs(encoder: GatedResNet, images: Tensor, block_index: int) -> Tensor:
    """The input of block `block_index` of the gated branch (eval mode), for `images`."""
    x = encoder.maxpool(torch.relu(encoder.bn1(encoder.conv1(images), Branch.GATED)))
    for block in encoder.blocks[:block_index]:
        x, _ = block(x, Branch.GATED)
    return x


@torch.no_grad()
def calibrate_gates(encoder: GatedResNet, images: Tensor, frequency: Sequence[float | Tensor | None]) -> None:
    """Shift each gate's biases so that channel c of block b is kept for a fraction frequency[b][c] of `images`.

    frequency[b]: a float (every channel of block b, the block's density rho_b), a [C_b] tensor (per channel, e.g. a
    `ChannelProfile.frequency` of a trained network) or None (block b's gate is left as it is).

    Block by block, on the inputs the calibrated earlier blocks produce, the bias of channel c is set to minus the
    (1 - f_c) quantile of its logits over `images` (midway between two samples, so no calibration logit sits at 0);
    f_c = 1 (0) keeps the channel always on (off). Which channels a sample keeps is then decided by that sample's
    own logits, as in a trained network: samples get different masks and different numbers of active channels, and
    each channel is kept on about f_c of unseen images. The gates need a bias (`GatedResNet(...,
    gate_bias_init=0.0)`).

    A randomly initialised gate's hidden ReLUs are often dead on many images, which then all share one logit and
    cannot be told apart; so each gate's BatchNorm bias is first shifted until each hidden unit is active on 90% of
    the images (trained gates need no such help; the shift touches only the gate).
    """
    if len(frequency) != len(encoder.blocks):
        raise ConfigError(f"calibration needs one density per block ({len(encoder.blocks)}), got {len(frequency)}")
    inputs = _block_inputs(encoder, images, 0)  # block `index`'s input, carried along: one forward in all
    for index, (block, target) in enumerate(zip(encoder.blocks, frequency, strict=True)):
        if target is not None:
            _calibrate_gate(block, torch.as_tensor(target, dtype=torch.float64), inputs, index)
        if index + 1 < len(encoder.blocks):
            inputs, _ = block(inputs, Branch.GATED)  # with this block's gate as calibrated


def _calibrate_gate(block: Any, target: Tensor, inputs: Tensor, index: int) -> None:
    """`calibrate_gates` for one block, on its `inputs` [N, C_in, H, W]."""
    gate = block.gate
    if gate is None or gate.expand.bias is None:
        # not user input: bench builds its encoders with gate biases
        raise ValueError("calibrate_gates needs gates with a bias: build the encoder with gate_bias_init=0.0")
    target = target.expand(gate.out_channels)
    if ((target < 0) | (target > 1)).any():
        raise ConfigError(f"calibration densities must lie in [0, 1], got {target.tolist()} for block {index}")
    hidden = gate.bn(gate.reduce(inputs.mean(dim=(2, 3), keepdim=True))).flatten(1)  # before the ReLU
    gate.bn.bias.sub_(torch.quantile(hidden, 0.1, dim=0))
    gate.expand.bias.zero_()
    logits = gate.logits(inputs).double()  # [N, C_b]
    ordered = logits.sort(dim=0).values
    n = ordered.shape[0]
    threshold = torch.empty(gate.out_channels, dtype=torch.float64)
    for c, f in enumerate(target.tolist()):
        keep = round(f * n)  # images that keep channel c: the `keep` largest logits
        if keep >= n:
            threshold[c] = ordered[0, c] - 1e3
        elif keep <= 0:
            threshold[c] = ordered[-1, c] + 1e3
        else:
            threshold[c] = 0.5 * (ordered[n - keep - 1, c] + ordered[n - keep, c])
    gate.expand.bias.copy_((-threshold).to(gate.expand.bias.dtype))


def calibrated_setup(
    width: int,
    stem: str,
    image_size: int,
    density: float | Sequence[float | Tensor],
    num_images: int,
    calibration_images: int,
    seed: int,
) -> BenchSetup:
    """A randomly initialised ResNet-18 whose gates are calibrated to `density` on synthetic images.

    Calibration and timed images are different draws of N(0, 1) pixels (inputs as normalised images would be).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    encoder = GatedResNet(width=width, stem=stem, gate_bias_init=0.0).eval()
    blocks = len(encoder.blocks)
    per_block = [float(density)] * blocks if isinstance(density, int | float) else list(density)
    calibration = torch.randn(calibration_images, 3, image_size, image_size, generator=generator)
    calibrate_gates(encoder, calibration, per_block)
    images = torch.randn(num_images, 3, image_size, image_size, generator=generator)
    return BenchSetup(
        gated=branch_encoder(encoder, Branch.GATED),
        dense=branch_encoder(encoder, Branch.DENSE),
        images=images,
        masks="calibrated",
        notes={
            "density": [d if isinstance(d, float) else round(float(torch.as_tensor(d).mean()), 4) for d in per_block],
            "calibration_images": calibration_images,
            "seed": seed,
            "weights": "random",
        },
    )


def checkpoint_setup(
    ckpt: str | Path, data: Mapping[str, Any] | None, num_images: int, split: str = "test"
) -> BenchSetup:
    """A pretraining checkpoint's gated network (its own masks) and dense network, on its dataset's `split`.

    A method without a dense branch (vicreg_gating) is timed against a dense network of the same architecture
    with random weights: its speed does not depend on the values.
    """
    model, cfg = gated_checkpoint(ckpt, dict(data or {}))
    images = []
    for batch, _ in eval_loader(cfg, split, batch_size=min(num_images, 512), num_workers=0):
        images.append(batch)
        if sum(len(b) for b in images) >= num_images:
            break
    images = torch.cat(images)[:num_images].float()
    gated = branch_encoder(model.backbone, Branch.GATED)
    if Branch.DENSE in served_branches(model.backbone):
        dense, weights = branch_encoder(model.backbone, Branch.DENSE), "checkpoint"
    else:
        arch = gated.arch_config()
        dense = GatedResNet(
            width=arch["width"], stem=arch["stem"], branches=("dense",), block_widths=arch["block_widths"]
        ).eval()
        weights = "random (the checkpoint has no dense branch)"
    notes = {"ckpt": str(ckpt), "split": split, "method": str(model.cfg.method.name), "dense_weights": weights}
    if model.backbone.gated and "budget" in model.cfg:
        notes["budget"] = float(model.cfg.budget)
    return BenchSetup(gated=gated, dense=dense, images=images, masks="checkpoint", notes=notes)


def served_branches(backbone: Any) -> tuple[Branch, ...]:
    """Branches a method's backbone serves (vdg_2x keeps one encoder per branch)."""
    if isinstance(backbone, GatedResNet):
        return backbone.branches
    return (Branch.DENSE, Branch.GATED)


def batches(images: Tensor, batch_size: int) -> list[Tensor]:
    """`images` cut into batches of `batch_size` (cycled when there are fewer images than one batch: repeated images
    share masks, which the per-sample path groups, so `run_benchmark` refuses that)."""
    if batch_size > len(images):
        repeats = -(-batch_size // len(images))
        images = images.repeat(repeats, 1, 1, 1)[:batch_size]
    return [images[i : i + batch_size] for i in range(0, len(images) - batch_size + 1, batch_size)]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def distinct_mask_fraction(masks: Sequence[Tensor]) -> float:
    """Mean over blocks of (distinct masks / samples): 1.0 when no two samples share a block's mask."""
    return sum(torch.unique(m.bool(), dim=0).shape[0] / m.shape[0] for m in masks) / len(masks)


def measure(
    setup: BenchSetup,
    batch_size: int,
    threads: int,
    rounds: int = 15,
    warmup: int = 2,
    device: str = "cpu",
    plan: str = "default",
    executions: Sequence[str] = EXECUTIONS,
    kernel: str = "auto",
) -> dict[str, Any]:
    """Time every execution on `setup.images` in batches of `batch_size`; one JSON-ready dict.

    A round runs each execution over all batches, the executions taking turns (their order rotates every
    round), after `warmup` untimed rounds. `<execution>_ms` is the median over rounds of the time per batch.
    `dense_ms` and `slim_ms` are the medians of the per-round fastest of each network's executions (oneDNN, the
    compiled kernel, onnxruntime: `dense_onednn_ms`, `dense_native_ms`, `dense_onnx_ms`, ...), and every ratio
    against "dense" uses that per-round best. Ratios (`latency_ratio` = sparse / dense, `slim_ratio`,
    `masked_ratio`, `masked_onnx_ratio`, `*_eager` against the eager dense module) are medians of the per-round
    ratios, which machine load drifting between rounds cannot bias; on a quiet
    machine they equal the ratios of the medians.
    plan: the sparse execution's block paths: "default" (`vdg.deploy.sparse.default_path`), "tune"
    (`FoldedResNet.tune` on the first batch), "sample" or "masked" (every block). kernel: the sparse execution's
    per-sample kernel (`vdg.deploy.sparse.resolve_kernel`); dense_native and slim_native always need the compiled one.
    """
    if plan not in PLANS:
        raise ConfigError(f"unknown plan={plan!r}; allowed values: {list(PLANS)}")
    if batch_size < 1 or threads < 1 or rounds < 1:
        raise ConfigError(f"batch_size={batch_size}, threads={threads}, rounds={rounds} must be >= 1")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure(setup, batch_size, threads, rounds, warmup, device, plan, executions, kernel)
    finally:
        torch.set_num_threads(previous_threads)  # the caller's process-wide setting, as it was


@dataclass
class _Engines:
    """Everything one measurement times: the networks, their executions, and what the gated one computes."""

    inputs: list[Tensor]  # the batches, on the device
    reference: list[Any]  # the gated module's outputs (features, masks) per batch: the ground truth
    masks: list[Tensor]  # per block, the masks [N, C_b] of every image
    widths: list[int]  # the slim network's per-block widths
    sparse: FoldedResNet
    paths: list[str]  # the sparse execution's block paths at this batch size
    calls: dict[str, Callable[[Tensor], Any]]  # execution name -> one batch through it
    left_out: list[str]  # *_native executions without a compiled kernel, *_onnx ones without onnxruntime


def _measure(
    setup: BenchSetup,
    batch_size: int,
    threads: int,
    rounds: int,
    warmup: int,
    device: str,
    plan: str,
    executions: Sequence[str],
    kernel: str,
) -> dict[str, Any]:
    dev = torch.device(device)
    engines = _build_engines(setup, batch_size, dev, plan, executions, kernel, threads)
    max_abs, scale = _sparse_error(engines)
    unknown = sorted(set(executions) - set(engines.calls) - set(engines.left_out))
    if unknown or "dense" not in executions:
        raise ConfigError(f"executions must include 'dense' and come from {list(engines.calls)}; unknown: {unknown}")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    per_batch = _time_executions(engines, executions, rounds, warmup, dev)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    best = _best_engines(per_batch)

    def ratio(num: str, den: str) -> float | None:
        if num not in per_batch or den not in per_batch:
            return None
        return median(a / b for a, b in zip(per_batch[num], per_batch[den], strict=True))

    gated, sparse = setup.gated, engines.sparse
    image_size = setup.images.shape[-1]
    cost = network_cost(gated, image_size)
    active = torch.stack([m.sum(dim=1) for m in engines.masks], dim=1)
    result: dict[str, Any] = {f"{name}_ms": 1e3 * median(ts) for name, ts in per_batch.items()}
    result.update(
        {
            "flops_ratio": cost.flops_ratio(active).item(),
            "latency_ratio": ratio("sparse", "dense"),
            "slim_ratio": ratio("slim", "dense"),
            "masked_ratio": ratio("masked", "dense"),
            "masked_onnx_ratio": ratio("masked_onnx", "dense"),
            "sparse_vs_masked": ratio("sparse", "masked"),
            "latency_ratio_eager": ratio("sparse", "dense_eager"),
            "slim_ratio_eager": ratio("slim_eager", "dense_eager"),
            "max_abs_diff": max_abs,
            "max_rel_diff": max_abs / scale if scale > 0 else max_abs,
            "batch_size": batch_size,
            "threads": threads,
            "device": device_name(dev),
            "masks": setup.masks,
            "width": gated.width,
            "stem": gated.stem_kind,
            "image_size": image_size,
            "images": len(setup.images),
            "rounds": rounds,
            "plan": engines.paths,
            "plan_choice": plan,
            "kernel": sparse.kernel,
            "executions_left_out": engines.left_out,  # *_native without a compiled kernel, *_onnx without onnxruntime
            "kernel_isa": sparse.kernel_isa,  # the compiled kernel's variant (vdg.deploy.native.ISAS), None: torch
            "cpu": cpu_model(),
            "cpu_isa": native.cpu_isa() if native.available() else None,  # the widest kernel variant the CPU runs
            "onednn_isa": onednn_isa() if dev.type == "cpu" else None,  # the widest oneDNN used (ONEDNN_MAX_CPU_ISA)
            "aten_isa": aten_isa(),  # ATen's vector kernels (ATEN_CPU_CAPABILITY)
            # onnxruntime's kernels follow the CPU (no cap): its version and the CPU's ISA, when an *_onnx ran
            "onnxruntime": onnxruntime_version() if any(n.endswith("_onnx") for n in per_batch) else None,
            "engines": best,
            "density_per_block": cost.channel_density(active).tolist(),
            "slim_widths": engines.widths,
            "distinct_mask_fraction": distinct_mask_fraction(engines.masks),
            "load_avg": [None if load is None else round(load[0], 2) for load in (load_before, load_after)],
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            **{f"setup_{k}": v for k, v in setup.notes.items()},
        }
    )
    return result


def _build_engines(
    setup: BenchSetup,
    batch_size: int,
    dev: torch.device,
    plan: str,
    executions: Sequence[str],
    kernel: str,
    threads: int,
) -> _Engines:
    """The gated network's reference outputs and masks, the slim network they shape, and every execution: oneDNN
    engines (folded), the compiled kernel's (`*_native`, left out without a compiler unless kernel=native),
    onnxruntime's (`*_onnx`, left out without onnxruntime or on a GPU), the sparse execution with its `plan`, and
    the eager modules."""
    gated, dense = setup.gated.to(dev).eval(), setup.dense.to(dev).eval()
    with torch.no_grad():
        reference = [gated(b.to(dev), Branch.GATED) for b in batches(setup.images, batch_size)]
    masks = [torch.cat(block) for block in zip(*(r.masks for r in reference), strict=True)]
    profile = profile_from_masks(masks, gated.arch_config())
    widths = slim_widths(profile)
    slim = slim_resnet(widths, gated.width, gated.stem_kind).eval().to(dev)

    folded_dense = FoldedResNet(dense, Branch.DENSE).to(dev)
    folded_masked = FoldedResNet(gated, Branch.GATED).to(dev)
    masked_plan = [BlockPath.MASKED] * len(gated.blocks)
    sparse = FoldedResNet(gated, Branch.GATED, kernel=kernel).to(dev)
    folded_slim = FoldedResNet(slim, Branch.DENSE).to(dev)
    inputs = [b.to(dev) for b in batches(setup.images, batch_size)]
    native_runs: dict[str, FoldedResNet] = {}
    left_out: list[str] = []
    for name, network in (("dense_native", dense), ("slim_native", slim)):
        if name in executions:
            try:
                engine = FoldedResNet(network, Branch.DENSE, kernel="native").to(dev)
            except NativeKernelError as err:
                if kernel == "native":
                    raise NativeKernelError(
                        f"{err}\nexecutions dense_native and slim_native need it: leave them out of executions="
                    ) from None
                # kernel auto/torch: the networks' oneDNN engines are timed alone, as sparse runs the torch kernel
                log.warning("%s left out (no compiled kernel): %s", name, err)
                left_out.append(name)
                continue
            engine.set_plan(batch_size, [BlockPath.SAMPLE] * len(engine.blocks))
            native_runs[name] = engine
    onnx_runs = _onnx_engines(
        {"dense_onnx": dense, "slim_onnx": slim, "masked_onnx": gated}, executions, setup.images.shape[-1], dev,
        threads, left_out,
    )
    if plan == "tune":
        sparse.tune(inputs[0])
    elif plan != "default":
        sparse.set_plan(batch_size, [plan] * len(gated.blocks))
    paths = [p.value for p in sparse.paths(batch_size, setup.images.shape[-1])]
    calls: dict[str, Callable[[Tensor], Any]] = {
        "dense": folded_dense,
        "masked": lambda x: folded_masked.encode(x, masked_plan),
        "sparse": sparse,
        "slim": folded_slim,
        **native_runs,
        **onnx_runs,
        "dense_eager": lambda x: dense(x, Branch.DENSE),
        "masked_eager": lambda x: gated(x, Branch.GATED),
        "slim_eager": lambda x: slim(x, Branch.DENSE),
    }
    return _Engines(inputs, reference, masks, widths, sparse, paths, calls, left_out)


def _onnx_engines(
    networks: dict[str, GatedResNet],
    executions: Sequence[str],
    image_size: int,
    dev: torch.device,
    threads: int,
    left_out: list[str],
) -> dict[str, Callable[[Tensor], Any]]:
    """onnxruntime engines of the `*_onnx` executions asked for; left out (appended to `left_out`, with a warning)
    without onnxruntime or on a GPU, as the native ones are without a compiler."""
    wanted = [name for name in networks if name in executions]
    if not wanted:
        return {}
    reason = None if onnx_available() else f"onnxruntime is not installed ({EXTRA})"
    if dev.type != "cpu":
        reason = "onnxruntime engines are timed on the CPU only"
    elif onednn_capped():
        # an emulated narrower CPU (ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 one): onnxruntime's MLAS picks its
        # kernels from CPUID and has no such cap, so its times would be this CPU's, not the emulated one's
        reason = (
            f"oneDNN is capped at {short_isa()} on this {cpu_isa()} CPU and onnxruntime cannot be capped (its kernels "
            "follow the CPU): its times would not be those of the emulated CPU"
        )
    if reason is not None:
        log.warning("%s left out: %s", ", ".join(wanted), reason)
        left_out.extend(wanted)
        return {}
    runs = {}
    for name in wanted:
        network = networks[name]
        branch = Branch.GATED if network.gated else Branch.DENSE
        runs[name] = OnnxEngine(BranchBackbone(network, branch, check_inputs=False).eval(), image_size, threads)
    return runs


def _sparse_error(engines: _Engines) -> tuple[float, float]:
    """(max |sparse - gated module| over every feature, max |gated module feature|): sparse execution's error."""
    with torch.inference_mode():
        outputs = torch.cat([engines.sparse(b) for b in engines.inputs])
    expected = torch.cat([r.features for r in engines.reference])
    return (outputs - expected).abs().max().item(), expected.abs().max().item()


def _time_executions(
    engines: _Engines, executions: Sequence[str], rounds: int, warmup: int, dev: torch.device
) -> dict[str, list[float]]:
    """Seconds per batch of each execution, one value per round (the executions take turns, rotating)."""
    inputs = engines.inputs
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def over_batches(call: Callable[[Tensor], Any]) -> Callable[[], None]:
        def run() -> None:
            for x in inputs:
                call(x)
            sync()

        return run

    with torch.inference_mode():
        times = interleaved_times(
            {name: over_batches(engines.calls[name]) for name in executions if name not in engines.left_out},
            rounds,
            warmup=warmup,
            rotate=True,
        )
    return {name: [t / len(inputs) for t in ts] for name, ts in times.items()}


def _best_engines(per_batch: dict[str, list[float]]) -> dict[str, str]:
    """A network's latency is the fastest of its engines, round by round: `dense`/`slim` become that per-round
    best (their oneDNN times move to `*_onednn`); returns which engine was fastest on the median."""
    engines: dict[str, str] = {}
    for network in ("dense", "slim"):
        if network not in per_batch:
            continue
        per_batch[f"{network}_onednn"] = onednn = per_batch.pop(network)
        candidates = {"onednn": onednn}
        candidates.update({e: per_batch[f"{network}_{e}"] for e in ENGINES if f"{network}_{e}" in per_batch})
        per_batch[network] = [min(times) for times in zip(*candidates.values(), strict=True)]
        engines[network] = min(candidates, key=lambda engine: median(candidates[engine]))
    return engines


RESULTS_HEADER = """# Inference latency (scripts/bench_inference.py)

One row per run, appended by each run. Columns:
- masks: `calibrated` (random weights; gates set so that each block keeps the stated density of channels, chosen
  per sample by the sample's own logits: `vdg.deploy.bench.calibrate_gates`) or `checkpoint` (a trained
  network's own gates on its test images). FLOPs ratio: realised gated MACs over dense MACs on the timed images.
- dense / masked / sparse / slim: milliseconds per batch (median over interleaved rounds) of `FoldedResNet`
  (eval BatchNorm folded): the dense network, the gated network computing every channel then masking, the gated
  network skipping inactive channels (`plan`: path per block), and the slim dense ResNet-18 whose conv1 widths
  are the mean active channels per block. dense and slim are each the fastest, round by round, of their engines:
  oneDNN's prepacked convolutions, the compiled kernel of sparse execution with every channel on, and (rows from
  2026-12-07 on, where onnxruntime is installed) onnxruntime on the exported ONNX graph (`engines` says which won
  by median). dense eager: the `GatedResNet` module as trained (`load_backbone(...,
  execution="masked")` runs this way).
- sparse/dense, slim/dense: medians of per-round ratios against the dense network's fastest engine; sparse/dense
  eager: against the eager dense module. max rel diff: sparse features vs the masked eager reference.
- plan: the sparse execution's path per block (s = per sample, m = masked) and its kernel (native = compiled,
  with the variant it ran: avx512, avx2 or portable; `VDG_KERNEL_ISA` forces one).
- ISA: the widest instruction set oneDNN used (its verbose `isa:` line; `ONEDNN_MAX_CPU_ISA` caps it) and
  ATen's vector kernels (`ATEN_CPU_CAPABILITY`), so that a row emulating an AVX2 CPU on a wider one says so;
  onnxruntime's, where one of its engines ran (the CPU's own: it has no cap, so emulated rows leave it out).
- load: the machine's 1-minute load average before and after timing (2 cores here: above ~0.5 the machine was
  shared and the figures are noisy; a 2-thread run itself brings it towards 2).

"""


COLUMNS = (
    "date", "device", "threads", "torch", "masks", "width", "input", "batch", "FLOPs ratio", "dense ms", "masked ms",
    "sparse ms", "slim ms", "sparse/dense", "slim/dense", "dense eager ms", "sparse/dense eager", "max rel diff",
    "plan", "engines", "ISA", "load",
)  # fmt: skip


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def append_row(result: Mapping[str, Any], path: str | Path) -> Path:
    """Add `result` as one row of the markdown table at `path` (created with its header).

    The file is replaced atomically (vdg.core.atomic), so a killed run never leaves half a row, and its
    mode follows the umask."""
    path = Path(path)
    header = "| " + " | ".join(COLUMNS) + " |\n" + "|---" * len(COLUMNS) + "|\n"
    if path.exists():
        text = path.read_text()
        text += "" if not text or text.endswith("\n") else "\n"
        headers = [line for line in text.splitlines() if line.startswith("| date |")]
        if not headers or headers[-1] + "\n" != header.splitlines(keepends=True)[0]:
            # the columns changed since the last row: a new table below the old one, whose rows stay as they were
            text += "\nColumns as of " + str(result["date"]) + " (see the top of this file):\n\n" + header
    else:
        text = RESULTS_HEADER + header
    plan = result["plan"]
    plan_text = plan[0] if len(set(plan)) == 1 else ",".join(p[0] for p in plan)  # s = sample, m = masked
    load = "/".join(_fmt(v, 2) for v in result["load_avg"])
    cells = [
        result["date"],
        result["device"],
        result["threads"],
        result["torch"],
        result["masks"],
        result["width"],
        f"{result['stem']} {result['image_size']}px",
        result["batch_size"],
        _fmt(result["flops_ratio"]),
        _fmt(result.get("dense_ms"), 2),
        _fmt(result.get("masked_ms"), 2),
        _fmt(result.get("sparse_ms"), 2),
        _fmt(result.get("slim_ms"), 2),
        _fmt(result.get("latency_ratio")),
        _fmt(result.get("slim_ratio")),
        _fmt(result.get("dense_eager_ms"), 2),
        _fmt(result.get("latency_ratio_eager")),
        f"{result['max_rel_diff']:.1e}",
        plan_text
        + ("" if result.get("plan_choice", "default") == "default" else f" ({result['plan_choice']})")
        + (f", {result['kernel']}" if result.get("kernel") else "")
        + (f" ({result['kernel_isa']})" if result.get("kernel_isa") else ""),
        ", ".join(f"{k}: {v}" for k, v in result.get("engines", {}).items()),
        f"oneDNN {result.get('onednn_isa') or '?'}; ATen {result.get('aten_isa') or '?'}"
        + (f"; onnxruntime {cpu_isa()}" if result.get("onnxruntime") else ""),
        load,
    ]
    atomic_write_text(path, text + "| " + " | ".join(str(c) for c in cells) + " |\n")
    return path


def check_bench_config(cfg: Any) -> None:
    """Every option of configs/bench_inference.yaml, before any network is built or checkpoint read: an unknown
    key, a wrong type or value is one `ConfigError` line naming the key and the allowed values (as vdg.run.config
    does for pretraining)."""
    defaults = OmegaConf.load(config_file("bench_inference.yaml"))
    check_known_keys("", cfg, [k for k in defaults if k != "defaults"])
    for section in ("data", "model", "calibration"):
        check_known_keys(section, cfg.get(section) or {}, defaults[section].keys())
    if cfg.ckpt is not None:
        check_str("ckpt", cfg.ckpt)
    for key in ("batch_size", "threads", "images", "rounds"):
        check_int(key, cfg.get(key), 1)
    check_int("warmup", cfg.get("warmup"), 0)
    if cfg.images < cfg.batch_size:
        raise ConfigError(
            f"images={cfg.images} < batch_size={cfg.batch_size}: a timed batch must hold distinct images "
            "(repeated images share masks, which would flatter sparse execution); raise images"
        )
    check_choice("device", cfg.device, ("cpu", "cuda"))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible on this machine; use device=cpu")
    check_choice("plan", cfg.plan, PLANS)
    check_choice("kernel", cfg.kernel, KERNELS)
    executions = cfg.executions
    if not OmegaConf.is_list(executions) or not executions:
        raise ConfigError(f"executions={executions!r} must be a list of executions; allowed values: {list(EXECUTIONS)}")
    for execution in executions:
        check_choice("executions", execution, EXECUTIONS)
    if "dense" not in executions:
        raise ConfigError(f"executions={list(executions)} must include 'dense' (every ratio is against it)")
    native_runs = [str(e) for e in executions if str(e).endswith("_native")]
    if cfg.kernel == "torch" and native_runs:
        raise ConfigError(f"kernel=torch and executions {native_runs} contradict: those run the compiled kernel")
    check_choice("split", cfg.split, SPLITS)
    check_str("results", cfg.results, optional=True)
    data = cfg.get("data") or {}
    if data.get("root") is not None:
        check_str("data.root", data.root)
    for key in ("download", "pin_memory"):
        if data.get(key) is not None and not isinstance(data[key], bool):
            raise ConfigError(f"data.{key}={data[key]!r} must be true or false (or null)")
    if data.get("num_workers") is not None:
        check_int("data.num_workers", data.num_workers, 0)
    model, calibration = cfg.model, cfg.calibration
    check_choice("model.stem", model.stem, STEMS)
    check_int("model.width", model.width, 1)
    check_int("model.image_size", model.image_size, 8)
    check_int("calibration.images", calibration.images, 2)
    check_int("calibration.seed", calibration.seed, 0)
    if calibration.profile is not None:
        check_str("calibration.profile", calibration.profile)
    else:
        density = calibration.density
        values = list(density) if OmegaConf.is_list(density) else [density]
        if len(values) not in (1, 8):
            raise ConfigError(f"calibration.density={_plain(density)!r} must be one number in [0, 1] or 8 of them")
        for value in values:
            check_number("calibration.density", value, 0, 1, note=" (one number or 8, one per block)")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def run_benchmark(cfg: Any) -> dict[str, Any]:
    """scripts/bench_inference.py: the setup its config asks for (checkpoint or calibrated), then `measure`."""
    check_bench_config(cfg)
    if cfg.results:
        check_writable(Path(cfg.results).parent, "results")  # before minutes of timing, not after
    executions = list(cfg.executions)
    if cfg.ckpt is not None:
        data = {key: value for key, value in cfg.data.items() if value is not None}
        setup = checkpoint_setup(cfg.ckpt, data, int(cfg.images), str(cfg.split))
    else:
        setup = calibrated_setup_from_config(cfg)
    return measure(
        setup,
        int(cfg.batch_size),
        int(cfg.threads),
        rounds=int(cfg.rounds),
        warmup=int(cfg.warmup),
        device=str(cfg.device),
        plan=str(cfg.plan),
        executions=executions,
        kernel=str(cfg.kernel),
    )


def calibrated_setup_from_config(cfg: Any) -> BenchSetup:
    """`calibrated_setup` from the `model:` and `calibration:` blocks of configs/bench_inference.yaml."""
    model, calibration = cfg.model, cfg.calibration
    if calibration.profile is not None:
        profile = ChannelProfile.load(calibration.profile)
        density: Any = list(profile.frequency)
        expected = [b.mid_planes for b in GatedResNet(width=int(model.width), branches=("dense",)).blocks]
        if profile.channels != expected:
            raise ConfigError(
                f"calibration.profile has {profile.channels} channels per block; "
                f"model.width={model.width} has {expected}"
            )
    else:
        values = list(calibration.density) if OmegaConf.is_list(calibration.density) else [calibration.density]
        density = float(values[0]) if len(values) == 1 else [float(v) for v in values]
    return calibrated_setup(
        int(model.width),
        str(model.stem),
        int(model.image_size),
        density,
        int(cfg.images),
        int(calibration.images),
        int(calibration.seed),
    )
