"""Linear, k-NN and transfer evaluation of a pretraining checkpoint, one JSON record per branch.

The runner behind scripts/linear_eval.py, scripts/knn_eval.py and `vdg.eval.api`: it picks the data, the
branches and the options; the maths is `vdg.eval.{features,knn,linear}`. The backbone stays frozen in eval mode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader

from vdg.core.errors import ConfigError, Interrupted
from vdg.core.options import check_bool, check_data_overrides, check_int, check_known_keys, check_number, check_str
from vdg.core.paths import CONFIG_DIR, config_file
from vdg.core.rundir import check_writable
from vdg.data.datasets import build_dataset
from vdg.data.module import eval_loader
from vdg.eval.features import Features, channels_last, eval_mode, extract_branches, extract_features, gate_report
from vdg.eval.knn import DISTANCES, WEIGHTINGS, knn_accuracy
from vdg.eval.linear import LinearProtocol, train_linear_on_features, train_linear_runs
from vdg.eval.reference import check_seeds, pixel_features, random_init_knn, reference_fields
from vdg.eval.results import accuracy_fields, base_record, result_filename, results_dir, write_json
from vdg.eval.summary import EpochProgress, describe_knn, describe_linear
from vdg.eval.views import (
    AUGMENT_BACKENDS,
    BatchedViews,
    EpochFeatures,
    WorkerViews,
    batched_views_of,
    choose_backend,
)
from vdg.methods import METHODS
from vdg.methods.checkpoint import load_method, require_branch
from vdg.models import Branch, GatedResNet, network_cost

log = logging.getLogger(__name__)

PROTOCOLS = ("linear", "knn", "transfer")
BRANCH_CHOICES = ("dense", "gated", "both")
FEATURES = ("backbone", "pixels")  # pixels: the raw-pixel reference (the protocol on the images, no network)
# image_stats: which mean/std normalise evaluation images. "dataset": the evaluated dataset's eval_mean/eval_std;
# "cifar10": CIFAR-10's, as the official linear/k-NN code does for CIFAR-100 too (reference §1.13).
IMAGE_STATS = ("dataset", "cifar10")


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


def allowed_eval_keys(protocol: str) -> set[str]:
    """Top-level keys of an evaluation config: linear_eval.yaml's plus those of configs/eval/<protocol>.yaml."""
    files = [config_file("linear_eval.yaml"), config_file("eval", f"{protocol}.yaml")]
    if protocol == "transfer":
        files.append(config_file("eval", "linear.yaml"))
    return {k for f in files for k in OmegaConf.load(f) if k not in ("defaults", "hydra")}


def check_device(name: Any, key: str = "device") -> None:
    """auto, cpu, cuda, cuda:N or mps, and present on this machine."""
    if not isinstance(name, str):
        raise ConfigError(f"{key}={name!r} must be auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"unknown {key} {name!r}; allowed values: auto, cpu, cuda, cuda:N, mps") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}={name} but no CUDA GPU is visible on this machine; use {key}=cpu or auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{key}={name} but this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}=mps but the MPS backend is not available; use {key}=cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown {key} {name!r}; allowed values: auto, cpu, cuda, cuda:N, mps")


def check_eval_config(cfg: DictConfig, need_checkpoint: bool = True) -> None:
    """Fail before any loading when a key or value is wrong; the message names the key and allowed values.

    Types are strict (epochs=2.5 or runs=true are refused, never truncated); need_checkpoint=False checks an
    evaluation chained after pretraining, whose checkpoint does not exist yet.
    """
    if need_checkpoint and (OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt):
        raise ConfigError("ckpt=PATH is required: the pretraining checkpoint to evaluate")
    protocol = _choice(cfg, "protocol", PROTOCOLS)
    check_known_keys("", cfg, allowed_eval_keys(protocol))
    if "features" in cfg:
        _choice(cfg, "features", FEATURES)
    _choice(cfg, "branch", BRANCH_CHOICES)
    _choice(cfg, "image_stats", IMAGE_STATS)
    if cfg.get("expected_method") is not None:
        _choice(cfg, "expected_method", sorted(METHODS))
    check_device(cfg.get("device", "auto"))
    check_str("results_dir", cfg.get("results_dir"), optional=True)
    tag = check_str("tag", cfg.get("tag"), optional=True)
    if tag is not None and ("/" in tag or tag in (".", "..")):
        raise ConfigError(f"tag={tag!r} becomes part of a file name: it must not contain '/'")
    check_data_overrides(cfg.get("data"))
    check_int("batch_size", cfg.batch_size, 1)
    if protocol == "transfer":
        _choice(cfg, "target", dataset_names())
    if protocol == "knn":
        _choice(cfg, "distance", DISTANCES)
        _choice(cfg, "weighting", WEIGHTINGS)
        check_int("k", cfg.k, 1)
        check_number("temperature", cfg.temperature, 0, low_open=True)
        check_bool("normalize", cfg.normalize)
        check_seeds("random_init_seeds", cfg.get("random_init_seeds", []))
    else:
        check_seeds("random_init_seeds", cfg.get("random_init_seeds", []))
        if cfg.get("features", "backbone") == "pixels" and cfg.augment:
            raise ConfigError("features=pixels needs augment=false: the raw-pixel reference trains its linear head "
                              "on the unaugmented images (the augmented protocol needs a network to re-extract)")
        check_int("epochs", cfg.epochs, 1)
        check_number("lr", cfg.lr, 0, low_open=True)
        check_number("momentum", cfg.momentum, 0, 1, high_open=True)
        check_number("weight_decay", cfg.weight_decay, 0)
        check_number("gamma", cfg.gamma, 0, 1, low_open=True, note=" (the lr factor at each milestone)")
        milestones = cfg.milestones
        if not isinstance(milestones, ListConfig) or not all(isinstance(m, int) and m >= 1 for m in milestones):
            raise ConfigError(f"milestones={_plain(milestones)!r} must be a list of epochs (integers >= 1)")
        check_int("runs", cfg.runs, 1)
        check_int("seed", cfg.seed, 0, 2**32 - 1)
        _choice(cfg, "augment_backend", AUGMENT_BACKENDS)
        for key in ("augment", "share_views"):
            check_bool(key, cfg.get(key))
        linear_protocol(cfg, seed=0)  # validates init and the milestones' order
    check_bool("json", cfg.get("json", False))


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value


def check_eval_data(cfg: DictConfig, pretrain_cfg: DictConfig) -> None:
    """The evaluated splits exist (downloaded now if allowed), their class lists agree, k fits the bank, and
    the results folder can be written: all before any feature is extracted or any probe trained."""
    target = str(cfg.target) if cfg.protocol == "transfer" else None
    dataset = eval_dataset(pretrain_cfg, target, str(cfg.image_stats))
    data = data_config(pretrain_cfg, cfg)
    train = build_dataset(dataset, data, "train")
    build_dataset(dataset, data, "test")
    if cfg.protocol == "knn" and int(cfg.k) > len(train):
        raise ConfigError(f"k={int(cfg.k)} is larger than the k-NN bank: the {dataset.name} train split has "
                          f"{len(train)} images")
    if cfg.get("results_dir"):
        check_writable(cfg.results_dir, "results_dir")
    elif cfg.get("ckpt") and not str(cfg.ckpt).startswith("<"):
        check_writable(results_dir(cfg.ckpt), "results_dir (default: <checkpoint dir>/results)")


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


@dataclass
class AugmentedViews:
    """What `Evaluation.augmented_views` prepares: the image source, labels [N] on the device, per-run seeds and
    the view stream each run reads, and the backend chosen ("batched" | "workers")."""

    views: BatchedViews | WorkerViews
    labels: torch.Tensor
    seeds: list[int]
    streams: list[int]
    backend: str


class Evaluation:
    """One checkpoint, one protocol: the loaded model, its data and where the records go."""

    def __init__(self, cfg: DictConfig) -> None:
        check_eval_config(cfg)
        self.cfg = cfg
        self.model = load_method(cfg.ckpt, cfg.get("expected_method"))
        self.branches = select_branches(self.model, cfg.branch)
        self.pretrain_cfg = self.model.cfg
        target = str(cfg.target) if cfg.protocol == "transfer" else None
        self.dataset = eval_dataset(self.pretrain_cfg, target, str(cfg.image_stats))
        self.data = data_config(self.pretrain_cfg, cfg)
        check_eval_data(cfg, self.pretrain_cfg)  # before any feature extraction or probe training
        self.device = resolve_device(str(cfg.device))
        self.model.to(self.device)
        self.out_dir = results_dir(cfg.ckpt, cfg.get("results_dir"))
        self.written: list[Path] = []

    def loader(self, split: str) -> DataLoader:
        """Unaugmented split with the evaluation transform (both k-NN banks, cached linear features, test)."""
        return eval_loader(
            OmegaConf.create({"dataset": self.dataset, "data": self.data}), split, int(self.cfg.batch_size)
        )

    def features(self, split: str, branch: Branch) -> Features:
        return extract_features(self.model.backbone, self.loader(split), branch, self.device)

    def all_features(self, split: str) -> dict[Branch, Features]:
        """Every evaluated branch's features of a split, from one pass over it (each batch feeds all branches)."""
        return extract_branches(self.model.backbone, self.loader(split), self.branches, self.device)

    @property
    def feature_dim(self) -> int:
        return int(self.model.backbone.feature_dim)

    # ----- protocols -----------------------------------------------------------------------------------
    def knn_fields(self, train: Features, test: Features) -> dict[str, Any]:
        """The k-NN protocol on one pair of feature sets (a network's, or the raw pixels): its record fields."""
        c = self.cfg
        options = {"k": int(c.k), "distance": str(c.distance), "weighting": str(c.weighting)}
        top1 = knn_accuracy(train.features.to(self.device), train.labels, test.features, test.labels,
                            temperature=float(c.temperature), normalize=bool(c.normalize), **options)
        description = describe_knn(dataset=str(self.dataset.name), num_train=len(train), num_test=len(test),
                                   feature_dim=int(train.features.shape[1]), normalize=bool(c.normalize),
                                   temperature=float(c.temperature), **options)
        return {**accuracy_fields([top1], []), **options, "normalize": bool(c.normalize), "num_train": len(train),
                "num_test": len(test), "description": description}

    def knn(self) -> dict[Branch, tuple[dict[str, Any], Features]]:
        c = self.cfg
        train, test = self.all_features("train"), self.all_features("test")
        options = {"k": int(c.k), "distance": str(c.distance), "weighting": str(c.weighting)}
        out = {branch: (self.knn_fields(train[branch], test[branch]), test[branch]) for branch in self.branches}
        seeds = check_seeds("random_init_seeds", c.get("random_init_seeds", []))
        if seeds:
            reference = random_init_knn(
                self.model, self.branches, self.loader("train"), self.loader("test"), self.device, seeds,
                temperature=float(c.temperature), normalize=bool(c.normalize), **options,
            )
            for branch in self.branches:
                fields = out[branch][0]
                fields.update(reference_fields(fields["value"], reference[branch], seeds))
        return out

    def describe_linear(self, num_train: int, num_test: int, augment: bool) -> str:
        c = self.cfg
        transfer = c.protocol == "transfer"
        return describe_linear(
            dataset=str(self.dataset.name),
            num_train=num_train,
            num_test=num_test,
            feature_dim=self.feature_dim,
            epochs=int(c.epochs),
            lr=float(c.lr),
            momentum=float(c.momentum),
            weight_decay=float(c.weight_decay),
            milestones=[int(m) for m in c.milestones],
            gamma=float(c.gamma),
            batch_size=int(c.batch_size),
            init=str(c.init),
            runs=int(c.runs),
            augment=augment,
            share_views=bool(c.share_views),
            pretrain_dataset=str(self.pretrain_cfg.dataset.name) if transfer else None,
        )

    def linear_fields(self, results: list[dict], seeds: list[int], num_train: int, num_test: int) -> dict[str, Any]:
        fields = accuracy_fields([r["top1"] for r in results], seeds)
        fields["top5"] = sum(r["top5"] for r in results) / len(results)
        fields["final_train_loss"] = [r["history"][-1]["loss"] for r in results]
        fields["augment"] = bool(self.cfg.augment)
        return {**fields, "num_train": num_train, "num_test": num_test}

    def linear_cached(self) -> dict[Branch, tuple[dict[str, Any], Features]]:
        """augment=false: `runs` probes with seeds seed, seed + 1, ... on unaugmented features computed once."""
        c = self.cfg
        num_classes = int(self.dataset.num_classes)
        seeds = [int(c.seed) + r for r in range(int(c.runs))]
        train, test = self.all_features("train"), self.all_features("test")
        out = {}
        for branch in self.branches:
            results = []
            for seed in seeds:
                protocol = linear_protocol(c, seed)
                result = train_linear_on_features(train[branch], test[branch], protocol, num_classes, self.device)
                results.append(result)
                log.info("%s %s seed %d: top1 %.2f", c.protocol, branch.value, seed, results[-1]["top1"])
            fields = self.linear_fields(results, seeds, len(train[branch]), len(test[branch]))
            fields["description"] = self.describe_linear(len(train[branch]), len(test[branch]), augment=False)
            out[branch] = (fields, test[branch])
        return out

    def augmented_views(self) -> AugmentedViews:
        """The train views of the augmented protocol: its seeds, view streams, labels and image source.

        Runs r = 0..runs-1 use seed + r. With share_views every run reads stream 0 (seeded with `seed`);
        without, run r reads its own stream r (seeded with seed + r).
        """
        c = self.cfg
        ds, device = self.dataset, self.device
        seeds = [int(c.seed) + r for r in range(int(c.runs))]
        streams = [0] * len(seeds) if c.share_views else list(range(len(seeds)))
        stream_seeds = seeds[:1] if c.share_views else seeds
        raw_train = build_dataset(ds, self.data, "train")
        try:
            backend = choose_backend(
                str(c.augment_backend), raw_train, device, float(self.data.get("gpu_memory_fraction", 0.5))
            )
        except ValueError as err:
            raise ConfigError(str(err)) from err
        augment = {
            "size": int(ds.image_size),
            "mean": list(ds.eval_mean),
            "std": list(ds.eval_std),
            "batch_size": int(c.batch_size),
            "seeds": stream_seeds,
        }
        if backend == "batched":
            views = batched_views_of(raw_train, device, **augment)
        else:
            workers = {"num_workers": int(self.data.num_workers), "pin_memory": bool(self.data.pin_memory)}
            views = WorkerViews(raw_train, device=device, **augment, **workers)
        labels = torch.as_tensor(raw_train.labels).long().to(device)  # both dataset kinds hold their labels
        return AugmentedViews(views, labels, seeds, streams, backend)

    def linear_augmented(self) -> dict[Branch, tuple[dict[str, Any], Features]]:
        """The paper's protocol: fresh RandomResizedCrop + flip views every epoch, all runs and branches at once.

        One augmented batch feeds every branch, and one backbone pass per epoch serves all `runs` runs (their
        heads are one batched matmul); share_views=false gives each run its own views (runs x the passes).
        Each run keeps its own head initialisation and mini-batch order (seed + r). docs/evaluation.md says
        what the spread over runs does and does not contain.
        """
        c = self.cfg
        backbone, device = self.model.backbone, self.device
        train = self.augmented_views()
        with eval_mode(backbone), channels_last(backbone):
            test = extract_branches(backbone, self.loader("test"), self.branches, device, torch.channels_last)
            log.info(
                "%s: %d epochs x %d train images (%s augmentation on %s), %d runs, %s",
                c.protocol, int(c.epochs), len(train.labels), train.backend, device.type, len(train.seeds),
                "views shared by the runs" if c.share_views else "views per run",
            )
            features = EpochFeatures(
                backbone, self.branches, train.views, max(train.streams) + 1, device, torch.channels_last
            )
            results = train_linear_runs(
                features, train.labels, test, linear_protocol(c, train.seeds[0]), train.seeds,
                int(self.dataset.num_classes), train.streams,
                on_epoch=EpochProgress(f"{c.protocol} [{', '.join(b.value for b in self.branches)}]"),
            )
        out = {}
        for branch in self.branches:
            r = results[branch]
            per_run = [
                {"top1": r["top1"][i], "top5": r["top5"][i], "history": r["history"][i]}
                for i in range(len(train.seeds))
            ]
            fields = self.linear_fields(per_run, train.seeds, len(train.labels), len(test[branch]))
            fields.update(
                augment_backend=train.backend,
                share_views=bool(c.share_views),
                description=self.describe_linear(len(train.labels), len(test[branch]), augment=True),
            )
            out[branch] = (fields, test[branch])
        return out

    # ----- records -------------------------------------------------------------------------------------
    def filename(self, branch: Branch | str) -> str:
        """The record's file name; a linear/transfer record on unaugmented features is marked `-cached`, so it
        never replaces the paper protocol's record (nor fills a paper table: `vdg.report.tables`)."""
        c = self.cfg
        knn = c.protocol == "knn"
        tag = "-".join(t for t in ("" if knn or c.augment else "cached", c.get("tag") or "") if t) or None
        return result_filename(
            str(c.protocol),
            str(self.dataset.name),
            branch.value if isinstance(branch, Branch) else branch,
            pretrain_dataset=str(self.pretrain_cfg.dataset.name),
            k=int(c.k) if knn else None,
            distance=str(c.distance) if knn else None,
            weighting=str(c.weighting) if knn else None,
            normalize=bool(c.normalize) if knn else False,
            tag=tag,
        )

    def random_init_linear(self, protocol: Any, seeds: list[int]) -> dict[Branch, list[float]]:
        """The same linear protocol on randomly initialised backbones, one per init seed, built as the trained one
        (`model.build_backbone(model.cfg)`); the trained backbone is put back afterwards. The RNG state is kept."""
        runs: dict[Branch, list[float]] = {branch: [] for branch in self.branches}
        trained = self.model.backbone
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                backbone = self.model.build_backbone(self.model.cfg)
            self.model.backbone = backbone.to(self.device).eval()
            try:
                per_branch = protocol()
            finally:
                self.model.backbone = trained
            for branch in self.branches:
                runs[branch].append(per_branch[branch][0]["value"])
        return runs

    def run_pixels(self) -> list[dict[str, Any]]:
        """`features=pixels`: the protocol on the raw images of the same splits (the raw-pixel reference). One
        record, branch "pixels", with no FLOPs: there is no network."""
        c = self.cfg
        train, test = pixel_features(self.loader("train")), pixel_features(self.loader("test"))
        dim = int(train.features.shape[1])
        if c.protocol == "knn":
            fields = self.knn_fields(train, test)
            description = fields.pop("description")
        else:
            seeds = [int(c.seed) + r for r in range(int(c.runs))]
            num_classes = int(self.dataset.num_classes)
            results = [train_linear_on_features(train, test, linear_protocol(c, seed), num_classes, self.device)
                       for seed in seeds]
            fields = self.linear_fields(results, seeds, len(train), len(test))
            description = self.describe_linear(len(train), len(test), augment=False)
        eval_cfg = OmegaConf.to_container(c, resolve=True)
        record = base_record(str(c.protocol), self.pretrain_cfg, str(self.dataset.name), "pixels", c.ckpt, eval_cfg)
        record.update(fields)
        record.update(
            features="pixels", num_train=len(train), num_test=len(test), flops_reduction=None,
            description=description.replace(f"frozen {dim}-d backbone features (eval mode)",
                                            f"raw pixels ({dim} values per image, no network)"),
            image_size=int(self.dataset.image_size), eval_config=eval_cfg,
        )
        path = write_json(record, self.out_dir / self.filename("pixels"))
        self.written.append(path)
        return [record]

    def run(self) -> list[dict[str, Any]]:
        if self.cfg.get("features", "backbone") == "pixels":
            return self.run_pixels()
        if self.cfg.protocol == "knn":
            per_branch = self.knn()  # its random-init reference is cheap: computed inside, on by default
        else:
            protocol = self.linear_augmented if self.cfg.augment else self.linear_cached
            per_branch = protocol()
            seeds = check_seeds("random_init_seeds", self.cfg.get("random_init_seeds", []))
            if seeds:
                log.info("%s: the random-init reference, %d init seeds", self.cfg.protocol, len(seeds))
                reference = self.random_init_linear(protocol, seeds)
                for branch in self.branches:
                    fields = per_branch[branch][0]
                    fields.update(reference_fields(fields["value"], reference[branch], seeds))
        records = []
        eval_cfg = OmegaConf.to_container(self.cfg, resolve=True)
        for branch in self.branches:
            fields, test = per_branch[branch]
            record = base_record(
                str(self.cfg.protocol), self.pretrain_cfg, str(self.dataset.name), branch.value, self.cfg.ckpt, eval_cfg
            )
            record.update(fields)
            record.update(flops_fields(self.model, branch, test))
            record["image_size"] = int(self.dataset.image_size)
            record["eval_config"] = eval_cfg
            path = write_json(record, self.out_dir / self.filename(branch))
            log.debug("wrote %s", path)
            self.written.append(path)
            records.append(record)
        return records


@dataclass
class EvaluationResult:
    """The records of one evaluation (one per branch) and the files they were written to."""

    records: list[dict[str, Any]]
    paths: list[Path]


def evaluate(cfg: DictConfig) -> EvaluationResult:
    """Evaluate `cfg.ckpt` with `cfg.protocol` on every selected branch; write one record each.

    The caller's CPU RNG is left as it was (building the model and iterating data loaders draw from it); the
    GPU RNGs are never drawn from (the views have their own generators).
    """
    try:
        with torch.random.fork_rng(devices=[]):
            evaluation = Evaluation(cfg)
            records = evaluation.run()
    except KeyboardInterrupt:
        raise Interrupted(
            "evaluation interrupted: the records already written are complete, the others were not written; "
            "rerun the same command"
        ) from None
    return EvaluationResult(records, evaluation.written)


def run_evaluation(cfg: DictConfig) -> list[dict[str, Any]]:
    """`evaluate(cfg).records`: the records written, one per evaluated branch."""
    return evaluate(cfg).records
