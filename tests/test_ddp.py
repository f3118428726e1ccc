"""Multi-process tests on CPU (gloo): VICReg gathered across processes equals single-process VICReg on the global
batch (value, terms and DDP-averaged gradient), and a 2-process Lightning pretraining run completes.

Marked `ddp` (pyproject): `pytest -m "not ddp"` skips them (~1 min: every process imports torch and Lightning).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vdg.losses import vicreg_loss
from vdg.losses.distributed import gather_rows, world_size
from vdg.run.checkpoint import read_checkpoint
from vdg.run.driver import pretrain

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
