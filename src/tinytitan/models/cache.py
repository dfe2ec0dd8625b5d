"""KV caches: a growing cache for global layers and a ring buffer for sliding-window layers.

Each layer's cache returns the keys/values attention must see plus the absolute position of every key,
so the attention code builds one mask rule (causal, and within the window) whatever the cache kind.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from tinytitan.config import ModelConfig
from tinytitan.models.kv_quant import QuantFullLayerCache, QuantRingLayerCache
from tinytitan.models.layer_cache import repeat_rows

F16_MAX = torch.finfo(torch.float16).max


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the cache's dtype; into float16 (a cache under float32 compute) saturated at +-65504, as an
    infinite key or value would make the attention's softmax NaN."""
    if dtype == torch.float16 and x.dtype != torch.float16:
        x = x.clamp(-F16_MAX, F16_MAX)
    return x.to(dtype)


def _row_index(slot: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The scatter index that writes x [B, KV, 1, D] at slot[b] of row b (a scatter, not an indexed
    assignment: that broadcasts its indices, and a traced step would then treat a batch of one apart)."""
    b, kv, _, d = x.shape
    return slot.view(b, 1, 1, 1).expand(b, kv, 1, d)


class FullLayerCache:
    """Keeps every position; capacity doubles as the context grows (up to max_len).

    static: allocate max_len at once, so a compiled decode step sees one buffer shape and never the
    growing branch (each would be another compilation), plus one slot that is never written: a step that
    filled the buffer exactly (the read `[:pos + 1]` as long as the buffer) would be traced again.
    """

    padded = False  # decode returns only written positions

    def __init__(
        self,
        batch: int,
        n_kv: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        static: bool = False,
    ) -> None:
        self.max_len = max_len
        self.length = 0
        shape = (batch, n_kv, max_len + 1 if static else min(max_len, 256), head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def _reserve(self, needed: int) -> None:
        cap = self.k.shape[2]
        if needed <= cap:
            return
        new_cap = min(self.max_len, max(needed, 2 * cap))
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros((old.shape[0], old.shape[1], new_cap, old.shape[3]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, pos: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        if pos + t > self.max_len:
            raise ValueError(f"KV cache overflow: position {pos + t} > {self.max_len}")
        k, v = to_cache_dtype(k, self.k.dtype), to_cache_dtype(v, self.v.dtype)
        self._reserve(pos + t)
        self.k[:, :, pos : pos + t] = k
        self.v[:, :, pos : pos + t] = v
        self.length = pos + t
        kpos = torch.arange(self.length, device=k.device)
        return self.k[:, :, : self.length], self.v[:, :, : self.length], kpos

    def update_at(
        self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token per row, row r at the position held by the device tensor pos [B] (rows of a batch may
        stand at different positions), on a static cache, with no value read back to the host (a CUDA
        graph or a compiled step runs it at any position): the whole buffer is returned, with each row's
        key positions [B, S], the slots past its position at -1. `length` is the caller's to set."""
        k, v = to_cache_dtype(k, self.k.dtype), to_cache_dtype(v, self.v.dtype)
        at = _row_index(pos, k)
        self.k.scatter_(2, at, k)
        self.v.scatter_(2, at, v)
        slots = torch.arange(self.k.shape[2], device=pos.device)[None, :]
        return self.k, self.v, torch.where(slots <= pos[:, None], slots, -1)

    sliding = False

    def graphable(self) -> bool:  # static buffers only (they keep one spare slot)
        return self.k.shape[2] == self.max_len + 1 and self.k.device.type == "cuda"

    def repeat_batch(self, n: int) -> None:
        """A batch-1 cache becomes n rows holding the same positions (a shared prompt prefix)."""
        self.k, self.v = repeat_rows(self.k, n), repeat_rows(self.v, n)

    def nbytes(self) -> int:
        """Bytes the cached positions occupy (what the context costs, not the spare capacity)."""
        per_pos = self.k.shape[0] * self.k.shape[1] * self.k.shape[3] * self.k.element_size()
        return 2 * per_pos * self.length

    def allocated_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class RingLayerCache:
    """A sliding-window layer keeps only the last `window` positions: slot = position % window.

    static: decode always returns the whole ring, empty slots at position -1 (`padded`: attention masks
    them), so a compiled decode step has one shape before and after the ring fills.
    """

    def __init__(
        self,
        batch: int,
        n_kv: int,
        head_dim: int,
        window: int,
        dtype: torch.dtype,
        device: torch.device,
        static: bool = False,
    ) -> None:
        self.window = window
        self.padded = static
        self.k = torch.zeros((batch, n_kv, window, head_dim), dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        # the position each slot holds (-1: empty); a static ring keeps one row of them per batch row, as
        # rows of a batch may stand at different positions (tinytitan.engine.Stepper)
        shape = (batch, window) if static else (window,)
        self.slot_pos = torch.full(shape, -1, dtype=torch.long, device=device)
        self.length = 0  # positions seen so far (not all are kept)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, pos: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t, w = k.shape[2], self.k.shape[2]  # the size, not self.window: symbolic in a compiled step
        k, v = to_cache_dtype(k, self.k.dtype), to_cache_dtype(v, self.v.dtype)
        new_pos = torch.arange(pos, pos + t, device=k.device)
        if t == 1 and not self.padded:
            # Decode: after writing, the ring holds exactly the keys this query may see (order is irrelevant
            # to attention because RoPE was applied before caching).
            # A tensor index, not an integer: a compiled step would specialise on the integer's value.
            slot = new_pos % w
            self.k.index_copy_(2, slot, k)
            self.v.index_copy_(2, slot, v)
            self.slot_pos.index_copy_(0, slot, new_pos)
            self.length = pos + 1
            n = min(pos + 1, w)
            return self.k[:, :, :n], self.v[:, :, :n], self.slot_pos[:n]
        if t == 1:  # a static ring: every row at this position
            keys, vals, kpos = self.update_at(k, v, new_pos.expand(k.shape[0]))
            self.length = pos + 1
            return keys, vals, kpos[0]
        # Prefill chunk (every row at the same positions): older keys from the ring plus the whole chunk;
        # the mask trims to the window.
        held = self.slot_pos if self.slot_pos.dim() == 1 else self.slot_pos[0]
        valid = held >= 0
        keys = torch.cat([self.k[:, :, valid], k], dim=2)
        vals = torch.cat([self.v[:, :, valid], v], dim=2)
        kpos = torch.cat([held[valid], new_pos])
        keep = min(t, w)
        slots = new_pos[-keep:] % w
        self.k[:, :, slots] = k[:, :, -keep:]
        self.v[:, :, slots] = v[:, :, -keep:]
        self.slot_pos[..., slots] = new_pos[-keep:]
        self.length = pos + t
        return keys, vals, kpos

    def update_at(
        self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token per row, row r at the position held by the device tensor pos [B] (a compiled or CUDA
        graph step; static ring): the whole ring and each row's slot positions [B, W], empty slots at -1.
        `length` is the caller's to set."""
        k, v = to_cache_dtype(k, self.k.dtype), to_cache_dtype(v, self.v.dtype)
        slot = pos % self.k.shape[2]
        at = _row_index(slot, k)
        self.k.scatter_(2, at, k)
        self.v.scatter_(2, at, v)
        self.slot_pos.scatter_(1, slot[:, None], pos[:, None])
        return self.k, self.v, self.slot_pos

    sliding = True

    def graphable(self) -> bool:
        return self.padded and self.k.device.type == "cuda"

    def repeat_batch(self, n: int) -> None:
        self.k, self.v = repeat_rows(self.k, n), repeat_rows(self.v, n)
        if self.slot_pos.dim() == 2:  # a static ring's positions are per row
            self.slot_pos = repeat_rows(self.slot_pos, n)

    def nbytes(self) -> int:
        per_pos = self.k.shape[0] * self.k.shape[1] * self.k.shape[3] * self.k.element_size()
        return 2 * per_pos * min(self.length, self.window)

    def allocated_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


@dataclass
class KVCache:
    """One cache per layer, chosen by the layer's kind (global: full; sliding: ring of `window`)."""

    layers: list  # FullLayerCache | RingLayerCache | their quantized versions (kv_quant.py)
    max_len: int

    @classmethod
    def for_model(
        cls,
        cfg: ModelConfig,
        max_len: int,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kv_quant: str | None = None,
        kv_axis: str = "token",
        static: bool = False,
    ) -> KVCache:
        """kv_quant: None (the compute dtype), "f16" (float16 keys and values, as llama.cpp keeps them by
        default: half the memory of float32, attention still computed in float32), "int8" or "int4";
        kv_axis: "token" or "channel" (int8/int4 only). static: fixed-shape float buffers for a compiled
        decode step (int8/int4 caches ignore it)."""
        device = torch.device(device)
        bits = {None: 0, "f16": 0, "int8": 8, "int4": 4}.get(kv_quant)
        axes = ("token",) if kv_quant == "f16" else ("token", "channel")
        if bits is None or kv_axis not in axes:
            choice = "choose f16, int8 or int4 (int8/int4 per token or channel; f16 has no axis)"
            raise ValueError(f"kv cache {kv_quant!r}/{kv_axis!r}: {choice}")
        if kv_quant == "f16":
            dtype = torch.float16
        layers: list = []
        for i in range(cfg.n_layers):
            window = cfg.layer_window(i)
            ring = window is not None and window < max_len
            if static and window is not None and not bits:
                # one cache type per layer whatever the request's length (a compiled step guards on it)
                ring, window = True, min(window, max_len)
            if bits and ring:
                layers.append(
                    QuantRingLayerCache(batch, cfg.n_kv_heads, cfg.head_dim, window, dtype, device, bits)
                )
            elif bits:
                layers.append(
                    QuantFullLayerCache(
                        batch, cfg.n_kv_heads, cfg.head_dim, max_len, dtype, device, bits, kv_axis
                    )
                )
            elif ring:
                layers.append(
                    RingLayerCache(batch, cfg.n_kv_heads, cfg.head_dim, window, dtype, device, static)
                )
            else:
                layers.append(
                    FullLayerCache(batch, cfg.n_kv_heads, cfg.head_dim, max_len, dtype, device, static)
                )
        return cls(layers=layers, max_len=max_len)

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def repeat_batch(self, n: int) -> None:
        """Every layer's batch-1 cache as n rows at the same positions: a prompt prefix computed once
        and continued by n different suffixes (multiple-choice scoring)."""
        for layer in self.layers:
            layer.repeat_batch(n)

    # -- a batch's rows as slots (tinytitan.engine.Stepper: static float caches only) ------------------
    def rows(self, a: int, b: int, length: int | None = None) -> KVCache:
        """Rows a..b as a cache of their own that shares this one's memory (a range of a batch decoded as
        one forward, or one row's prompt prefilled through it); its layers at `length` positions (None:
        this cache's)."""
        layers = []
        for layer in self.layers:
            view = copy.copy(layer)
            view.k, view.v = layer.k[a:b], layer.v[a:b]
            if isinstance(layer, RingLayerCache):
                view.slot_pos = layer.slot_pos[a:b]
            if length is not None:
                view.length = length
            layers.append(view)
        return KVCache(layers=layers, max_len=self.max_len)

    def row(self, r: int, length: int = 0) -> KVCache:
        """Row r as a batch-1 cache sharing this one's memory, its layers at `length` positions."""
        return self.rows(r, r + 1, length)

    def resized(self, rows: int, max_len: int, make) -> KVCache:
        """A static cache of `rows` rows and `max_len` positions (made by make(max_len, rows)) holding
        this one's rows (as many as fit) at their positions: a batch that grows in rows or length."""
        new = make(max_len, rows)
        n = min(rows, self.layers[0].k.shape[0]) if self.layers else 0
        for old, fresh in zip(self.layers, new.layers, strict=True):
            if isinstance(old, RingLayerCache):
                # a position p sits in slot p % size: re-slotted when the ring's size changes
                held = old.slot_pos[:n]
                r, j = torch.nonzero(held >= 0, as_tuple=True)
                p = held[r, j]
                slot = p % fresh.k.shape[2]
                fresh.k[r, :, slot] = old.k[r, :, j]
                fresh.v[r, :, slot] = old.v[r, :, j]
                fresh.slot_pos[r, slot] = p
            else:
                t = min(old.k.shape[2], fresh.k.shape[2])
                fresh.k[:n, :, :t] = old.k[:n, :, :t]
                fresh.v[:n, :, :t] = old.v[:n, :, :t]
            fresh.length = old.length
        return new

    def clear_row(self, r: int) -> None:
        """Row r holds no position (a new sequence starts in it). Full layers need nothing: a decode step
        reads only the slots up to its row's position."""
        for layer in self.layers:
            if isinstance(layer, RingLayerCache):
                layer.slot_pos[r] = -1

    def move_row(self, src: int, dst: int) -> None:
        """Copy row src over row dst (the batch is kept dense when a row leaves)."""
        for layer in self.layers:
            layer.k[dst] = layer.k[src]
            layer.v[dst] = layer.v[src]
            if isinstance(layer, RingLayerCache):
                layer.slot_pos[dst] = layer.slot_pos[src]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def allocated_bytes(self) -> int:
        return sum(layer.allocated_bytes() for layer in self.layers)

    def describe(self) -> dict[str, int]:
        ring = [c for c in self.layers if c.sliding]
        full = [c for c in self.layers if not c.sliding]
        return {
            "global_layers": len(full),
            "sliding_layers": len(ring),
            "positions": self.length,
            "bytes": self.nbytes(),
            "allocated_bytes": self.allocated_bytes(),
        }
