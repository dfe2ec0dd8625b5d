"""Group-wise integer quantization of weight matrices: round-to-nearest with a least-squares refit,
importance-weighted rounding (imatrix-like), and GPTQ error compensation.

Every quantized matrix is stored as unsigned codes q in [0, 2^bits) with one (scale, zero) pair per group
of `group` weights along the input dimension:  w ~= (q - offset) * scale + zero,  offset = 2^(bits-1) for
symmetric schemes (zero = 0) and 0 for asymmetric ones (zero = the group's minimum). Scales and zeros are
kept in float16, exactly as GGML's Q4_0/Q4_1 blocks store them, so groups of 32 export losslessly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class IntWeight:
    q: torch.Tensor  # uint8 [N, K], codes in [0, 2^bits)
    scale: torch.Tensor  # float16 [N, K // group]
    zero: torch.Tensor  # float16 [N, K // group] (all zero for symmetric)
    bits: int
    group: int  # == K for one scale per output row
    symmetric: bool

    @property
    def offset(self) -> int:
        return 1 << (self.bits - 1) if self.symmetric else 0

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        g = self.group
        q = self.q.float().view(n, k // g, g) - self.offset
        w = q * self.scale.float()[..., None] + self.zero.float()[..., None]
        return w.view(n, k)

    @property
    def codes_shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def nbytes(self) -> int:
        """Storage size: codes bit-packed at `bits`, plus f16 scales (and zeros when asymmetric)."""
        n, k = self.codes_shape
        per_group = 2 if self.symmetric else 4
        return (n * k * self.bits + 7) // 8 + n * (k // self.group) * per_group


def _fit_asym(
    w: torch.Tensor, imp: torch.Tensor, levels: int, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (last dim): scale and min minimizing sum(imp * (w - (q*s + m))^2), alternating
    rounding and a weighted least-squares refit, starting from the min/max range."""
    mn, mx = w.amin(-1), w.amax(-1)
    s = ((mx - mn) / levels).clamp_min(1e-10)
    m = mn
    best_s, best_m = s, m
    best_err = torch.full_like(s, float("inf"))
    sw = imp.sum(-1)
    for _ in range(iters + 1):
        s16, m16 = s.half().float().clamp_min(6e-8), m.half().float()
        q = torch.clamp(torch.round((w - m16[..., None]) / s16[..., None]), 0, levels)
        err = (imp * (w - (q * s16[..., None] + m16[..., None])) ** 2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_m = torch.where(better, s16, best_s), torch.where(better, m16, best_m)
        sq, sqq = (imp * q).sum(-1), (imp * q * q).sum(-1)
        sx, sqx = (imp * w).sum(-1), (imp * q * w).sum(-1)
        det = sw * sqq - sq * sq
        ok = det > 1e-20
        s = torch.where(ok, (sw * sqx - sq * sx) / det.clamp_min(1e-20), s).clamp_min(1e-10)
        m = torch.where(ok, (sqq * sx - sq * sqx) / det.clamp_min(1e-20), m)
    return best_s, best_m


def _fit_sym(w: torch.Tensor, imp: torch.Tensor, bits: int, iters: int) -> torch.Tensor:
    """Per group: scale d for q in [-2^(b-1), 2^(b-1)) with the extreme value mapped to -2^(b-1)
    (as GGML's Q4_0 does), then weighted least-squares refits d = sum(imp*q*w) / sum(imp*q*q)."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    idx = w.abs().argmax(-1, keepdim=True)
    extreme = w.gather(-1, idx)[..., 0]
    d = extreme / lo
    d = torch.where(d.abs() < 1e-10, torch.full_like(d, 1e-10), d)
    best_d, best_err = d, torch.full_like(d, float("inf"))
    for _ in range(iters + 1):
        d16 = d.half().float()
        d16 = torch.where(d16 == 0, torch.full_like(d16, 6e-8), d16)
        q = torch.clamp(torch.round(w / d16[..., None]), lo, hi)
        err = (imp * (w - q * d16[..., None]) ** 2).sum(-1)
        better = err < best_err
        best_err, best_d = torch.where(better, err, best_err), torch.where(better, d16, best_d)
        den = (imp * q * q).sum(-1)
        d = torch.where(den > 0, (imp * q * w).sum(-1) / den.clamp_min(1e-20), d)
    return best_d


def quantize_int(
    w: torch.Tensor,
    bits: int,
    group: int,
    symmetric: bool,
    importance: torch.Tensor | None = None,
    iters: int = 4,
    chunk_rows: int = 16384,
) -> IntWeight:
    """w [N, K] float -> IntWeight. importance [K] (e.g. mean squared input activation) weights the
    rounding error of each input column; None weighs all columns equally."""
    n, k = w.shape
    g = group or k
    if k % g:
        raise ValueError(f"{k} columns are not a multiple of the group size {g}")
    levels = (1 << bits) - 1
    imp_full = (importance.float() if importance is not None else torch.ones(k)).view(1, k // g, g)
    qs, scales, zeros = [], [], []
    for r in range(0, n, chunk_rows):  # bounded temporary memory on a 262k-row embedding
        wg = w[r : r + chunk_rows].float().view(-1, k // g, g)
        imp = imp_full.expand_as(wg)
        if symmetric:
            d = _fit_sym(wg, imp, bits, iters)
            q = torch.clamp(torch.round(wg / d[..., None]), -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
            q = q + (1 << (bits - 1))
            zero = torch.zeros_like(d)
        else:
            d, zero = _fit_asym(wg, imp, levels, iters)
            q = torch.clamp(torch.round((wg - zero[..., None]) / d[..., None]), 0, levels)
        qs.append(q.to(torch.uint8).view(-1, k))
        scales.append(d.half())
        zeros.append(zero.half())
    return IntWeight(torch.cat(qs), torch.cat(scales), torch.cat(zeros), bits, g, symmetric)


def _quantize_columns(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of columns w [N, c] under one (scale, zero) per row."""
    s, z = scale.float()[:, None], zero.float()[:, None]
    if symmetric:
        off = 1 << (bits - 1)
        q = torch.clamp(torch.round(w / s), -off, off - 1) + off
        return q, (q - off) * s
    q = torch.clamp(torch.round((w - z) / s), 0, (1 << bits) - 1)
    return q, q * s + z


def gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group: int,
    symmetric: bool,
    block: int = 128,
    damp: float = 0.01,
) -> IntWeight:
    """GPTQ: quantize columns one at a time and push each column's rounding error onto the columns not
    yet quantized, weighted by the inverse Hessian of the layer's inputs (H = X^T X over calibration
    tokens). A group's scale and zero are fitted when the group is reached, on the error-updated weights."""
    n, k = w.shape
    g = group or k
    block = max(g, (block // g) * g) if g < k else k
    W = w.float().clone()
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    Hinv = torch.linalg.cholesky(Hinv, upper=True)
    Q = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, k // g, dtype=torch.float16)
    zeros = torch.zeros(n, k // g, dtype=torch.float16)
    diag_imp = torch.diag(hessian).float().clamp_min(0)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                fitted = quantize_int(W1[:, i : i + g], bits, g, symmetric, diag_imp[col : col + g])
                scales[:, col // g], zeros[:, col // g] = fitted.scale[:, 0], fitted.zero[:, 0]
            q, dq = _quantize_columns(
                W1[:, i : i + 1], scales[:, col // g], zeros[:, col // g], bits, symmetric
            )
            Q[:, col] = q[:, 0].to(torch.uint8)
            err = (W1[:, i] - dq[:, 0]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return IntWeight(Q, scales, zeros, bits, g, symmetric)
