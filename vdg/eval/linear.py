"""Linear evaluation of a frozen backbone (paper: 100 epochs, SGD lr 0.3, x0.1 at epochs 60 and 80).

It trains only the linear head: the backbone stays frozen in eval mode and is never updated or moved to train.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vdg.eval.features import Features, eval_mode, extract_features, module_device
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
            raise ValueError(f"unknown linear init {self.init!r}; allowed values: {list(INITS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"linear epochs={self.epochs} and batch_size={self.batch_size} must be >= 1")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"linear milestones={self.milestones} must be increasing")


def step_lr(epoch: int, protocol: LinearProtocol) -> float:
    """LR of `epoch` (0-based) under MultiStepLR: lr * gamma^(number of milestones <= epoch)."""
    return protocol.lr * protocol.gamma ** bisect.bisect_right(protocol.milestones, epoch)


def linear_head(in_features: int, num_classes: int, init: str = "default", seed: int = 0) -> nn.Linear:
    """Linear(in_features, num_classes) initialised from its own seeded generator (global RNG untouched).

    "default" reproduces nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)); "uniform" draws weights from U(0, 1).
    """
    if init not in INITS:
        raise ValueError(f"unknown linear init {init!r}; allowed values: {list(INITS)}")
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
    head: nn.Linear, protocol: LinearProtocol
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR]:
    optimizer = torch.optim.SGD(
        head.parameters(), lr=protocol.lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(protocol.milestones), protocol.gamma)
    return optimizer, scheduler


def sgd_step(head: nn.Linear, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> tuple[float, int]:
    logits = head(x)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item() * y.shape[0], (logits.argmax(dim=1) == y).sum().item()


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


def epoch_record(epoch: int, lr: float, loss_sum: float, correct: int, seen: int) -> dict:
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
    """
    device = torch.device(device or "cpu")
    x, y = train.features.to(device).float(), train.labels.to(device).long()
    head = linear_head(x.shape[1], num_classes, protocol.init, protocol.seed).to(device)
    optimizer, scheduler = make_optimizer(head, protocol)
    generator = torch.Generator().manual_seed(protocol.seed)
    history = []
    for epoch in range(protocol.epochs):
        lr = scheduler.get_last_lr()[0]
        loss_sum, correct = 0.0, 0
        for batch in torch.randperm(len(y), generator=generator).split(protocol.batch_size):
            batch = batch.to(device)
            batch_loss, batch_correct = sgd_step(head, optimizer, x[batch], y[batch])
            loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
        scheduler.step()
        history.append(epoch_record(epoch, lr, loss_sum, correct, len(y)))
    top1, top5 = topk_accuracy(head, test.features.float(), test.labels.long())
    return {"top1": top1, "top5": top5, "history": history, "head": head}


def train_linear_on_images(
    backbone: nn.Module,
    branch: str | Branch,
    train_loader: Iterable,
    test_loader: Iterable,
    protocol: LinearProtocol,
    num_classes: int,
    device: torch.device | str | None = None,
) -> dict:
    """The full linear protocol: each step runs the frozen backbone (eval mode, no_grad) on augmented images.

    The loaders yield (images, labels); train_loader applies the train augmentation and owns the shuffling
    (seed it for reproducibility). device: None = the backbone's device, otherwise the backbone moves there.
    The backbone's parameters and train/eval flags are left as they were. Returns what
    `train_linear_on_features` returns, evaluated on the test loader's features.
    """
    branch = Branch.parse(branch)
    if device is None:
        device = module_device(backbone)
    else:
        backbone.to(device)
    head = linear_head(backbone.feature_dim, num_classes, protocol.init, protocol.seed).to(device)
    optimizer, scheduler = make_optimizer(head, protocol)
    history = []
    with eval_mode(backbone):
        for epoch in range(protocol.epochs):
            lr = scheduler.get_last_lr()[0]
            loss_sum, correct, seen = 0.0, 0, 0
            for images, labels in train_loader:
                with torch.no_grad():
                    features = backbone(images.to(device, non_blocking=True), branch).features.float()
                labels = torch.as_tensor(labels).to(device).long()
                batch_loss, batch_correct = sgd_step(head, optimizer, features, labels)
                loss_sum, correct, seen = loss_sum + batch_loss, correct + batch_correct, seen + len(labels)
            scheduler.step()
            history.append(epoch_record(epoch, lr, loss_sum, correct, seen))
    test = extract_features(backbone, test_loader, branch, device)
    top1, top5 = topk_accuracy(head, test.features, test.labels)
    return {"top1": top1, "top5": top5, "history": history, "head": head}
