"""Performance contracts: no host-device synchronisation in a training step, `trainer.compile`, and the
throughput benchmark (scripts/bench_throughput.py) at tiny settings.

Without a GPU a synchronisation cannot be observed, so the sync tests count the calls that would cause one
(host reads such as .item() or bool(tensor), and tensors built from host data, i.e. uploads) made from vdg code
during training steps. With CUDA, `test_cuda_training_step_never_synchronises` checks the real thing.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning_fabric
import lightning_utilities
import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor

import vdg
from vdg.data import PretrainDataModule
from vdg.methods import METHODS, BaseMethod, build_method
from vdg.run.callbacks import NonFiniteGuard
from vdg.run.driver import trainer_kwargs

from .conftest import TINY, compose_config, distill_overrides, write_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
WATCHED = (str(Path(vdg.__file__).parent),)  # the code whose host access counts
# frames of these packages are passed through to find who asked (Lightning's self.log -> torch.tensor: vdg)
LIBRARIES = tuple(str(Path(m.__file__).parent) for m in (torch, pl, lightning_fabric, lightning_utilities))

# Tensor methods and torch functions that read device memory on the host (a synchronisation on CUDA)
HOST_READ_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero")
HOST_READ_FUNCTIONS = ("equal", "allclose", "is_nonzero", "nonzero", "masked_select", "unique")
# torch functions that build a tensor from host data: on CUDA a blocking copy to the device
HOST_UPLOAD_FUNCTIONS = ("tensor", "as_tensor")


def vdg_caller() -> str | None:
    """file:line of the vdg frame that (through torch/Lightning frames) called the patched function, else None."""
    frame = sys._getframe(2)  # 0: here, 1: the patch's wrapper, 2: its caller
    while frame is not None and frame.f_code.co_filename.startswith(LIBRARIES):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(WATCHED):
        return None
    return f"{os.path.relpath(frame.f_code.co_filename, ROOT)}:{frame.f_lineno}"


class HostAccessCounter:
    """Records calls from vdg code to host reads and host uploads while `active`."""

    def __init__(self) -> None:
        self.active = False
        self.reads: list[str] = []
        self.uploads: list[str] = []

    def wrap(self, name: str, fn: Callable, calls: list[str]) -> Callable:
        @functools.wraps(fn)
        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if self.active:
                where = vdg_caller()
                if where is not None:
                    calls.append(f"{name} at {where}")
            return fn(*args, **kwargs)

        return counted

    def getitem(self, fn: Callable) -> Callable:
        """Boolean-mask indexing (x[mask]) has a data-dependent size: a host read."""

        def indexed(tensor: Tensor, index):  # noqa: ANN001, ANN202
            parts = index if isinstance(index, tuple) else (index,)
            if self.active and any(isinstance(p, Tensor) and p.dtype == torch.bool for p in parts):
                where = vdg_caller()
                if where is not None:
                    self.reads.append(f"boolean-mask indexing at {where}")
            return fn(tensor, index)

        return indexed


@contextmanager
def count_host_access() -> Iterator[HostAccessCounter]:
    counter = HostAccessCounter()
    with pytest.MonkeyPatch.context() as patch:
        for name in HOST_READ_METHODS:
            patch.setattr(Tensor, name, counter.wrap(f"Tensor.{name}", getattr(Tensor, name), counter.reads))
        for name in HOST_READ_FUNCTIONS:
            patch.setattr(torch, name, counter.wrap(f"torch.{name}", getattr(torch, name), counter.reads))
        for name in HOST_UPLOAD_FUNCTIONS:
            patch.setattr(torch, name, counter.wrap(f"torch.{name}", getattr(torch, name), counter.uploads))
        patch.setattr(Tensor, "__getitem__", counter.getitem(Tensor.__getitem__))
        yield counter


class CountDuringBatches(pl.Callback):
    """Activates the counter from each training batch's start to its end (training_step, backward, optimizer
    step, and the on_train_batch_end hooks of the callbacks listed before this one), from the second batch on:
    the first one creates Lightning's metric states and the optimizer's buffers once."""

    def __init__(self, counter: HostAccessCounter) -> None:
        self.counter = counter

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:  # noqa: ANN001
        self.counter.active = batch_idx > 0

    def on_train_batch_end(self, *args) -> None:  # noqa: ANN002
        self.counter.active = False


def fit_counting(cfg) -> HostAccessCounter:  # noqa: ANN001 - DictConfig
    """Train one tiny epoch (4 steps) with the callbacks that run per step in pretraining, counting host access
    (the checkpoint, timer and learning-rate callbacks act per epoch)."""
    model, datamodule = build_method(cfg), PretrainDataModule(cfg)
    with count_host_access() as counter:
        kwargs = {**trainer_kwargs(cfg), "limit_val_batches": 0, "num_sanity_val_steps": 0}
        callbacks = [NonFiniteGuard(int(cfg.guard.check_every_n_steps)), CountDuringBatches(counter)]
        trainer = pl.Trainer(**kwargs, callbacks=callbacks, logger=False, enable_checkpointing=False)
        trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 4
    return counter


@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_step_reads_nothing_back_to_the_host(method, tiny_cfg, tmp_path):
    teacher = write_tiny_teacher(tmp_path / "teacher") if method in ("simreg", "seed") else None
    counter = fit_counting(tiny_cfg(f"method={method}", *distill_overrides(method, teacher)))
    assert counter.reads == []


def test_vdg_symmetric_training_step_reads_nothing_back(tiny_cfg):
    counter = fit_counting(tiny_cfg("method.symmetric=true"))
    assert counter.reads == []


def test_a_host_read_in_a_training_step_is_caught(tiny_cfg, monkeypatch):
    """The detector itself: a step that tests its loss in Python (bool(tensor)) is reported, with the line."""
    vicreg = METHODS["vicreg"]
    original = vicreg.ssl_step

    def ssl_step(self, views, targets):  # noqa: ANN001, ANN202
        out = original(self, views, targets)
        assert out.loss < 1e9  # bool(tensor): a synchronisation on CUDA
        return out

    monkeypatch.setattr(vicreg, "ssl_step", ssl_step)
    monkeypatch.setattr(sys.modules[__name__], "WATCHED", (*WATCHED, __file__))
    counter = fit_counting(tiny_cfg("method=vicreg"))
    assert len(counter.reads) == 3  # steps 2 to 4
    assert all(r.startswith("Tensor.__bool__ at tests/test_performance.py") for r in counter.reads)


@pytest.mark.parametrize("method", ["vicreg", "vdg"])
def test_training_step_uploads_no_host_data(method, tiny_cfg):
    counter = fit_counting(tiny_cfg(f"method={method}"))
    assert counter.uploads == []


# ----- trainer.compile ---------------------------------------------------------------------------------------
class GraphCounter:
    """A torch.compile backend that counts the graphs dynamo captures and runs them eagerly (no codegen)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        return graph.forward


def compile_with(monkeypatch: pytest.MonkeyPatch, backend: str | Callable) -> None:
    """Route the model's torch.compile (nn.Module.compile calls it) to another backend, on a fresh dynamo cache."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, *args, **kwargs: real(fn, *args, **{**kwargs, "backend": backend}))
    torch._dynamo.reset()


def fit(cfg, **kwargs) -> tuple[pl.Trainer, BaseMethod]:  # noqa: ANN001, ANN003 - DictConfig, Trainer overrides
    model = build_method(cfg)
    trainer = pl.Trainer(**{**trainer_kwargs(cfg), **kwargs}, logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=PretrainDataModule(cfg))
    return trainer, model


def test_compile_keeps_checkpoint_keys_and_captures_one_graph_per_branch(tiny_cfg, monkeypatch, tmp_path):
    counter = GraphCounter()
    compile_with(monkeypatch, counter)
    cfg = tiny_cfg("trainer.compile=true", "trainer.max_epochs=2")
    trainer, model = fit(cfg, limit_val_batches=0, num_sanity_val_steps=0)
    assert model._compiled and model.backbone._compiled_call_impl is not None
    # 8 training steps, both branches: the dense and the gated backbone graphs and the projector's, no recompiles
    assert trainer.global_step == 8 and counter.graphs == 3
    trainer.save_checkpoint(tmp_path / "compiled.ckpt")
    eager = build_method(tiny_cfg())
    state = torch.load(tmp_path / "compiled.ckpt", weights_only=False)["state_dict"]
    assert list(state) == list(eager.state_dict())
    eager.load_state_dict(state)  # strict: the same keys as an uncompiled model's


def test_compile_traces_the_training_step_through_aot_autograd(tiny_cfg, monkeypatch):
    """aot_eager runs dynamo and AOTAutograd (the joint forward-backward graph) as inductor does, without its
    C++ code generation, which takes minutes on a CPU; validation's eval-mode graphs are traced too."""
    compile_with(monkeypatch, "aot_eager")
    trainer, model = fit(tiny_cfg("trainer.compile=true"), limit_train_batches=2, limit_val_batches=1)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_compile_is_off_by_default(tiny_cfg):
    model = build_method(tiny_cfg())
    model.configure_model()
    assert not model._compiled and model.backbone._compiled_call_impl is None


SLOW_OR_GPU = pytest.mark.skipif(
    not torch.cuda.is_available() and not os.environ.get("VDG_SLOW_TESTS"),
    reason="inductor compiles the tiny model in ~3 min on a 2-core CPU; runs with CUDA or VDG_SLOW_TESTS=1",
)


@SLOW_OR_GPU
def test_inductor_compile_trains_a_step(tiny_cfg):
    torch._dynamo.reset()
    trainer, _ = fit(tiny_cfg("trainer.compile=true"), limit_train_batches=2, limit_val_batches=0)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["vicreg", "vdg"])
def test_cuda_training_step_never_synchronises(method, tiny_cfg):
    """The real thing on a GPU: forward (bf16 autocast), backward and LARS step under sync debug mode 'error'."""
    cfg = tiny_cfg(f"method={method}", "scheduler.name=constant")
    model = build_method(cfg)
    model.configure_model()  # channels_last, as the Trainer would
    model.cuda()
    optimizer = model.configure_optimizers()
    views = [torch.randn(16, 3, 32, 32, device="cuda") for _ in range(2)]
    batch = (views, torch.randint(0, 10, (16,), device="cuda"))
    for step in range(3):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step > 0 else "default")  # step 0 creates the LARS buffers
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.training_step(batch, step)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ----- scripts/bench_throughput.py ---------------------------------------------------------------------------
def load_bench():  # noqa: ANN201 - the script as a module
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "scripts" / "bench_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list:
    """Wrap owner.name so that each call is recorded; returns the list of recorded calls."""
    calls, real = [], getattr(owner, name)

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_bench_throughput_reports_rows_and_appends_results(tmp_path, capsys, monkeypatch):
    bench = load_bench()
    results = tmp_path / "results.md"
    tiny = [*TINY, f"results={results}", "steps=2", "warmup=1"]
    rows = bench.main([*tiny, "methods=[vicreg,vdg]", "backends=[gpu]", "compile=[false]"])
    assert [(r["method"], r["backend"], r["compile"]) for r in rows] == [
        ("vicreg", "gpu", False),
        ("vdg", "gpu", False),
    ]
    vicreg, vdg_row = rows
    assert vicreg["passes_per_step"] == {"dense": 2} and vdg_row["passes_per_step"] == {"gated": 1, "dense": 1}
    assert vdg_row["steps_per_epoch"] == 4 and vdg_row["s_per_epoch"] == pytest.approx(4 * vdg_row["s_per_step"], 0.01)
    dense = build_method(compose_config([*TINY, "run_dir=unused"])).cost.dense_macs
    assert vicreg["model_gflop_per_pair"] == pytest.approx(2 * 3 * 2 * dense / 1e9, rel=1e-3)
    gated = 2 * 3 * (1 + vdg_row["flops_ratio"]) * dense / 1e9
    assert 0 < vdg_row["flops_ratio"] < 1 and vdg_row["model_gflop_per_pair"] == pytest.approx(gated, rel=1e-3)
    # MFU needs the device's peak: known for the data-sheet GPUs (H100, H200, A100...), unknown on a CPU
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert (vicreg["mfu"] is None) == (bench.peak_tflops(device, "null", vicreg["precision"]) is None)
    assert vicreg["pairs_per_s"] > 0 and vicreg["peak_memory_mib"] > 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == rows
    text = results.read_text()
    assert text.startswith("# Training throughput") and text.count("\n| 20") == 2

    modules = count_calls(monkeypatch, bench, "PretrainDataModule")
    rows = bench.main([*tiny, "methods=[vdg]", "backends=[cpu]", "compile=[false]", "peak_tflops=0.5",
                       "fit_epochs=1", "profile=true"])  # fmt: skip
    assert len(modules) == 1  # the Lightning epochs reuse the cell's data module: one device copy of the split
    (row,) = rows
    assert row["mfu"] == pytest.approx(row["model_tflops_per_s"] / 0.5, rel=1e-3) and row["hfu"] > row["mfu"]
    assert row["fit_s_per_epoch"] > 0 and row["fit_train_s_per_epoch"] > 0
    assert "Self CPU" in capsys.readouterr().out  # the profiler table
    assert results.read_text().count("\n| 20") == 3  # appended below the header, not rewritten


def test_bench_throughput_cells_start_from_a_fresh_dynamo_cache_with_cudnn_autotuning(tmp_path, monkeypatch):
    """Compiled cells share dynamo's cache and recompile budget unless reset: a later cell could silently run
    eagerly. cuDNN autotuning follows the Trainer's setting (trainer.benchmark, on unless deterministic)."""
    bench = load_bench()
    compile_with(monkeypatch, "eager")
    resets = count_calls(monkeypatch, torch._dynamo, "reset")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    tiny = [*TINY, "results=none", "steps=1", "warmup=1", "backends=[gpu]"]
    bench.main([*tiny, "methods=[vicreg,vdg]", "compile=[true]"])
    assert len(resets) == 2  # one per cell
    assert torch.backends.cudnn.benchmark is True
    bench.main([*tiny, "methods=[vdg]", "compile=[false]", "trainer.deterministic=true"])
    assert torch.backends.cudnn.benchmark is False


def test_mfu_peak_follows_the_precision(monkeypatch):
    """MFU over the bf16 peak at 32-bit precision understated it by 2x: 32-true runs on TF32 tensor cores."""
    bench = load_bench()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert bench.peak_tflops(cuda, "null", "bf16-mixed") == 989.0
    assert bench.peak_tflops(cuda, "null", "16-mixed") == 989.0
    assert bench.peak_tflops(cuda, "null", "32-true") == 494.5
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200 NVL")
    assert bench.peak_tflops(cuda, "null", "bf16-mixed") == 835.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert bench.peak_tflops(cuda, "null", "bf16-mixed") is None
    assert bench.peak_tflops(cuda, "123", "32-true") == 123.0  # peak_tflops= overrides
