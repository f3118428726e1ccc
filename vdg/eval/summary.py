"""What people read from an evaluation: the protocol in words, one line per network, progress with time left.

Formatting only: it computes no metric and writes no record (`vdg.eval.results` does). The scripts print these
lines by default; `json=true` prints the records themselves instead.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from vdg.eval.linear import EpochStats


def _count(n: int) -> str:
    return f"{n:,}"


def _milestones(milestones: Sequence[int]) -> str:
    if not milestones:
        return "constant"
    return "at epochs " + " and ".join(", ".join(str(m) for m in milestones).rsplit(", ", 1))


def describe_linear(
    *,
    dataset: str,
    num_train: int,
    num_test: int,
    feature_dim: int,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    milestones: Sequence[int],
    gamma: float,
    batch_size: int,
    init: str,
    runs: int,
    augment: bool,
    share_views: bool = True,
    pretrain_dataset: str | None = None,
) -> str:
    """The linear (or transfer) protocol of a record in one sentence."""
    source = f"transfer from {pretrain_dataset}: " if pretrain_dataset else ""
    head = "weights ~ U(0, 1)" if init == "uniform" else "PyTorch init"
    schedule = f"x{gamma:g} {_milestones(milestones)}" if milestones else "constant lr"
    if augment:
        data = f"RandomResizedCrop(0.08-1) + flip views of the {_count(num_train)} {dataset} train images"
        data += ", new each epoch"
        shared = "each epoch's views shared by the runs" if share_views else "each run its own views"
        independence = f"own head init and batch order; {shared}"
    else:
        data = f"unaugmented features of the {_count(num_train)} {dataset} train images, computed once"
        independence = "own head init and batch order"
    return (
        f"{source}linear probe ({head}) on frozen {feature_dim}-d backbone features (eval mode): {epochs} epochs of "
        f"SGD (lr {lr:g}, momentum {momentum:g}, weight decay {weight_decay:g}, {schedule}), batch {batch_size}, "
        f"on {data}; {runs} run{'s' if runs != 1 else ''} ({independence}); top-1 on the {_count(num_test)} test "
        "images"
    )


def describe_knn(
    *,
    dataset: str,
    num_train: int,
    num_test: int,
    feature_dim: int,
    k: int,
    distance: str,
    weighting: str,
    normalize: bool,
    temperature: float = 0.07,
) -> str:
    """The k-NN protocol of a record in one sentence."""
    features = "l2-normalised" if normalize or distance == "cosine" else "raw"
    votes = ""
    if k > 1:
        votes = {"uniform": ", majority vote", "distance": ", votes weighted 1/(d + 1e-5)"}.get(
            weighting, f", votes weighted exp(similarity / {temperature:g})"
        )
    return (
        f"{k}-NN, {distance} distance on {features} frozen {feature_dim}-d backbone features (eval mode){votes}; "
        f"bank: the {_count(num_train)} unaugmented {dataset} train images, queries: the {_count(num_test)} test images"
    )


def _flops_text(record: dict[str, Any]) -> str:
    reduction = record.get("flops_reduction")
    if reduction is None:
        return ""
    if record.get("branch") == "dense":
        return "FLOPs 100% of dense"
    return f"FLOPs {100 * (1 - reduction):.1f}% of dense (reduction {100 * reduction:.1f}%)"


def record_line(record: dict[str, Any]) -> str:
    """`gated  top-1 36.94 ± 0.81% (5 runs)  FLOPs 50.6% of dense (reduction 49.4%)`."""
    runs = record.get("runs") or [record["value"]]
    accuracy = f"top-1 {record['value']:.2f}%"
    if len(runs) > 1:
        accuracy = f"top-1 {record['value']:.2f} ± {record['std']:.2f}% ({len(runs)} runs)"
    if record.get("random_init"):
        reference = record["random_init"]
        accuracy += (f"  {record['over_random_init']:+.2f} over random init ({reference['top1_mean']:.2f}%, "
                     f"{len(reference['seeds'])} seeds)")
    return f"{record['branch']:<5}  {accuracy}  {_flops_text(record)}".rstrip()


def display_path(path: str | Path) -> str:
    """`path` relative to the working directory when it lies inside it, else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def summary_lines(records: Sequence[dict[str, Any]], written: Sequence[Path] = ()) -> list[str]:
    """The human summary of one evaluation: what was evaluated and how, one line per network, where the records are."""
    if not records:
        return []
    first = records[0]
    budget = "" if first.get("budget") is None else f", t_d = {first['budget']:g}"
    lines = [
        f"{first['protocol']} evaluation of {display_path(first['ckpt'])} ({first['method']}{budget}) "
        f"on {first['dataset']}:",
        *(f"  {record_line(r)}" for r in records),
    ]
    if first.get("description"):
        lines.append(f"protocol: {first['description']}")
    if written:
        folder = display_path(Path(written[0]).parent)
        lines.append(f"records: {folder}/{{{','.join(Path(p).name for p in written)}}} (json=true prints them)")
    return lines


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class EpochProgress:
    """Per-epoch progress of a linear evaluation with the time left, on stderr.

    On a terminal one line is rewritten in place every epoch; elsewhere (logs, CI) a line is printed every
    `every` epochs and at the last one. Time left = mean epoch time so far x epochs to go.
    """

    def __init__(self, label: str, every: int = 10, stream: TextIO | None = None) -> None:
        self.label, self.every, self.stream = label, max(int(every), 1), stream
        self.start = time.perf_counter()

    def _out(self) -> TextIO:
        return self.stream or sys.stderr

    def line(self, stats: EpochStats) -> str:
        done = stats.epoch + 1
        per_epoch = (time.perf_counter() - self.start) / done
        parts = [
            f"{b.value} loss {stats.loss[b]:.3f} train top-1 {stats.train_top1[b]:.1f}%" for b in stats.loss
        ]
        return (
            f"{self.label} epoch {done}/{stats.epochs} (lr {stats.lr:g}) | {' | '.join(parts)} | "
            f"{per_epoch:.2f} s/epoch | ETA {_duration(per_epoch * (stats.epochs - done))}"
        )

    def __call__(self, stats: EpochStats) -> None:
        out, last = self._out(), stats.epoch + 1 == stats.epochs
        interactive = out.isatty() and os.environ.get("TERM") != "dumb"
        if interactive:
            print("\r\033[K" + self.line(stats), end="\n" if last else "", file=out, flush=True)
        elif last or (stats.epoch + 1) % self.every == 0 or stats.epoch == 0:
            print(self.line(stats), file=out, flush=True)
