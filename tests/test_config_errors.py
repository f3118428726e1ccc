"""Bad input gets a clear error naming the key and the allowed values, before any work (table-driven).

Every row of BAD_VALUES / BAD_EVAL_ARGUMENTS / BAD_PREFLIGHT is listed in docs/validation.md with its message.
"""

import pytest
import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict

from vdg.core.cli import quote_path_values
from vdg.core.errors import ConfigError, DatasetError, RunDirError
from vdg.run.config import validate_pretrain_config
from vdg.run.driver import prepare, pretrain

from .conftest import TINY, compose_config

NOT_SYNTHETIC = [o for o in TINY if not o.startswith("dataset")]


def cfg_with(*overrides, **values):
    cfg = compose_config([*TINY, *overrides])
    with open_dict(cfg):
        for dotted, value in values.items():
            node = cfg
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return cfg


BAD_VALUES = [
    # ranges and choices
    ({"budget": 0.0}, r"budget=0.0 is outside \(0, 1\]"),
    ({"budget": 1.5}, r"budget=1.5 is outside \(0, 1\]"),
    ({"budget": -0.3}, r"budget=-0.3 is outside \(0, 1\]"),
    ({"budget": "half"}, r"budget='half' must be a number in \(0, 1\]"),
    ({"budget": True}, r"budget=True must be a number in \(0, 1\]"),
    ({"method.name": "simclr"}, r"unknown method.name 'simclr'; allowed values: \[.*'vdg'.*'vicreg'"),
    ({"dataset.name": "mnist"}, r"unknown dataset.name 'mnist'; allowed values: \['cifar10', 'cifar100'"),
    ({"dataset.stem": "vit"}, r"unknown dataset.stem 'vit'; allowed values: \['cifar', 'imagenet'\]"),
    ({"backbone.bn_split": "half"}, r"unknown backbone.bn_split 'half'; allowed values: \['blocks', 'all', 'none'\]"),
    ({"backbone.name": "resnet50"}, r"unknown backbone.name 'resnet50'; allowed values: \['resnet18'\]"),
    ({"backbone.width": 2}, r"backbone.width=2 must be an integer >= 4"),
    ({"backbone.gate_reduction": 0}, r"backbone.gate_reduction=0 must be an integer >= 1"),
    ({"backbone.block_widths": [4, 4]}, r"backbone.block_widths=\[4, 4\] must be null or 8 integers"),
    ({"dataset.image_size": 4}, r"dataset.image_size=4 must be an integer >= 8"),
    ({"data.batch_size": 1}, r"data.batch_size=1 must be an integer >= 2"),
    ({"data.backend": "tpu"}, r"unknown data.backend 'tpu'; allowed values: \["),
    ({"data.num_workers": -1}, r"data.num_workers=-1 must be an integer >= 0"),
    ({"data.gpu_memory_fraction": 2.0}, r"data.gpu_memory_fraction=2.0 must be a number in \(0, 1\]"),
    ({"trainer.max_epochs": 0}, r"trainer.max_epochs=0 must be an integer >= 1"),
    ({"trainer.precision": "fp8"}, r"unknown trainer.precision 'fp8'; allowed values: \['auto', '32-true'"),
    ({"trainer.devices": 0}, r"trainer.devices=0 must be an integer >= 1"),
    ({"trainer.log_every_n_steps": 0}, r"trainer.log_every_n_steps=0 must be an integer >= 1"),
    ({"trainer.limit_train_batches": 0}, r"trainer.limit_train_batches=0 must be an integer >= 1"),
    ({"trainer.progress": "fancy"}, r"unknown trainer.progress 'fancy'; allowed values"),
    ({"scheduler.interval": "batch"}, r"unknown scheduler.interval 'batch'; allowed values: \['epoch', 'step'\]"),
    ({"resume": "maybe"}, r"unknown resume 'maybe'; allowed values: \['auto', 'never', 'extend'\]"),
    ({"optimizer.lr": -0.1}, r"optimizer.lr=-0.1 must be a number > 0"),
    ({"optimizer.lr": float("inf")}, r"optimizer.lr=inf must be a finite number > 0"),
    ({"optimizer.weight_decay": -1.0}, r"optimizer.weight_decay=-1.0 must be a number >= 0"),
    ({"optimizer.momentum": 1.5}, r"optimizer.momentum=1.5 must be a number in \[0, 1\)"),
    ({"gating.budget_weight": -5.0}, r"gating.budget_weight=-5.0 must be a number >= 0"),
    ({"gating.bound_target": "cube"}, r"unknown gating.bound_target 'cube'; allowed values: \['sqrt', 'linear'\]"),
    ({"method.variance_reduction": "median"}, r"unknown method.variance_reduction 'median'; allowed values"),
    ({"dataset.std": [0.0, 0.0, 0.0]}, r"dataset.std=\[0.0, 0.0, 0.0\]: every channel's std must be > 0"),
    ({"dataset.eval_std": [0.2, 0.0, 0.2]}, r"dataset.eval_std=.*every channel's std must be > 0"),
    ({"dataset.mean": [0.5, 0.5]}, r"dataset.mean=\[0.5, 0.5\] must be a list of 3 numbers"),
    ({"dataset.augment": [{"crop_min_scale": 0.2}]}, r"dataset.augment must list 2 views"),
    ({"final_knn.distance": "manhattan"}, r"unknown final_knn.distance 'manhattan'; allowed values"),
    ({"final_knn.k": 0}, r"final_knn.k=0 must be an integer >= 1"),
    # values that used to be coerced silently: integers must be integers, booleans booleans
    ({"seed": 1.5}, r"seed=1.5 must be an integer in \[0, 4294967295\]"),
    ({"seed": True}, r"seed=True must be an integer"),
    ({"seed": -1}, r"seed=-1 must be an integer in \[0, 4294967295\]"),
    ({"seed": "abc"}, r"seed='abc' must be an integer"),
    ({"seed": 2**40}, r"seed=1099511627776 must be an integer in \[0, 4294967295\]"),
    ({"trainer.max_epochs": True}, r"trainer.max_epochs=True must be an integer >= 1"),
    ({"trainer.max_epochs": 2.5}, r"trainer.max_epochs=2.5 must be an integer >= 1"),
    ({"data.num_workers": True}, r"data.num_workers=True must be an integer >= 0"),
    ({"data.batch_size": 16.5}, r"data.batch_size=16.5 must be an integer >= 2"),
    ({"optimizer.lr": True}, r"optimizer.lr=True must be a number > 0"),
    ({"checkpoint.every_n_epochs": 1.5}, r"checkpoint.every_n_epochs=1.5 must be an integer >= 1"),
    ({"guard.check_every_n_steps": 0}, r"guard.check_every_n_steps=0 must be an integer >= 1"),
    ({"final_knn.k": 1.5}, r"final_knn.k=1.5 must be an integer >= 1"),
    ({"dataset.num_classes": 10.5}, r"dataset.num_classes=10.5 must be an integer >= 1"),
    ({"method.projector_output_dim": 32.5}, r"method.projector_output_dim=32.5 must be an integer >= 1"),
    ({"scheduler.warmup_epochs": "abc"}, r"scheduler.warmup_epochs='abc' must be a number >= 0"),
    ({"gating.bound_loss": "no"}, r"gating.bound_loss='no' must be true or false"),
    ({"data.pin_memory": "maybe"}, r"data.pin_memory='maybe' must be true or false"),
    ({"probe.enabled": 1}, r"probe.enabled=1 must be true or false"),
    # typos appended with `+key=value` (Hydra's own suggestion for a key that does not exist)
    ({"trainer.max_epoch": 3}, r"unknown key trainer.max_epoch \(did you mean trainer.max_epochs\?\)"),
    ({"method.invariance_weigth": 5.0}, r"unknown key method.invariance_weigth \(did you mean method.invariance_w"),
    ({"data.batchsize": 32}, r"unknown key data.batchsize \(did you mean data.batch_size\?\)"),
    ({"gating.budget_wieght": 1.0}, r"unknown key gating.budget_wieght"),
    ({"trainer.callbacks": []}, r"trainer.callbacks is set by vdg itself"),
    ({"evaluate": {"protocol": "knn"}}, r"evaluate=\{'protocol': 'knn'\} must be a list"),
]


@pytest.mark.parametrize("values,message", BAD_VALUES, ids=[str(v) for v, _ in BAD_VALUES])
def test_bad_config_values_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        validate_pretrain_config(cfg_with(**values))


def test_defaults_are_valid():
    validate_pretrain_config(compose_config([]))


def test_more_processes_than_batch_or_a_gpu_that_is_not_there():
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu but no CUDA GPU is visible.*cpu or auto"):
            validate_pretrain_config(cfg_with(**{"trainer.accelerator": "gpu"}))
        with pytest.raises(ConfigError, match=r"trainer.precision=16-mixed needs a GPU"):
            validate_pretrain_config(cfg_with(**{"trainer.precision": "16-mixed"}))


# evaluations chained after pretraining (`evaluate=`), checked with the pretraining config
BAD_EVALUATE = [
    ("evaluate=[{protocol: linaer}]", r"evaluate\[0\]: unknown protocol 'linaer'"),
    ("evaluate=[{protocol: knn, k: 0}]", r"evaluate\[0\]: k=0 must be an integer >= 1"),
    ("evaluate=[{protocol: linear, lr: -0.1}]", r"evaluate\[0\]: lr=-0.1 must be a number > 0"),
    ("evaluate=[{protocol: linear, epochz: 2}]", r"evaluate\[0\]: unknown linear evaluation option\(s\) \['epochz'\]"),
    ("evaluate=[{protocol: transfer, target: mnist}]", r"evaluate\[0\]: unknown target 'mnist'"),
    ("evaluate=[{k: 3}]", r"evaluate\[0\]=\{'k': 3\} must be a mapping with a protocol"),
]


@pytest.mark.parametrize("override,message", BAD_EVALUATE, ids=[o for o, _ in BAD_EVALUATE])
def test_bad_chained_evaluations_are_refused_before_training(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_pretrain_config(cfg_with(override))


# what the data says, checked before the run directory is created (`vdg.run.driver.prepare`)
BAD_PREFLIGHT = [
    (["data.batch_size=128"], DatasetError, r"pretraining split has 64 images, fewer than one per-device batch"),
    (["final_knn.enabled=true", "final_knn.k=1000"], ConfigError, r"final_knn.k=1000 is larger than the k-NN bank"),
    (["evaluate=[{protocol: knn, k: 1000}]"], ConfigError, r"evaluate\[0\]: k=1000 is larger than the k-NN bank"),
    (["run_dir=/proc/vdg-run"], RunDirError, r"run_dir='/proc/vdg-run' cannot be created in /proc"),
]


@pytest.mark.parametrize("overrides,error,message", BAD_PREFLIGHT, ids=[" ".join(o) for o, *_ in BAD_PREFLIGHT])
def test_data_and_run_dir_are_checked_before_anything_is_created(tmp_path, overrides, error, message):
    cfg = compose_config([*TINY, f"run_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(error, match=message):
        prepare(cfg)
    assert not (tmp_path / "run").exists()


def test_a_run_failing_validation_leaves_no_run_folder(tmp_path):
    with pytest.raises(ConfigError, match="budget"):
        pretrain(compose_config([*TINY, f"run_dir={tmp_path / 'new' / 'run'}", "budget=2"]))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "override,allowed",
    [("dataset=mnist", "cifar10"), ("method=simclr", "vdg"), ("optimizer=adamw", "lars")],
)
def test_unknown_config_group_option_lists_the_choices(override, allowed):
    with pytest.raises(HydraException, match=rf"(?s)Could not find.*Available options.*{allowed}"):
        compose_config([override])


def test_missing_cifar_names_data_root(tmp_path):
    nowhere = tmp_path / "nowhere"
    cfg = compose_config([*NOT_SYNTHETIC, "dataset=cifar100", f"data.root={nowhere}", "data.download=false",
                          f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(FileNotFoundError, match=r"cifar100 not found under data.root=.*nowhere.*cifar-100-python"):
        pretrain(cfg)
    assert not (tmp_path / "run").exists()


def test_missing_folder_names_layout(tmp_path):
    cfg = compose_config([*NOT_SYNTHETIC, "dataset=folder", f"data.root={tmp_path}", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(FileNotFoundError, match=r"has no train/ folder.*dataset=folder expects"):
        pretrain(cfg)


# Command-line arguments of the evaluation scripts (checked before any checkpoint is read).
BAD_EVAL_ARGUMENTS = [
    ("linear_eval", [], r"ckpt=PATH is required"),
    ("linear_eval", ["ckpt=x.ckpt", "branch=left"], r"branch.*'left'.*allowed values: \['dense', 'gated', 'both'\]"),
    ("linear_eval", ["ckpt=x.ckpt", "runs=0"], r"runs=0 must be an integer >= 1"),
    ("linear_eval", ["ckpt=x.ckpt", "init=zeros"], r"init.*zeros"),
    ("linear_eval", ["ckpt=x.ckpt", "epochs=0"], r"epochs=0 must be an integer >= 1"),
    ("linear_eval", ["ckpt=x.ckpt", "image_stats=imagenet"], r"image_stats.*'imagenet'.*allowed values"),
    ("linear_eval", ["ckpt=x.ckpt", "eval=transfer", "target=mnist"], r"'mnist'.*allowed values: \[.*'cifar10'"),
    ("linear_eval", ["ckpt=x.ckpt", "epochs=2.5"], r"epochs=2.5 must be an integer >= 1"),
    ("linear_eval", ["ckpt=x.ckpt", "runs=true"], r"runs=True must be an integer >= 1"),
    ("linear_eval", ["ckpt=x.ckpt", "batch_size=12.5"], r"batch_size=12.5 must be an integer >= 1"),
    ("linear_eval", ["ckpt=x.ckpt", "augment=sometimes"], r"augment='sometimes' must be true or false"),
    ("linear_eval", ["ckpt=x.ckpt", "lr=-0.1"], r"lr=-0.1 must be a number > 0"),
    ("linear_eval", ["ckpt=x.ckpt", "momentum=-1"], r"momentum=-1 must be a number in \[0, 1\)"),
    ("linear_eval", ["ckpt=x.ckpt", "weight_decay=-1"], r"weight_decay=-1 must be a number >= 0"),
    ("linear_eval", ["ckpt=x.ckpt", "gamma=0"], r"gamma=0 must be a number in \(0, 1\]"),
    ("linear_eval", ["ckpt=x.ckpt", "milestones=[a]"], r"milestones=\['a'\] must be a list of epochs"),
    ("linear_eval", ["ckpt=x.ckpt", "seed=1.5"], r"seed=1.5 must be an integer"),
    ("linear_eval", ["ckpt=x.ckpt", "device=tpu"], r"unknown device 'tpu'; allowed values"),
    ("linear_eval", ["ckpt=x.ckpt", "tag=a/b"], r"tag='a/b' becomes part of a file name"),
    ("linear_eval", ["ckpt=x.ckpt", "expected_method=simclr"], r"unknown expected_method 'simclr'"),
    ("linear_eval", ["ckpt=x.ckpt", "+epoch=3"], r"unknown key epoch \(did you mean epochs\?\)"),
    ("linear_eval", ["ckpt=x.ckpt", "data.num_workers=-2"], r"data.num_workers=-2 must be an integer >= 0"),
    ("knn_eval", ["ckpt=x.ckpt", "k=0"], r"k=0 must be an integer >= 1"),
    ("knn_eval", ["ckpt=x.ckpt", "k=true"], r"k=True must be an integer >= 1"),
    ("knn_eval", ["ckpt=x.ckpt", "distance=manhattan"], r"'manhattan'.*allowed values: \['euclidean', 'cosine'\]"),
    ("knn_eval", ["ckpt=x.ckpt", "weighting=softmax"], r"weighting.*'softmax'.*allowed values"),
    ("linear_eval", ["ckpt=x.ckpt", "augment_backend=gpu"], r"augment_backend 'gpu'.*\['auto', 'batched', 'workers'\]"),
    ("linear_eval", ["ckpt=x.ckpt", "share_views=yes"], r"share_views='yes' must be true or false"),
    ("knn_eval", ["ckpt=x.ckpt", "json=1"], r"json=1 must be true or false"),
    ("knn_eval", ["ckpt=x.ckpt", "temperature=0"], r"temperature=0 must be a number > 0"),
    ("knn_eval", ["ckpt=x.ckpt", "normalize=yes"], r"normalize='yes' must be true or false"),
]
if not torch.cuda.is_available():
    BAD_EVAL_ARGUMENTS.append(("linear_eval", ["ckpt=x.ckpt", "device=cuda"], r"device=cuda but no CUDA GPU"))


@pytest.mark.parametrize("config,args,message", BAD_EVAL_ARGUMENTS, ids=[" ".join(a) for _, a, _ in BAD_EVAL_ARGUMENTS])
def test_bad_evaluation_arguments_are_refused(config, args, message):
    from vdg.eval.protocols import check_eval_config

    with pytest.raises(ConfigError, match=message):
        check_eval_config(compose_config(args, config_name=config))


BAD_UMAP_ARGUMENTS = [
    (["max_samples=1"], r"max_samples=1 must be an integer >= 3"),
    (["max_samples=20.5"], r"max_samples=20.5 must be an integer >= 3"),
    (["n_neighbors=1"], r"n_neighbors=1 must be an integer >= 2"),
    (["results_dir=/proc/vdg-results"], r"results_dir='/proc/vdg-results' cannot be created in /proc"),
    (["+max_sample=3"], r"unknown key max_sample \(did you mean max_samples\?\)"),
]


@pytest.mark.parametrize("args,message", BAD_UMAP_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_UMAP_ARGUMENTS])
def test_bad_umap_arguments_are_refused_before_loading(tmp_path, args, message):
    from vdg.report.umap import check_umap_config

    with pytest.raises((ConfigError, RunDirError), match=message):
        check_umap_config(compose_config([f"ckpt={tmp_path / 'x.ckpt'}", *args], config_name="umap"))


def test_flops_report_into_an_unwritable_folder_is_refused_before_loading(tmp_path):
    from vdg.report.flops import flops_summary

    cfg = compose_config([f"ckpt={tmp_path / 'x.ckpt'}", "report=true", "results_dir=/proc/x"], config_name="flops")
    with pytest.raises(RunDirError, match=r"results_dir='/proc/x' cannot be created in /proc"):
        flops_summary(cfg)


def test_paths_with_an_equals_sign_are_quoted_for_hydra():
    argv = ["ckpt=runs/a/epoch=0009.ckpt", "k=3", "run_dir=runs/td=0.3", "ckpt='quoted=already'", "tag=a=b"]
    assert quote_path_values(argv) == [
        "ckpt='runs/a/epoch=0009.ckpt'", "k=3", "run_dir='runs/td=0.3'", "ckpt='quoted=already'", "tag=a=b",
    ]
    cfg = compose_config([*quote_path_values(["ckpt=runs/a/epoch=0009.ckpt"])], config_name="knn_eval")
    assert cfg.ckpt == "runs/a/epoch=0009.ckpt"


def test_bad_input_table_is_large_enough():
    rows = BAD_VALUES + BAD_EVALUATE + BAD_PREFLIGHT + BAD_EVAL_ARGUMENTS + BAD_UMAP_ARGUMENTS
    assert len(rows) >= 100
    assert OmegaConf.is_config(cfg_with())
