"""BaseMethod: the LightningModule plumbing every method shares (backbone, gate regularisers, online probes,
LARS + schedule, logging). A method subclass only says what is new: its heads and its `ssl_step`."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from vdg.core.errors import CheckpointError, ConfigError
from vdg.losses import bound_annealing, bound_channel_counts, bound_loss, budget_loss, rankme
from vdg.models import BackboneOutput, Branch, GatedResNet, network_cost
from vdg.optim import OPTIMIZERS, SCHEDULERS, build_optimizer, lars_param_groups, warmup_cosine

SYNC_BATCHNORM_SCOPES = ("backbone", "all", "none")
SYNC_BATCHNORM_DEVICES = ("cuda", "xpu", "hpu")  # where torch's SyncBatchNorm synchronises (it refuses CPUs)


def sync_batchnorm_scope(value: Any) -> str:
    """`trainer.sync_batchnorm` as one of SYNC_BATCHNORM_SCOPES; true and false keep Lightning's meaning."""
    if value is True or value is False or value is None:
        return "all" if value else "none"
    if value not in SYNC_BATCHNORM_SCOPES:
        raise ConfigError(
            f"unknown trainer.sync_batchnorm {value!r}; allowed values: {list(SYNC_BATCHNORM_SCOPES)} "
            "(true = all, false = none)"
        )
    return value


@dataclass
class StepOutput:
    """What a method's `ssl_step` returns.

    loss: the total self-supervised (+ gate) loss to minimise.
    terms: named scalars to log as `train/<name>` (loss terms, FLOPs ratio...); tensors, never floats.
    features: backbone features per branch (one view each) for the online probes; they are detached here.
    """

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    features: dict[Branch, Tensor] = field(default_factory=dict)


def build_backbone(cfg: DictConfig, branches: tuple[Branch, ...]) -> GatedResNet:
    b = cfg.backbone
    if b.name != "resnet18":
        raise ConfigError(f"unknown backbone.name {b.name!r}; allowed values: ['resnet18']")
    return GatedResNet(
        width=int(b.width),
        stem=cfg.dataset.stem,
        branches=branches,
        bn_split=b.bn_split,
        gate_reduction=int(b.gate_reduction),
        gate_temperature=float(b.gate_temperature),
        gate_bias_init=None if b.gate_bias_init is None else float(b.gate_bias_init),
        zero_init_residual=bool(b.zero_init_residual),
        block_widths=None if b.get("block_widths") is None else [int(w) for w in b.block_widths],
    )


# Validation images per process whose features give RankMe; the paper uses ~25k, and the features are kept until
# the epoch ends (10k x 512 floats = 20 MB at width 64).
RANKME_SAMPLES = 10_000


def online_probe(feature_dim: int, num_classes: int, batchnorm: bool) -> nn.Module:
    """The online linear probe of one branch: [BatchNorm1d without affine ->] Linear(feature_dim, num_classes).

    Backbone features share a large common mean next to a small spread across images (quickstart: 1.6 vs 0.3
    per dimension), which makes plain SGD on a bare linear layer unstable along that mean: the probe's loss rose
    from 2.4 to 16 within 7 epochs. Standardising the features first (as MAE's linear probe does) removes that;
    in eval mode it is a fixed per-dimension affine map, so the probe stays a linear classifier of the features.
    A config without `probe.batchnorm` (checkpoints written before it) builds the bare layer its weights fit.
    """
    linear = nn.Linear(feature_dim, num_classes)
    return nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), linear) if batchnorm else linear


class BaseMethod(pl.LightningModule):
    """Owns everything but the SSL objective.

    Subclasses set `branches` (the networks the encoder serves), build their heads in `__init__` and
    implement `ssl_step(views, targets) -> StepOutput`. Gated methods pass their gated passes' outputs to
    `gate_terms(out)` for the budget and bound losses. Heads registered as attributes are optimised
    automatically (LARS groups, see `configure_optimizers`); the online probes get their own group without
    LARS or weight decay.
    """

    name: ClassVar[str] = "base"
    branches: ClassVar[tuple[Branch, ...]] = (Branch.DENSE,)

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True)})
        self.budget = float(cfg.budget)
        self.backbone = self.build_backbone(cfg)
        self.cost = self.build_cost(cfg)
        self.probes = nn.ModuleDict()
        self._compiled = False  # set by configure_model (trainer.compile)
        if cfg.probe.enabled and cfg.dataset.get("has_labels", True):
            for branch in self.branches:
                self.probes[branch.value] = online_probe(
                    self.backbone.feature_dim, int(cfg.dataset.num_classes), bool(cfg.probe.get("batchnorm", False))
                )

    @classmethod
    def prepare_config(cls, cfg: DictConfig) -> None:
        """Resolve, in place, config values a method reads from files before the run starts (the driver calls it
        before comparing a resumed run's config). The distillation methods record their teacher here; others
        have nothing to resolve."""

    def build_backbone(self, cfg: DictConfig) -> nn.Module:
        """The encoder serving `branches`; vdg_2x overrides it with two separate encoders."""
        return build_backbone(cfg, self.branches)

    def build_cost(self, cfg: DictConfig):  # noqa: ANN201 - NetworkCost
        """Analytic MACs of the (gated) encoder at the dataset's input size."""
        return network_cost(self.backbone, int(cfg.dataset.image_size))

    # ----- the science a subclass provides -------------------------------------------------------------
    def ssl_step(self, views: list[Tensor], targets: Tensor) -> StepOutput:
        raise NotImplementedError

    # ----- shared pieces --------------------------------------------------------------------------------
    def encode(self, x: Tensor, branch: Branch) -> BackboneOutput:
        if self.cfg.trainer.get("channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x, branch)

    @property
    def bound_p(self) -> float:
        """Annealing factor p of the bound loss, from the epoch counter (so a resumed run continues it)."""
        return bound_annealing(self.current_epoch, float(self.cfg.gating.bound_alpha))

    def gate_terms(self, *gated: BackboneOutput) -> dict[str, Tensor]:
        """Budget loss (Eq. 3) + bound loss of one or more gated passes (their samples pooled into one batch).

        Takes the gated passes' `BackboneOutput`s, not their active channels: the budget loss reads the FLOPs
        ratio from the masks' sums, the bound loss the masks' L1 norms (`gating.bound_gradient`,
        `bound_channel_counts`). Returns flops_ratio, budget_loss, bound_loss (if enabled) and gate_loss, their sum.
        """
        if not gated or any(not isinstance(o, BackboneOutput) or o.masks is None for o in gated):
            # not user input: a method's author passing the wrong outputs
            raise TypeError(
                "gate_terms takes the BackboneOutput of gated passes, e.g. self.gate_terms(self.encode(x, "
                "Branch.GATED)), not their active_channels()"
            )
        g = self.cfg.gating
        active = torch.cat([o.active_channels() for o in gated])
        ratio = self.cost.flops_ratio(active)
        terms = {"flops_ratio": ratio, "budget_loss": budget_loss(ratio, self.budget, float(g.budget_weight))}
        loss = terms["budget_loss"]
        if g.bound_loss:
            gradient = str(g.get("bound_gradient", "open"))  # configs older than the key: the official default
            counts = torch.cat([bound_channel_counts(o.masks, gradient) for o in gated])
            terms["bound_loss"] = bound_loss(
                self.cost.channel_density(counts), self.budget, self.bound_p, float(g.bound_weight), str(g.bound_target)
            )
            loss = loss + terms["bound_loss"]
        terms["gate_loss"] = loss
        return terms

    def probe_loss(self, features: dict[Branch, Tensor], targets: Tensor) -> dict[str, Tensor]:
        """Cross-entropy and accuracy of each branch's online linear probe on detached features."""
        out: dict[str, Tensor] = {}
        # mean over the labelled samples (label -1: none), 0 for a batch without any; a sum and a clamped count
        # rather than `if labelled.any()`, which would read the device on the host every step
        labelled = (targets >= 0).sum().clamp(min=1)
        for branch, feats in features.items():
            if branch.value not in self.probes:
                continue
            logits = self.probes[branch.value](feats.detach())
            ce = F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum") / labelled
            out[f"probe_loss_{branch.value}"] = ce
            out[f"probe_acc_{branch.value}"] = (logits.argmax(1) == targets).float().mean()
        return out

    # ----- Lightning hooks ------------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming: refuse, in one line, a checkpoint whose online probes have another layout than this config's
        (a run started before `probe.batchnorm` existed has bare linear probes)."""
        saved = {k for k in checkpoint.get("state_dict", {}) if k.startswith("probes.")}
        expected = {f"probes.{k}" for k in self.probes.state_dict()}
        if saved and saved != expected:
            batchnorm = any(".running_mean" in k for k in saved)
            raise CheckpointError(
                f"the checkpoint's online probes ({'with' if batchnorm else 'without'} BatchNorm) do not match "
                f"probe.batchnorm={bool(self.cfg.probe.get('batchnorm', False))}; resume with "
                f"probe.batchnorm={str(batchnorm).lower()}"
            )

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        views, targets = batch
        step = self.ssl_step(list(views), targets)
        probes = self.probe_loss(step.features, targets)
        loss = step.loss + sum(v for k, v in probes.items() if k.startswith("probe_loss"))
        metrics = {f"train/{k}": v.detach() for k, v in {**step.terms, **probes}.items()}
        metrics["train/loss"] = step.loss.detach()
        # accumulated on the device, read once per epoch; sync_dist averages over processes at epoch end only
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=targets.shape[0], sync_dist=True)
        # the terms travel to callbacks (the non-finite guard) without leaving the device
        return {"loss": loss, "terms": {**step.terms, **probes}}

    def on_train_epoch_end(self) -> None:
        # p is constant over an epoch; logged here because a Python float logged per step is copied to the device
        # (a host-device synchronisation) on every step
        if self.backbone.gated:
            self.log("train/bound_p", self.bound_p, on_step=False, on_epoch=True)

    def on_validation_epoch_start(self) -> None:
        self._rank_features: dict[Branch, list[Tensor]] = {branch: [] for branch in self.branches}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, targets = batch
        metrics: dict[str, Tensor] = {}
        ranked = getattr(self, "_rank_features", {})  # filled between on_validation_epoch_start and _end
        kept = sum(len(f) for f in ranked.get(self.branches[0], []))
        for branch in self.branches:
            out = self.encode(images, branch)
            if branch in ranked and kept < RANKME_SAMPLES:
                ranked[branch].append(out.features.detach()[: RANKME_SAMPLES - kept])
            if branch.value in self.probes:
                logits = self.probes[branch.value](out.features)
                metrics[f"val/acc_{branch.value}"] = (logits.argmax(1) == targets).float().mean() * 100
            if branch is Branch.GATED:
                active = out.active_channels()
                metrics["val/flops_ratio"] = self.cost.flops_ratio(active)
                for i, d in enumerate(self.cost.channel_density(active).unbind()):
                    metrics[f"val/density_block{i}"] = d
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=targets.shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        """RankMe of each branch's backbone features over the validation images (up to `RANKME_SAMPLES` per
        process): a label-free sign of learning, and of collapse (val/rankme_<branch>, averaged over processes)."""
        for branch, parts in getattr(self, "_rank_features", {}).items():
            if parts:
                self.log(f"val/rankme_{branch.value}", rankme(torch.cat(parts)), on_step=False, on_epoch=True,
                         sync_dist=True)
        self._rank_features = {}

    def configure_model(self) -> None:
        """Prepare the model for the Trainer's processes, before DDP wraps it and builds its gradient buckets.

        1. Synchronised BatchNorm across processes (`trainer.sync_batchnorm`, `sync_batchnorm_modules`).
        2. channels_last (`trainer.channels_last`): NHWC is faster for convolutions on GPUs (tensor cores) and
           CPUs (oneDNN), ~3x for narrow nets. Converted here, not at fit start: DDP lays its gradient buckets out
           like the parameters when it wraps the model, and a later conversion costs every conv gradient a
           layout copy per step ("Grad strides do not match bucket view strides").
        3. torch.compile (`trainer.compile`) of the encoder and heads (not the probes, too small to gain).
           `nn.Module.compile` compiles in place, so state-dict keys (checkpoints) stay those of the eager model.
           The branch is an Enum constant, so dynamo builds one graph per branch (and one per train/eval mode);
           dynamic=False keeps the training graphs static when validation's last, smaller batch adds its own.
        Lightning calls this hook once per trainer entry point; each step is applied once.
        """
        synced = self._synchronise_batchnorm()
        if self.cfg.trainer.get("channels_last", False):
            self.to(memory_format=torch.channels_last)
        if not self.cfg.trainer.get("compile", False) or self._compiled:
            return
        if synced:
            rank_zero_warn(
                f"trainer.compile=true with {synced} SyncBatchNorm layers (trainer.sync_batchnorm="
                f"{self.cfg.trainer.get('sync_batchnorm', 'backbone')}): dynamo breaks the graph at each one and "
                "upstream reports failures for this combination; set trainer.sync_batchnorm=none or "
                "trainer.compile=false"
            )
        for name, module in self.named_children():
            if name != "probes":
                module.compile(dynamic=False)
        self._compiled = True

    def sync_batchnorm_modules(self, scope: str) -> list[nn.Module]:
        """The modules whose BatchNorms are synchronised across processes with `trainer.sync_batchnorm=scope`.

        backbone (default): the encoder's, gates included, so they see the global batch as the official code's
        backbone BNs do (512 images over 2 GPUs). all: the heads' too (the projector's BatchNorm1d), which is
        Lightning's sync_batchnorm=true, the official code's setting. Per-process projector statistics match the
        VICReg statistics, which are per process unless method.gather_across_processes=true. none: nothing.
        """
        if scope == "backbone":
            return [self.backbone]
        if scope == "all":
            return [m for name, m in self.named_children() if name != "probes"]
        return []

    def _synchronise_batchnorm(self) -> int:
        """Convert the BatchNorms of `sync_batchnorm_modules` to SyncBatchNorm when the Trainer runs several
        processes on devices torch synchronises (not CPUs); returns how many layers are synchronised."""
        trainer = self._trainer
        if trainer is None or trainer.world_size < 2:
            return 0
        if trainer.strategy.root_device.type not in SYNC_BATCHNORM_DEVICES:
            return 0
        scope = sync_batchnorm_scope(self.cfg.trainer.get("sync_batchnorm", "backbone"))
        for module in self.sync_batchnorm_modules(scope):
            for parent in list(module.modules()):  # in place; the new layers keep the same Parameter objects
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                        setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        return sum(isinstance(m, nn.SyncBatchNorm) for m in self.modules())

    def configure_optimizers(self) -> Any:
        o, s = self.cfg.optimizer, self.cfg.scheduler
        if o.name not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer.name {o.name!r}; allowed values: {list(OPTIMIZERS)}")
        if s.name not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler.name {s.name!r}; allowed values: {list(SCHEDULERS)}")
        scale = int(self.cfg.data.batch_size) / 256 if o.scale_lr else 1.0
        lr = float(o.lr) * scale
        modules = [(name, m) for name, m in self.named_children() if name != "probes"]
        groups = lars_param_groups(modules, float(o.weight_decay), bool(o.exclude_bias_n_norm))
        if len(self.probes):
            probe_lr = float(o.classifier_lr) * scale
            groups.append(
                {
                    "name": "probes",
                    "params": list(self.probes.parameters()),
                    "lr": probe_lr,
                    "weight_decay": 0.0,
                    "lars": False,
                }
            )
        optimizer = build_optimizer(
            str(o.name),
            groups,
            lr=lr,
            momentum=float(o.momentum),
            weight_decay=float(o.weight_decay),
            eta=float(o.get("eta", 0.02)),
            clip_lr=bool(o.get("clip_lr", True)),
        )
        if s.name == "constant":
            return optimizer
        interval = str(s.interval)
        steps = (
            1
            if interval == "epoch"
            else max(self.trainer.estimated_stepping_batches // self.trainer.max_epochs, 1)
        )
        shape = partial(
            warmup_cosine,
            warmup=float(s.warmup_epochs) * steps,
            total=float(self.trainer.max_epochs) * steps,
            start_lr=float(s.warmup_start_lr),
            base_lr=lr,
            min_lr=float(s.min_lr),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: shape(t) / lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
