#!/usr/bin/env bash
# First-GPU check: what CPU machines cannot show, in at most 10 minutes on one GPU (docs/distributed.md).
#
#   scripts/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu_check/<date>-<time>
#
# Steps, each with its own time cap (seconds, overridable through the environment), all output in OUT_DIR:
#   1. environment.txt     torch/CUDA/GPU versions, nvidia-smi
#   2. tests.log           the test suite with CUDA visible (GPU-path files first; `ddp` tests are CPU-only: skipped)
#   3. sync_check.log      a short data.backend=gpu VDG pretraining under torch.cuda.set_sync_debug_mode("warn"):
#                          fails on any host-device synchronisation in a training step (augmentation included)
#   4. bench_*.log         scripts/bench_throughput.py for vicreg and vdg, eager then compiled (bench_results.md)
#   5. ddp.log             two GPUs only: a 2-process DDP pretraining step, compiled, TORCH_LOGS=graph_breaks
#   summary.txt            one line per step: status, exit code, seconds; the script exits 1 if a step failed.
# A step that runs out of time is reported as TIMEOUT (exit 124); the next step still runs.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's vdg, installed or not

OUT=${1:-gpu_check/$(date +%Y%m%d-%H%M%S)}
TEST_SECONDS=${GPU_CHECK_TEST_SECONDS:-240}
SYNC_SECONDS=${GPU_CHECK_SYNC_SECONDS:-75}
BENCH_EAGER_SECONDS=${GPU_CHECK_BENCH_EAGER_SECONDS:-75}
BENCH_COMPILED_SECONDS=${GPU_CHECK_BENCH_COMPILED_SECONDS:-150}
DDP_SECONDS=${GPU_CHECK_DDP_SECONDS:-150}

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device is visible to torch (torch.cuda.is_available() is False); run it on a" \
        "machine with a GPU" >&2
    exit 2
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
echo "gpu_check.sh: writing to $OUT"
: > "$OUT/summary.txt"
failed=0

# run_step NAME SECONDS LOG COMMAND...: run with a time cap, record status and duration in summary.txt
run_step() {
    local name=$1 seconds=$2 log=$3
    shift 3
    local start=$SECONDS status
    echo "== $name (at most ${seconds}s) -> $log"
    timeout --signal=TERM --kill-after=15 "$seconds" "$@" > "$OUT/$log" 2>&1
    status=$?
    local verdict=PASS
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then verdict=TIMEOUT; elif [ "$status" -ne 0 ]; then verdict=FAIL; fi
    [ "$verdict" = PASS ] || failed=1
    printf '%-14s %-7s exit=%-3s %4ss  %s\n' "$name" "$verdict" "$status" "$((SECONDS - start))" "$log" \
        | tee -a "$OUT/summary.txt"
}

# 1. environment
{
    python - <<'PY'
import platform

import pytorch_lightning as pl
import torch

print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}), pytorch_lightning {pl.__version__}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, bf16 "
          f"{torch.cuda.is_bf16_supported()}")
PY
    nvidia-smi || true
    git rev-parse HEAD 2>/dev/null || true
} > "$OUT/environment.txt" 2>&1
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")

# 2. the test suite with CUDA visible: the files whose behaviour changes on a GPU first, so that a time-out
# still leaves them run; the multi-process `ddp` tests use gloo on CPUs and are the same with or without a GPU.
first=(tests/test_gpu_readiness.py tests/test_performance.py tests/test_gpu_backend.py tests/test_gpu_augment.py
       tests/test_optim.py tests/test_models.py tests/test_losses.py tests/test_methods.py tests/test_pretrain.py
       tests/test_reliability.py)
rest=()
for f in tests/test_*.py; do
    [[ " ${first[*]} " == *" $f "* ]] || rest+=("$f")
done
run_step tests "$TEST_SECONDS" tests.log \
    python -m pytest -p no:cacheprovider -q -rfEs --durations=15 -m "not ddp" "${first[@]}" "${rest[@]}"

# 3. no host-device synchronisation in a training step (data.backend=gpu: augmentation on the GPU)
run_step sync_check "$SYNC_SECONDS" sync_check.log python - <<'PY'
"""A 24-step VDG pretraining (width 64, batch 256, bf16, channels_last, data.backend=gpu) whose training steps
from the 4th on run under torch.cuda.set_sync_debug_mode("warn"): the GPU augmentation of the batch, then
training_step, backward and the LARS step. Every synchronisation warning is printed with its stack; any one
fails the check."""
import sys
import traceback
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from vdg.data import PretrainDataModule
from vdg.methods import build_method
from vdg.run.callbacks import NonFiniteGuard, RNGState
from vdg.run.driver import trainer_kwargs

STEPS, WARM = 24, 3  # the first steps create the optimizer's buffers and Lightning's metric states
caught: list[tuple[str, str]] = []
seen: dict[str, object] = {}


def record(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
    if "synchroniz" in str(message):
        caught.append((f"{filename}:{lineno}: {message}", "".join(traceback.format_stack(limit=16)[:-1])))


class SyncWindow(pl.Callback):
    """Sync debug mode on from each watched training batch's start to its end."""

    def on_train_start(self, trainer, module):  # noqa: ANN001, ANN201
        seen["backend"] = trainer.datamodule.backend

    def on_train_batch_start(self, trainer, module, batch, batch_idx):  # noqa: ANN001, ANN201
        if batch_idx >= WARM:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
        torch.cuda.set_sync_debug_mode("default")


class WatchedAugment(PretrainDataModule):
    """The GPU augmentation of each watched batch (on_after_batch_transfer, before the batch starts) too."""

    augmented = 0

    def augment(self, batch):  # noqa: ANN001, ANN201
        watch = self.trainer is not None and self.augmented >= WARM
        self.augmented += 1
        if watch:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        try:
            return super().augment(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")


with initialize_config_dir(config_dir=str(Path("configs").resolve()), version_base="1.3"):
    cfg = compose(config_name="pretrain", overrides=[
        "dataset=synthetic", "dataset.train_size=6144", "dataset.test_size=512", "data.backend=gpu",
        "data.batch_size=256", "data.num_workers=2", "trainer.max_epochs=1", f"trainer.limit_train_batches={STEPS}",
        "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false", "run_dir=/tmp/vdg_gpu_check",
    ])
warnings.showwarning = record
warnings.simplefilter("always")
trainer = pl.Trainer(**trainer_kwargs(cfg), callbacks=[NonFiniteGuard(50), RNGState(), SyncWindow()], logger=False,
                     enable_checkpointing=False)
trainer.fit(build_method(cfg), datamodule=WatchedAugment(cfg))
print(f"data backend {seen.get('backend')}, precision {trainer.precision}, {trainer.global_step} steps, "
      f"{trainer.global_step - WARM} watched")
for where, stack in caught:
    print(f"\nSYNC {where}\n{stack}")
print(f"{len(caught)} synchronising call(s) in the watched training steps")
sys.exit(1 if caught or trainer.global_step != STEPS or seen.get("backend") != "gpu" else 0)
PY

# 4. training throughput, the paper's CIFAR shape on synthetic data (50k 32-px images, batch 512 on one GPU)
BENCH=(scripts/bench_throughput.py dataset=synthetic dataset.train_size=50000 dataset.test_size=1000
       "methods=[vicreg,vdg]" "backends=[gpu]" steps=30 warmup=10 "results=$OUT/bench_results.md")
run_step bench_eager "$BENCH_EAGER_SECONDS" bench_eager.log python "${BENCH[@]}" "compile=[false]"
run_step bench_compiled "$BENCH_COMPILED_SECONDS" bench_compiled.log python "${BENCH[@]}" "compile=[true]"

# 5. two GPUs: one short DDP pretraining, compiled, with SyncBatchNorm (the default) and dynamo's graph breaks
if [ "$GPUS" -ge 2 ]; then
    run_step ddp_2gpu "$DDP_SECONDS" ddp.log env TORCH_LOGS=graph_breaks \
        torchrun --standalone --nproc_per_node=2 scripts/pretrain.py dataset=synthetic dataset.train_size=4096 \
        trainer.devices=2 trainer.strategy=ddp trainer.compile=true trainer.max_epochs=1 \
        trainer.limit_train_batches=8 trainer.limit_val_batches=2 data.batch_size=512 data.backend=gpu \
        "run_dir=$OUT/ddp_run" checkpoint.export_backbone=false
else
    printf '%-14s %-7s only %s GPU visible\n' ddp_2gpu SKIPPED "$GPUS" | tee -a "$OUT/summary.txt"
fi

echo "gpu_check.sh: summary in $OUT/summary.txt"
exit "$failed"
