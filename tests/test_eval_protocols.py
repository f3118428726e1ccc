"""End-to-end evaluation of tiny pretrained checkpoints: linear, k-NN, transfer, UMAP, records, bad input.

One module-scoped fixture pretrains a width-4 VDG and a width-4 VICReg for one epoch on synthetic data.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from vdg.core.errors import CheckpointError, ConfigError
from vdg.data.module import eval_loader
from vdg.eval.api import eval_config, evaluate_checkpoint
from vdg.eval.features import Features, extract_features
from vdg.eval.knn import knn_accuracy
from vdg.eval.linear import LinearProtocol, train_linear_on_features
from vdg.eval.protocols import data_config, dataset_config, eval_dataset, linear_protocol, transfer_dataset
from vdg.eval.results import config_hash, result_filename, write_json
from vdg.methods import build_method
from vdg.methods.checkpoint import load_method
from vdg.report.paper_results import CellKey
from vdg.report.tables import build_table, load_results, record_key
from vdg.report.umap import exact_knn, spread_subset
from vdg.run.driver import pretrain

from .conftest import TINY, compose_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA = {
    "protocol", "method", "method_config", "pretrain_dataset", "dataset", "budget", "seed", "branch", "metric",
    "value", "std", "runs", "seeds", "flops_reduction", "dense_macs", "gated_macs", "ckpt", "config_hash",
}  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"
FAST = {"epochs": 2, "batch_size": 16, "augment": False}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """last.ckpt of a 1-epoch VDG and VICReg pretraining (width 4, 64 synthetic images)."""
    torch.set_num_threads(1)  # 2 threads on 2 shared, busy cores are many times slower for these tiny convs
    root = tmp_path_factory.mktemp("pretrain")
    out = {}
    for method in ("vdg", "vicreg"):
        cfg = compose_config([*TINY, f"method={method}", f"run_dir={root / method}", "probe.enabled=false"])
        out[method] = Path(pretrain(cfg)["checkpoint"])
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def results_of(ckpt: Path) -> Path:
    return ckpt.parent / "results"


def direct_features(ckpt: Path, branch: str):
    model = load_method(ckpt)
    return [extract_features(model.backbone, eval_loader(model.cfg, split, 16), branch) for split in ("train", "test")]


# ----- linear ------------------------------------------------------------------------------------------------
def test_linear_cached_features_both_branches_mean_and_std(ckpts):
    records = evaluate_checkpoint(ckpts["vdg"], "linear", runs=2, **FAST)
    assert [r["branch"] for r in records] == ["dense", "gated"]
    for record in records:
        assert SCHEMA <= record.keys()
        assert len(record["runs"]) == 2 and record["seeds"] == [0, 1]
        assert record["value"] == pytest.approx(statistics.fmean(record["runs"]))
        assert record["std"] == pytest.approx(statistics.stdev(record["runs"]))
        # augment=false: a variant of the paper's protocol, kept apart from its records (and from its tables)
        path = results_of(ckpts["vdg"]) / f"linear-synthetic-{record['branch']}-cached.json"
        assert json.loads(path.read_text()) == record
    dense, gated = records
    assert dense["flops_reduction"] == 0.0 and dense["gated_macs"] == dense["dense_macs"]
    assert 0.0 < gated["flops_reduction"] < 1.0 and gated["gated_macs"] < gated["dense_macs"]
    # the first run is exactly a probe on deterministic-gate features of the unaugmented splits
    train, test = direct_features(ckpts["vdg"], "gated")
    expected = train_linear_on_features(train, test, LinearProtocol(epochs=2, batch_size=16, seed=0), 10)
    assert gated["runs"][0] == pytest.approx(expected["top1"])


def test_linear_augmented_path_is_seeded_and_leaves_global_rng_alone(ckpts, tmp_path):
    options = {"branch": "gated", "epochs": 1, "runs": 1, "batch_size": 16, "augment": True}
    state = torch.get_rng_state()
    (first,) = evaluate_checkpoint(ckpts["vdg"], "linear", results_dir=str(tmp_path), **options)
    assert torch.equal(torch.get_rng_state(), state)
    (again,) = evaluate_checkpoint(ckpts["vdg"], "linear", results_dir=str(tmp_path), **options)
    assert first["runs"] == again["runs"] and first["eval_config"]["augment"] is True
    assert (tmp_path / "linear-synthetic-gated.json").is_file()
    assert first["augment_backend"] == "batched" and first["share_views"] is True


@pytest.mark.parametrize("backend", ["batched", "workers"])
def test_runs_share_views_or_draw_their_own(ckpts, tmp_path, backend):
    """Run r always owns its head init and batch order (seed + r). With share_views the runs read one stream of
    views (seeded with `seed`); without, run r reads its own (seed + r). Run 0 is the same either way."""
    options = {"epochs": 2, "runs": 2, "batch_size": 16, "augment": True, "augment_backend": backend}
    shared = evaluate_checkpoint(ckpts["vdg"], "linear", results_dir=str(tmp_path / "a"), **options)
    own = evaluate_checkpoint(ckpts["vdg"], "linear", results_dir=str(tmp_path / "b"), share_views=False, **options)
    for a, b in zip(shared, own, strict=True):
        assert a["augment_backend"] == b["augment_backend"] == backend
        assert a["share_views"] is True and b["share_views"] is False
        assert a["runs"][0] == b["runs"][0] and a["final_train_loss"][0] == pytest.approx(b["final_train_loss"][0])
        assert a["final_train_loss"][1] != pytest.approx(b["final_train_loss"][1])
        assert "2 runs (own head init and batch order; each epoch's views shared by the runs)" in a["description"]
        assert "each run its own views" in b["description"]


def test_augmented_records_state_the_protocol(ckpts, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown augment_backend 'gpu'; allowed values: \['auto', 'batched'"):
        evaluate_checkpoint(ckpts["vdg"], "linear", augment_backend="gpu")
    with pytest.raises(ConfigError, match="share_views='yes' must be true or false"):
        evaluate_checkpoint(ckpts["vdg"], "linear", share_views="yes")


# ----- k-NN --------------------------------------------------------------------------------------------------
def test_knn_k1_euclidean_is_the_paper_protocol(ckpts):
    records = evaluate_checkpoint(ckpts["vdg"], "knn")
    assert [(r["branch"], r["k"], r["distance"]) for r in records] == [
        ("dense", 1, "euclidean"),
        ("gated", 1, "euclidean"),
    ]
    for record in records:
        train, test = direct_features(ckpts["vdg"], record["branch"])
        assert record["value"] == pytest.approx(knn_accuracy(train.features, train.labels, test.features, test.labels))
        assert record["runs"] == [record["value"]] and record["std"] == 0.0
        assert (results_of(ckpts["vdg"]) / f"knn-k1-euclidean-synthetic-{record['branch']}.json").is_file()


def test_knn_k20_cosine(ckpts, tmp_path):
    (record,) = evaluate_checkpoint(
        ckpts["vdg"], "knn", k=20, distance="cosine", branch="gated", results_dir=str(tmp_path)
    )
    assert (record["k"], record["distance"], record["weighting"]) == (20, "cosine", "distance")
    train, test = direct_features(ckpts["vdg"], "gated")
    options = {"k": 20, "distance": "cosine", "weighting": "distance"}
    assert record["value"] == pytest.approx(
        knn_accuracy(train.features, train.labels, test.features, test.labels, **options)
    )
    assert (tmp_path / "knn-k20-cosine-distance-synthetic-gated.json").is_file()


def test_rerunning_a_protocol_leaves_other_protocols_untouched(ckpts, tmp_path):
    evaluate_checkpoint(
        ckpts["vicreg"], "linear", epochs=1, runs=1, batch_size=16, augment=False, results_dir=str(tmp_path)
    )
    linear = tmp_path / "linear-synthetic-dense-cached.json"
    before = linear.read_bytes()
    evaluate_checkpoint(ckpts["vicreg"], "knn", results_dir=str(tmp_path))
    evaluate_checkpoint(ckpts["vicreg"], "knn", results_dir=str(tmp_path))
    assert linear.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["knn-k1-euclidean-synthetic-dense.json", linear.name]


# ----- transfer ----------------------------------------------------------------------------------------------
def test_transfer_synthetic_to_digits(ckpts, tmp_path):
    records = evaluate_checkpoint(
        ckpts["vdg"],
        "transfer",
        target="digits",
        branch="gated",
        runs=1,
        results_dir=str(tmp_path),
        **{**FAST, "batch_size": 512},
    )
    assert [r["branch"] for r in records] == ["gated"]
    for record in records:
        assert (record["protocol"], record["pretrain_dataset"], record["dataset"]) == (
            "transfer",
            "synthetic",
            "digits",
        )
        assert (record["num_train"], record["num_test"], record["image_size"]) == (1437, 360, 32)
        assert (tmp_path / f"transfer-synthetic-to-digits-{record['branch']}-cached.json").is_file()
        assert record_key(record) == CellKey("vdg", record["branch"], "synthetic", "digits", 0.3)
        assert 0 < record["flops_reduction"] < 1  # measured on the target's test split


def test_transfer_keeps_the_pretraining_size_and_the_target_normalisation():
    imagenet = dataset_config("imagenet100")
    at32 = transfer_dataset(imagenet, 32)
    assert (at32.image_size, at32.eval_resize) == (32, 37)  # 256/224 of the crop, as ImageNet's own val
    assert list(at32.eval_mean) == list(imagenet.eval_mean)
    stl = transfer_dataset(dataset_config("stl10"), 32)
    assert (stl.image_size, stl.eval_resize) == (32, 32)
    cifar = transfer_dataset(dataset_config("cifar100"), 96)
    assert (cifar.image_size, cifar.eval_resize, cifar.num_classes) == (96, 96, 100)


def test_eval_options_reach_the_protocol():
    pre = compose_config(["dataset=cifar100", "data.root=/pretrain/data"])
    official = compose_config(["ckpt=x", "init=uniform", "weight_decay=1e-4", "image_stats=cifar10"], "linear_eval")
    protocol = linear_protocol(official, seed=3)
    assert (protocol.init, protocol.weight_decay, protocol.milestones, protocol.seed) == ("uniform", 1e-4, (60, 80), 3)
    assert (protocol.epochs, protocol.lr, protocol.momentum, protocol.gamma) == (100, 0.3, 0.9, 0.1)
    cifar10 = dataset_config("cifar10")
    quirk = eval_dataset(pre, None, "cifar10")  # CIFAR-100 normalised with CIFAR-10's statistics
    assert (quirk.name, list(quirk.eval_mean), list(quirk.eval_std)) == ("cifar100", cifar10.mean, cifar10.std)
    assert list(eval_dataset(pre, None, "dataset").eval_mean) == list(pre.dataset.mean)
    assert data_config(pre, official).root == "/pretrain/data"  # null: the checkpoint's own data.root
    elsewhere = compose_config(["ckpt=x", "data.root=/here", "data.num_workers=0"], "linear_eval")
    assert (data_config(pre, elsewhere).root, data_config(pre, elsewhere).num_workers) == ("/here", 0)


# ----- UMAP --------------------------------------------------------------------------------------------------
def run_script_here(name: str, *overrides: str) -> None:
    """Run scripts/<name> in this process (as `python scripts/<name> overrides...`): no second interpreter start."""
    argv = sys.argv
    sys.argv = [name, *overrides]
    try:
        runpy.run_path(str(REPO / "scripts" / name), run_name="__main__")
    finally:
        sys.argv = argv


def test_umap_script_plots_both_branches(ckpts, tmp_path, capsys):
    # in this process: numba compiles umap-learn on first use (~10-20 s), a subprocess would add its imports
    args = [f"ckpt={ckpts['vdg']}", "max_samples=40", f"output={tmp_path / 'u.png'}"]
    run_script_here("umap_plot.py", *args, "json=true")
    summary = json.loads(capsys.readouterr().out)
    assert summary["branches"] == ["dense", "gated"]
    assert (summary["num_samples"], summary["n_neighbors"]) == (32, 31)  # the tiny test split has 32 images
    assert (tmp_path / "u.png").read_bytes()[:8] == PNG
    run_script_here("umap_plot.py", *args)  # for people: one line
    assert capsys.readouterr().out == (
        f"UMAP (n_neighbors 31) of 32 synthetic test images, dense and gated side by side: {tmp_path / 'u.png'}\n"
    )


def test_exact_knn_puts_each_row_first_and_matches_brute_force():
    x = torch.randn(50, 8)
    index, dist = exact_knn(x, 5, chunk=16)
    brute = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    assert (index[:, 0] == range(50)).all() and (dist[:, 0] == 0).all()
    assert torch.equal(torch.from_numpy(index), brute.topk(5, largest=False).indices)
    assert torch.allclose(torch.from_numpy(dist), brute.topk(5, largest=False).values, atol=1e-4)


def test_spread_subset_covers_class_sorted_splits():
    assert spread_subset(10, None) == list(range(10))
    assert spread_subset(100, 5) == [0, 25, 50, 74, 99]
    with pytest.raises(ConfigError, match="max_samples"):
        spread_subset(10, 0)


# ----- records -----------------------------------------------------------------------------------------------
def test_records_feed_the_tables(ckpts):
    evaluate_checkpoint(ckpts["vicreg"], "knn")
    records = load_results(results_of(ckpts["vicreg"]))
    (knn,) = [r for r in records if r["protocol"] == "knn"]
    assert record_key(knn) == CellKey("vicreg", "dense", "synthetic", "synthetic", None)
    assert len(build_table("table4", records).rows) == 6  # synthetic rows do not exist: the cells stay empty


def test_config_hash_ignores_locations_only():
    pre = OmegaConf.to_container(compose_config([*TINY, "run_dir=/a"]), resolve=True)
    moved = OmegaConf.to_container(compose_config([*TINY, "run_dir=/b", "data.root=/elsewhere"]), resolve=True)
    ev = {"protocol": "knn", "k": 1, "ckpt": "/a/last.ckpt", "data": {"root": None}}
    same = config_hash(moved, {**ev, "ckpt": "/b/last.ckpt", "data": {"root": "/x"}})
    assert config_hash(pre, ev) == same and len(same) == 12
    assert config_hash(pre, {**ev, "k": 20}) != same
    assert config_hash({**pre, "budget": 0.5}, ev) != same


def test_result_filenames():
    assert result_filename("linear", "cifar10", "gated") == "linear-cifar10-gated.json"
    assert result_filename("knn", "cifar10", "dense", k=1, distance="euclidean", weighting="distance") == (
        "knn-k1-euclidean-cifar10-dense.json"
    )
    assert result_filename("knn", "c", "dense", k=20, distance="euclidean", weighting="exp", normalize=True) == (
        "knn-k20-euclidean-l2-exp-c-dense.json"
    )
    name = result_filename("transfer", "cifar10", "dense", pretrain_dataset="cifar100", tag="official")
    assert name == "transfer-cifar100-to-cifar10-dense-official.json"


def test_write_json_replaces_atomically(tmp_path):
    path = write_json({"a": 1}, tmp_path / "r" / "x.json")
    write_json({"a": 2}, path)
    assert json.loads(path.read_text()) == {"a": 2} and os.listdir(path.parent) == ["x.json"]


# ----- bad input ---------------------------------------------------------------------------------------------
def test_missing_corrupt_and_truncated_checkpoints(ckpts, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        evaluate_checkpoint(tmp_path / "nope.ckpt", "knn")
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="corrupt"):
        evaluate_checkpoint(noise, "knn")
    cut = tmp_path / "cut.ckpt"
    data = ckpts["vdg"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        evaluate_checkpoint(cut, "knn")


def test_branch_the_checkpoint_lacks(ckpts):
    with pytest.raises(
        CheckpointError, match=r"branch='gated' is not in this checkpoint \(vicreg serves \['dense'\]\)"
    ):
        evaluate_checkpoint(ckpts["vicreg"], "knn", branch="gated")


def test_checkpoint_of_another_width_or_method(ckpts, tmp_path):
    checkpoint = torch.load(ckpts["vdg"], weights_only=True)
    wider = OmegaConf.create(checkpoint["hyper_parameters"]["cfg"])
    wider.backbone.width = 8
    checkpoint["state_dict"] = build_method(wider).state_dict()
    edited = tmp_path / "edited.ckpt"
    torch.save(checkpoint, edited)
    with pytest.raises(CheckpointError, match="does not fit"):
        evaluate_checkpoint(edited, "knn")
    with pytest.raises(CheckpointError, match="trained with method 'vdg', expected 'vicreg'"):
        evaluate_checkpoint(ckpts["vdg"], "knn", expected_method="vicreg")


def test_unknown_protocol_target_option_and_branch(ckpts):
    with pytest.raises(ConfigError, match=r"unknown protocol 'probe'; allowed values: \['linear', 'knn', 'transfer'\]"):
        evaluate_checkpoint(ckpts["vdg"], "probe")
    with pytest.raises(ConfigError, match=r"unknown target 'mnist'; allowed values: \[.*'cifar10'"):
        evaluate_checkpoint(ckpts["vdg"], "transfer", target="mnist")
    with pytest.raises(ConfigError, match="target is required"):
        evaluate_checkpoint(ckpts["vdg"], "transfer")
    with pytest.raises(ConfigError, match=r"unknown knn evaluation option\(s\) \['kk'\]"):
        evaluate_checkpoint(ckpts["vdg"], "knn", kk=3)
    with pytest.raises(ConfigError, match="unknown branch 'all'"):
        evaluate_checkpoint(ckpts["vdg"], "knn", branch="all")
    with pytest.raises(ConfigError, match="unknown distance 'manhattan'"):
        evaluate_checkpoint(ckpts["vdg"], "knn", distance="manhattan")


def test_api_config_equals_the_script_config():
    api = eval_config("x.ckpt", "transfer", target="cifar10", epochs=3, data={"root": "/d"})
    script = compose_config(
        ["ckpt=x.ckpt", "eval=transfer", "target=cifar10", "epochs=3", "data.root=/d"], "linear_eval"
    )
    assert api == script
    knn = compose_config(["ckpt=x.ckpt", "k=20"], "knn_eval")
    with initialize_config_dir(config_dir=str(REPO / "tests"), version_base="1.3"):  # a running Hydra app
        running = GlobalHydra.instance().hydra
        assert eval_config("x.ckpt", "knn", k=20) == knn
        assert GlobalHydra.instance().hydra is running  # given back untouched


# ----- the scripts ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def linear_script(ckpts, tmp_path_factory) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`python scripts/linear_eval.py` with tiny overrides, launched at the first test so that its interpreter
    start-up and imports (most of its cost) overlap with the in-process tests; test_linear_eval_script waits."""
    out = tmp_path_factory.mktemp("linear_script")
    command = [
        sys.executable, str(REPO / "scripts" / "linear_eval.py"), f"ckpt={ckpts['vdg']}", "branch=gated",
        "epochs=1", "runs=1", "batch_size=16", f"results_dir={out}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield process, out
    if process.poll() is None:
        process.kill()
        process.wait()


def test_linear_eval_script(linear_script):
    """It prints a short summary (one line per network) and per-epoch progress with the time left."""
    process, out = linear_script
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    record = json.loads((out / "linear-synthetic-gated.json").read_text())
    assert (record["protocol"], record["branch"], record["eval_config"]["augment"]) == ("linear", "gated", True)
    lines = stdout.splitlines()
    assert lines[0].startswith("linear evaluation of ") and lines[0].endswith("(vdg, t_d = 0.3) on synthetic:")
    assert lines[1] == f"  gated  top-1 {record['value']:.2f}%  FLOPs {100 * (1 - record['flops_reduction']):.1f}% " \
        f"of dense (reduction {100 * record['flops_reduction']:.1f}%)"
    assert lines[2] == f"protocol: {record['description']}" and "1 run " in lines[2]
    assert lines[3].startswith("records: ") and "json=true" in lines[3] and len(lines) == 4
    assert "linear [gated] epoch 1/1 (lr 0.3) | gated loss " in stderr and "| ETA 0:00:00" in stderr


def test_knn_eval_script(ckpts, tmp_path, capsys):
    run_script_here("knn_eval.py", f"ckpt={ckpts['vicreg']}", "k=20", f"results_dir={tmp_path}")
    summary = capsys.readouterr().out.splitlines()
    record = json.loads((tmp_path / "knn-k20-euclidean-distance-synthetic-dense.json").read_text())
    reference = record["random_init"]
    assert summary[1] == (
        f"  dense  top-1 {record['value']:.2f}%  {record['over_random_init']:+.2f} over random init "
        f"({reference['top1_mean']:.2f}%, 3 seeds)  FLOPs 100% of dense"
    ) and len(summary) == 4
    assert record["description"] == (
        "20-NN, euclidean distance on raw frozen 32-d backbone features (eval mode), votes weighted 1/(d + 1e-5); "
        "bank: the 64 unaugmented synthetic train images, queries: the 32 test images"
    )
    run_script_here("knn_eval.py", f"ckpt={ckpts['vicreg']}", "k=20", f"results_dir={tmp_path}", "json=true")
    (printed,) = json.loads(capsys.readouterr().out)
    assert printed["eval_config"]["json"] is True and printed["config_hash"] == record["config_hash"]  # display only
    assert {**printed, "eval_config": None} == {**record, "eval_config": None}


def test_scripts_report_bad_input_in_one_line(tmp_path):
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(SystemExit, match=f"^error: checkpoint not found: ckpt={str(missing)!r} is not a file$"):
        run_script_here("knn_eval.py", f"ckpt={missing}")
    with pytest.raises(SystemExit, match=r"^error: unknown target 'mnist'; allowed values: \["):
        run_script_here("linear_eval.py", f"ckpt={missing}", "eval=transfer", "target=mnist")


# ----- the random-init reference -----------------------------------------------------------------------------------
def test_knn_records_the_random_init_reference_of_the_same_architecture(ckpts, tmp_path):
    before = torch.random.get_rng_state()
    records = evaluate_checkpoint(ckpts["vdg"], "knn", results_dir=str(tmp_path), random_init_seeds=[3, 4])
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone
    model = load_method(ckpts["vdg"])
    for record in records:
        runs = []
        for seed in (3, 4):  # what the reference must be: a fresh backbone built as the model builds its own
            torch.manual_seed(seed)
            backbone = model.build_backbone(model.cfg).eval()
            train, test = (extract_features(backbone, eval_loader(model.cfg, split, 16), record["branch"])
                           for split in ("train", "test"))
            runs.append(knn_accuracy(train.features, train.labels, test.features, test.labels))
        assert record["random_init"] == {"top1_mean": pytest.approx(sum(runs) / 2), "top1_runs": pytest.approx(runs),
                                         "seeds": [3, 4]}
        assert record["over_random_init"] == pytest.approx(record["value"] - sum(runs) / 2)
    again = evaluate_checkpoint(ckpts["vdg"], "knn", results_dir=str(tmp_path), random_init_seeds=[3, 4])
    assert [r["random_init"] for r in again] == [r["random_init"] for r in records]  # seeded


def test_random_init_reference_can_be_turned_off_and_refuses_bad_seeds(ckpts, tmp_path):
    (record,) = evaluate_checkpoint(ckpts["vicreg"], "knn", results_dir=str(tmp_path), random_init_seeds=[])
    assert "random_init" not in record and "over_random_init" not in record
    with pytest.raises(ConfigError, match=r"random_init_seeds=.*list of init seeds"):
        evaluate_checkpoint(ckpts["vicreg"], "knn", results_dir=str(tmp_path), random_init_seeds=[-1])


def test_linear_random_init_reference_runs_the_same_protocol_on_fresh_backbones(ckpts, tmp_path):
    options = {"branch": "gated", "epochs": 2, "runs": 1, "batch_size": 16, "augment": False}
    (plain,) = evaluate_checkpoint(ckpts["vdg"], "linear", results_dir=str(tmp_path / "a"), **options)
    assert "random_init" not in plain  # off by default: it costs one protocol per init seed
    before = torch.random.get_rng_state()
    (record,) = evaluate_checkpoint(ckpts["vdg"], "linear", results_dir=str(tmp_path / "b"), random_init_seeds=[5],
                                    **options)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert record["value"] == plain["value"]  # the trained figure is untouched, the trained backbone put back
    model = load_method(ckpts["vdg"])
    torch.manual_seed(5)
    backbone = model.build_backbone(model.cfg).eval()
    train, test = (extract_features(backbone, eval_loader(model.cfg, split, 16), "gated")
                   for split in ("train", "test"))
    expected = train_linear_on_features(train, test, LinearProtocol(epochs=2, batch_size=16, seed=0), 10)["top1"]
    assert record["random_init"] == {"top1_mean": pytest.approx(expected), "top1_runs": [pytest.approx(expected)],
                                     "seeds": [5]}
    assert record["over_random_init"] == pytest.approx(record["value"] - expected)
    with pytest.raises(ConfigError, match=r"random_init_seeds=.*list of init seeds"):
        evaluate_checkpoint(ckpts["vdg"], "linear", results_dir=str(tmp_path), random_init_seeds=[1.5], **options)


def test_raw_pixel_reference_runs_the_protocol_on_the_images(ckpts, tmp_path):
    model = load_method(ckpts["vdg"])
    train, test = (next(iter(eval_loader(model.cfg, split, 10_000))) for split in ("train", "test"))
    (knn,) = evaluate_checkpoint(ckpts["vdg"], "knn", results_dir=str(tmp_path), features="pixels")
    expected = knn_accuracy(train[0].flatten(1), train[1], test[0].flatten(1), test[1])
    assert knn["branch"] == "pixels" and knn["features"] == "pixels" and knn["value"] == pytest.approx(expected)
    assert knn["flops_reduction"] is None and "random_init" not in knn
    assert "raw pixels (3072 values" in knn["description"]
    assert (tmp_path / "knn-k1-euclidean-synthetic-pixels.json").is_file()
    (linear,) = evaluate_checkpoint(ckpts["vdg"], "linear", results_dir=str(tmp_path), features="pixels", runs=1,
                                    **FAST)
    pixels = Features(train[0].flatten(1), train[1]), Features(test[0].flatten(1), test[1])
    expected = train_linear_on_features(*pixels, LinearProtocol(epochs=2, batch_size=16, seed=0), 10)["top1"]
    assert linear["branch"] == "pixels" and linear["value"] == pytest.approx(expected)
    with pytest.raises(ConfigError, match="features=pixels needs augment=false"):
        evaluate_checkpoint(ckpts["vdg"], "linear", results_dir=str(tmp_path), features="pixels", augment=True)
    with pytest.raises(ConfigError, match=r"unknown features 'raw'.*allowed values: \['backbone', 'pixels'\]"):
        evaluate_checkpoint(ckpts["vdg"], "knn", results_dir=str(tmp_path), features="raw")


def test_knn_script_prints_the_trained_figure_and_the_reference_on_one_line(ckpts, tmp_path):
    result = subprocess.run([sys.executable, "scripts/knn_eval.py", f"ckpt={ckpts['vdg']}", f"results_dir={tmp_path}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.strip().startswith(("dense", "gated"))]
    assert len(lines) == 2
    for line in lines:
        assert re.search(r"top-1 \d+\.\d\d%  [+-]\d+\.\d\d over random init \(\d+\.\d\d%, 3 seeds\)", line), line
