"""The augmented linear protocol: several runs in one batched step, views made once for every network and run,
no host read per step, per-epoch progress (vdg.eval.linear, vdg.eval.views, vdg.eval.summary)."""

from __future__ import annotations

import io

import pytest
import torch

from vdg.eval.features import channels_last, eval_mode
from vdg.eval.linear import (
    EpochStats,
    LinearProtocol,
    StackedLinearHeads,
    linear_head,
    train_linear_on_features,
    train_linear_runs,
)
from vdg.eval.summary import EpochProgress, describe_knn, describe_linear, record_line
from vdg.eval.views import BatchedViews, EpochFeatures, choose_backend
from vdg.models import Branch, GatedResNet

from .test_eval_math import separable_problem

D = Branch.DENSE
PROTOCOL = LinearProtocol(epochs=6, milestones=(3, 5), batch_size=64, lr=0.1)


def test_stacked_runs_train_exactly_like_separate_runs():
    """R heads stacked into one batched matmul = R separate probes with the same seeds (init, batch order)."""
    train, test = separable_problem()
    seeds = [3, 4, 5]
    separate = [train_linear_on_features(train, test, LinearProtocol(**{**PROTOCOL.__dict__, "seed": s}), 3)
                for s in seeds]
    stacked = train_linear_runs(lambda epoch: {D: train.features[None]}, train.labels, {D: test}, PROTOCOL, seeds, 3)[D]
    assert stacked["top1"] == [r["top1"] for r in separate]
    for r, run in enumerate(separate):
        assert torch.allclose(stacked["heads"].weight[r], run["head"].weight, atol=1e-5)
        assert [h["loss"] for h in stacked["history"][r]] == pytest.approx([h["loss"] for h in run["history"]])
        assert [h["lr"] for h in stacked["history"][r]] == pytest.approx([h["lr"] for h in run["history"]])
    assert torch.equal(StackedLinearHeads(8, 3, seeds).head(1).weight, linear_head(8, 3, seed=4).weight)


def test_each_run_reads_its_own_view_stream():
    """streams[r] picks run r's copy of the epoch's views: run 1 on copy 1 equals a lone run on that copy."""
    train, test = separable_problem()
    other = train.features + 0.3 * torch.randn(train.features.shape, generator=torch.Generator().manual_seed(2))
    two_copies = torch.stack([train.features, other])
    both = train_linear_runs(lambda e: {D: two_copies}, train.labels, {D: test}, PROTOCOL, [3, 4], 3, streams=[0, 1])
    alone = train_linear_runs(lambda e: {D: other[None]}, train.labels, {D: test}, PROTOCOL, [4], 3)
    assert torch.allclose(both[D]["heads"].weight[1], alone[D]["heads"].weight[0], atol=1e-5)
    with pytest.raises(ValueError, match="one copy index per run"):
        train_linear_runs(lambda e: {D: two_copies}, train.labels, {D: test}, PROTOCOL, [3, 4], 3, streams=[0])


def count_host_reads(monkeypatch) -> list[int]:
    """Counts Tensor.item/.tolist/__float__/__bool__ calls (each one waits for the device)."""
    calls = [0]
    for name in ("item", "tolist", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            calls[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("trainer", ["runs", "features"])
def test_no_host_read_per_step(monkeypatch, trainer):
    """Host reads per epoch are a constant: halving the batch (twice the steps) adds none."""
    train, test = separable_problem()

    def reads(batch_size: int) -> int:
        protocol = LinearProtocol(**{**PROTOCOL.__dict__, "batch_size": batch_size})
        with monkeypatch.context() as patch:
            calls = count_host_reads(patch)
            if trainer == "runs":
                train_linear_runs(lambda e: {D: train.features[None]}, train.labels, {D: test}, protocol, [0, 1], 3)
            else:
                train_linear_on_features(train, test, protocol, 3)
        return calls[0]

    assert reads(32) == reads(64) == reads(128)


def test_views_are_seeded_fresh_each_epoch_and_normalised():
    images = torch.randint(0, 256, (10, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    make = lambda seed: BatchedViews(images, 8, [0.5] * 3, [0.25] * 3, batch_size=4, seeds=[seed])  # noqa: E731
    views = make(7)
    first, second = torch.cat(list(views.batches(0))), torch.cat(list(views.batches(0)))
    assert first.shape == (10, 3, 8, 8) and first.dtype == torch.float32
    assert not torch.equal(first, second)  # new crops and flips every pass (epoch)
    assert torch.equal(torch.cat(list(make(7).batches(0))), first)  # the stream is a function of its seed
    assert not torch.equal(torch.cat(list(make(8).batches(0))), first)
    assert first.min() >= (0 - 0.5) / 0.25 - 1e-6 and first.max() <= (1 - 0.5) / 0.25 + 1e-6


class CountingViews:
    """BatchedViews that counts how many augmented batches it made."""

    def __init__(self, views: BatchedViews) -> None:
        self.views, self.made = views, 0

    def __len__(self) -> int:
        return len(self.views)

    def batches(self, stream: int):
        for batch in self.views.batches(stream):
            self.made += 1
            self.last = batch
            yield batch


def test_one_augmented_batch_feeds_every_branch():
    torch.manual_seed(0)
    backbone = GatedResNet(width=4)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views = CountingViews(BatchedViews(images, 16, [0.5] * 3, [0.25] * 3, batch_size=6, seeds=[0, 1]))
    backbone.train()
    epoch = EpochFeatures(backbone, [Branch.DENSE, Branch.GATED], views, 2, torch.device("cpu"))
    features = epoch(0)
    assert views.made == 2  # one batch per stream, shared by the two networks
    assert all(m.training for m in backbone.modules())  # eval mode only while extracting
    with torch.no_grad(), eval_mode(backbone):
        for branch in (Branch.DENSE, Branch.GATED):
            assert features[branch].shape == (2, 6, backbone.feature_dim)
            assert torch.allclose(features[branch][1], backbone(views.last, branch).features, atol=1e-5)
    with channels_last(backbone):
        assert backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert backbone.conv1.weight.is_contiguous()


def test_backend_choice():
    from vdg.data.datasets import make_synthetic

    tensors = make_synthetic("train", size=8)
    cpu = torch.device("cpu")
    assert choose_backend("auto", tensors, cpu, 0.5) == "batched"
    assert choose_backend("workers", tensors, cpu, 0.5) == "workers"
    assert choose_backend("auto", tensors, cpu, 1e-30) == "workers"  # does not fit
    with pytest.raises(ValueError, match="does not fit"):
        choose_backend("batched", tensors, cpu, 1e-30)
    with pytest.raises(ValueError, match="allowed values"):
        choose_backend("gpu", tensors, cpu, 0.5)


def test_progress_prints_every_epoch_with_time_left():
    stream = io.StringIO()
    progress = EpochProgress("linear [dense]", every=2, stream=stream)
    for epoch in range(5):
        progress(EpochStats(epoch, 5, 0.3, {D: 1.5}, {D: 40.0}))
    lines = stream.getvalue().splitlines()
    assert [line.split(" epoch ")[1].split(" ")[0] for line in lines] == ["1/5", "2/5", "4/5", "5/5"]
    assert all("dense loss 1.500 train top-1 40.0%" in line and "| ETA 0:00:0" in line for line in lines)


def test_protocols_in_words_and_summary_lines():
    text = describe_linear(
        dataset="digits", num_train=1437, num_test=360, feature_dim=64, epochs=100, lr=0.3, momentum=0.9,
        weight_decay=0.0, milestones=[60, 80], gamma=0.1, batch_size=512, init="default", runs=5, augment=True,
    )
    assert "100 epochs" in text and "RandomResizedCrop(0.08-1) + flip" in text and "1,437 digits train" in text
    assert "5 runs (own head init and batch order; each epoch's views shared by the runs)" in text
    assert "x0.1 at epochs 60 and 80" in text and "360 test images" in text
    knn = describe_knn(dataset="digits", num_train=1437, num_test=360, feature_dim=64, k=1, distance="euclidean",
                       weighting="distance", normalize=False)
    assert knn.startswith("1-NN, euclidean distance on raw frozen 64-d") and "votes" not in knn
    gated = {"branch": "gated", "value": 36.94, "std": 0.81, "runs": [1.0] * 5, "flops_reduction": 0.494}
    assert record_line(gated) == "gated  top-1 36.94 ± 0.81% (5 runs)  FLOPs 50.6% of dense (reduction 49.4%)"
    dense = {"branch": "dense", "value": 73.06, "std": 0.0, "runs": [73.06], "flops_reduction": 0.0}
    assert record_line(dense) == "dense  top-1 73.06%  FLOPs 100% of dense"
