"""GGML blocks run as stored: the default runtime of a GGUF file (`tinytitan.load(path)` without `reference`).

The C++ kernel (`csrc/ggml_matmul.cpp`) multiplies float32 inputs with the file's blocks: the weights stay
the file's bytes (a view of its memory map), read once per token. On x86 (AVX2) it rounds the inputs to int8
per 32 values and multiplies integer codes, as llama.cpp does; with `GgmlMatrix.exact` (and elsewhere) it
decodes each block into the values its float32 dequantization holds, the reference's up to the order of sums.
Decode (a few input rows) runs the kernel; prefill decodes slices of rows into float32 for a GEMM (in bf16
on CPUs that compute in it, `gemm_dtype`). Embedding
lookups decode the rows they read. Built once per machine (~15 s) into $TINYTITAN_HOME/kernels; without a
C++ compiler, or with TINYTITAN_NO_KERNELS=1, `available()` is False and `load()` dequantizes as before.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from tinytitan import native
from tinytitan.quant.modules import PackedMatrix, _slice_gemm, gemm_dtype

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "ggml_matmul.cpp"
# reassociation lets the compiler vectorise the sums; no contraction keeps each decoded value d * q (+ m) the
# float32 reference's, not a fused multiply-add's
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-ffp-contract=off"]  # fmt: skip
TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
KERNEL_MAX_ROWS = 16  # more input rows than this (prefill) decode slices of rows for a float32 GEMM

_loaded = False
_failure: str | None = None
_mode = threading.local()  # per thread: a server's worker thread prefills while others score


@contextlib.contextmanager
def generating():
    """While a prompt is prefilled for generation (not scored): GEMMs of many rows may run in bf16."""
    before = getattr(_mode, "generating", False)
    _mode.generating = True
    try:
        yield
    finally:
        _mode.generating = before


def available(build: bool = True) -> bool:
    """Whether the kernel is loaded, building it first (the first time on a machine, ~15 s) when `build`."""
    global _loaded, _failure
    if _loaded or _failure is not None:
        return _loaded
    why = native.try_load("tinytitan_ggml_matmul", SOURCE, FLAGS, build, _register_fakes)
    if why:
        _failure = why
        log.warning("GGML block kernel unavailable (%s); weights are dequantized to float32", why)
    _loaded = why is None
    return _loaded


def int8_inputs() -> bool:
    """Whether the kernel rounds its inputs to int8 (x86 with AVX2, where the build has that path)."""
    return "avx2" in native.cpu_flags()


def failure() -> str | None:
    """Why the kernel could not be built, once available() has failed."""
    return _failure


def _register_fakes() -> None:
    """Shapes for torch.compile, which traces the kernel's calls without running them."""

    def matmul(x: torch.Tensor, blocks: torch.Tensor, type: int, k: int, exact: bool) -> torch.Tensor:
        return x.new_empty(x.shape[0], blocks.shape[0])

    def dequant(blocks: torch.Tensor, type: int, k: int) -> torch.Tensor:
        return blocks.new_empty(blocks.shape[0], k, dtype=torch.float32)

    torch.library.register_fake("tinytitan_ggml::matmul")(matmul)
    torch.library.register_fake("tinytitan_ggml::dequant")(dequant)


def as_blocks(raw: np.ndarray) -> torch.Tensor:
    """[rows, bytes per row] uint8 from a GGUF file as a tensor without a copy (a read-only memory map is
    never written through it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(raw))


class GgmlMatrix(PackedMatrix):
    """An [N, K] matrix held as its GGML blocks: [N, K / block values * block bytes] uint8."""

    kind = "ggml"
    exact = False  # True: float32 products of the decoded weights (slower); False: int8 inputs on x86

    def __init__(self, gtype: str, blocks: torch.Tensor, k: int) -> None:
        if gtype not in TYPES:
            raise ValueError(f"no kernel for GGML type {gtype} (kernels: {', '.join(TYPES)})")
        super().__init__(blocks.shape[0], k)
        self.gtype, self.type_id = gtype, TYPES[gtype]
        self.register_buffer("blocks", blocks, persistent=False)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.k).float()
        if x2.shape[0] <= KERNEL_MAX_ROWS:
            y = torch.ops.tinytitan_ggml.matmul(x2, self.blocks, self.type_id, self.k, self.exact)
        else:
            # many rows: float32 decoded slices for a GEMM, float32 when scoring; a generation's prefill
            # (`generating`) multiplies in bf16 where the CPU computes in it: 2x the float32 GEMM, mean KL
            # 0.0004-0.0007 against the float32 product, below the decode path's int8 inputs (RESULTS)
            dt = gemm_dtype() if getattr(_mode, "generating", False) and not self.exact else torch.float32
            y = _slice_gemm(x2, self.n, lambda r0, r1, d: self.dequantized(r0, r1).to(d), dt)
        return y.view(*shape[:-1], self.n).to(x.dtype)

    def dequantized(self, r0: int, r1: int) -> torch.Tensor:
        return torch.ops.tinytitan_ggml.dequant(self.blocks[r0:r1], self.type_id, self.k)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        got = torch.ops.tinytitan_ggml.dequant(self.blocks[flat].contiguous(), self.type_id, self.k)
        return got.view(*ids.shape, self.k)

    def extra_repr(self) -> str:
        return f"{self.gtype}, {self.n} x {self.k}"
