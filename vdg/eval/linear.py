"""Linear evaluation of a frozen backbone (paper: 100 epochs, SGD lr 0.3, x0.1 at epochs 60 and 80).

Two trainers of linear heads on backbone features; neither touches a backbone or a data loader:
- `train_linear_on_features`: one run on features computed once (no train augmentation, `augment=false`);
- `train_linear_runs`: R runs at once on per-epoch features of augmented views (the paper's protocol), the
  R heads stacked into one batched matmul. `vdg.eval.views` makes those features.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vdg.core.errors import ConfigError
from vdg.eval.features import Features
from vdg.models.branch import Branch

INITS = ("default", "uniform")


@dataclass(frozen=True)
class LinearProtocol:
    """Hyperparameters of the linear probe (reference §1.13; the paper gives no batch size or weight decay).

    init: "default" = PyTorch's nn.Linear init; "uniform" = weights ~ U(0, 1) as the official code
        (`linear.py:~102`), bias still PyTorch's default. lr is used as given (not batch-scaled), as the
        official code. seed: head initialisation and mini-batch shuffling of `train_linear_on_features`.
    """

    epochs: int = 100
    lr: float = 0.3
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = (60, 80)
    gamma: float = 0.1
    batch_size: int = 512
    init: str = "default"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ConfigError(f"unknown linear init {self.init!r}; allowed values: {list(INITS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"linear epochs={self.epochs} and batch_size={self.batch_size} must be >= 1")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"linear milestones={self.milestones} must be increasing")


def step_lr(epoch: int, protocol: LinearProtocol) -> float:
    """LR of `epoch` (0-based) under MultiStepLR: lr * gamma^(number of milestones <= epoch)."""
    return protocol.lr * protocol.gamma ** bisect.bisect_right(protocol.milestones, epoch)


def linear_head(in_features: int, num_classes: int, init: str = "default", seed: int = 0) -> nn.Linear:
    """Linear(in_features, num_classes) initialised from its own seeded generator (global RNG untouched).

    "default" reproduces nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)); "uniform" draws weights from U(0, 1).
    """
    if init not in INITS:
        raise ConfigError(f"unknown linear init {init!r}; allowed values: {list(INITS)}")
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(in_features, num_classes)
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        low = 0.0 if init == "uniform" else -bound
        high = 1.0 if init == "uniform" else bound
        head.weight.uniform_(low, high, generator=generator)
        head.bias.uniform_(-bound, bound, generator=generator)
    return head


def make_optimizer(
    module: nn.Module, protocol: LinearProtocol
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR]:
    optimizer = torch.optim.SGD(
        module.parameters(), lr=protocol.lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(protocol.milestones), protocol.gamma)
    return optimizer, scheduler


def sgd_step(head: nn.Linear, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """One SGD step; returns (summed loss, correct predictions) as device tensors, never read on the host."""
    logits = head(x)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach() * y.shape[0], (logits.detach().argmax(dim=1) == y).sum()


@torch.no_grad()
def topk_accuracy(head: nn.Linear, features: Tensor, labels: Tensor, batch: int = 4096) -> tuple[float, ...]:
    """(top-1, top-5) accuracy in percent; top-5 becomes top-C when there are fewer than 5 classes."""
    device = head.weight.device
    k = min(5, head.out_features)
    top1 = top5 = 0
    for start in range(0, features.shape[0], batch):
        logits = head(features[start : start + batch].to(device))
        target = labels[start : start + batch].to(device)[:, None]
        ranked = logits.topk(k, dim=1).indices
        top1 += (ranked[:, :1] == target).sum().item()
        top5 += (ranked == target).any(dim=1).sum().item()
    n = features.shape[0]
    return 100.0 * top1 / n, 100.0 * top5 / n


def epoch_record(epoch: int, lr: float, loss_sum: float, correct: float, seen: int) -> dict:
    return {"epoch": epoch, "lr": lr, "loss": loss_sum / seen, "train_top1": 100.0 * correct / seen}


def train_linear_on_features(
    train: Features,
    test: Features,
    protocol: LinearProtocol,
    num_classes: int,
    device: torch.device | str | None = None,
) -> dict:
    """Linear probe on precomputed features (no train augmentation): SGD with momentum, MultiStepLR per epoch.

    Mini-batches are reshuffled every epoch by a generator seeded with `protocol.seed`, so a run is a
    function of (features, protocol). Returns {"top1", "top5"} in percent on `test`, "history" (one dict per
    epoch: epoch, lr, loss, train_top1) and the trained "head". device: where to train (None = CPU).
    The statistics of an epoch stay on the device until it ends (one host read per epoch, not per step).
    """
    device = torch.device(device or "cpu")
    x, y = train.features.to(device).float(), train.labels.to(device).long()
    head = linear_head(x.shape[1], num_classes, protocol.init, protocol.seed).to(device)
    optimizer, scheduler = make_optimizer(head, protocol)
    generator = torch.Generator().manual_seed(protocol.seed)
    history = []
    for epoch in range(protocol.epochs):
        lr = scheduler.get_last_lr()[0]
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for batch in torch.randperm(len(y), generator=generator).split(protocol.batch_size):
            batch = batch.to(device)
            batch_loss, batch_correct = sgd_step(head, optimizer, x[batch], y[batch])
            loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
        scheduler.step()
        history.append(epoch_record(epoch, lr, loss_sum.item(), correct.item(), len(y)))
    top1, top5 = topk_accuracy(head, test.features.float(), test.labels.long())
    return {"top1": top1, "top5": top5, "history": history, "head": head}


# ------------------------------------------------------------------------------ several runs at once
class StackedLinearHeads(nn.Module):
    """R independent linear heads as one [R, C, D] weight and [R, C] bias: one batched matmul serves all runs.

    Head r starts exactly as `linear_head(D, C, init, seeds[r])`. Each run's loss depends on its own head only
    and SGD (momentum, weight decay) acts elementwise, so one optimizer over the stacked tensors updates every
    head exactly as its own optimizer would. forward: x [R, B, D] (run r's mini-batch in row r) -> [R, B, C].
    """

    def __init__(self, in_features: int, num_classes: int, seeds: Sequence[int], init: str = "default") -> None:
        super().__init__()
        heads = [linear_head(in_features, num_classes, init, seed) for seed in seeds]
        self.weight = nn.Parameter(torch.stack([h.weight.detach() for h in heads]))
        self.bias = nn.Parameter(torch.stack([h.bias.detach() for h in heads]))

    @property
    def runs(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    def head(self, run: int) -> nn.Linear:
        """Run `run`'s head as a plain nn.Linear (a copy)."""
        out_features, in_features = self.weight.shape[1:]
        linear = nn.Linear(in_features, out_features).to(self.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight[run])
            linear.bias.copy_(self.bias[run])
        return linear


@dataclass
class EpochStats:
    """What one epoch of `train_linear_runs` reports: per branch, the mean over runs of loss and train top-1."""

    epoch: int  # 0-based
    epochs: int
    lr: float
    loss: dict[Branch, float]
    train_top1: dict[Branch, float]


@torch.no_grad()
def stacked_topk(heads: StackedLinearHeads, features: Tensor, labels: Tensor, batch: int = 4096) -> tuple[list, list]:
    """Per-run (top-1, top-5) in percent of every head on the same test features; top-5 is top-C below 5 classes."""
    device = heads.weight.device
    k = min(5, heads.weight.shape[1])
    top1 = torch.zeros(heads.runs, device=device)
    top5 = torch.zeros(heads.runs, device=device)
    for start in range(0, features.shape[0], batch):
        x = features[start : start + batch].to(device).float()
        target = labels[start : start + batch].to(device).long()[None, :, None]
        ranked = heads(x.expand(heads.runs, *x.shape)).topk(k, dim=2).indices  # [R, B, k]
        top1 += (ranked[..., :1] == target).sum(dim=(1, 2))
        top5 += (ranked == target).any(dim=2).sum(dim=1)
    n = features.shape[0]
    return (100.0 * top1 / n).tolist(), (100.0 * top5 / n).tolist()


def train_linear_runs(
    epoch_features: Callable[[int], Mapping[Branch, Tensor]],
    labels: Tensor,
    test: Mapping[Branch, Features],
    protocol: LinearProtocol,
    seeds: Sequence[int],
    num_classes: int,
    streams: Sequence[int] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> dict[Branch, dict]:
    """`len(seeds)` linear-probe runs per branch, trained together on per-epoch features of augmented views.

    epoch_features(epoch) -> {branch: [S, N, D]}: the backbone features of S independently augmented copies of
        the N train images (in dataset order) for that epoch, on the training device. labels: [N] on that device.
    streams: run r reads copy streams[r] (default: every run reads copy 0, i.e. the runs share the views).
    What is each run's own: the head initialisation (seeds[r]), the order and composition of its mini-batches
    (a generator seeded with seeds[r], reshuffled every epoch) and, when streams differ, its augmented views.
    Every epoch each run sees every image once, in batches of protocol.batch_size (the last one smaller).
    Statistics stay on the device during an epoch; `on_epoch` gets one `EpochStats` after each.
    Returns per branch {"top1": [R], "top5": [R] (percent on `test`), "history": per run a list of epoch
    records (epoch, lr, loss, train_top1), "heads": the `StackedLinearHeads`}.
    """
    device = labels.device
    runs, n = len(seeds), labels.shape[0]
    streams = torch.as_tensor(list(streams) if streams is not None else [0] * runs, device=device)
    if streams.shape != (runs,):
        # not user input: the linear protocol's own streams
        raise ValueError(f"streams must give one copy index per run ({runs}), got {streams.tolist()}")
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    heads: dict[Branch, StackedLinearHeads] = {}
    optimizers: dict[Branch, tuple] = {}
    history: dict[Branch, list[list[dict]]] = {}
    for branch, feats in test.items():
        heads[branch] = StackedLinearHeads(feats.features.shape[1], num_classes, seeds, protocol.init).to(device)
        optimizers[branch] = make_optimizer(heads[branch], protocol)
        history[branch] = [[] for _ in seeds]
    for epoch in range(protocol.epochs):
        lr = step_lr(epoch, protocol)
        features = epoch_features(epoch)
        # each run's own permutation of the N images: [R, N], split into the epoch's mini-batches
        order = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)
        stats_loss, stats_top1 = {}, {}
        for branch, head in heads.items():
            optimizer, scheduler = optimizers[branch]
            loss_sum = torch.zeros(runs, device=device)
            correct = torch.zeros(runs, device=device)
            for index in order.split(protocol.batch_size, dim=1):  # [R, B]
                x = features[branch][streams[:, None], index]  # [R, B, D]: run r's batch from its own copy
                y = labels[index]
                logits = head(x)
                per_run = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y).mean(1)
                optimizer.zero_grad(set_to_none=True)
                per_run.sum().backward()  # run r's gradient is that of its own mean loss
                optimizer.step()
                loss_sum += per_run.detach() * y.shape[1]
                correct += (logits.detach().argmax(dim=2) == y).sum(dim=1)
            scheduler.step()
            losses, tops = (loss_sum / n).tolist(), (100.0 * correct / n).tolist()  # one host read per epoch
            for r in range(runs):
                history[branch][r].append({"epoch": epoch, "lr": lr, "loss": losses[r], "train_top1": tops[r]})
            stats_loss[branch], stats_top1[branch] = sum(losses) / runs, sum(tops) / runs
        if on_epoch is not None:
            on_epoch(EpochStats(epoch, protocol.epochs, lr, stats_loss, stats_top1))
    results = {}
    for branch, head in heads.items():
        top1, top5 = stacked_topk(head, test[branch].features, test[branch].labels)
        results[branch] = {"top1": top1, "top5": top5, "history": history[branch], "heads": head}
    return results
