"""GGML block formats (llama.cpp's quantization types): quantize with a weighted scale search, dequantize
bit-for-bit like `gguf.quants.dequantize`.

One small class per format, registered in FORMATS under its gguf type name. Every format turns a float32
array whose last axis is a row (GGUF's ne0, the "in" dimension of a matrix) into the raw bytes llama.cpp
stores, and back:

    raw = FORMATS["Q4_K"].quantize_blocks(w, weights=importance)   # (rows, cols // 256 * 144) uint8
    w_hat = FORMATS["Q4_K"].dequantize_blocks(raw)                  # (rows, cols) float32

Scale selection. Each block's scale (and min) comes from a small search over candidate inverse scales
around the plain max-based one; every candidate's rounding is scored with its own least-squares scale
(and min), the best is kept, and the values are rounded again with the float16 scale that is actually
stored. k-quants then fit their 6-/8-/4-bit sub-block scales to a super-block float16 scale by the same
kind of weighted search. This is the idea of llama.cpp's make_qx_quants / make_qkx2_quants, written
for whole arrays at once. The error minimized is plain squared error, or sum(weights * err**2) when
`weights` (importance per column, or per element) is given: our imatrix-style rounding.

Dequantization repeats gguf-py's float32 arithmetic in the same order (scale products are exact; only
the final add/subtract rounds), so results are identical bit for bit, not merely close.

Traps (each also commented where it happens): every scale is a float16, so blocks of values below ~1e-6
quantize to zeros (llama.cpp's too) and scales beyond 65504 are refused; k-quants need rows that are a
multiple of 256 (fallback_type says what llama.cpp uses instead); Q8_0 never uses -128; Q3_K stores its
high bit set for the upper half; a row's bytes never depend on the rows quantized alongside it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import gguf
import numpy as np

from tinytitan.errors import TinyTitanError

QK_K = 256  # super-block length of the k-quants
_CHUNK = 1 << 16  # elements per work item: every temporary of the search stays in L2 cache
_F16_MAX = 65504.0
Arr = np.ndarray
# worker threads for the chunks (numpy releases the GIL in its loops); TINYTITAN_QUANT_THREADS=1 when
# other jobs already keep the cores busy
_THREADS = max(1, int(os.environ.get("TINYTITAN_QUANT_THREADS", 0)) or min(4, os.cpu_count() or 1))


class QuantFormatError(TinyTitanError, ValueError):
    """An array cannot be stored in the requested GGML format (row length, non-finite values, range)."""


FORMATS: dict[str, GGMLFormat] = {}


class GGMLFormat:
    """A GGML tensor type. Subclasses name their `qtype` and implement `_quantize` / `_dequantize` on
    whole blocks: (n_blocks, block_size) float32 <-> (n_blocks, type_size) uint8."""

    qtype: ClassVar[gguf.GGMLQuantizationType]
    name: ClassVar[str]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    bits_per_weight: ClassVar[float]
    has_search: ClassVar[bool] = True  # False: `weights` cannot change the result (float types)

    def __init_subclass__(cls, qtype: gguf.GGMLQuantizationType | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if qtype is None:
            return
        cls.qtype = qtype
        cls.name = qtype.name
        cls.block_size, cls.type_size = gguf.GGML_QUANT_SIZES[qtype]
        cls.bits_per_weight = cls.type_size * 8 / cls.block_size
        FORMATS[cls.name] = cls()

    def __repr__(self) -> str:
        return f"<{self.name}: {self.block_size} weights in {self.type_size} bytes>"

    # -- public ---------------------------------------------------------------------------------------

    def quantize_blocks(self, x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """float32 (..., cols) -> uint8 (..., cols // block_size * type_size).

        `weights`: importance, the same shape as `x` or broadcastable to it (e.g. (cols,)); the scale
        search then minimizes sum(weights * (x - dequantized)**2) instead of the plain squared error.
        """
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 0:
            raise QuantFormatError(f"{self.name}: cannot quantize a scalar")
        cols = x.shape[-1]
        self._check_row(cols)
        rows = x.reshape(-1, cols)
        w = None
        if weights is not None and self.has_search:
            w = np.asarray(weights, dtype=np.float32)
            try:
                np.broadcast_shapes(w.shape, x.shape)
            except ValueError:
                raise QuantFormatError(
                    f"{self.name}: weights of shape {w.shape} do not broadcast to the array's {x.shape}"
                ) from None
            if not (np.isfinite(w).all() and (w >= 0).all()):
                raise QuantFormatError(f"{self.name}: importance weights must be finite and >= 0")
            w = np.broadcast_to(w, x.shape).reshape(-1, cols)  # a view when w is (cols,)
        out = np.empty((rows.shape[0], cols // self.block_size * self.type_size), dtype=np.uint8)
        step = max(1, _CHUNK // cols)

        def work(r0: int) -> None:
            xb = rows[r0 : r0 + step]
            if not np.isfinite(xb).all():
                raise QuantFormatError(f"{self.name}: cannot quantize NaN or infinite values (row >= {r0})")
            blocks = np.ascontiguousarray(xb).reshape(-1, self.block_size)
            wb = None if w is None else np.ascontiguousarray(w[r0 : r0 + step]).reshape(-1, self.block_size)
            n = blocks.shape[0]
            if n == 1:
                # Trap: numpy sums a lone column pairwise but several columns row by row, so a single
                # block could round differently than the same block among others. Pair it with itself:
                # a row's bytes never depend on what it is quantized with.
                blocks = np.repeat(blocks, 2, axis=0)
                wb = None if wb is None else np.repeat(wb, 2, axis=0)
            q = self._quantize(blocks, wb)[:n]
            out[r0 : r0 + step] = q.reshape(xb.shape[0], -1)

        _run_chunks(work, range(0, rows.shape[0], step))
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def dequantize_blocks(self, raw: np.ndarray) -> np.ndarray:
        """uint8 (..., n_bytes) -> float32 (..., n_bytes // type_size * block_size)."""
        raw = np.asarray(raw)
        if raw.dtype != np.uint8:
            raw = raw.view(np.uint8)
        if raw.ndim == 0 or raw.shape[-1] % self.type_size:
            raise QuantFormatError(f"{self.name}: rows of {raw.shape[-1:]} bytes are not whole blocks")
        n_bytes = raw.shape[-1]
        rows = raw.reshape(-1, n_bytes)
        cols = n_bytes // self.type_size * self.block_size
        out = np.empty((rows.shape[0], cols), dtype=np.float32)
        step = max(1, (_CHUNK * 4) // max(cols, 1))

        def work(r0: int) -> None:
            blocks = np.ascontiguousarray(rows[r0 : r0 + step]).reshape(-1, self.type_size)
            out[r0 : r0 + step] = self._dequantize(blocks).reshape(-1, cols)

        _run_chunks(work, range(0, rows.shape[0], step))
        return out.reshape(*raw.shape[:-1], cols)

    def row_ok(self, cols: int) -> bool:
        return cols > 0 and cols % self.block_size == 0

    # -- per format -----------------------------------------------------------------------------------

    def _check_row(self, cols: int) -> None:
        if not self.row_ok(cols):
            raise QuantFormatError(
                f"{self.name} stores rows in blocks of {self.block_size}; a row of {cols} values does not "
                f"split into whole blocks"
            )

    def _quantize(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def _dequantize(self, blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _run_chunks(work: Callable[[int], None], starts: range) -> None:
    """numpy releases the GIL inside its loops, so chunks run on a few threads."""
    if len(starts) < 4 or _THREADS == 1:
        for s in starts:
            work(s)
        return
    with ThreadPoolExecutor(_THREADS) as pool:
        for f in [pool.submit(work, s) for s in starts]:
            f.result()


def _k_row_error(name: str, cols: int) -> QuantFormatError:
    return QuantFormatError(
        f"{name} needs rows whose length is a multiple of {QK_K} (got {cols}); llama.cpp stores such "
        f"tensors as {fallback_type(name, cols)} instead (see fallback_type)"
    )


# ---------------------------------------------------------------------------------------------------
# Scale search. Layout: one block per COLUMN (a block's values run down axis 0). Reductions over a block
# are then sums of contiguous rows, several times faster in numpy than reducing 16-32-long rows, and
# per-block scalars broadcast as (n,) rows.
# ---------------------------------------------------------------------------------------------------
# Offsets added to the level count of the plain max-based inverse scale: iscale = (levels + delta) / ref.
_DELTAS_FINE = np.round(np.arange(-0.9, 0.95, 0.1), 2)  # 19, like make_qx_quants' -9..9 tenths
_DELTAS_AFFINE = np.round(np.arange(-1.0, 1.05, 0.1), 2)  # 21, make_qkx2_quants' range for Q4_K
_DELTAS_Q2 = np.round(np.arange(-0.5, 1.05, 0.1), 2)  # 16 (its range for Q2_K): as good there, faster
_DELTAS_SCALES = np.round(np.arange(-2.0, 2.05, 0.1), 2)  # super-block fits: 1/16 of the data, cheap
_F64 = np.float64
_POLISH = 1  # Lloyd steps after the sub-block search of the k-quants (a 2nd gains ~0.05%)


def _f16(v: np.ndarray, what: str) -> np.ndarray:
    """Round scales to float16 (what the block stores), refusing values float16 cannot hold."""
    if np.abs(v).max(initial=0.0) > _F16_MAX:
        raise QuantFormatError(f"values too large: a {what} exceeds float16's range ({_F16_MAX})")
    return v.astype(np.float16)


def _cdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-column dot products, float64 (n,)."""
    return np.einsum("ij,ij->j", a, b).astype(_F64)


def _csum(a: np.ndarray) -> np.ndarray:
    return a.sum(axis=0).astype(_F64)


def _inv(v: np.ndarray, num: float = 1.0) -> np.ndarray:
    """num / v as float32, 0 where v == 0 (a zero scale quantizes everything to level 0)."""
    v = np.asarray(v, dtype=np.float32)
    return np.divide(np.float32(num), v, out=np.zeros_like(v), where=v != 0)


def _pick(values: np.ndarray, k: np.ndarray) -> np.ndarray:
    """values[k[j], j] for (K, n) values."""
    return values[k, np.arange(values.shape[1])]


def _sym_sums(xt: np.ndarray, wt: np.ndarray | None, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    wl = L if wt is None else L * wt
    return _cdot(wl, xt), _cdot(wl, L)


def _sym_search(
    xt: np.ndarray, wt: np.ndarray | None, lo: int, hi: int, deltas: np.ndarray, signed: bool = True
) -> np.ndarray:
    """Scale d per column for x ~ d * L, L integer in [lo, hi], minimizing sum(w (x - d L)^2).

    Each candidate rounding is scored with its own least-squares scale (error = sum(w x^2) -
    (sum w x L)^2 / sum w L^2), the best one wins. signed=True (lo = -hi - 1): the value of largest
    magnitude goes to `lo`, the side with one more level, and d takes its sign (llama.cpp's trick for
    Q4_0, Q3_K, Q6_K). signed=False: ranges symmetric or non-negative ([-127, 127], [0, 63]), d >= 0.
    """
    n = xt.shape[1]
    mx, mn = xt.max(axis=0), xt.min(axis=0)
    if signed:
        big = np.where(-mn > mx, mn, mx)  # the signed value of largest magnitude
        xn = xt * _inv(big, -1.0)  # big -> -1, so level `lo` after scaling by -lo
        base = -lo
    else:
        xn = xt * _inv(np.maximum(mx, -mn))
        base = hi
    K = len(deltas)
    slx = np.empty((K, n), dtype=np.float32)
    sl2 = np.empty((K, n), dtype=np.float32)
    L = np.empty_like(xt)
    wl = L if wt is None else np.empty_like(xt)
    for k, delta in enumerate(deltas):
        np.multiply(xn, np.float32(base + delta), out=L)
        np.rint(L, out=L)
        np.clip(L, lo, hi, out=L)
        if wt is not None:
            np.multiply(L, wt, out=wl)
        np.einsum("ij,ij->j", wl, xt, out=slx[k])
        np.einsum("ij,ij->j", wl, L, out=sl2[k])
    sumlx, suml2 = slx.astype(_F64), sl2.astype(_F64)
    ok = suml2 > 0
    d = np.where(ok, sumlx / np.where(ok, suml2, 1.0), 0.0)
    return _pick(d, np.where(ok, d * sumlx, -1.0).argmax(axis=0))


def _round_sym(xt: np.ndarray, d: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Nearest levels for per-column scales d: the best L for that d, whatever the weights."""
    L = xt * _inv(d)
    np.rint(L, out=L)
    return np.clip(L, lo, hi, out=L)


def _quantize_sym(
    xt: np.ndarray, wt: np.ndarray | None, lo: int, hi: int, deltas: np.ndarray, signed: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Search, store the scale as float16, round to it; then one least-squares refit of the scale for
    those levels and a second rounding, kept where it lowers the error.
    Returns float16 scales (n,) and levels (bs, n) as float32."""
    d1 = _f16(_sym_search(xt, wt, lo, hi, deltas, signed), "block scale")
    L1 = _round_sym(xt, d1, lo, hi)
    slx1, sl21 = _sym_sums(xt, wt, L1)
    d2 = _f16(np.where(sl21 > 0, slx1 / np.where(sl21 > 0, sl21, 1.0), 0.0), "block scale")
    L2 = _round_sym(xt, d2, lo, hi)
    slx2, sl22 = _sym_sums(xt, wt, L2)
    e1 = d1.astype(_F64) * (d1.astype(_F64) * sl21 - 2 * slx1)  # error minus sum(w x^2)
    e2 = d2.astype(_F64) * (d2.astype(_F64) * sl22 - 2 * slx2)
    better = e2 < e1
    return np.where(better, d2, d1), np.where(better, L2, L1)


class _Affine:
    """x ~ s * L + o per column, L integer in [0, nmax], fitted by weighted least squares.

    All sums are taken over xm = x - lo (lo = the column's min, or min(min, 0)): the fit is shift
    invariant, and this keeps float32 sums free of cancellation when a block sits far from zero.
    `cap` bounds the offset in those coordinates (k-quants store -o as an unsigned min, so o <= 0).
    """

    def __init__(self, xt: np.ndarray, wt: np.ndarray | None, nmax: int, min_le_zero: bool) -> None:
        self.xt, self.wt, self.nmax = xt, wt, nmax
        n = xt.shape[1]
        self.mx, lo = xt.max(axis=0), xt.min(axis=0)
        self.lo = np.minimum(lo, 0.0) if min_le_zero else lo
        self.xm = xt - self.lo
        self.bounded = min_le_zero
        self.cap = -self.lo.astype(_F64) if min_le_zero else np.full(n, np.inf)
        if wt is None:
            self.sw = np.full(n, float(xt.shape[0]))
            self.sx, self.sxx = _csum(self.xm), _cdot(self.xm, self.xm)
        else:
            wx = wt * self.xm
            self.sw, self.sx, self.sxx = _csum(wt), _csum(wx), _cdot(wx, self.xm)

    def sums(self, L: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        wl = L if self.wt is None else L * self.wt
        return _csum(wl), _cdot(wl, L), _cdot(wl, self.xm)

    def solve(self, sl: Arr, sl2: Arr, sxl: Arr) -> tuple[Arr, Arr, Arr]:
        """Least-squares (s, o in xm coordinates, error) from level sums of shape (n,) or (K, n), in
        the sums' dtype (float32 for the candidate search: its sums cover at most 32 values)."""
        dt = sl.dtype
        sw, sx, sxx = self.sw.astype(dt), self.sx.astype(dt), self.sxx.astype(dt)
        det = sw * sl2 - sl * sl
        ok = det > 0
        r = 1 / np.where(ok, det, 1)
        s = (sw * sxl - sx * sl) * r
        o = (sl2 * sx - sl * sxl) * r
        err = sxx - s * sxl - o * sx  # the residual at the least-squares optimum
        if self.bounded:
            cap = self.cap.astype(dt)
            pinned = o > cap  # the offset would break its bound: pin it there and refit the scale alone
            if pinned.any():
                sxl_c = sxl - cap * sl
                s_p = sxl_c / np.where(sl2 > 0, sl2, 1)
                s = np.where(pinned, s_p, s)
                o = np.where(pinned, cap, o)
                err = np.where(pinned, sxx - 2 * cap * sx + cap * cap * sw - s_p * sxl_c, err)
        return s, o, np.where(ok & (s > 0), err, np.inf)

    def error(self, sl: Arr, sl2: Arr, sxl: Arr, s: Arr, o: Arr | float) -> Arr:
        """sum(w (xm - s L - o)^2), expanded over the sums."""
        return self.sxx - 2 * s * sxl - 2 * o * self.sx + s * s * sl2 + 2 * s * o * sl + o * o * self.sw

    def search(self, deltas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best (scale, offset) over candidate roundings, in x's own coordinates (float64)."""
        n, nmax = self.xt.shape[1], self.nmax
        rng = self.mx - self.lo
        xn = self.xm * _inv(rng)  # in [0, 1]
        K = len(deltas)
        acc = np.empty((3, K, n), dtype=np.float32)
        L = np.empty_like(self.xt)
        wl = L if self.wt is None else np.empty_like(self.xt)
        for k, delta in enumerate(deltas):
            np.multiply(xn, np.float32(nmax + delta), out=L)
            np.rint(L, out=L)
            np.clip(L, 0, nmax, out=L)
            if self.wt is not None:
                np.multiply(L, self.wt, out=wl)
            acc[0, k] = wl.sum(axis=0)
            np.einsum("ij,ij->j", wl, L, out=acc[1, k])
            np.einsum("ij,ij->j", wl, self.xm, out=acc[2, k])
        sl, sl2, sxl = acc
        s, o, err = self.solve(sl, sl2, sxl)
        k = err.argmin(axis=0)
        best_s, best_o, best_err = _pick(s, k).astype(_F64), _pick(o, k).astype(_F64), _pick(err, k)
        # fallback (flat or degenerate columns): the range split into nmax steps from the min
        k0 = int(np.argmin(np.abs(deltas)))
        s0 = rng.astype(_F64) / nmax
        e0 = self.error(sl[k0].astype(_F64), sl2[k0].astype(_F64), sxl[k0].astype(_F64), s0, 0.0)
        plain = ~(best_err <= e0)
        best_s = np.where(plain, s0, best_s)
        best_o = np.where(plain, 0.0, best_o)
        return np.where(rng > 0, best_s, 0.0), best_o + self.lo

    def refit(self, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, o, err = self.solve(*self.sums(L))
        bad = ~np.isfinite(err)  # a single level used: keep the scale, fit the offset alone
        o_flat = np.minimum(self.sx / np.where(self.sw > 0, self.sw, 1.0), self.cap)
        return np.where(bad, 0.0, s), np.where(bad, o_flat, o) + self.lo

    def error_of(self, s: np.ndarray, o: np.ndarray, L: np.ndarray) -> np.ndarray:
        """Weighted squared error of stored (s, o) with levels L."""
        return self.error(*self.sums(L), s.astype(_F64), o.astype(_F64) - self.lo)


def _round_affine(xt: np.ndarray, s: np.ndarray, o: np.ndarray, nmax: int) -> np.ndarray:
    """Nearest levels in [0, nmax] for per-column stored scales and offsets."""
    L = (xt - np.asarray(o, dtype=np.float32)) * _inv(s)
    np.rint(L, out=L)
    return np.clip(L, 0, nmax, out=L)


def _sym_polish(
    xt: np.ndarray, wt: np.ndarray | None, s: np.ndarray, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd steps on a searched scale: refit the scale to its rounded levels, round again; each step is
    kept only where it lowers the error. Finds grids the candidate search cannot hit (a sub-block that
    does not reach its extreme levels, e.g. one requantized from a k-quant file)."""
    L = _round_sym(xt, s, lo, hi)
    slx, sl2 = _sym_sums(xt, wt, L)
    err = s * (s * sl2 - 2 * slx)  # error minus sum(w x^2)
    for _ in range(_POLISH):
        s2 = np.where(sl2 > 0, slx / np.where(sl2 > 0, sl2, 1.0), 0.0)
        L2 = _round_sym(xt, s2, lo, hi)
        slx2, sl22 = _sym_sums(xt, wt, L2)
        e2 = s2 * (s2 * sl22 - 2 * slx2)
        better = e2 < err
        s, err = np.where(better, s2, s), np.where(better, e2, err)
        L, slx, sl2 = np.where(better, L2, L), np.where(better, slx2, slx), np.where(better, sl22, sl2)
    return s, L


def _affine_polish(fit: _Affine, s: Arr, o: Arr) -> tuple[Arr, Arr, Arr]:
    """_sym_polish for (scale, offset) fits."""
    L = _round_affine(fit.xt, s, o, fit.nmax)
    err = fit.error_of(s, o, L)
    for _ in range(_POLISH):
        s2, o2 = fit.refit(L)
        L2 = _round_affine(fit.xt, s2, o2, fit.nmax)
        e2 = fit.error_of(s2, o2, L2)
        better = e2 < err
        s, o, err, L = (
            np.where(better, s2, s),
            np.where(better, o2, o),
            np.where(better, e2, err),
            np.where(better, L2, L),
        )
    return s, o, L


def _quantize_affine(
    xt: np.ndarray, wt: np.ndarray | None, nmax: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 / Q5_1: float16 scale and offset per column, and levels; search then one refit step."""
    fit = _Affine(xt, wt, nmax, min_le_zero=False)
    s, o = fit.search(_DELTAS_AFFINE)
    d1, m1 = _f16(s, "block scale"), _f16(o, "block min")
    L1 = _round_affine(xt, d1, m1, nmax)
    s2, o2 = fit.refit(L1)
    d2, m2 = _f16(s2, "block scale"), _f16(o2, "block min")
    L2 = _round_affine(xt, d2, m2, nmax)
    better = fit.error_of(d2, m2, L2) < fit.error_of(d1, m1, L1)
    return np.where(better, d2, d1), np.where(better, m2, m1), np.where(better, L2, L1)


def _levels(v: Arr, vw: Arr, lo: int, hi: int, signed: bool, what: str) -> tuple[Arr, Arr]:
    """A super-block's float16 scale and the integer levels of its sub-block scales (or mins) v:
    (n_sub, n) columns, fitted with weights vw = how much each sub-block's error grows per unit error
    of the value (sum w L^2 for a scale, sum w for a min)."""
    d16 = _f16(_sym_search(v, vw, lo, hi, _DELTAS_SCALES, signed), what)
    return d16, np.clip(np.rint(v * _inv(d16)), lo, hi)


def _cols(a: np.ndarray | None) -> np.ndarray | None:
    """(n_blocks, block) rows -> the search's (block, n_blocks) columns, contiguous."""
    return None if a is None else np.ascontiguousarray(a.T)


def _sub_cols(v: np.ndarray, ns: int) -> np.ndarray:
    """Per-sub-block values (n * ns,) -> (ns, n) float32 columns, one super-block per column."""
    return np.ascontiguousarray(v.reshape(-1, ns).T, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------
# Bit packing helpers
# ---------------------------------------------------------------------------------------------------


def _u8(a: np.ndarray) -> np.ndarray:
    return a.astype(np.uint8)


def _f16_bytes(d16: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(d16.astype(np.float16)).view(np.uint8).reshape(-1, 2)


def _f16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    """A float16 stored at byte `start` of every block, as float32 (n, 1)."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles_split(q: np.ndarray) -> np.ndarray:
    """Legacy 32-blocks: byte j holds value j (low nibble) and value j + 16 (high nibble)."""
    half = q.shape[1] // 2
    return _u8(q[:, :half]) | (_u8(q[:, half:]) << 4)


def _unnibble_split(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits32(q: np.ndarray, bit: int) -> np.ndarray:
    """Bit `bit` of each of 32 values as a little-endian uint32 field: value j -> bit j (4 bytes)."""
    return np.packbits(((_u8(q) >> bit) & 1), axis=1, bitorder="little")


def _unbits32(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=1, bitorder="little")


# ---------------------------------------------------------------------------------------------------
# Float types
# ---------------------------------------------------------------------------------------------------


class F32(GGMLFormat, qtype=gguf.GGMLQuantizationType.F32):
    has_search = False

    def _quantize(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        return x.astype("<f4").view(np.uint8)

    def _dequantize(self, blocks: np.ndarray) -> np.ndarray:
        return blocks.view("<f4").astype(np.float32)


class F16(GGMLFormat, qtype=gguf.GGMLQuantizationType.F16):
    has_search = False

    def _quantize(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        if np.abs(x).max(initial=0.0) > _F16_MAX:
            raise QuantFormatError(f"F16: values beyond float16's range ({_F16_MAX}); use BF16 or F32")
        return x.astype("<f2").view(np.uint8)

    def _dequantize(self, blocks: np.ndarray) -> np.ndarray:
        return blocks.view("<f2").astype(np.float32)


class BF16(GGMLFormat, qtype=gguf.GGMLQuantizationType.BF16):
    has_search = False

    def _quantize(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        n = x.view(np.uint32).astype(np.uint64)
        n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16  # round to nearest even (inputs are finite: no NaN case)
        return n.astype("<u2").view(np.uint8)

    def _dequantize(self, blocks: np.ndarray) -> np.ndarray:
        return (blocks.view("<u2").astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------------------------------
# Legacy 32-blocks
# ---------------------------------------------------------------------------------------------------


class Q8_0(GGMLFormat, qtype=gguf.GGMLQuantizationType.Q8_0):
    """d (f16) | 32 x int8. w = q * d.

    Trap: levels stay in [-127, 127]. int8 has -128, but llama.cpp's x86 dot products take |q| with a
    sign instruction, and |-128| does not fit in int8.
    """

    _deltas = np.array([0.0, -0.25, -0.5])

    def _quantize(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        d16, L = _quantize_sym(_cols(x), _cols(w), -127, 127, self._deltas, signed=False)
        return np.concatenate([_f16_bytes(d16), L.T.astype(np.int8).view(np.uint8)], axis=1)

    def _dequantize(self, blocks: np.ndarray) -> np.ndarray:
        d = _f16_field(blocks, 0)
        return blocks[:, 2:].view(np.int8).astype(np.float32) * d


class Q4_0(GGMLFormat, qtype=gguf.GGMLQuantizationType.Q4_0):
    """d (f16) | 16 bytes of nibbles (value j low, j + 16 high). w = (q - 8) * d."""

    def _quantize(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        d16, L = _quantize_sym(_cols(x), _cols(w), -8, 7, _DELTAS_FINE)
        return np.concatenate([_f16_bytes(d16), _nibbles_split(L.T + 8)], axis=1)

    def _dequantize(self, blocks: np.ndarray) -> np.ndarray:
        d = _f16_field(blocks, 0)
        q = _unnibble_split(blocks[:, 2:]).astype(np.int8) - np.int8(8)
        return d * q.astype(np.float32)


class Q5_0(GGMLFormat, qtype=gguf.GGMLQuantizationType.Q5_0):
    """d (f16) | qh: uint32, bit j = 5th bit of value j | 16 bytes of low nibbles. w = (q - 16) * d."""

    def _quantize(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        d16, L = _quantize_sym(_cols(x), _cols(w), -16, 15, _DELTAS_FINE)
        q = L.T + 16
        return np.concatenate([_f16_bytes(d16), _bits32(q, 4), _nibbles_split(_u8(q) & 0x0F)], axis=1)

    def _dequantize(self, blocks: np.ndarray) -> np.ndarray:
        d = _f16_field(blocks, 0)
        q = _unnibble_split(blocks[:, 6:]) | (_unbits32(blocks[:, 2:6]) << 4)
        return d * (q.astype(np.int8) - np.int8(16)).astype(np.float32)


class Q4_1(GGMLFormat, qtype=gguf.GGMLQuantizationType.Q4_1):
    """d (f16) | m (f16) | 16 bytes of nibbles. w = q * d + m."""

    nmax = 15
    _offset = 4  # where the nibbles start

    def _fit(self, x: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d16, m16, L = _quantize_affine(_cols(x), _cols(w), self.nmax)
        return d16, m16, L.T

    def _quantize(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        d16, m16, L = self._fit(x, w)
        return np.concatenate([_f16_bytes(d16), _f16_bytes(m16), _nibbles_split(L)], axis=1)

    def _dequantize(self, blocks: np.ndarray) -> np.ndarray:
        d, m = _f16_field(blocks, 0), _f16_field(blocks, 2)
        return (d * _unnibble_split(blocks[:, 4:]).astype(np.float32)) + m


class Q5_1(Q4_1, qtype=gguf.GGMLQuantizationType.Q5_1):
    """d (f16) | m (f16) | qh: uint32 of 5th bits | 16 bytes of low nibbles. w = q * d + m."""

    nmax = 31

    def _quantize(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        d16, m16, L = self._fit(x, w)
        parts = [_f16_bytes(d16), _f16_bytes(m16), _bits32(L, 4), _nibbles_split(_u8(L) & 0x0F)]
        return np.concatenate(parts, axis=1)

    def _dequantize(self, blocks: np.ndarray) -> np.ndarray:
        d, m = _f16_field(blocks, 0), _f16_field(blocks, 2)
        q = _unnibble_split(blocks[:, 8:]) | (_unbits32(blocks[:, 4:8]) << 4)
        return (d * q.astype(np.float32)) + m


# ---------------------------------------------------------------------------------------------------
# k-quants: 256-value super-blocks of 16 or 32-value sub-blocks
# ---------------------------------------------------------------------------------------------------


class _KQuant(GGMLFormat):
    def _check_row(self, cols: int) -> None:
        if not self.row_ok(cols):
            raise _k_row_error(self.name, cols)


class _AffineKQuant(_KQuant):
    """Q2_K / Q4_K / Q5_K: sub-block j stores an unsigned scale level ls_j and min level lm_j;
    w = (d * ls_j) * q - (dmin * lm_j), with q in [0, nmax]."""

    nmax: ClassVar[int]
    sub: ClassVar[int]  # sub-block length
    scale_max: ClassVar[int]  # largest sub-block scale / min level (63: 6 bits, 15: 4 bits)
    deltas: ClassVar[np.ndarray] = _DELTAS_AFFINE

    def _fit(self, x: Arr, w: Arr | None) -> tuple[Arr, Arr, Arr, Arr, Arr]:
        """-> d16, dmin16 (n,), ls, lm (n, n_sub) integer levels, L (n, 256) levels."""
        n, ns, nmax = x.shape[0], QK_K // self.sub, self.nmax
        xt = _cols(x.reshape(-1, self.sub))  # column c = sub-block c % ns of super-block c // ns
        wt = _cols(None if w is None else w.reshape(-1, self.sub))
        fit = _Affine(xt, wt, nmax, min_le_zero=True)
        s, o, L = _affine_polish(fit, *fit.search(self.deltas))
        m = -o  # >= 0: k-quants subtract their min
        # how much a sub-block's error grows per unit error of its scale (sum w L^2) or min (sum w)
        s_w = _sym_sums(xt, wt, L)[1]
        d16, ls = _levels(_sub_cols(s, ns), _sub_cols(s_w, ns), 0, self.scale_max, False, "super-block scale")
        ds = (d16.astype(np.float32) * ls.astype(np.float32)).T.reshape(-1)  # exact products
        # with the scales fixed, each sub-block's best min moves: refit it before storing it
        L = _round_affine(xt, ds, -m, nmax)
        res = ds * L - xt
        if wt is not None:
            res *= wt
        m = np.maximum(_csum(res) / np.where(fit.sw > 0, fit.sw, 1.0), 0.0)
        dmin16, lm = _levels(
            _sub_cols(m, ns), _sub_cols(fit.sw, ns), 0, self.scale_max, False, "super-block min"
        )
        dm = (dmin16.astype(np.float32) * lm.astype(np.float32)).T.reshape(-1)
        L = _round_affine(xt, ds, -dm, nmax)
        return d16, dmin16, _u8(ls.T), _u8(lm.T), L.T.reshape(n, QK_K)

    @staticmethod
    def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
        """8 six-bit scales and mins in 12 bytes (Q4_K / Q5_K):
        bytes 0-3: scale j (low 6 bits) + top 2 bits of scale j+4; bytes 4-7: the same for mins;
        bytes 8-11: low 4 bits of scale j+4 | low 4 bits of min j+4 << 4."""
        b0 = (ls[:, :4] & 63) | ((ls[:, 4:] >> 4) << 6)
        b1 = (lm[:, :4] & 63) | ((lm[:, 4:] >> 4) << 6)
        b2 = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
        return np.concatenate([b0, b1, b2], axis=1).astype(np.uint8)

    @staticmethod
    def _unpack_scales_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b0, b1, b2 = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
        ls = np.concatenate([b0 & 63, (b2 & 0x0F) | ((b0 >> 6) << 4)], axis=1)
        lm = np.concatenate([b1 & 63, (b2 >> 4) | ((b1 >> 6) << 4)], axis=1)
        return ls, lm

    def _dequant_affine(self, d: Arr, dmin: Arr, ls: Arr, lm: Arr, q: Arr) -> Arr:
        """(d * ls) * q - (dmin * lm), float32, in gguf-py's order of operations."""
        n, ns = ls.shape
        dl = (d * ls.astype(np.float32)).reshape(n, ns, 1)
        ml = (dmin * lm.astype(np.float32)).reshape(n, ns, 1)
        return (dl * q.reshape(n, ns, -1).astype(np.float32) - ml).reshape(n, QK_K)


class Q4_K(_AffineKQuant, qtype=gguf.GGMLQuantizationType.Q4_K):
    """d (f16) | dmin (f16) | 12 bytes: 8 six-bit scales + 8 six-bit mins | 128 bytes of nibbles:
    byte c*32 + l holds sub-block 2c value l (low nibble) and sub-block 2c+1 value l (high nibble)."""

    nmax, sub, scale_max = 15, 32, 63

    def _quantize(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        d16, dmin16, ls, lm, L = self._fit(x, w)
        q = _u8(L).reshape(-1, 4, 2, 32)
        qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
        parts = [_f16_bytes(d16), _f16_bytes(dmin16), self._pack_scales_k4(ls, lm), qs]
        return np.concatenate(parts, axis=1)

    def _dequantize(self, blocks: np.ndarray) -> np.ndarray:
        d, dmin = _f16_field(blocks, 0), _f16_field(blocks, 2)
        ls, lm = self._unpack_scales_k4(blocks[:, 4:16])
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)
        return self._dequant_affine(d, dmin, ls, lm, q)


class Q5_K(_AffineKQuant, qtype=gguf.GGMLQuantizationType.Q5_K):
    """Q4_K's layout with qh (32 bytes) before the nibbles: bit j of qh[l] = 5th bit of sub-block j's
    value l."""

    nmax, sub, scale_max = 31, 32, 63

    def _quantize(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        d16, dmin16, ls, lm, L = self._fit(x, w)
        q = _u8(L).reshape(-1, 8, 32)
        qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
        for j in range(8):
            qh |= ((q[:, j] >> 4) & 1) << j
        lo = (q & 0x0F).reshape(-1, 4, 2, 32)
        qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
        parts = [_f16_bytes(d16), _f16_bytes(dmin16), self._pack_scales_k4(ls, lm), qh, qs]
        return np.concatenate(parts, axis=1)

    def _dequantize(self, blocks: np.ndarray) -> np.ndarray:
        d, dmin = _f16_field(blocks, 0), _f16_field(blocks, 2)
        ls, lm = self._unpack_scales_k4(blocks[:, 4:16])
        qh = blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        qs = blocks[:, 48:].reshape(-1, 4, 1, 32)
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32) | ((qh & 1) << 4)
        return self._dequant_affine(d, dmin, ls, lm, q)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """256 2-bit values in 64 bytes: value h*128 + s*32 + l sits in byte h*32 + l, bits 2s..2s+1."""
    q = _u8(L).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK_K)


class Q2_K(_AffineKQuant, qtype=gguf.GGMLQuantizationType.Q2_K):
    """16 bytes: per 16-sub-block, scale level (low nibble) | min level (high nibble) | 64 bytes of
    2-bit values (see _pack_2bit) | d (f16) | dmin (f16)."""

    nmax, sub, scale_max, deltas = 3, 16, 15, _DELTAS_Q2

    def _quantize(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        d16, dmin16, ls, lm, L = self._fit(x, w)
        parts = [ls | (lm << 4), _pack_2bit(L), _f16_bytes(d16), _f16_bytes(dmin16)]
        return np.concatenate(parts, axis=1)

    def _dequantize(self, blocks: np.ndarray) -> np.ndarray:
        sc = blocks[:, :16]
        d, dmin = _f16_field(blocks, 80), _f16_field(blocks, 82)
        return self._dequant_affine(d, dmin, sc & 0x0F, sc >> 4, _unpack_2bit(blocks[:, 16:80]))


class _SymKQuant(_KQuant):
    """Q3_K / Q6_K: 16 sub-blocks of 16 with signed scale levels; w = (d * ls_j) * q, q in [lo, hi]."""

    lo: ClassVar[int]
    hi: ClassVar[int]
    scale_lo: ClassVar[int]
    scale_hi: ClassVar[int]

    def _fit(self, x: Arr, w: Arr | None) -> tuple[Arr, Arr, Arr]:
        """-> d16 (n,), ls (n, 16) int8 levels, L (n, 256) levels."""
        n = x.shape[0]
        xt = _cols(x.reshape(-1, 16))
        wt = _cols(None if w is None else w.reshape(-1, 16))
        s, L = _sym_polish(xt, wt, _sym_search(xt, wt, self.lo, self.hi, _DELTAS_FINE), self.lo, self.hi)
        s_w = _sym_sums(xt, wt, L)[1]
        d16, ls = _levels(
            _sub_cols(s, 16), _sub_cols(s_w, 16), self.scale_lo, self.scale_hi, True, "super-block scale"
        )
        ds = (d16.astype(np.float32) * ls.astype(np.float32)).T.reshape(-1)
        L = _round_sym(xt, ds, self.lo, self.hi)
        return d16, ls.T.astype(np.int8), L.T.reshape(n, QK_K)

    def _dequant_sym(self, d: Arr, ls: Arr, q: Arr) -> Arr:
        n = ls.shape[0]
        dl = (d * ls.astype(np.float32)).reshape(n, 16, 1)
        return (dl * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


class Q6_K(_SymKQuant, qtype=gguf.GGMLQuantizationType.Q6_K):
    """128 bytes ql (low nibbles) | 64 bytes qh (2 high bits) | 16 int8 scales | d (f16). w = d*sc*(q-32).

    ql: value h*128 + s*64 + p -> byte h*64 + p, nibble s. qh: value h*128 + s*32 + l -> byte h*32 + l,
    bits 2s..2s+1.
    """

    lo, hi, scale_lo, scale_hi = -32, 31, -128, 127

    def _quantize(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        d16, ls, L = self._fit(x, w)
        q = _u8(L + 32).reshape(-1, 2, 128)
        lo = (q & 0x0F).reshape(-1, 2, 2, 64)
        ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
        hi = (q >> 4).reshape(-1, 2, 4, 32)
        qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
        return np.concatenate([ql, qh, ls.view(np.uint8), _f16_bytes(d16)], axis=1)

    def _dequantize(self, blocks: np.ndarray) -> np.ndarray:
        ql = blocks[:, :128].reshape(-1, 2, 1, 64)
        ql = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 128)
        shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        qh = ((blocks[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 2, 128)
        q = (ql | (qh << 4)).astype(np.int8) - np.int8(32)
        ls = blocks[:, 192:208].view(np.int8)
        return self._dequant_sym(_f16_field(blocks, 208), ls, q)


class Q3_K(_SymKQuant, qtype=gguf.GGMLQuantizationType.Q3_K):
    """32 bytes hmask | 64 bytes of low 2 bits (as Q2_K) | 12 bytes of 6-bit scales (+32) | d (f16).

    Trap: hmask is not a sign bit. With u = q + 4 in [0, 7], hmask holds u >> 2 (set for q >= 0) and
    the value is (u & 3) - 4 * (1 - hbit): a CLEAR bit subtracts 4. Value b*32 + l -> bit b of hmask[l].
    Scales: u_j = ls_j + 32; low nibble of u_j in byte j (j < 8) or the high nibble of byte j - 8;
    its top 2 bits in byte 8 + j % 4, bits 2 * (j // 4).
    """

    lo, hi, scale_lo, scale_hi = -4, 3, -32, 31

    def _quantize(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        d16, ls, L = self._fit(x, w)
        u = _u8(L + 4)
        hbit = (u >> 2).reshape(-1, 8, 32)
        hmask = np.zeros((u.shape[0], 32), dtype=np.uint8)
        for b in range(8):
            hmask |= hbit[:, b] << b
        su = _u8(ls.astype(np.int16) + 32)
        low = (su[:, :8] & 0x0F) | ((su[:, 8:] & 0x0F) << 4)
        top = (su >> 4).reshape(-1, 4, 4)  # [j // 4, j % 4]
        high = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
        return np.concatenate([hmask, _pack_2bit(u & 3), low, high, _f16_bytes(d16)], axis=1)

    def _dequantize(self, blocks: np.ndarray) -> np.ndarray:
        hbit = (blocks[:, :32].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        low2 = _unpack_2bit(blocks[:, 32:96])
        q = low2.astype(np.int8) - ((hbit.reshape(-1, QK_K) ^ 1) << 2).astype(np.int8)
        sc = blocks[:, 96:108]
        low = np.concatenate([sc[:, :8] & 0x0F, sc[:, :8] >> 4], axis=1)
        shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
        high = ((sc[:, 8:12].reshape(-1, 1, 4) >> shifts) & 3).reshape(-1, 16)
        ls = (low | (high << 4)).astype(np.int8) - np.int8(32)
        return self._dequant_sym(_f16_field(blocks, 108), ls, q)


# ---------------------------------------------------------------------------------------------------
# llama.cpp's fallbacks and the int4-group view
# ---------------------------------------------------------------------------------------------------

# llama.cpp (src/llama-quant.cpp, llama_tensor_get_type): a k-quant whose rows (ne0) are not a multiple
# of 256 is replaced by:
#   Q2_K, Q3_K (and IQ2_*/IQ3_*/IQ1_*/IQ4_XS) -> IQ4_NL   Q4_K -> Q5_0   Q5_K -> Q5_1   Q6_K -> Q8_0
#   (TQ1_0/TQ2_0 -> Q4_0), and if that type's block (32) does not divide the row either -> F16.
# IQ4_NL (32-blocks, one f16 scale, 16 non-uniform levels, 4.5 bits) is not implemented here; its nearest
# implemented type is Q4_0: same block, same size, uniform levels.
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def get_format(name: str) -> GGMLFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise QuantFormatError(f"unknown GGML type {name!r}; known: {', '.join(FORMATS)}") from None


def fallback_type(name: str, cols: int) -> str:
    """The type llama.cpp stores a tensor with rows of `cols` values as, when asked for `name`:
    `name` itself when its blocks divide the row, else llama.cpp's fallback (see _FALLBACK), else F16."""
    fmt = get_format(name)
    if fmt.row_ok(cols):
        return name
    alt = _FALLBACK.get(name, "F16")
    return alt if FORMATS[alt].row_ok(cols) else "F16"


INT4_GROUP_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K")


def to_int4_groups(name: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Read 4-bit-or-less blocks as int4 groups: w = (q - 8) * scale + zero, without requantizing.

    Returns q uint8 (rows, cols) in 0..15, scale and zero float32 (rows, cols // group), and the group:
    32 for Q4_0, Q4_1, Q4_K; 16 for Q3_K and Q2_K (their sub-blocks). In float32, ((q - 8) * scale) + zero
    reproduces the format's dequantization bit for bit for Q4_0, Q3_K and Q2_K always (their zero is 0 or
    the block's own min). Q4_1 and Q4_K use all 16 levels, so zero must be 8 * scale + min, and the
    result is exact when that sum fits float32's 24 bits: unless the min and 8 * scale differ in magnitude
    by more than ~2^13 (values far from zero with almost no spread, or a min near zero beside an outlier).
    Then no float32 zero can be exact (q = 8 returns zero itself) and the error is one ulp of zero.
    Every Q4_1 / Q4_K tensor of the two reference models converts exactly; int4_groups_exact checks one.
    """
    fmt = get_format(name)
    if name not in INT4_GROUP_TYPES:
        raise QuantFormatError(f"{name} does not fit int4 groups; these do: {', '.join(INT4_GROUP_TYPES)}")
    raw = np.asarray(raw).view(np.uint8)
    raw2 = raw.reshape(-1, raw.shape[-1])
    rows = raw2.shape[0]
    blocks = np.ascontiguousarray(raw2).reshape(-1, fmt.type_size)
    f32 = np.float32
    if name == "Q4_0":
        q = _unnibble_split(blocks[:, 2:])
        scale = _f16_field(blocks, 0)
        zero = np.zeros_like(scale)
        group = 32
    elif name == "Q4_1":
        q = _unnibble_split(blocks[:, 4:])
        scale, m = _f16_field(blocks, 0), _f16_field(blocks, 2)
        zero = (m.astype(np.float64) + 8 * scale.astype(np.float64)).astype(f32)  # q*d + m = (q-8)*d + (m+8d)
        group = 32
    elif name == "Q4_K":
        d, dmin = _f16_field(blocks, 0), _f16_field(blocks, 2)
        ls, lm = _AffineKQuant._unpack_scales_k4(blocks[:, 4:16])
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, QK_K)
        scale = d * ls.astype(f32)  # exact: an 11-bit mantissa times a 6-bit integer
        minv = dmin * lm.astype(f32)
        zero = (8 * scale.astype(np.float64) - minv.astype(np.float64)).astype(f32)
        group = 32
    elif name == "Q2_K":
        sc = blocks[:, :16]
        d, dmin = _f16_field(blocks, 80), _f16_field(blocks, 82)
        q = _unpack_2bit(blocks[:, 16:80]) + np.uint8(8)  # 2-bit values 0..3 stored as 8..11: then
        scale = d * (sc & 0x0F).astype(f32)  # (q - 8) * scale is the format's own product, exactly,
        zero = -(dmin * (sc >> 4).astype(f32))  # and zero is just the (exact) min: always bit-exact
        group = 16
    else:  # Q3_K: signed 3-bit values -4..3 become 4..11
        hbit = (blocks[:, :32].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        low2 = _unpack_2bit(blocks[:, 32:96])
        q = (low2 + (hbit.reshape(-1, QK_K) << 2)).astype(np.uint8) + np.uint8(4)  # (u - 4) + 8
        sc = blocks[:, 96:108]
        low = np.concatenate([sc[:, :8] & 0x0F, sc[:, :8] >> 4], axis=1)
        shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
        high = ((sc[:, 8:12].reshape(-1, 1, 4) >> shifts) & 3).reshape(-1, 16)
        ls = (low | (high << 4)).astype(np.int8) - np.int8(32)
        scale = _f16_field(blocks, 108) * ls.astype(f32)
        zero = np.zeros_like(scale)
        group = 16
    return (
        q.astype(np.uint8).reshape(rows, -1),
        scale.astype(f32).reshape(rows, -1),
        zero.astype(f32).reshape(rows, -1),
        group,
    )


def int4_groups_dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> np.ndarray:
    """w = (q - 8) * scale + zero in float32, groups of `group` along each row."""
    rows, cols = q.shape
    qg = q.reshape(rows, cols // group, group).astype(np.float32) - np.float32(8)
    return (qg * scale[..., None] + zero[..., None]).reshape(rows, cols)


def int4_groups_exact(name: str, raw: np.ndarray) -> bool:
    """Whether to_int4_groups reproduces this tensor's dequantization bit for bit (values compared)."""
    q, s, z, g = to_int4_groups(name, raw)
    ref = FORMATS[name].dequantize_blocks(np.asarray(raw).reshape(q.shape[0], -1))
    return bool(np.array_equal(int4_groups_dequantize(q, s, z, g), ref))
