"""Linear, k-NN and transfer evaluation of a pretraining checkpoint, one JSON record per branch.

The runner behind scripts/linear_eval.py, scripts/knn_eval.py and `vdg.eval.api`: it picks the data, the
branches and the options; the maths is `vdg.eval.{features,knn,linear}`. The backbone stays frozen in eval mode.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from vdg.data.datasets import build_dataset
from vdg.data.module import TransformedDataset, eval_loader
from vdg.data.transforms import linear_train_transform
from vdg.eval.features import Features, extract_features, gate_report
from vdg.eval.knn import DISTANCES, WEIGHTINGS, knn_accuracy
from vdg.eval.linear import LinearProtocol, train_linear_on_features, train_linear_on_images
from vdg.eval.results import accuracy_fields, base_record, result_filename, results_dir, write_json
from vdg.models import Branch, GatedResNet, network_cost
from vdg.run.checkpoint import CheckpointError, load_method, require_branch
from vdg.run.config import ConfigError

log = logging.getLogger(__name__)

PROTOCOLS = ("linear", "knn", "transfer")
BRANCH_CHOICES = ("dense", "gated", "both")
# image_stats: which mean/std normalise evaluation images. "dataset": the evaluated dataset's eval_mean/eval_std;
# "cifar10": CIFAR-10's, as the official linear/k-NN code does for CIFAR-100 too (reference §1.13).
IMAGE_STATS = ("dataset", "cifar10")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def dataset_names() -> list[str]:
    """The datasets a transfer `target` may name: the files of configs/dataset/."""
    return sorted(p.stem for p in (CONFIG_DIR / "dataset").glob("*.yaml"))


def dataset_config(name: str) -> DictConfig:
    """configs/dataset/<name>.yaml, interpolations resolved."""
    path = CONFIG_DIR / "dataset" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown dataset {name!r}; allowed values: {dataset_names()}")
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def _choice(cfg: DictConfig, key: str, allowed: tuple[str, ...] | list[str]) -> str:
    value = None if OmegaConf.is_missing(cfg, key) else cfg.get(key)
    if value not in allowed:
        what = f"{key} is required" if value is None else f"unknown {key} {value!r}"
        raise ConfigError(f"{what}; allowed values: {list(allowed)}")
    return str(value)


def check_eval_config(cfg: DictConfig) -> None:
    """Fail before any loading when a value is out of range; the message names the key and allowed values."""
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise ConfigError("ckpt=PATH is required: the pretraining checkpoint to evaluate")
    protocol = _choice(cfg, "protocol", PROTOCOLS)
    _choice(cfg, "branch", BRANCH_CHOICES)
    _choice(cfg, "image_stats", IMAGE_STATS)
    if protocol == "transfer":
        _choice(cfg, "target", dataset_names())
    if protocol == "knn":
        _choice(cfg, "distance", DISTANCES)
        _choice(cfg, "weighting", WEIGHTINGS)
        if not isinstance(cfg.k, int) or cfg.k < 1:
            raise ConfigError(f"k={cfg.k!r} must be an integer >= 1")
    else:
        linear_protocol(cfg, seed=0)  # validates init, epochs, milestones
        if not isinstance(cfg.runs, int) or cfg.runs < 1:
            raise ConfigError(f"runs={cfg.runs!r} must be an integer >= 1")


def linear_protocol(cfg: DictConfig, seed: int) -> LinearProtocol:
    try:
        return LinearProtocol(
            epochs=int(cfg.epochs),
            lr=float(cfg.lr),
            momentum=float(cfg.momentum),
            weight_decay=float(cfg.weight_decay),
            milestones=tuple(int(m) for m in cfg.milestones),
            gamma=float(cfg.gamma),
            batch_size=int(cfg.batch_size),
            init=str(cfg.init),
            seed=seed,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err


def load_checkpoint(ckpt: str | Path, method: str | None = None):  # noqa: ANN201 - BaseMethod
    """`vdg.run.checkpoint.load_method`, with weights of the wrong shape reported as a CheckpointError too."""
    try:
        return load_method(ckpt, method)
    except RuntimeError as err:  # load_state_dict: size mismatch (e.g. another backbone width)
        first = str(err).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        raise CheckpointError(
            f"{ckpt} does not fit the architecture its own config describes (edited or foreign weights): {detail}"
        ) from err


def select_branches(model: Any, choice: str) -> list[Branch]:
    """ "both": every branch the checkpoint serves (dense first); otherwise the one named, if it has it."""
    if choice == "both":
        return [b for b in (Branch.DENSE, Branch.GATED) if b in model.backbone.branches]
    return [require_branch(model, choice)]


def data_config(pretrain_cfg: DictConfig, eval_cfg: DictConfig) -> DictConfig:
    """The checkpoint's data: block with every non-null key of the eval config's data: block on top."""
    data = OmegaConf.to_container(pretrain_cfg.data, resolve=True)
    data.update({k: v for k, v in OmegaConf.to_container(eval_cfg.data, resolve=True).items() if v is not None})
    return OmegaConf.create(data)


def transfer_dataset(target: DictConfig, image_size: int) -> DictConfig:
    """The target dataset at the pretraining input size (paper Table 2): the backbone keeps its stem and H x W.

    Test images: shorter side resized to image_size (or the target's own eval_resize scaled by the same
    factor, e.g. ImageNet's 256/224), centre crop image_size. The target keeps its own normalisation.
    """
    ds = OmegaConf.to_container(target, resolve=True)
    resize = ds.get("eval_resize")
    ds["eval_resize"] = image_size if resize is None else round(resize * image_size / int(ds["image_size"]))
    ds["image_size"] = image_size  # generated datasets (digits, synthetic) are built at this size
    return OmegaConf.create(ds)


def eval_dataset(pretrain_cfg: DictConfig, target: str | None, image_stats: str) -> DictConfig:
    """The dataset config evaluated: the pretraining one, or the transfer `target`; `image_stats` applied."""
    if target is not None:
        ds = transfer_dataset(dataset_config(target), int(pretrain_cfg.dataset.image_size))
    else:
        ds = OmegaConf.create(OmegaConf.to_container(pretrain_cfg.dataset, resolve=True))
    if image_stats == "cifar10":
        cifar10 = dataset_config("cifar10")
        ds.eval_mean, ds.eval_std = list(cifar10.eval_mean), list(cifar10.eval_std)
    return ds


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def flops_fields(model: Any, branch: Branch, test: Features | None) -> dict[str, Any]:
    """MACs per image of the evaluated branch on the test split (deterministic gates); dense: no reduction,
    except for a slim network (backbone.block_widths, e.g. a Table 3 student): its MACs against the standard
    ResNet-18's at the same width and input size."""
    dense = model.cost.dense_macs
    if branch is Branch.DENSE:
        widths = getattr(model.backbone, "block_widths", None)
        if widths is None:
            return {"flops_reduction": 0.0, "dense_macs": dense, "gated_macs": dense}
        standard = GatedResNet(width=model.backbone.width, stem=model.backbone.stem_kind, branches=("dense",))
        full = network_cost(standard, int(model.cfg.dataset.image_size)).dense_macs
        return {"flops_reduction": 1.0 - dense / full, "dense_macs": full, "gated_macs": dense}
    report = gate_report(test.active_channels, model.cost)
    return {
        "flops_reduction": report["flops_reduction"],
        "dense_macs": dense,
        "gated_macs": report["gated_macs"],
        "density_per_block": report["density_per_block"],
    }


class Evaluation:
    """One checkpoint, one protocol: the loaded model, its data and where the records go."""

    def __init__(self, cfg: DictConfig) -> None:
        check_eval_config(cfg)
        self.cfg = cfg
        self.model = load_checkpoint(cfg.ckpt, cfg.get("expected_method"))
        self.branches = select_branches(self.model, cfg.branch)
        self.pretrain_cfg = self.model.cfg
        target = str(cfg.target) if cfg.protocol == "transfer" else None
        self.dataset = eval_dataset(self.pretrain_cfg, target, str(cfg.image_stats))
        self.data = data_config(self.pretrain_cfg, cfg)
        self.device = resolve_device(str(cfg.device))
        self.model.to(self.device)
        self.out_dir = results_dir(cfg.ckpt, cfg.get("results_dir"))

    def loader(self, split: str) -> DataLoader:
        """Unaugmented split with the evaluation transform (both k-NN banks, cached linear features, test)."""
        return eval_loader(
            OmegaConf.create({"dataset": self.dataset, "data": self.data}), split, int(self.cfg.batch_size)
        )

    def augmented_loader(self, raw_train: Any, seed: int) -> DataLoader:
        ds = self.dataset
        transform = linear_train_transform(int(ds.image_size), list(ds.eval_mean), list(ds.eval_std))
        return DataLoader(
            TransformedDataset(raw_train, transform),
            batch_size=int(self.cfg.batch_size),
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            num_workers=int(self.data.num_workers),
            pin_memory=bool(self.data.pin_memory),
        )

    def features(self, split: str, branch: Branch) -> Features:
        return extract_features(self.model.backbone, self.loader(split), branch, self.device)

    # ----- protocols -----------------------------------------------------------------------------------
    def knn(self, branch: Branch) -> tuple[dict[str, Any], Features]:
        c = self.cfg
        train, test = self.features("train", branch), self.features("test", branch)
        top1 = knn_accuracy(
            train.features.to(self.device),
            train.labels,
            test.features,
            test.labels,
            k=int(c.k),
            distance=str(c.distance),
            weighting=str(c.weighting),
            temperature=float(c.temperature),
            normalize=bool(c.normalize),
        )
        options = {"k": int(c.k), "distance": str(c.distance), "weighting": str(c.weighting)}
        fields = {**accuracy_fields([top1], []), **options, "normalize": bool(c.normalize)}
        return {**fields, "num_train": len(train), "num_test": len(test)}, test

    def linear(self, branch: Branch) -> tuple[dict[str, Any], Features | None]:
        """`runs` linear probes with seeds seed, seed + 1, ...; without augmentation on features computed once."""
        c = self.cfg
        num_classes = int(self.dataset.num_classes)
        seeds = [int(c.seed) + r for r in range(int(c.runs))]
        results = []
        if c.augment:
            raw_train = build_dataset(self.dataset, self.data, "train")
            test_loader = self.loader("test")
            num_train, num_test = len(raw_train), len(test_loader.dataset)
            # the probe sees test features inside train_linear_on_images; the gate report needs them once more
            test = self.features("test", branch) if branch is Branch.GATED else None
            for seed in seeds:
                # the augmentations draw from the global CPU RNG (forked in run_evaluation); torch.manual_seed
                # would also reseed every GPU, which fork_rng(devices=[]) does not give back
                torch.default_generator.manual_seed(seed)
                results.append(
                    train_linear_on_images(
                        self.model.backbone,
                        branch,
                        self.augmented_loader(raw_train, seed),
                        test_loader,
                        linear_protocol(c, seed),
                        num_classes,
                        self.device,
                    )
                )
                log.info("%s %s seed %d: top1 %.2f", c.protocol, branch.value, seed, results[-1]["top1"])
        else:
            train, test = self.features("train", branch), self.features("test", branch)
            num_train, num_test = len(train), len(test)
            for seed in seeds:
                results.append(
                    train_linear_on_features(train, test, linear_protocol(c, seed), num_classes, self.device)
                )
                log.info("%s %s seed %d: top1 %.2f", c.protocol, branch.value, seed, results[-1]["top1"])
        fields = accuracy_fields([r["top1"] for r in results], seeds)
        fields["top5"] = sum(r["top5"] for r in results) / len(results)
        fields["final_train_loss"] = [r["history"][-1]["loss"] for r in results]
        return {**fields, "num_train": num_train, "num_test": num_test}, test

    # ----- records -------------------------------------------------------------------------------------
    def filename(self, branch: Branch) -> str:
        c = self.cfg
        knn = c.protocol == "knn"
        return result_filename(
            str(c.protocol),
            str(self.dataset.name),
            branch.value,
            pretrain_dataset=str(self.pretrain_cfg.dataset.name),
            k=int(c.k) if knn else None,
            distance=str(c.distance) if knn else None,
            weighting=str(c.weighting) if knn else None,
            normalize=bool(c.normalize) if knn else False,
            tag=c.get("tag"),
        )

    def run(self) -> list[dict[str, Any]]:
        records = []
        eval_cfg = OmegaConf.to_container(self.cfg, resolve=True)
        for branch in self.branches:
            fields, test = (self.knn if self.cfg.protocol == "knn" else self.linear)(branch)
            record = base_record(
                str(self.cfg.protocol), self.pretrain_cfg, str(self.dataset.name), branch.value, self.cfg.ckpt, eval_cfg
            )
            record.update(fields)
            record.update(flops_fields(self.model, branch, test))
            record["image_size"] = int(self.dataset.image_size)
            record["eval_config"] = eval_cfg
            path = write_json(record, self.out_dir / self.filename(branch))
            log.info("wrote %s", path)
            records.append(record)
        return records


def run_evaluation(cfg: DictConfig) -> list[dict[str, Any]]:
    """Evaluate `cfg.ckpt` with `cfg.protocol` on every selected branch; write and return one record each.

    The caller's global RNG is left as it was: building the model and iterating data loaders draw from it.
    """
    with torch.random.fork_rng(devices=[]):
        return Evaluation(cfg).run()
