"""Bad input gets a clear error naming the key and the allowed values (table-driven)."""

import pytest
from hydra.errors import HydraException
from omegaconf import open_dict

from vdg.run.config import ConfigError, validate_pretrain_config
from vdg.run.driver import pretrain

from .conftest import TINY, compose_config


def cfg_with(**values):
    cfg = compose_config(TINY)
    with open_dict(cfg):
        for dotted, value in values.items():
            node = cfg
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return cfg


BAD_VALUES = [
    ({"budget": 0.0}, r"budget=0.0 is outside \(0, 1\]"),
    ({"budget": 1.5}, r"budget=1.5 is outside \(0, 1\]"),
    ({"budget": -0.3}, r"budget=-0.3 is outside \(0, 1\]"),
    ({"budget": "half"}, r"budget='half' is outside \(0, 1\]"),
    ({"method.name": "simclr"}, r"unknown method.name 'simclr'; allowed values: \[.*'vdg'.*'vicreg'"),
    ({"dataset.name": "mnist"}, r"unknown dataset.name 'mnist'; allowed values: \['cifar10', 'cifar100'"),
    ({"dataset.stem": "vit"}, r"unknown dataset.stem 'vit'; allowed values: \['cifar', 'imagenet'\]"),
    ({"backbone.bn_split": "half"}, r"unknown backbone.bn_split 'half'; allowed values: \['blocks', 'all', 'none'\]"),
    ({"backbone.width": 2}, r"backbone.width=2 must be an integer >= 4"),
    ({"dataset.image_size": 4}, r"dataset.image_size=4 must be an integer >= 8"),
    ({"data.batch_size": 1}, r"data.batch_size=1 must be an integer >= 2"),
    ({"data.backend": "tpu"}, r"unknown data.backend 'tpu'; allowed values: \["),
    ({"data.num_workers": -1}, r"data.num_workers=-1 must be an integer >= 0"),
    ({"trainer.max_epochs": 0}, r"trainer.max_epochs=0 must be an integer >= 1"),
    ({"scheduler.interval": "batch"}, r"unknown scheduler.interval 'batch'; allowed values: \['epoch', 'step'\]"),
    ({"resume": "maybe"}, r"unknown resume 'maybe'; allowed values: \['auto', 'never'\]"),
    ({"optimizer.lr": -0.1}, r"optimizer.lr=-0.1 must be a number >= 0"),
    ({"optimizer.weight_decay": -1.0}, r"optimizer.weight_decay=-1.0 must be a number >= 0"),
    ({"gating.budget_weight": -5.0}, r"gating.budget_weight.*must be >= 0"),
]


@pytest.mark.parametrize("values,message", BAD_VALUES, ids=[str(v) for v, _ in BAD_VALUES])
def test_bad_config_values_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        validate_pretrain_config(cfg_with(**values))


def test_defaults_are_valid():
    validate_pretrain_config(compose_config([]))


@pytest.mark.parametrize(
    "override,allowed",
    [("dataset=mnist", "cifar10"), ("method=simclr", "vdg"), ("optimizer=adamw", "lars")],
)
def test_unknown_config_group_option_lists_the_choices(override, allowed):
    with pytest.raises(HydraException, match=rf"(?s)Could not find.*Available options.*{allowed}"):
        compose_config([override])


def test_missing_cifar_names_data_root(tmp_path):
    cfg = cfg_with(**{"dataset.name": "cifar100", "data.root": str(tmp_path / "nowhere"), "data.download": False})
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"cifar100 not found under data.root=.*nowhere.*cifar-100-python"):
        pretrain(cfg)


def test_missing_folder_names_layout(tmp_path):
    cfg = cfg_with(**{"dataset.name": "folder", "data.root": str(tmp_path)})
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"has no train/ folder.*dataset=folder expects"):
        pretrain(cfg)


# Command-line arguments of the evaluation scripts (checked before any checkpoint is read).
BAD_EVAL_ARGUMENTS = [
    ("linear_eval", [], r"ckpt=PATH is required"),
    ("linear_eval", ["ckpt=x.ckpt", "branch=left"], r"branch.*'left'.*allowed values: \['dense', 'gated', 'both'\]"),
    ("linear_eval", ["ckpt=x.ckpt", "runs=0"], r"runs=0 must be an integer >= 1"),
    ("linear_eval", ["ckpt=x.ckpt", "init=zeros"], r"init.*zeros"),
    ("linear_eval", ["ckpt=x.ckpt", "epochs=0"], r"epochs"),
    ("linear_eval", ["ckpt=x.ckpt", "image_stats=imagenet"], r"image_stats.*'imagenet'.*allowed values"),
    ("linear_eval", ["ckpt=x.ckpt", "eval=transfer", "target=mnist"], r"'mnist'.*allowed values: \[.*'cifar10'"),
    ("knn_eval", ["ckpt=x.ckpt", "k=0"], r"k=0 must be an integer >= 1"),
    ("knn_eval", ["ckpt=x.ckpt", "distance=manhattan"], r"'manhattan'.*allowed values: \['euclidean', 'cosine'\]"),
    ("knn_eval", ["ckpt=x.ckpt", "weighting=softmax"], r"weighting.*'softmax'.*allowed values"),
    ("linear_eval", ["ckpt=x.ckpt", "augment_backend=gpu"], r"augment_backend 'gpu'.*\['auto', 'batched', 'workers'\]"),
    ("linear_eval", ["ckpt=x.ckpt", "share_views=yes"], r"share_views='yes' must be true or false"),
    ("knn_eval", ["ckpt=x.ckpt", "json=1"], r"json=1 must be true or false"),
]


@pytest.mark.parametrize("config,args,message", BAD_EVAL_ARGUMENTS, ids=[" ".join(a) for _, a, _ in BAD_EVAL_ARGUMENTS])
def test_bad_evaluation_arguments_are_refused(config, args, message):
    from vdg.eval.protocols import check_eval_config

    with pytest.raises(ConfigError, match=message):
        check_eval_config(compose_config(args, config_name=config))


def test_bad_input_table_is_large_enough():
    assert len(BAD_VALUES) + len(BAD_EVAL_ARGUMENTS) >= 20
