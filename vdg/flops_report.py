"""What `scripts/flops.py` reports: dense MACs for a dataset's input size, and with a checkpoint the gated
network's realised MACs over the test split (deterministic gates). Counting itself is `vdg.models.flops`."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from vdg.models import Branch, GatedResNet, network_cost


def flops_summary(cfg: DictConfig) -> dict[str, Any]:
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
    from vdg.checkpoint import load_method, require_branch
    from vdg.data.module import eval_loader
    from vdg.eval.features import extract_features, gate_report

    model = load_method(cfg.ckpt)
    require_branch(model, Branch.GATED)
    run_cfg = model.cfg.copy()
    OmegaConf.set_struct(run_cfg, False)
    run_cfg.data = OmegaConf.merge(run_cfg.data, cfg.data)  # where the data lives on *this* machine
    test = extract_features(model.backbone, eval_loader(run_cfg, "test"), Branch.GATED)
    report = gate_report(test.active_channels, model.cost)
    return {
        "dataset": run_cfg.dataset.name,
        "image_size": int(run_cfg.dataset.image_size),
        "width": int(run_cfg.backbone.width),
        "ckpt": str(cfg.ckpt),
        "dense_macs": model.cost.dense_macs,
        "gated_macs": report["gated_macs"],
        "flops_ratio": report["flops_ratio"],
        "reduction": report["flops_reduction"],
        "density_per_block": report["density_per_block"],
    }
