"""The compiled kernel of sparse execution (`csrc/sparse_block.c`): one gated block's per-sample path in one call.

Equality: the gate, the active-channel convolutions and the shortcut compute the masked reference's sums in
another order, so outputs equal `FoldedBlock.masked` (and the `GatedResNet` eval forward) up to float round-off,
for every batch size, channel count and mask, all-off and all-on included (tests/test_native.py, test_sparse.py);
the masks are identical unless a gate logit lies within round-off of 0.

Why a compiled kernel (and why plain C through ctypes rather than a PyTorch C++ extension): PyTorch has no matrix
product that reads an indexed subset of a weight's rows, so the PyTorch per-sample path (`kernel="torch"`) gathers
the active rows into a copy and oneDNN then packs that copy again; in the late stages at batch 1 those two copies
cost as much as the skipped multiplications (width-64 CIFAR ResNet-18, 2 threads, 2-core AMD EPYC: the PyTorch
path ran 0.84x the folded dense blocks' time, the compiled kernel 0.51x with the same masks; docs/deploy.md). The
C file needs no PyTorch headers, so it compiles in about a second with the system C compiler; a C++ extension
would take a minute and a build toolchain for PyTorch.

Built on first use with `$VDG_CC` (else `$CC`, else `cc`): `-O3 -fopenmp` (no `-march=native`: the AVX-512 and
AVX2 tiles are compiled per function, and the CPU's widest is chosen at run time, `kernel_isa`; `VDG_KERNEL_ISA`
forces one). Cached under `$VDG_KERNEL_CACHE` (else `$XDG_CACHE_HOME/vdg/kernels`, else `~/.cache/vdg/kernels`),
named by a hash of the source, flags, the compiler's name and the machine type, so a cached library is found
without running the compiler (it need not be installed); a sidecar `.json` written atomically at build time
records its size, SHA-256 and the compiler's version, and a library that does not match it (truncated, empty,
overwritten) is rebuilt once, never loaded. A compiler without OpenMP gets a second try without `-fopenmp` (the
kernel then runs on one thread). OpenMP comes from the `libgomp.so.1` that PyTorch has already loaded (same
soname), so the kernel's threads are PyTorch's intra-op threads, not a second pool competing for the cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from vdg.core.errors import ConfigError, VdgError

SOURCE = Path(__file__).with_name("csrc") / "sparse_block.c"
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
VERSION = 7  # vdg_sparse_kernel_version() of the source this module speaks to
ISAS = ("portable", "avx2", "avx512")  # the kernel's variants, in the C source's ISA_* order (narrowest first)
COMPILE_TIMEOUT_S = 120  # a compiler that hangs (a licence server, a wedged NFS mount) is reported, not waited on


def compile_timeout() -> float:
    """Seconds a compile may take: `$VDG_COMPILE_TIMEOUT_S`, else COMPILE_TIMEOUT_S."""
    return float(os.environ.get("VDG_COMPILE_TIMEOUT_S") or COMPILE_TIMEOUT_S)


class NativeKernelError(VdgError, RuntimeError):
    """The compiled kernel cannot be built or loaded here; the message says why and what to do."""


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: NativeKernelError | None = None
_TORCH_HINT = "or use the PyTorch kernel: kernel='torch' (slower, same outputs)"


def compiler() -> str:
    return os.environ.get("VDG_CC") or os.environ.get("CC") or "cc"


def cache_dir() -> Path:
    if os.environ.get("VDG_KERNEL_CACHE"):
        return Path(os.environ["VDG_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vdg" / "kernels"


def library_path() -> Path:
    """Where the library of this source, these flags and this compiler name lives; runs nothing."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS), compiler(), platform.machine(), sys.platform):
        key.update(part if isinstance(part, bytes) else part.encode())
        key.update(b"\0")
    return cache_dir() / f"sparse_block-{key.hexdigest()[:16]}.so"


def sidecar_path(library: Path) -> Path:
    return library.with_suffix(".json")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _looks_like_a_library(path: Path) -> bool:
    """A shared library's header: ELF on Linux (Mach-O and others are not checked beyond being non-empty)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    if sys.platform.startswith("linux"):
        return head == b"\x7fELF"
    return len(head) == 4


def is_valid(path: Path) -> bool:
    """The cached library matches the sidecar written when it was built: size, ELF header and SHA-256. (A
    truncated library makes the loader die with SIGBUS, not an error; it must never reach ctypes.)"""
    try:
        record = json.loads(sidecar_path(path).read_text())
        return (
            path.stat().st_size == record["size"] > 0
            and _looks_like_a_library(path)
            and _sha256(path) == record["sha256"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _discard(path: Path) -> None:
    for stale in (path, sidecar_path(path)):
        try:
            stale.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            raise NativeKernelError(f"cannot replace the bad cached kernel {stale} ({err}); delete it") from None


def _compiler_version(cc: str) -> str:
    try:
        result = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (result.stdout or result.stderr).strip().splitlines()[0] if (result.stdout or result.stderr) else "unknown"


def _compile(flags: tuple[str, ...], output: str) -> subprocess.CompletedProcess:
    cc = compiler()
    command = [cc, *flags, str(SOURCE), "-o", output]
    try:  # its own process group: a compiler that times out is killed with its children (which hold the pipes)
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
    except OSError as err:
        raise NativeKernelError(
            f"sparse execution's compiled kernel needs a C compiler; {cc!r} could not be run ({err}). Install gcc "
            f"(or set VDG_CC to a C compiler), {_TORCH_HINT}"
        ) from None
    try:
        stdout, stderr = proc.communicate(timeout=compile_timeout())
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise NativeKernelError(
            f"compiling sparse execution's kernel timed out after {compile_timeout():g} s: {' '.join(command)}; "
            f"set VDG_CC to a working C compiler, {_TORCH_HINT}"
        ) from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build() -> Path:
    """Compile the kernel into the cache unless a valid one is there (`is_valid`); a bad one is rebuilt.

    Atomically: the library is compiled into a temporary file and renamed into place, then its sidecar is; a
    library without a matching sidecar is never loaded."""
    path = library_path()
    if path.exists() or sidecar_path(path).exists():
        if is_valid(path):
            return path
        _discard(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise NativeKernelError(
            f"cannot write the kernel cache {path.parent} ({err.strerror or err}); set VDG_KERNEL_CACHE to a "
            f"writable folder, {_TORCH_HINT}"
        ) from None
    cc = compiler()
    try:
        flags, result = FLAGS, _compile(FLAGS, tmp)
        if result.returncode != 0:  # no OpenMP (clang without libomp): one thread is better than no kernel
            without = tuple(f for f in FLAGS if f != "-fopenmp")
            retry = _compile(without, tmp)
            if retry.returncode == 0:
                flags, result = without, retry
        if result.returncode != 0:
            raise NativeKernelError(
                f"compiling sparse execution's kernel failed: {' '.join([cc, *FLAGS, str(SOURCE)])}\n"
                f"{result.stderr.strip()}\nSet VDG_CC to a C compiler (gcc), {_TORCH_HINT}"
            )
        size = os.path.getsize(tmp)
        if size == 0 or not _looks_like_a_library(Path(tmp)):
            raise NativeKernelError(
                f"the C compiler {cc!r} exited 0 but wrote no library ({size} bytes at {tmp}); set VDG_CC to a "
                f"working C compiler, {_TORCH_HINT}"
            )
        os.chmod(tmp, 0o755)
        record = {
            "size": size,
            "sha256": _sha256(Path(tmp)),
            "compiler": cc,
            "compiler_version": _compiler_version(cc),
            "flags": list(flags),
            "source_sha256": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
        }
        os.replace(tmp, path)
        _write_atomically(sidecar_path(path), json.dumps(record, indent=1) + "\n")
    except OSError as err:
        raise NativeKernelError(
            f"cannot write the kernel cache {path.parent} ({err.strerror or err}); set VDG_KERNEL_CACHE to a "
            f"writable folder, {_TORCH_HINT}"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class Params(ctypes.Structure):
    """params_t of the C source: one block's sizes and weight pointers."""

    _fields_ = [(name, ctypes.c_int64) for name in ("c", "cin", "cout", "stride", "tile_out", "hidden")] + [
        (name, ctypes.c_void_p) for name in ("wr", "br", "we", "be", "w1", "b1", "w2", "b2", "wd")
    ]


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn = lib.vdg_sparse_block
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(Params), ptr, i64, i64, i64, ptr, i32, ptr, ptr, i64, i32]
    lib.vdg_sparse_kernel_version.restype = ctypes.c_int
    lib.vdg_sparse_kernel_cpu_isa.restype = ctypes.c_int
    if lib.vdg_sparse_kernel_version() != VERSION:
        raise NativeKernelError(f"{lib._name}: kernel version {lib.vdg_sparse_kernel_version()}, expected {VERSION}")
    return lib


def _load() -> ctypes.CDLL:
    """Build (or find) and load the library; a cached one that fails to load is rebuilt once."""
    torch.get_num_threads()  # PyTorch (and its libgomp) is loaded before the kernel binds to it
    for attempt in (1, 2):
        path = build()
        try:
            return _bind(ctypes.CDLL(str(path)))
        except (OSError, AttributeError) as err:
            if attempt == 2:
                message = f"loading sparse execution's kernel {path} failed: {err}; {_TORCH_HINT}"
                raise NativeKernelError(message) from None
            _discard(path)
    raise AssertionError("unreachable")


def library() -> ctypes.CDLL:
    """The loaded kernel (built on first use); raises `NativeKernelError` saying why it cannot be had."""
    global _library, _error
    with _lock:
        if _library is None and _error is None:
            try:
                _library = _load()
            except NativeKernelError as err:
                _error = err
        if _error is not None:
            raise _error
        return _library


def available() -> bool:
    try:
        library()
    except NativeKernelError:
        return False
    return True


def cpu_isa() -> str:
    """The widest variant of the kernel this CPU runs: "avx512", "avx2" (AVX2 and FMA) or "portable"."""
    return ISAS[library().vdg_sparse_kernel_cpu_isa()]


def kernel_isa() -> str:
    """The variant the kernel runs: `$VDG_KERNEL_ISA` when set (so that every variant can be tested and timed on
    one machine), else `cpu_isa()`. A variant the CPU lacks is a ValueError naming what it has."""
    wanted = os.environ.get("VDG_KERNEL_ISA", "").strip().lower()
    widest = cpu_isa()
    if not wanted:
        return widest
    if wanted not in ISAS:
        raise ConfigError(f"VDG_KERNEL_ISA={wanted!r}: allowed values {list(ISAS)}; this CPU runs up to {widest!r}")
    if ISAS.index(wanted) > ISAS.index(widest):
        supported = ISAS[: ISAS.index(widest) + 1]
        raise ConfigError(
            f"VDG_KERNEL_ISA={wanted!r}, but this CPU runs only {list(supported)} (allowed values {list(ISAS)})"
        )
    return wanted


def output_tile(c_out: int) -> int:
    """Output channels per conv2 tile: 64, or 16 / 32 for blocks with that few (the tile's lanes would be
    wasted on padding: a width-8 network's first stage has 8 output channels)."""
    return 16 if c_out <= 16 else 32 if c_out <= 32 else 64


def block_conv2(weight: Tensor, tile: int) -> Tensor:
    """A conv weight [C_out, C, kh, kw] in the kernel's layout [ceil(C_out / tile), C, kh * kw, tile] (output
    channels zero-padded to a multiple of the tile): one output tile's weights of one input channel are one run."""
    c_out, c, kh, kw = weight.shape
    tiles = -(-c_out // tile)
    w = weight.detach().float().reshape(c_out, c, kh * kw)
    w = torch.nn.functional.pad(w, (0, 0, 0, 0, 0, tiles * tile - c_out))
    return w.reshape(tiles, tile, c, kh * kw).permute(0, 2, 3, 1).contiguous()


def _check(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or tuple(t.shape) != shape:
        # not user input: the engines pass the kernel its own prepacked tensors
        raise ValueError(
            f"{name}: need a contiguous float32 CPU tensor of shape {list(shape)}, "
            f"got {t.dtype} {list(t.shape)} on {t.device} (contiguous={t.is_contiguous()})"
        )


class NativeBlock:
    """One gated BasicBlock's weights for the compiled kernel, checked once; calling it runs the block.

    w1_rows [C, 9 * C_in] (BN-folded conv1, columns (kh, kw, c_in)), b1 [C], w2 [C_out, C, 3, 3] (BN-folded
    conv2; kept as `block_conv2` lays it out), b2 [C_out]; downsample: (W_d [C_out, C_in, 1, 1], b_d) of the
    BN-folded 1x1 shortcut, or None for the identity; gate: (W_r [hidden, C_in] BN folded, b_r, W_e [C, hidden],
    b_e) of the eval-mode gate (`FoldedGate`), or None.
    """

    def __init__(
        self,
        w1_rows: Tensor,
        b1: Tensor,
        w2: Tensor,
        b2: Tensor,
        stride: int,
        downsample: tuple[Tensor, Tensor] | None,
        gate: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    ) -> None:
        self.c, k1 = w1_rows.shape
        self.c_in, self.c_out, self.stride = k1 // 9, w2.shape[0], int(stride)
        self.w1_rows, self.b1, self.b2 = w1_rows.contiguous(), b1.contiguous(), b2.contiguous()
        self.tile = output_tile(self.c_out)
        self.w2 = block_conv2(w2, self.tile)
        _check("w1_rows", self.w1_rows, (self.c, 9 * self.c_in))
        _check("b1", self.b1, (self.c,))
        _check("w2", self.w2, (-(-self.c_out // self.tile), self.c, 9, self.tile))
        _check("b2", self.b2, (self.c_out,))
        self.wd = None
        if downsample is not None:
            wd, bd = downsample
            self.wd = block_conv2(wd.reshape(self.c_out, self.c_in, 1, 1), self.tile)
            self.b2 = (self.b2 + bd).contiguous()  # the kernel adds one bias for conv2 and the shortcut
            _check("downsample", self.wd, (-(-self.c_out // self.tile), self.c_in, 1, self.tile))
        elif self.c_in != self.c_out or self.stride != 1:
            # not user input: the engines build blocks from a network's own shapes
            raise ValueError(f"an identity shortcut needs C_in == C_out and stride 1, got {self.c_in} -> "
                             f"{self.c_out}, stride {self.stride}: pass the block's downsample")
        self.isa = kernel_isa()
        self.gate = None
        self.hidden = 0
        if gate is not None:  # the kernel takes both gate matrices transposed (see gate_mask in the C source)
            wr, br, we, be = gate
            self.hidden = wr.shape[0]
            _check("gate reduce weight", wr.contiguous(), (self.hidden, self.c_in))
            _check("gate expand weight", we.contiguous(), (self.c, self.hidden))
            self.gate = (wr.t().contiguous(), br.contiguous(), we.t().contiguous(), be.contiguous())
            _check("gate reduce bias", self.gate[1], (self.hidden,))
            _check("gate expand bias", self.gate[3], (self.c,))
        self._pointers()

    def _pointers(self) -> None:
        gate = [t.data_ptr() for t in self.gate] if self.gate is not None else [None] * 4
        wd = self.wd.data_ptr() if self.wd is not None else None
        weights = (*gate, self.w1_rows.data_ptr(), self.b1.data_ptr(), self.w2.data_ptr(), self.b2.data_ptr(), wd)
        self._params = Params(self.c, self.c_in, self.c_out, self.stride, self.tile, self.hidden, *weights)
        self._params_ref = ctypes.byref(self._params)  # the tensors above live as long as self

    def scratch_size(self, ho: int, wo: int, threads: int) -> int:
        return max(1, threads) * ho * wo * self.c

    def __call__(
        self,
        x: Tensor,
        out: Tensor,
        mask: Tensor,
        scratch: Tensor,
        threads: int,
        use_gate: bool = True,
        isa: str | None = None,
    ) -> Tensor:
        """out = relu(conv2_active(relu(conv1_active(x) + b1)) + b2 + shortcut(x)), reading only active weights.

        x [N, H, W, C_in] (channels_last images), out [N, Ho, Wo, C_out], mask [N, C] bool: written
        with the gate's masks when use_gate (the block has a gate), else read. scratch: >= `scratch_size` float32.
        At N = 1 the sample's tiles are shared over `threads` threads, at N > 1 the samples. isa: one of `ISAS`
        (this CPU's, `cpu_isa`, at most) instead of the block's `kernel_isa` (same outputs up to round-off). Returns
        out.
        """
        n, h, w, c_in = x.shape
        ho, wo = (h - 1) // self.stride + 1, (w - 1) // self.stride + 1
        threads = max(1, int(threads))
        _check("x", x, (n, h, w, self.c_in))
        _check("out", out, (n, ho, wo, self.c_out))
        if mask.dtype != torch.bool or tuple(mask.shape) != (n, self.c) or not mask.is_contiguous():
            got = f"{mask.dtype} {list(mask.shape)}"
            # not user input: the engines pass their own masks
            raise ValueError(f"mask: need a contiguous bool tensor [{n}, {self.c}], got {got}")
        needed = self.scratch_size(ho, wo, threads)
        if scratch.dtype != torch.float32 or not scratch.is_contiguous() or scratch.numel() < needed:
            # not user input: the engines size their own scratch
            raise ValueError(f"scratch: need >= {needed} contiguous float32 elements")
        if use_gate and self.gate is None:
            # not user input: the engines pass their own gates
            raise ValueError("use_gate=True, but the block was given no gate")
        if isa is not None and (isa not in ISAS or ISAS.index(isa) > ISAS.index(cpu_isa())):
            raise ConfigError(f"isa={isa!r}: allowed values {list(ISAS)}, up to {cpu_isa()!r} on this CPU")
        return self.run_trusted(x, out, mask, scratch, threads, use_gate, isa)

    def run_trusted(
        self,
        x: Tensor,
        out: Tensor,
        mask: Tensor,
        scratch: Tensor,
        threads: int,
        use_gate: bool = True,
        isa: str | None = None,
    ) -> Tensor:
        """`__call__` without its checks, for callers that made every tensor themselves to the documented shapes
        (`FoldedBlock.native_sampled`): a wrong shape here is memory corruption, not an error."""
        n, h, w, _ = x.shape
        status = library().vdg_sparse_block(
            self._params_ref, x.data_ptr(), n, h, w, mask.data_ptr(), int(use_gate), out.data_ptr(),
            scratch.data_ptr(), threads, ISAS.index(isa or self.isa),
        )
        if status == -1:
            raise MemoryError("sparse execution's kernel could not allocate its index buffers")
        if status != 0:  # -2: a gate asked of a block without one, -3: a tile size with no code, -4: a bad isa
            # not user input: the kernel refuses only what the checks above let through, a vdg bug
            raise RuntimeError(f"sparse execution's kernel refused the block (status {status}); a vdg bug")
        return out
