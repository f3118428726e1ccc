"""Evaluation maths: k-NN against brute-force references, linear probe, features, gate statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from vdg.eval.features import Features, channel_usage, extract_features, gate_report
from vdg.eval.knn import knn_accuracy, knn_predict
from vdg.eval.linear import LinearProtocol, linear_head, step_lr, train_linear_on_features
from vdg.models import BlockCost, GatedResNet, NetworkCost, network_cost


def random_bank(seed: int = 0, n_train: int = 300, n_test: int = 80, dim: int = 16, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.5
    y_train = torch.randint(classes, (n_train,), generator=g)
    y_test = torch.randint(classes, (n_test,), generator=g)
    x_train = centers[y_train] + torch.randn(n_train, dim, generator=g)
    x_test = centers[y_test] + torch.randn(n_test, dim, generator=g)
    return x_train, y_train, x_test, y_test


# ---------------------------------------------------------------- k-NN


def test_knn_k1_euclidean_matches_sklearn():
    x_train, y_train, x_test, y_test = random_bank()
    reference = KNeighborsClassifier(n_neighbors=1, algorithm="brute").fit(x_train.numpy(), y_train.numpy())
    expected = reference.predict(x_test.numpy())
    assert knn_predict(x_train, y_train, x_test).tolist() == expected.tolist()
    accuracy = knn_accuracy(x_train, y_train, x_test, y_test)
    assert accuracy == pytest.approx(100.0 * (expected == y_test.numpy()).mean())


def test_knn_k20_distance_weighted_matches_sklearn():
    x_train, y_train, x_test, _ = random_bank(seed=1)
    reference = KNeighborsClassifier(n_neighbors=20, algorithm="brute", weights=lambda d: 1.0 / (d + 1e-5))
    expected = reference.fit(x_train.numpy(), y_train.numpy()).predict(x_test.numpy())
    predicted = knn_predict(x_train, y_train, x_test, k=20, weighting="distance")
    assert predicted.tolist() == expected.tolist()


def test_knn_cosine_exp_weighted_matches_numpy():
    x_train, y_train, x_test, _ = random_bank(seed=2)
    k, temperature = 20, 0.07
    a = x_train.double().numpy()
    b = x_test.double().numpy()
    sim = (b / np.linalg.norm(b, axis=1, keepdims=True)) @ (a / np.linalg.norm(a, axis=1, keepdims=True)).T
    expected = []
    for row in sim:
        top = np.argsort(-row, kind="stable")[:k]
        scores = np.bincount(y_train.numpy()[top], weights=np.exp(row[top] / temperature), minlength=5)
        expected.append(int(np.argmax(scores)))
    predicted = knn_predict(x_train, y_train, x_test, k=k, distance="cosine", weighting="exp")
    assert predicted.tolist() == expected


def test_knn_normalize_equals_search_on_normalized_features():
    x_train, y_train, x_test, _ = random_bank(seed=3)
    unit = lambda x: x / x.norm(dim=1, keepdim=True)
    expected = knn_predict(unit(x_train), y_train, unit(x_test), k=5)
    assert torch.equal(knn_predict(x_train, y_train, x_test, k=5, normalize=True), expected)
    # scaling the features changes nothing once normalised, but it does change a raw euclidean search
    assert torch.equal(knn_predict(x_train * 7, y_train, x_test, k=5, normalize=True), expected)


@pytest.mark.parametrize("options", [{}, {"k": 20, "weighting": "distance"}, {"k": 7, "distance": "cosine"}])
def test_knn_chunking_gives_identical_predictions(options):
    x_train, y_train, x_test, _ = random_bank(seed=4)
    whole = knn_predict(x_train, y_train, x_test, chunk_size=len(x_test), **options)
    for chunk in (1, 7, 33):
        assert torch.equal(knn_predict(x_train, y_train, x_test, chunk_size=chunk, **options), whole)
    assert torch.equal(knn_predict(x_train, y_train, x_test, **options), whole)


def test_knn_hand_made_2d_example():
    train = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0], [11.0, 10.0], [10.0, 11.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = torch.tensor([[0.4, 0.2], [9.0, 9.0], [0.0, 0.1]])
    assert knn_predict(train, labels, queries).tolist() == [0, 1, 0]
    # k=5 majority is class 1 (3 votes vs 2); 1/(d + eps) weighting lets the two close class-0 points win
    assert knn_predict(train, labels, queries, k=5).tolist() == [1, 1, 1]
    assert knn_predict(train, labels, queries, k=5, weighting="distance").tolist() == [0, 1, 0]
    # an exact match (d = 0) weighs 1/1e-5 and outvotes two class-1 neighbours at d = 0.5
    line = torch.tensor([[0.0, 0.0], [0.5, 0.0], [-0.5, 0.0]])
    exact = knn_predict(line, torch.tensor([0, 1, 1]), line[:1], k=3, weighting="distance")
    assert exact.tolist() == [0]


def test_knn_ties_are_deterministic():
    # equidistant duplicates: the lowest train index wins, whatever its label
    train = torch.tensor([[1.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    query = torch.tensor([[0.0, 0.0]])
    assert knn_predict(train, torch.tensor([2, 0, 1]), query).tolist() == [2]
    assert knn_predict(train, torch.tensor([0, 2, 1]), query).tolist() == [0]
    # a tied class vote goes to the lowest class
    assert knn_predict(train, torch.tensor([3, 1, 0]), query, k=2).tolist() == [1]
    # a tie at the k-th place among many equal distances still picks the lowest indices
    ring = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert knn_predict(ring, torch.tensor([1, 0, 0, 0]), query, k=1).tolist() == [1]
    assert knn_predict(ring, torch.tensor([2, 2, 0, 1]), query, k=3).tolist() == [2]  # needs indices 0 and 1


@pytest.mark.parametrize(
    "options, message",
    [
        ({"k": 0}, "k=0"),
        ({"k": 11}, "k=11"),
        ({"distance": "manhattan"}, "allowed values: \\['euclidean', 'cosine'\\]"),
        ({"weighting": "softmax"}, "allowed values: \\['uniform', 'distance', 'exp'\\]"),
        ({"weighting": "exp", "temperature": 0.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_knn_bad_options_raise(options, message):
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match=message):
        knn_predict(x, torch.zeros(10, dtype=torch.long), x, **options)


# ---------------------------------------------------------------- linear probe


def test_step_lr_follows_the_paper_schedule():
    protocol = LinearProtocol()
    expected = {0: 0.3, 59: 0.3, 60: 0.03, 79: 0.03, 80: 0.003, 99: 0.003}
    for epoch, lr in expected.items():
        assert step_lr(epoch, protocol) == pytest.approx(lr)


def separable_problem(seed: int = 0, classes: int = 3, dim: int = 8) -> tuple[Features, Features]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 4.0

    def sample(n: int) -> Features:
        labels = torch.randint(classes, (n,), generator=g)
        return Features(centers[labels] + 0.5 * torch.randn(n, dim, generator=g), labels)

    return sample(300), sample(150)


def test_linear_on_features_learns_and_is_deterministic():
    train, test = separable_problem()
    protocol = LinearProtocol(epochs=12, milestones=(6, 9), batch_size=64, lr=0.1, seed=3)
    first = train_linear_on_features(train, test, protocol, num_classes=3)
    second = train_linear_on_features(train, test, protocol, num_classes=3)
    assert first["top1"] > 95.0 and first["top5"] == 100.0
    assert [h["loss"] for h in first["history"]] == [h["loss"] for h in second["history"]]
    assert torch.equal(first["head"].weight, second["head"].weight)
    # the logged per-epoch LR is MultiStepLR's, and it agrees with step_lr
    assert [h["lr"] for h in first["history"]] == pytest.approx([step_lr(e, protocol) for e in range(12)])
    other = train_linear_on_features(train, test, LinearProtocol(**{**protocol.__dict__, "seed": 4}), 3)
    assert not torch.equal(other["head"].weight, first["head"].weight)


def test_uniform_init_draws_weights_in_unit_interval():
    head = linear_head(512, 10, init="uniform", seed=0)
    assert head.weight.min() >= 0.0 and head.weight.max() < 1.0 and head.weight.mean() > 0.4
    default = linear_head(512, 10, init="default", seed=0)
    assert default.weight.abs().max() <= 1 / 512**0.5 and default.weight.min() < 0
    assert torch.equal(linear_head(512, 10, "uniform", seed=0).weight, head.weight)
    with pytest.raises(ValueError, match="allowed values"):
        LinearProtocol(init="normal")


# ---------------------------------------------------------------- features and gate statistics


@pytest.fixture(scope="module")
def tiny_backbone() -> GatedResNet:
    torch.manual_seed(0)
    return GatedResNet(width=8)


def tiny_loader(n: int = 10, batch: int = 4, size: int = 16):
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 3
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, n, batch)]


def test_extract_features_shapes_modes_and_determinism(tiny_backbone):
    loader = tiny_loader()
    tiny_backbone.train()
    dense = extract_features(tiny_backbone, loader, "dense")
    assert dense.features.shape == (10, 64) and dense.features.dtype == torch.float32
    assert dense.labels.tolist() == [i % 3 for i in range(10)] and dense.active_channels is None
    assert all(m.training for m in tiny_backbone.modules())

    gated = extract_features(tiny_backbone, loader, "gated", keep_masks=True)
    assert gated.features.shape == (10, 64) and gated.active_channels.shape == (10, 8)
    assert [m.shape for m in gated.masks] == [(10, c) for c in (8, 8, 16, 16, 32, 32, 64, 64)]
    assert gated.masks[0].dtype == torch.bool
    assert torch.equal(torch.stack([m.sum(1) for m in gated.masks], 1).float(), gated.active_channels)
    assert all(m.training for m in tiny_backbone.modules())

    again = extract_features(tiny_backbone, loader, "gated")
    assert torch.equal(again.features, gated.features) and again.masks is None
    tiny_backbone.eval()
    extract_features(tiny_backbone, loader, "dense")
    assert not any(m.training for m in tiny_backbone.modules())


def test_gate_report_matches_hand_computation():
    cost = NetworkCost(
        stem=100,
        blocks=(
            BlockCost(channels=4, planes=4, full=45, per_channel=10, fixed=5, gate=2),
            BlockCost(channels=2, planes=2, full=40, per_channel=20, fixed=0, gate=1),
        ),
    )
    active = torch.tensor([[2.0, 1.0], [4.0, 2.0], [0.0, 0.0]])
    # per sample: 100 + 3 (gates) + 5 (downsample) + 10*c0 + 20*c1 = 148, 188, 108 -> mean 148; dense 185
    report = gate_report(active, cost)
    assert report["gated_macs"] == pytest.approx(148.0) and report["dense_macs"] == 185
    assert report["flops_ratio"] == pytest.approx(0.8) and report["flops_reduction"] == pytest.approx(0.2)
    assert report["active_channels_per_block"] == pytest.approx([2.0, 1.0])
    assert report["density_per_block"] == pytest.approx([0.5, 0.5])
    assert report["density"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one column per block"):
        gate_report(active[:, :1], cost)


def test_gate_report_all_channels_on_costs_dense_plus_gates(tiny_backbone):
    cost = network_cost(tiny_backbone, 32)
    report = gate_report(cost.channels().expand(5, -1), cost)
    assert report["gated_macs"] == pytest.approx(cost.dense_macs + cost.gate_macs)
    assert report["density"] == pytest.approx(1.0)


def test_channel_usage_counts_hand_made_masks():
    masks = [
        torch.tensor([[1, 0, 1, 1], [1, 0, 0, 1], [1, 0, 1, 1]], dtype=torch.uint8),
        torch.tensor([[True, False], [True, False]]),
    ]
    assert channel_usage(masks) == [
        {"channels": 4, "always_off": 1, "always_on": 2, "data_dependent": 1},
        {"channels": 2, "always_off": 1, "always_on": 1, "data_dependent": 0},
    ]
