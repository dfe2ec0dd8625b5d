"""Pieces both architectures share: RMSNorm, rotary embeddings, cached attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinytitan.models import attention_kernel


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32.

    The weight is the final multiplier. Gemma's checkpoints store w and multiply by (1 + w); GGUF files
    already store (1 + w), and the HF loader adds the 1, so the model code never does.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op (bit-identical to x * rsqrt(mean(x^2) + eps) * w in float32): at decode the
        # per-op Python cost of the long form is a visible share of a token (4-6 norms per layer).
        w = self.weight
        if x.dtype == w.dtype == torch.float32:  # no casts: each is one more dispatched op
            return F.rms_norm(x, w.shape, w, self.eps)
        return F.rms_norm(x.float(), w.shape, w.float(), self.eps).to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding, "half-split" layout (pairs are i and i + d/2).

    GGUF Llama files store Q/K rows permuted for the interleaved layout; the GGUF loader undoes that, so
    one layout serves both sources.
    """

    def __init__(
        self, head_dim: int, base: float, scaling_factor: float = 1.0, freq_factors: list[float] | None = None
    ) -> None:
        super().__init__()
        # Plain attributes, not buffers: the model is built on the meta device and the table is made on
        # first use, on the device of the activations.
        self.head_dim, self.base, self.scaling_factor = head_dim, base, scaling_factor
        self.freq_factors = freq_factors
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def inv_freq(self) -> torch.Tensor:
        d = self.head_dim
        inv_freq = 1.0 / (self.base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        inv_freq = inv_freq / self.scaling_factor  # linear scaling: positions are divided by the factor
        if self.freq_factors is not None:  # Llama 3 style per-frequency factors (GGUF: rope_freqs.weight)
            inv_freq = inv_freq / torch.tensor(self.freq_factors, dtype=torch.float32)
        return inv_freq

    def tables(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The cos and sin tables as they are now (None before first use): what a recorded CUDA graph
        reads, so it must keep them alive."""
        return self._cos, self._sin

    def use_tables(self, cos: torch.Tensor | None, sin: torch.Tensor | None) -> None:
        """Read these tables from now on (a traced step passes its own as inputs, then puts these back)."""
        self._cos, self._sin = cos, sin

    def _table(self, n: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [positions, D] in x's dtype and device, made once and grown by doubling."""
        cos = self._cos
        if cos is None or cos.shape[0] < n:
            self._make(n, x.dtype, x.device)
        elif cos.device != x.device or cos.dtype != x.dtype:  # the same length in another dtype
            self._make(n, x.dtype, x.device, grow=False)
        return self._cos, self._sin  # type: ignore[return-value]

    def _make(self, n: int, dtype: torch.dtype, device: torch.device, grow: bool = True) -> None:
        """Tables for at least n positions: at least 1,024 and at least twice the current ones (grow), or
        as many as now (a new dtype or device: float32 and bf16 passes in turn must not double them)."""
        current = 0 if self._cos is None else self._cos.shape[0]
        size = max(n, 2 * current if grow else current, 1024)
        with torch.inference_mode(False):  # tables made while generating must also serve training
            pos = torch.arange(size, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq())
            emb = torch.cat([freqs, freqs], dim=-1)
            self._cos = emb.cos().to(device=device, dtype=dtype)
            # sin with the first half negated: rotate_half(x) * sin == roll(x, d/2) * this (bit-exact)
            sin = freqs.sin()
            self._sin = torch.cat([-sin, sin], dim=-1).to(device=device, dtype=dtype)

    def reserve(self, n: int) -> int:
        """Grow an existing table to at least n positions (by doubling, at least), outside any traced code:
        a compiled decode step that grew it itself would be traced again (the branch above) each time a
        request passes its end. Returns the positions the table covers (0 while no forward pass has made
        it)."""
        cos = self._cos
        if cos is not None and cos.shape[0] < n:
            self._make(n, cos.dtype, cos.device)
        return 0 if self._cos is None else self._cos.shape[0]

    @property
    def table(self) -> torch.Tensor | None:
        """The cos table now in use (None before the first forward pass); a new object when it grows."""
        return self._cos

    def forward(self, x: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """x: [B, H, T, D] for positions start .. start+T-1. start may be a device tensor [B] of each row's
        position (one token per row, T = 1: a batched, compiled or CUDA-graph step): the table must then
        exist in x's dtype and device and cover them (`reserve`; a graph holds the table it was recorded
        with)."""
        if isinstance(start, torch.Tensor):
            assert self._cos is not None and self._sin is not None, "reserve the table before a graph step"
            shape = (start.shape[0], 1, 1, x.shape[-1])
            cos = self._cos.index_select(0, start).view(shape)
            sin = self._sin.index_select(0, start).view(shape)
        else:
            t = x.shape[2]
            cos, sin = self._table(start + t, x)
            cos, sin = cos[start : start + t], sin[start : start + t]
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def cache_update(
    layer_cache, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Write k/v [B, KV, T, D] at positions start.. into a layer's cache; returns what attention reads
    (keys, values, their positions, padded). A device-tensor position (a CUDA-graph step) writes in place
    at that position and reads the whole fixed-shape buffer, empty slots at position -1 (so padded)."""
    if isinstance(start, torch.Tensor):
        return (*layer_cache.update_at(k, v, start), True)
    return (*layer_cache.update(k, v, start), layer_cache.padded)


def projections(x: torch.Tensor, fused: nn.Module | None, *parts: nn.Module) -> list[torch.Tensor]:
    """Each of `parts` (linear layers) applied to x: one fused matmul while `fused` (set by the quantized
    runtime, see tinytitan.quant.modules.FusedLinear) stands for exactly these modules, else one by one."""
    if fused is not None and fused.serves(*parts):
        return fused(x)
    return [p(x) for p in parts]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int | torch.Tensor,
    kpos: torch.Tensor,
    window: int | None,
    scale: float,
    padded: bool = False,
) -> torch.Tensor:
    """Causal (and sliding-window) attention of q [B,H,T,D] (positions start..) over k/v [B,KV,S,D] at
    absolute positions kpos.

    padded: at decode, the cache may return empty slots (position -1), which are masked out. kpos is [S]
    (every row's keys at the same positions) or, at decode, [B, S] (each row's own: a batch whose rows
    stand at different positions).
    k/v may be float16 under float32 queries (a float16 cache): widened as they are read.
    With one query and a cache that already holds only visible keys, no mask is built (the common decode
    step). SDPA on CPU does not skip masked keys, so sliding windows are enforced by the ring cache's size.
    """
    b, h, t, d = q.shape
    if t == 1:
        # Decode: one query per head, so two small matmuls (the query heads of one KV head side by side)
        # beat SDPA's flash kernel, whose blocking and threading are sized for long queries.
        n_kv = k.shape[1]
        qg = q.reshape(b, n_kv, h // n_kv, d) * scale
        if attention_kernel.supports(qg, k, v):  # one C++ pass over the cache (attention_kernel.py)
            return attention_kernel.decode_attention(qg, k, v, kpos, padded).view(b, h, 1, d)
        k, v = k.to(q.dtype), v.to(q.dtype)
        scores = torch.matmul(qg, k.transpose(-1, -2))
        if padded:
            empty = kpos < 0 if kpos.dim() == 1 else (kpos < 0)[:, None, None, :]
            scores = scores.masked_fill(empty, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        return torch.matmul(probs.to(v.dtype), v).view(b, h, 1, d)  # softmax in fp32 for bf16 caches
    # Compare positions straight into a bool mask: an int64 difference matrix would cost 8x its memory
    # (a 512-token chunk against 32K keys: 134 MB).
    k, v = k.to(q.dtype), v.to(q.dtype)
    qpos = torch.arange(start, start + t, device=q.device)
    mask = kpos[None, :] <= qpos[:, None]
    if window is not None:
        mask &= kpos[None, :] > qpos[:, None] - window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=h != k.shape[1])
