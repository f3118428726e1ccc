"""ONNX export of a backbone, checked against PyTorch with onnxruntime, and an onnxruntime engine for the benchmark.

`export_onnx` writes one network (a `BranchBackbone`: images [N, 3, H, W] -> features [N, F]) as a self-contained
.onnx file with a dynamic batch axis and vdg's export JSON in its metadata (key "vdg"), then runs it with
onnxruntime and compares with the PyTorch module before the file is put in place. `OnnxEngine` runs such a graph
as one more engine of `vdg.deploy.bench`.

What ONNX expresses of vdg's networks:
- the dense network and the slim students (`backbone.block_widths`, Table 3) are static graphs: ONNX runs them
  whole, and onnxruntime is one more dense engine;
- the gated network exports as the *masked* graph: every channel computed, the gate's 1[logit >= 0] multiplied
  in. That is the network as trained, not a fast one: it costs the dense network plus the gates. ONNX has no
  operator that skips the work of a per-sample set of channels inside a batch (the gather of weight rows by each
  sample's mask that `vdg.deploy.sparse` does); the sparse execution stays a vdg (PyTorch + compiled C) feature.

Written here, not taken from a library: `torch.onnx.export` (the torch.export-based exporter, with onnxscript)
does the conversion; what is ours is the file handling (atomic, no overwrite), the metadata and the check.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vdg.core.atomic import atomic_write
from vdg.core.errors import ConfigError

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "features"
METADATA_KEY = "vdg"  # metadata_props key holding the export JSON
CHECK_BATCHES = (1, 5)  # batch sizes the exported graph is compared at (the batch axis is dynamic)
CHECK_RTOL = 1e-4  # max |onnxruntime - PyTorch| / max |PyTorch feature| allowed
EXTRA = "pip install 'vdg[onnx]' (onnx, onnxscript, onnxruntime)"


def _require(module: str) -> Any:
    """Import an optional dependency of the ONNX path, or a ConfigError naming the extra that installs it."""
    try:
        return __import__(module)  # the ONNX packages are optional and heavy: imported only when asked for
    except ImportError:
        raise ConfigError(f"format=onnx needs the {module} package, which is not installed: {EXTRA}") from None


def onnx_available() -> bool:
    """Whether onnxruntime can be imported (the benchmark's ONNX engines are left out otherwise)."""
    try:
        _require("onnxruntime")
    except ConfigError:
        return False
    return True


def onnxruntime_version() -> str:
    return str(_require("onnxruntime").__version__)


def _program(module: nn.Module, image_size: int) -> Any:
    """`torch.onnx.export` of `module` on [2, 3, S, S] with a dynamic batch axis (an `ONNXProgram`)."""
    for name in ("onnx", "onnxscript"):
        _require(name)
    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1)
    # the exporter reports its progress on stdout; vdg's scripts print one JSON object there
    with contextlib.redirect_stdout(io.StringIO()):
        return torch.onnx.export(
            module.eval(),
            (example,),
            None,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )


def session(path: str | Path | bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU session on `path` (a file, or a serialised model's bytes; `threads`: intra-op threads;
    None = onnxruntime's default)."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def compare(path: str | Path | bytes, module: nn.Module, image_size: int, seed: int = 0) -> dict[str, Any]:
    """Run the graph at `path` (a file or a serialised model) and `module` on the same N(0, 1) images at each of
    `CHECK_BATCHES`; the largest absolute and relative difference of their features."""
    runner = session(path)
    generator = torch.Generator().manual_seed(seed)
    max_abs, scale = 0.0, 0.0
    with torch.no_grad():
        for n in CHECK_BATCHES:
            images = torch.randn(n, 3, image_size, image_size, generator=generator)
            expected = module(images)
            got = torch.from_numpy(runner.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0])
            if got.shape != expected.shape:
                # not user input: the exporter or onnxruntime got the graph wrong (a bug: keep the traceback)
                raise RuntimeError(f"the ONNX graph gives features {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
            max_abs = max(max_abs, (got - expected).abs().max().item())
            scale = max(scale, expected.abs().max().item())
    rel = max_abs / scale if scale > 0 else max_abs
    return {"batches": list(CHECK_BATCHES), "max_abs_diff": max_abs, "max_rel_diff": rel, "runtime": "onnxruntime"}


def export_onnx(module: nn.Module, path: str | Path, image_size: int, metadata: dict[str, Any]) -> dict[str, Any]:
    """Write `module` (images -> features, eval mode) to `path` as ONNX with `metadata` (+ the check) under
    metadata key "vdg"; the file appears only once onnxruntime's features match PyTorch's within `CHECK_RTOL`.
    Returns the check: {"batches", "max_abs_diff", "max_rel_diff", "runtime"}."""
    _require("onnxruntime")  # before minutes of export: the check needs it
    program = _program(module, image_size)
    # checked in memory, then written once with the check in its metadata
    check = compare(program.model_proto.SerializeToString(), module, image_size)
    if check["max_rel_diff"] > CHECK_RTOL:
        # not user input: the exporter or onnxruntime computes another function (a bug: keep the traceback)
        raise RuntimeError(
            f"the ONNX graph's features differ from PyTorch's by {check['max_rel_diff']:.2e} (relative; allowed "
            f"{CHECK_RTOL:g}): not written to {path}"
        )
    program.model.metadata_props[METADATA_KEY] = json.dumps({**metadata, "onnx_check": check})
    atomic_write(Path(path), lambda tmp: program.save(str(tmp), external_data=False))  # weights inline: one file
    return check


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The export JSON stored in an ONNX file written by `export_onnx` ({} when it has none)."""
    onnx = _require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return {}


class OnnxEngine:
    """A PyTorch module run by onnxruntime: exported once (through a temporary file), then `engine(x)` -> features.

    For `vdg.deploy.bench`: `threads` intra-op threads, as torch's; inputs and outputs are CPU tensors."""

    def __init__(self, module: nn.Module, image_size: int, threads: int) -> None:
        program = _program(module, image_size)
        with tempfile.TemporaryDirectory(prefix="vdg-onnx-") as folder:  # the session holds the graph in memory
            path = Path(folder) / "engine.onnx"
            program.save(str(path), external_data=False)
            self.session = session(path, threads)

    def __call__(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: x.cpu().numpy()})[0])
