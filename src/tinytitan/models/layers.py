"""Pieces both architectures share: RMSNorm, rotary embeddings, cached attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


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

    def _table(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._sin is None or self._cos.shape[0] < n or self._cos.device != device:
            size = max(n, 2 * (0 if self._cos is None else self._cos.shape[0]), 1024)
            pos = torch.arange(size, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq())
            emb = torch.cat([freqs, freqs], dim=-1)
            self._cos, self._sin = emb.cos().to(device), emb.sin().to(device)
        return self._cos, self._sin

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x: [B, H, T, D] for positions start .. start+T-1."""
        t = x.shape[2]
        cos, sin = self._table(start + t, x.device)
        cos = cos[start : start + t].to(x.dtype)
        sin = sin[start : start + t].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qpos: torch.Tensor,
    kpos: torch.Tensor,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """Causal (and sliding-window) attention of q [B,H,T,D] over k/v [B,KV,S,D] at absolute positions.

    With one query and a cache that already holds only visible keys, no mask is built (the common decode
    step). SDPA on CPU does not skip masked keys, so sliding windows are enforced by the ring cache's size.
    """
    mask = None
    if q.shape[2] > 1:
        delta = qpos[:, None] - kpos[None, :]
        mask = delta >= 0
        if window is not None:
            mask = mask & (delta < window)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
