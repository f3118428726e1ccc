"""Multi-process tests on CPU (gloo): VICReg gathered across processes equals single-process VICReg on the global
batch (value, terms and DDP-averaged gradient), a 2-process Lightning pretraining run completes, and what a
multi-GPU run must get right that one process cannot show (one 2-process Lightning DDP run, `ddp_run`): per-rank
augmentation draws, per-rank RNG states in checkpoints, one data backend for all ranks, one decode of an image
folder, channels_last before DDP's buckets, and which BatchNorms become SyncBatchNorm.

Marked `ddp` (pyproject): `pytest -m "not ddp"` skips them (~1 min: every process imports torch and Lightning).
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vdg.losses import vicreg_loss
from vdg.losses.distributed import gather_rows, world_size
from vdg.methods.checkpoint import read_checkpoint
from vdg.run.driver import pretrain

from .conftest import TINY, compose_config
from .test_data import make_folder

pytestmark = pytest.mark.ddp

WORLD, ROWS, DIM = 2, 6, 5  # each rank holds ROWS of the global batch of WORLD * ROWS
TERMS = ("loss", "invariance", "variance", "covariance")


def problem() -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
    """Two views of a global batch and a linear 'projector', identical on every rank (seeded)."""
    generator = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(WORLD * ROWS, 8, generator=generator) for _ in range(2))
    projector = nn.Linear(8, DIM)
    with torch.no_grad():
        for p in projector.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return x1, x2, projector


def loss_and_grads(x1: torch.Tensor, x2: torch.Tensor, projector: nn.Linear, gather: bool) -> dict:
    projector.zero_grad()
    terms = vicreg_loss(projector(x1), projector(x2), gather_across_processes=gather)
    terms["loss"].backward()
    return {**{k: terms[k].detach() for k in TERMS}, "grads": [p.grad.clone() for p in projector.parameters()]}


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        x1, x2, projector = problem()
        shard = slice(rank * ROWS, (rank + 1) * ROWS)
        result = loss_and_grads(x1[shard], x2[shard], projector, gather=True)
        for grad in result["grads"]:  # what DDP does to parameter gradients: their mean over the ranks
            dist.all_reduce(grad)
            grad /= WORLD
        local = loss_and_grads(x1[shard], x2[shard], projector, gather=False)
        torch.save({"gathered": result, "local": local, "world_size": world_size()}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gathered_vicreg_equals_single_process_vicreg_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    x1, x2, projector = problem()
    reference = loss_and_grads(x1, x2, projector, gather=False)
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"{rank}.pt")
        assert saved["world_size"] == WORLD
        gathered, local = saved["gathered"], saved["local"]
        for key in TERMS:  # every rank computes the global batch's loss and terms
            torch.testing.assert_close(gathered[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
        for grad, expected in zip(gathered["grads"], reference["grads"], strict=True):
            # float32 sums in another order: ~1e-6 absolute on gradients of order 1-10 (the bias's are ~0)
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)
        # without the gather (the default, official) each rank's loss is its own shard's
        shard = slice(rank * ROWS, (rank + 1) * ROWS)
        own = loss_and_grads(x1[shard], x2[shard], projector, gather=False)
        torch.testing.assert_close(local["loss"], own["loss"])
        assert not torch.allclose(local["loss"], reference["loss"])


def test_gather_is_the_identity_in_one_process():
    z = torch.randn(3, 4, requires_grad=True)
    assert world_size() == 1 and gather_rows(z) is z


def test_two_process_lightning_pretraining_completes(tiny_cfg):
    """ddp_spawn (ddp would re-launch pytest itself) with 2 CPU processes, the global batch split over them.
    SyncBatchNorm is off: torch implements it for GPUs only."""
    cfg = tiny_cfg(
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp_spawn",
        "trainer.sync_batchnorm=false",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "method.gather_across_processes=true",
    )
    summary = pretrain(cfg)
    # the metrics come back from rank 0 (train/flops_ratio averaged over both processes at epoch end)
    assert 0 < summary["flops_ratio_train"] < 1 and summary["probe_acc"]["gated"] is not None
    checkpoint = read_checkpoint(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, 2)


# ----- one 2-process Lightning DDP run (strategy=ddp in processes started here, as torchrun would) ------------
class TrainStartProbe(pl.Callback):
    """Records, when training starts, the data backend and whether the parameters DDP wraps are channels_last."""

    def __init__(self) -> None:
        self.record: dict = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        convs = [m.weight for m in pl_module.backbone.modules() if isinstance(m, nn.Conv2d)]
        self.record["wrapped_by"] = type(trainer.strategy.model).__name__
        self.record["channels_last"] = all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        self.record["backend"] = trainer.datamodule.backend


def _lightning_ddp_worker(rank: int, port: int, root: str, out_dir: str) -> None:
    """One rank of a 2-process CPU DDP run of a tiny VDG on an image folder with data.backend=gpu, then two
    set-ups without training in the same processes: data.backend=auto where the ranks disagree, and the
    SyncBatchNorm conversion."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )  # fmt: skip
    torch.set_num_threads(1)
    import vdg.data.datasets as datasets
    import vdg.data.gpu_augment as gpu_augment
    import vdg.data.module as data_module
    import vdg.methods.base as base
    from vdg.data import PretrainDataModule
    from vdg.methods import build_method
    from vdg.run.callbacks import RNGState
    from vdg.run.driver import trainer_kwargs

    decodes, draws = [], []
    decode_one = datasets._Decoded.__getitem__
    datasets._Decoded.__getitem__ = lambda self, i: decodes.append(i) or decode_one(self, i)
    sample = gpu_augment.sample_view_params

    def recording_sample(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        params = sample(*args, **kwargs)
        draws.append({"boxes": params.boxes.clone(), "flip": params.flip.clone()})
        return params

    gpu_augment.sample_view_params = recording_sample

    overrides = [
        *(o for o in TINY if not o.startswith("dataset")), "dataset=folder", "dataset.num_classes=2",
        f"data.root={root}", f"data.cache_dir={Path(out_dir) / 'cache'}", f"run_dir={Path(out_dir) / 'run'}",
        "trainer.accelerator=cpu", f"trainer.devices={WORLD}", "trainer.strategy=ddp", "trainer.channels_last=true",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "+trainer.num_sanity_val_steps=0",
    ]  # fmt: skip
    cfg = compose_config([*overrides, "data.backend=gpu"])
    pl.seed_everything(int(cfg.seed), workers=True)  # as the pretraining driver: every rank seeded alike
    datamodule, probe = PretrainDataModule(cfg), TrainStartProbe()
    common = {"logger": False, "enable_checkpointing": False, "default_root_dir": str(Path(out_dir) / "run")}
    trainer = pl.Trainer(**trainer_kwargs(cfg), callbacks=[RNGState(), probe], **common)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(build_method(cfg), datamodule=datamodule)
    record = {
        **probe.record,
        "decodes": len(decodes),
        "first_view_draws": draws[0],
        "grad_stride_warnings": sum("Grad strides do not match" in str(w.message) for w in caught),
        "released_after_fit": datamodule.train_batches is None and datamodule.gpu_augment is None,
        "torch_rng_at_save": torch.get_rng_state(),
    }
    trainer.save_checkpoint(Path(out_dir) / "ddp.ckpt")  # every rank builds it, rank 0 writes it

    # data.backend=auto when each GPU sees different free memory: rank 0 alone would choose gpu, rank 1 cpu.
    data_module.resolve_backend = lambda backend, nbytes, device, fraction: "gpu" if rank == 0 else "cpu"
    auto = PretrainDataModule(compose_config([*overrides, "data.backend=auto"]), device="cpu")
    auto.setup("fit")
    record["auto_backend"] = auto.backend

    # Which BatchNorms configure_model converts in this 2-process Trainer. torch synchronises them on GPUs only
    # (and DDP refuses to wrap CPU modules holding one), so the conversion is allowed here and nothing is wrapped.
    base.SYNC_BATCHNORM_DEVICES = ("cpu",)
    model = build_method(cfg)
    model.trainer = trainer
    model.configure_model()
    record["sync_batchnorm"] = [n for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    """Per-rank records of `_lightning_ddp_worker` and the checkpoint it saved."""
    out = tmp_path_factory.mktemp("ddp")
    root = make_folder(out / "data", {"train": {"a": 20, "b": 20}, "test": {"a": 4, "b": 4}}, size=(32, 32))
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_lightning_ddp_worker, args=(port, str(root), str(out)), nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"ranks": ranks, "checkpoint": torch.load(out / "ddp.ckpt", weights_only=False)}


def test_ranks_draw_their_own_gpu_augmentation_parameters(ddp_run):
    """data.backend=gpu (its ops on CPU tensors here): each rank draws its own crop boxes and flips."""
    assert [r["backend"] for r in ddp_run["ranks"]] == ["gpu", "gpu"]
    rank0, rank1 = (r["first_view_draws"] for r in ddp_run["ranks"])
    assert rank0["boxes"].shape == rank1["boxes"].shape == (8, 4)  # 16 images over 2 ranks
    assert not torch.equal(rank0["boxes"], rank1["boxes"])
    assert not torch.equal(rank0["flip"], rank1["flip"])


def test_checkpoints_hold_every_ranks_rng_states(ddp_run):
    """Each rank's own streams are saved (not rank 0's for all), so each resumes its own."""
    saved = ddp_run["checkpoint"]["callbacks"]["RNGState"]["rng_per_rank"]
    assert len(saved) == WORLD
    for rank, record in enumerate(ddp_run["ranks"]):
        assert torch.equal(saved[rank]["torch"], record["torch_rng_at_save"])
    assert not torch.equal(saved[0]["torch"], saved[1]["torch"])


def test_every_rank_uses_the_same_data_backend(ddp_run):
    """Rank 0 alone would choose gpu and rank 1 cpu: all take cpu (gpu only where every rank can)."""
    assert [r["auto_backend"] for r in ddp_run["ranks"]] == ["cpu", "cpu"]


def test_an_image_folder_is_decoded_once_per_node(ddp_run):
    """The first run of the gpu backend on a folder: rank 0 decodes the 40 images, rank 1 reads its cache."""
    assert [r["decodes"] for r in ddp_run["ranks"]] == [40, 0]


def test_channels_last_precedes_ddp_buckets(ddp_run):
    for record in ddp_run["ranks"]:
        assert record["wrapped_by"] == "DistributedDataParallel" and record["channels_last"]
        assert record["grad_stride_warnings"] == 0  # DDP's buckets follow the parameters' layout


def test_the_device_copy_of_the_split_is_released_after_fit(ddp_run):
    assert all(r["released_after_fit"] for r in ddp_run["ranks"])


def test_only_the_backbones_batchnorms_are_synchronised(ddp_run):
    """trainer.sync_batchnorm=backbone (default): every BatchNorm of the encoder, gates included, and none of the
    projector's (Lightning's sync_batchnorm=true converts them all: 52 synchronising calls per VDG step)."""
    names = ddp_run["ranks"][0]["sync_batchnorm"]
    assert names == ddp_run["ranks"][1]["sync_batchnorm"]
    assert names and all(n.startswith("backbone.") for n in names)
    expected = {f"backbone.{n}" for n, m in _tiny_vdg().backbone.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert set(names) == expected
    assert sum(".gate.bn" in n for n in names) == 8


def _tiny_vdg() -> nn.Module:
    from vdg.methods import build_method

    return build_method(compose_config([*TINY, "run_dir=unused"]))
