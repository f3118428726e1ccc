"""What `scripts/flops.py` reports: dense MACs for a dataset's input size, and with a checkpoint the gated
network's realised MACs over the test split (deterministic gates). Counting itself is `vdg.models.flops`.

With `report=true` it also counts, per block, the channels that are always off, always on or data-dependent
over the test split (the paper's supplementary figure) and writes flops_report.json + channel_usage.png to
`<checkpoint dir>/results/`. With `latency=true` it times the gated network's sparse execution against the dense
network (`vdg.deploy.bench`) and reports the measured latency ratio next to the FLOPs ratio.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from vdg.core.errors import ConfigError
from vdg.core.options import check_bool, check_choice, check_int, check_str
from vdg.core.rundir import check_writable
from vdg.data.module import eval_loader
from vdg.deploy.bench import checkpoint_setup, measure
from vdg.eval.features import channel_usage, extract_features, gate_report
from vdg.eval.protocols import check_device, data_config, resolve_device
from vdg.eval.results import base_record, results_dir, write_json
from vdg.methods.checkpoint import load_method, require_branch
from vdg.models import Branch, GatedResNet, NetworkCost, network_cost
from vdg.report.plots import plot_channel_usage


def block_labels(cost: NetworkCost) -> list[str]:
    """ "(B1,L1)" ... "(B4,L2)": stage and block-in-stage of every block (a stage starts where the width changes)."""
    labels, stage, index, previous = [], 0, 0, None
    for block in cost.blocks:
        if block.planes != previous:
            stage, index, previous = stage + 1, 0, block.planes
        index += 1
        labels.append(f"(B{stage},L{index})")
    return labels


def block_usage(cost: NetworkCost, active_channels: Any, masks: Any) -> list[dict[str, Any]]:
    """Per block: label, channels, mean active channels, density, always off / always on / data-dependent."""
    mean_active = active_channels.float().mean(dim=0).tolist()
    rows = []
    for label, block, usage, active in zip(
        block_labels(cost), cost.blocks, channel_usage(masks), mean_active, strict=True
    ):
        rows.append({"label": label, **usage, "mean_active": active, "density": active / block.channels})
    return rows


def check_flops_config(cfg: DictConfig) -> None:
    """The options, and with report=true the results folder's permissions, before any model is built."""
    check_bool("report", cfg.get("report", False))
    if check_bool("latency", cfg.get("latency", False)):
        bench = cfg.get("bench") or {}
        for key, low in (("batch_size", 1), ("threads", 1), ("images", 1), ("rounds", 1), ("warmup", 0)):
            check_int(f"bench.{key}", bench.get(key), low)
    check_int("backbone.width", cfg.backbone.width, 4)
    check_int("dataset.image_size", cfg.dataset.image_size, 8)
    check_choice("dataset.stem", cfg.dataset.stem, ("cifar", "imagenet"))
    check_int("data.batch_size", cfg.data.batch_size, 1)
    check_device(cfg.get("device", "cpu"))
    check_str("results_dir", cfg.get("results_dir"), optional=True)
    if cfg.get("ckpt") is not None:
        check_str("ckpt", cfg.ckpt)
        if cfg.get("report", False):
            check_writable(results_dir(cfg.ckpt, cfg.get("results_dir")), "results_dir")


def flops_summary(cfg: DictConfig) -> dict[str, Any]:
    check_flops_config(cfg)
    if cfg.get("latency", False) and cfg.get("ckpt") is None:
        raise ConfigError("latency=true needs ckpt=PATH: it times the checkpoint's gated network on its own masks")
    if cfg.get("ckpt") is None:
        backbone = GatedResNet(width=int(cfg.backbone.width), stem=cfg.dataset.stem)
        cost = network_cost(backbone, int(cfg.dataset.image_size))
        return {
            "dataset": cfg.dataset.name,
            "image_size": int(cfg.dataset.image_size),
            "stem": cfg.dataset.stem,
            "width": int(cfg.backbone.width),
            "dense_macs": cost.dense_macs,
            "gate_macs": cost.gate_macs,
            "blocks_full_macs": [b.full for b in cost.blocks],
        }
    report = bool(cfg.get("report", False))
    model = load_method(cfg.ckpt)
    require_branch(model, Branch.GATED)
    run_cfg = model.cfg.copy()
    OmegaConf.set_struct(run_cfg, False)
    run_cfg.data = data_config(model.cfg, cfg)  # where the data lives on *this* machine
    device = resolve_device(str(cfg.get("device", "cpu")))
    test = extract_features(
        model.backbone, eval_loader(run_cfg, "test", int(cfg.data.batch_size)), Branch.GATED, device, keep_masks=report
    )
    gates = gate_report(test.active_channels, model.cost)
    summary = {
        "dataset": run_cfg.dataset.name,
        "image_size": int(run_cfg.dataset.image_size),
        "width": int(run_cfg.backbone.width),
        "ckpt": str(cfg.ckpt),
        "dense_macs": model.cost.dense_macs,
        "gated_macs": gates["gated_macs"],
        "flops_ratio": gates["flops_ratio"],
        "reduction": gates["flops_reduction"],
        "density_per_block": gates["density_per_block"],
    }
    if cfg.get("latency", False):
        summary.update(latency_summary(cfg))
    if report:
        summary["blocks"] = block_usage(model.cost, test.active_channels, test.masks)
        summary.update(write_report(cfg, model, summary, len(test)))
    return summary


def latency_summary(cfg: DictConfig) -> dict[str, Any]:
    """`latency_ratio` (sparse / dense execution) and the timings behind it, on the checkpoint's test images."""
    bench = cfg.bench
    data = {key: value for key, value in cfg.data.items() if value is not None and key != "batch_size"}
    setup = checkpoint_setup(cfg.ckpt, data, int(bench.images), "test")
    result = measure(
        setup,
        int(bench.batch_size),
        int(bench.threads),
        rounds=int(bench.rounds),
        warmup=int(bench.warmup),
        executions=("dense", "masked", "sparse"),
    )
    keys = ("dense_ms", "masked_ms", "sparse_ms", "flops_ratio", "latency_ratio", "max_rel_diff", "batch_size")
    return {
        "latency_ratio": result["latency_ratio"],
        "latency": {**{k: result[k] for k in keys}, "threads": result["threads"], "device": result["device"]},
    }


def write_report(cfg: DictConfig, model: Any, summary: dict[str, Any], num_test: int) -> dict[str, str]:
    """flops_report.json (a "flops" record, see `vdg.eval.results`) and channel_usage.png; their paths."""
    out = results_dir(cfg.ckpt, cfg.get("results_dir"))
    record = base_record("flops", model.cfg, summary["dataset"], "gated", cfg.ckpt, cfg)
    record.update(
        {
            "flops_reduction": summary["reduction"],
            "flops_ratio": summary["flops_ratio"],
            "dense_macs": summary["dense_macs"],
            "gated_macs": summary["gated_macs"],
            "gate_macs": model.cost.gate_macs,
            "num_test": num_test,
            "blocks": summary["blocks"],
        }
    )
    if "latency" in summary:
        record["latency"] = summary["latency"]
    report_path = write_json(record, out / "flops_report.json")
    budget = "" if model.cfg.method.name == "vicreg" else f" t_d {float(model.cfg.budget):g},"
    title = (
        f"{model.cfg.method.name}{budget} {summary['dataset']} test split: "
        f"FLOPs reduction {100 * summary['reduction']:.1f}%"
    )
    plot_path = plot_channel_usage(summary["blocks"], out / "channel_usage.png", title)
    return {"report": str(report_path), "plot": str(plot_path)}
