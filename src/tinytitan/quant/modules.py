"""Runtime modules that execute quantized weights in their low-bit form (module swap targets).

CPU kernels: torch's `_weight_int8pack_mm` (int8 per output row) and `_weight_int4pack_mm_for_cpu`
(4-bit codes in groups of 32..256 with a bf16 scale and zero per group). Both want bf16 activations;
the residual stream stays in the model's dtype and only each matmul's input is cast. Codes of 3 and 2
bits run on the 4-bit kernel (their storage in artifacts is packed at 3 / 2 bits). On other devices the
weights are dequantized to bf16 once and run with F.linear (see `build_matrix`).

Prefill (many input rows) multiplies weights dequantized a slice of rows at a time with a GEMM in
`gemm_dtype()`: bf16 on CPUs with bf16 arithmetic (AVX-512 BF16, AMX), float32 elsewhere. On an AVX2 CPU
without it, torch's bf16 GEMM is emulated: 512 x 640 by 640 x 16384 took 1,841 ms in bf16 against 309 ms in
float32 (2 threads), so there the weights are dequantized to float32 and the activations stay float32.
"""

from __future__ import annotations

import functools
import itertools
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tinytitan.quant.int_quant import IntWeight

INT4_GROUPS = (32, 64, 128, 256)
PACK_ROWS = 16384  # rows packed at a time (bounds the transient copies of the codes at load)


@functools.cache
def gemm_dtype() -> torch.dtype:
    """The dtype of prefill GEMMs on this CPU: bf16 where the CPU computes in it, else float32."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    words = set(info.split())
    if words & {"avx512_bf16", "amx_bf16"} or (
        platform.machine() in ("aarch64", "arm64") and "bf16" in words
    ):
        return torch.bfloat16
    return torch.float32


def _slice_gemm(x: torch.Tensor, n: int, weights, dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] @ W^T with W [n, K] made ROW_SLICE rows at a time by `weights(r0, r1, dtype)`."""
    y = torch.empty(x.shape[0], n, dtype=dtype, device=x.device)
    xd = x.to(dtype)
    for r in range(0, n, ROW_SLICE):
        y[:, r : r + ROW_SLICE] = xd @ weights(r, min(r + ROW_SLICE, n), dtype).T
    return y


class PackedMatrix(nn.Module):
    """A quantized [N, K] matrix that can multiply (x @ W^T) and gather rows (embedding lookup)."""

    kind = "float"

    def __init__(self, n: int, k: int) -> None:
        super().__init__()
        self.n, self.k = n, k

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def runtime_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.buffers()) + list(self.parameters()))


class Bf16Matrix(PackedMatrix):
    """A 16-bit float matrix: bf16 (any other float is converted to it), or float16 kept as float16 (a
    float16 checkpoint runs in its dtype). A few input rows multiply in the matrix's dtype; more (prefill)
    run a GEMM of slices converted to float32, or to bf16 for a bf16 matrix where the CPU computes in it
    (torch's CPU float16 GEMM was 5x slower than float32's: 44 vs 8.5 ms for 512 x 640 by 640 x 2048)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__(*w.shape)
        dtype = torch.float16 if w.dtype == torch.float16 else torch.bfloat16
        self.register_buffer("w", w.to(dtype).contiguous())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        wdt = self.w.dtype
        gemm = gemm_dtype() if wdt == torch.bfloat16 else torch.float32
        if self.w.device.type != "cpu" or gemm == wdt or x.numel() < GEMM_MIN_ROWS * self.k:
            return F.linear(x.to(wdt), self.w).to(x.dtype)
        shape = x.shape
        y = _slice_gemm(x.reshape(-1, self.k), self.n, lambda r0, r1, dt: self.w[r0:r1].to(dt), gemm)
        return y.view(*shape[:-1], self.n).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.w[ids]


INT8_KERNEL_MAX_ROWS = 64  # _weight_int8pack_mm wins at decode, loses to a GEMM at prefill (bench/)
ROW_SLICE = 16384  # output rows converted at a time (bounded scratch on a 262k-row head)
GEMM_MIN_ROWS = 8  # a bf16 weight (dequantized GGML blocks) runs a float32 GEMM from this many rows (AVX2:
# 24 x 640 by 640 x 2048 in 6.0 ms as bf16, 2.6 ms converted to float32; one row: 0.4 vs 1.0 ms)


class Int8Matrix(PackedMatrix):
    """int8 codes with one bf16 scale per output row."""

    kind = "int8"

    def __init__(self, qw: IntWeight) -> None:
        super().__init__(*qw.q.shape)
        assert qw.bits == 8 and qw.group == qw.q.shape[1] and qw.symmetric
        if qw.q.dtype == torch.uint8:  # u ^ 0x80 read as int8 is u - 128: one pass, no int16 copy
            q = (qw.q ^ 0x80).view(torch.int8)
        else:
            q = (qw.q.to(torch.int16) - 128).to(torch.int8)
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scale", qw.scale[:, 0].to(torch.bfloat16).contiguous())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.k).to(torch.bfloat16)
        if torch.compiler.is_compiling() and x2.shape[0] == 1 and x2.device.type == "cpu":
            # One row in a compiled step: written as multiply-and-sum, inductor generates one vectorized
            # loop over the int8 rows, ~2x the packed kernel's speed (262k-row head: 7.1 vs 14.1 ms, bench).
            # Same rounding points as the kernel: bf16 input, float32 sums, bf16 output.
            y = ((x2.float() * self.q.float()).sum(-1) * self.scale.float()).to(torch.bfloat16)[None]
        elif x2.shape[0] < INT8_KERNEL_MAX_ROWS:
            y = torch._weight_int8pack_mm(x2, self.q, self.scale)
        else:  # prefill: a GEMM on codes converted per slice beats the packed kernel
            dt = gemm_dtype()
            # int8 codes are exact in bf16; the row scale is applied to the product
            y = _slice_gemm(x.reshape(-1, self.k), self.n, lambda r0, r1, d: self.q[r0:r1].to(d), dt)
            y.mul_(self.scale.to(dt))
        return y.view(*shape[:-1], self.n).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q[ids].float() * self.scale[ids].float()[..., None]


# Above this many input rows (prefill) the int4 matmul dequantizes to bf16 and runs a GEMM: at 512 rows
# 4.9 vs 8.2 ms for a 2048 x 640 matrix; below ~200 rows the packed kernel wins (bench, 2 threads).
INT4_KERNEL_MAX_ROWS = 192


@functools.cache
def _int4_block_n() -> int | None:
    """Probe the CPU int4 packing: blocks of B rows, byte (b, k, j) = row j | row j + B/2 << 4 at column k.
    Returns B, or None if the layout is different (then lookups keep their own copy of the codes)."""
    n, k = 128, 64
    rows = torch.arange(n)[:, None].expand(n, k)
    try:
        lo = torch.ops.aten._convert_weight_to_int4pack_for_cpu((rows & 15).int().contiguous(), 1)
        hi = torch.ops.aten._convert_weight_to_int4pack_for_cpu((rows >> 4).int().contiguous(), 1)
    except (RuntimeError, AttributeError):
        return None
    found = ((lo & 15) + 16 * (hi & 15)).int(), ((lo >> 4) + 16 * (hi >> 4)).int()
    for block in (64, 32, 16):
        if n % block:
            continue
        half = block // 2
        flat_lo = found[0].reshape(n // block, k, half)
        flat_hi = found[1].reshape(n // block, k, half)
        want = torch.arange(n).view(n // block, 1, block)
        if torch.equal(flat_lo, want[..., :half].expand_as(flat_lo)) and torch.equal(
            flat_hi, want[..., half:].expand_as(flat_hi)
        ):
            return block
    return None


def pack_int4_rows(q: torch.Tensor, shift: int, block_n: int) -> torch.Tensor:
    """Codes [N, K] (N a multiple of block_n) + shift in the CPU int4 kernel's packing, as `_int4_block_n`
    found it: per block of block_n rows a [K, block_n / 2] byte table, row j of the block in the low nibble
    and row j + block_n / 2 in the high one. Same bytes as `_convert_weight_to_int4pack_for_cpu` (tested),
    without its int32 copy of the codes."""
    n, k = q.shape
    c = q.to(torch.uint8) + shift
    c = c.view(n // block_n, 2, block_n // 2, k)
    return (c[:, 0] | (c[:, 1] << 4)).transpose(1, 2).reshape(n, k // 2)


class Int4Matrix(PackedMatrix):
    """4-bit codes (or 3/2-bit codes, which fit) in torch's CPU int4 packing, bf16 scale/zero per group:
    w = (q - 8) * scale + zero."""

    kind = "int4"

    def __init__(self, qw: IntWeight) -> None:
        n, k = qw.q.shape
        super().__init__(n, k)
        if qw.bits > 4 or qw.group not in INT4_GROUPS:
            raise ValueError(f"int4 kernel needs bits <= 4 and group in {INT4_GROUPS}")
        self.group = qw.group
        # Codes of b <= 4 bits are shifted to sit around the kernel's fixed offset 8 (q4 = q + 8 - 2^(b-1)),
        # so the bf16 zero it needs is the middle of the group's range, small, and rounds little.
        shift = 8 - (1 << (qw.bits - 1))
        scale = qw.scale.float()
        zero = qw.zero.float() + ((1 << (qw.bits - 1)) - qw.offset) * scale
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.register_buffer("sz", sz)  # [K / group, N, 2]
        self.block_n = _int4_block_n() if n % 64 == 0 else None
        if self.block_n is not None:
            # The layout probed above, written with uint8 ops (faster at load than torch's conversion,
            # which wants int32 codes), in slices of rows: the packing is local to blocks of block_n rows.
            step = PACK_ROWS if PACK_ROWS % self.block_n == 0 else n
            packed = torch.empty(n, k // 2, dtype=torch.uint8)
            for i in range(0, n, step):
                packed[i : i + step] = pack_int4_rows(qw.q[i : i + step], shift, self.block_n)
            self.register_buffer("packed", packed)
        else:  # torch's own conversion, and plain nibbles kept for row lookups
            q = qw.q.int() + shift
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            q = q.to(torch.uint8)
            self.register_buffer("nibbles", (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.k).to(torch.bfloat16)
        if x2.shape[0] < INT4_KERNEL_MAX_ROWS or self.block_n is None:
            sz = self.sz.contiguous()  # a view into a fused matrix's table when this one is a part of it
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, sz)
        else:  # prefill: a GEMM on weights dequantized per slice of rows beats the packed kernel
            y = _slice_gemm(x.reshape(-1, self.k), self.n, self.dequantized, gemm_dtype())
        return y.view(*shape[:-1], self.n).to(x.dtype)

    def dequantized(self, r0: int, r1: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Rows r0..r1 (multiples of block_n) in `dtype`, from the kernel's packing: each group's
        (q - 8) * scale + zero computed in float32 (and rounded once to bf16)."""
        assert self.block_n is not None
        bn = self.block_n
        blocks = self.packed.view(self.n // bn, self.k, bn // 2)[r0 // bn : r1 // bn]
        q = torch.cat([blocks & 15, blocks >> 4], dim=2).permute(0, 2, 1).reshape(r1 - r0, -1, self.group)
        sz = self.sz[:, r0:r1].float()
        # in place on the one float32 copy: faster than three broadcasting temporaries, same bits
        w = q.float().sub_(8).mul_(sz[..., 0].T[..., None]).add_(sz[..., 1].T[..., None])
        return w.view(r1 - r0, self.k).to(dtype)

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self.block_n is None:
            b = self.nibbles[flat]
            q = torch.stack([b & 15, b >> 4], dim=-1).reshape(flat.shape[0], self.k)
        else:
            half = self.block_n // 2
            view = self.packed.view(self.n // self.block_n, self.k, half)
            j = flat % self.block_n
            b = view[flat // self.block_n, :, j % half]  # [T, K]
            q = (b >> (4 * (j >= half).to(torch.uint8))[:, None]) & 15
        return q.reshape(*ids.shape, self.k)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.codes(ids).float()
        sz = self.sz[:, ids.reshape(-1)].float()  # [K/g, T, 2]
        scale = sz[..., 0].T.repeat_interleave(self.group, dim=1).reshape(*ids.shape, self.k)
        zero = sz[..., 1].T.repeat_interleave(self.group, dim=1).reshape(*ids.shape, self.k)
        return (q - 8) * scale + zero


class QuantLinear(nn.Module):
    """nn.Linear replacement over a PackedMatrix."""

    def __init__(self, matrix: PackedMatrix, label: str) -> None:
        super().__init__()
        self.matrix = matrix
        self.label = label  # the scheme, for reports
        self.in_features, self.out_features = matrix.k, matrix.n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix.matmul(x)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.label}, {type(self.matrix).__name__}"


class QuantEmbedding(nn.Module):
    """nn.Embedding replacement: looks rows up in the same quantized matrix the tied output head uses."""

    def __init__(self, matrix: PackedMatrix, label: str, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.matrix = matrix
        self.label = label
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.matrix.rows(ids).to(self.dtype)


def _blank(like: PackedMatrix, n: int) -> PackedMatrix:
    """An empty matrix of `like`'s class and settings with n rows (its buffers are set by the caller)."""
    m = type(like).__new__(type(like))
    PackedMatrix.__init__(m, n, like.k)
    for attr in ("group", "block_n"):
        if hasattr(like, attr):
            setattr(m, attr, getattr(like, attr))
    return m


# Buffers stacked along the output rows, and the dimension that is rows: Int4Matrix's packing is local to
# blocks of block_n rows, so its row blocks stack like rows; its scale/zero table is [K / group, N, 2].
# Compiled decode, fused vs separate: bench/ab_fused_projections.py (figures in bench/RESULTS.md).
_ROW_BUFFERS: dict[type, dict[str, int]] = {
    Bf16Matrix: {"w": 0},
    Int8Matrix: {"q": 0, "scale": 0},
    Int4Matrix: {"packed": 0, "sz": 1},
}


def fuse_rows(parts: list[PackedMatrix]) -> PackedMatrix | None:
    """One matrix holding the rows of `parts` one after the other, so projections of the same input run
    as one kernel call; None when they cannot (different kinds, groups or inputs; row tiers; an int4
    layout with no known row blocks). Each part then keeps views of the fused storage: no extra memory."""
    first = parts[0]
    kind = type(first)
    dims = _ROW_BUFFERS.get(kind)
    if dims is None or any(type(p) is not kind or p.k != first.k for p in parts):
        return None
    if kind is Int4Matrix:
        bn = first.block_n
        if bn is None or any(p.group != first.group or p.block_n != bn or p.n % bn for p in parts):
            return None
    fused = _blank(first, sum(p.n for p in parts))
    for name, dim in dims.items():
        fused.register_buffer(name, torch.cat([getattr(p, name) for p in parts], dim=dim))
    r0 = 0
    for p in parts:
        for name, dim in dims.items():
            setattr(p, name, getattr(fused, name).narrow(dim, r0, p.n))
        r0 += p.n
    return fused


_fusions = itertools.count()


class FusedLinear(nn.Module):
    """Projections of one input run as one matmul (q/k/v; gate/up): one kernel call instead of three or
    two per layer and token. The projections stay in the model as modules of their own (adapters, reports
    and exports address them by name) and hold views of this matrix's rows. The model takes the fused
    path only while its projections are still exactly these modules (`serves`): wrap or replace one (an
    adapter, a merge) and it runs them one by one again."""

    def __init__(self, matrix: PackedMatrix, parts: list[QuantLinear]) -> None:
        super().__init__()
        self.matrix = matrix
        self.sizes = [p.out_features for p in parts]
        self._parts = tuple(parts)  # a plain tuple: not registered as children a second time
        # each part carries this fusion's number: torch.export's tracing hands the model other objects
        # for the same modules (an identity check failed there, and the step ran three matmuls)
        self.token = next(_fusions)
        for p in parts:
            p.fused_token = self.token

    def serves(self, *modules: nn.Module) -> bool:
        return len(modules) == len(self._parts) and all(
            getattr(m, "fused_token", None) == self.token for m in modules
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.matrix.matmul(x).split(self.sizes, dim=-1))

    def extra_repr(self) -> str:
        return f"{self.matrix.k} -> {' + '.join(map(str, self.sizes))}, {type(self.matrix).__name__}"


# Attribute of the model's module that takes the fused call -> the projections it stands for
FUSED_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def fuse_projections(module: nn.Module) -> int:
    """Fuse every q/k/v and gate/up group of quantized projections in `module` whose kernels allow it
    (modules that declare a `qkv` / `gate_up` attribute); returns how many groups were fused."""
    done = 0
    for mod in list(module.modules()):
        for attr, names in FUSED_GROUPS.items():
            if not hasattr(mod, attr):
                continue
            parts = [getattr(mod, n, None) for n in names]
            if not all(isinstance(p, QuantLinear) for p in parts):
                continue
            matrix = fuse_rows([p.matrix for p in parts])  # type: ignore[union-attr]
            if matrix is not None:
                setattr(mod, attr, FusedLinear(matrix, parts))  # type: ignore[arg-type]
                done += 1
    return done


def unfuse_projections(module: nn.Module) -> None:
    """Undo fuse_projections before the projections are wrapped one by one (an adapter): each part gets
    contiguous tables of its own again (int4's kernel, compiled, takes no view for them); the codes stay
    where they are."""
    for mod in list(module.modules()):
        for attr in FUSED_GROUPS:
            fused = getattr(mod, attr, None)
            if isinstance(fused, FusedLinear):
                for part in fused._parts:
                    matrix = part.matrix
                    for name in _ROW_BUFFERS[type(matrix)]:
                        setattr(matrix, name, getattr(matrix, name).contiguous())
                setattr(mod, attr, None)


def build_matrix(qw: IntWeight | None, dense: torch.Tensor | None, device: torch.device) -> PackedMatrix:
    """The fastest runtime form for a quantized weight on this device. On the CPU: int8 per row and int4
    in groups run packed. Elsewhere the weight is dequantized to bf16 once: on an H200, torch's CUDA int8
    kernel decoded Gemma 3 270M at 167 tokens/s against 410 for bf16 weights (bench/RESULTS.md)."""
    if device.type == "cpu" and qw is not None:
        if qw.bits == 8 and qw.symmetric and qw.group == qw.q.shape[1]:
            return Int8Matrix(qw)
        if qw.bits <= 4 and qw.group in INT4_GROUPS and qw.q.shape[0] % 16 == 0:  # the kernel packs 16 rows
            return Int4Matrix(qw)
    w = dense if dense is not None else qw.dequantize()  # type: ignore[union-attr]
    return Bf16Matrix(w).to(device)
