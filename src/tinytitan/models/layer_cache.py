"""What every layer's KV cache offers (float or int8/int4, growing or a sliding-window ring), and the row
helper they share. KVCache (models/cache.py) holds one per layer."""

from __future__ import annotations

from typing import Protocol

import torch


class LayerCache(Protocol):
    length: int  # positions written so far
    padded: bool  # whether reads return the whole buffer, empty slots at position -1

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: int):
        """Write k/v [B, n_kv, T, head_dim] at positions pos.. and return what attention must see: keys,
        values and each key's absolute position."""
        ...

    def repeat_batch(self, n: int) -> None:
        """A batch-1 cache as n independent rows (each then written on its own)."""
        ...

    def nbytes(self) -> int:
        """Bytes of the positions held."""
        ...

    def allocated_bytes(self) -> int:
        """Bytes allocated (held or reserved)."""
        ...

    def graphable(self) -> bool:
        """Whether a CUDA graph can replay steps on it: fixed-shape float buffers on a CUDA device."""
        ...

    @property
    def sliding(self) -> bool:
        """A sliding-window layer's ring (else every position is kept)."""
        ...


def repeat_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """A batch-1 tensor [1, ...] as n independent copies [n, ...] (each row is written on its own)."""
    if x.shape[0] != 1:
        raise ValueError(f"only a batch-1 cache can be repeated; this one has {x.shape[0]} rows")
    return x.expand(n, *x.shape[1:]).contiguous()
