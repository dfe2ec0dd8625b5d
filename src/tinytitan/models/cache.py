"""KV caches: a growing cache for global layers and a ring buffer for sliding-window layers.

Each layer's cache returns the keys/values attention must see plus the absolute position of every key,
so the attention code builds one mask rule (causal, and within the window) whatever the cache kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinytitan.config import ModelConfig

F16_MAX = torch.finfo(torch.float16).max


def repeat_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """A batch-1 tensor [1, ...] as n independent copies [n, ...] (each row is written on its own)."""
    if x.shape[0] != 1:
        raise ValueError(f"only a batch-1 cache can be repeated; this one has {x.shape[0]} rows")
    return x.expand(n, *x.shape[1:]).contiguous()


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the cache's dtype; into float16 (a cache under float32 compute) saturated at +-65504, as an
    infinite key or value would make the attention's softmax NaN."""
    if dtype == torch.float16 and x.dtype != torch.float16:
        x = x.clamp(-F16_MAX, F16_MAX)
    return x.to(dtype)


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
        """One token at the position held by the device tensor pos [1], on a static cache, with no value
        read back to the host (a CUDA graph replays it at any position): the whole buffer is returned and
        the slots past pos are at position -1. `length` is the caller's to set."""
        k, v = to_cache_dtype(k, self.k.dtype), to_cache_dtype(v, self.v.dtype)
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        slots = torch.arange(self.k.shape[2], device=pos.device)
        return self.k, self.v, torch.where(slots <= pos, slots, -1)

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
        self.slot_pos = torch.full((window,), -1, dtype=torch.long, device=device)
        self.length = 0  # positions seen so far (not all are kept)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, pos: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t, w = k.shape[2], self.k.shape[2]  # the size, not self.window: symbolic in a compiled step
        k, v = to_cache_dtype(k, self.k.dtype), to_cache_dtype(v, self.v.dtype)
        new_pos = torch.arange(pos, pos + t, device=k.device)
        if t == 1:
            # Decode: after writing, the ring holds exactly the keys this query may see (order is irrelevant
            # to attention because RoPE was applied before caching).
            # A tensor index, not an integer: a compiled step would specialise on the integer's value.
            slot = new_pos % w
            self.k.index_copy_(2, slot, k)
            self.v.index_copy_(2, slot, v)
            self.slot_pos.index_copy_(0, slot, new_pos)
            self.length = pos + 1
            if self.padded:
                return self.k, self.v, self.slot_pos
            n = min(pos + 1, w)
            return self.k[:, :, :n], self.v[:, :, :n], self.slot_pos[:n]
        # Prefill chunk: older keys from the ring plus the whole chunk; the mask trims to the window.
        valid = self.slot_pos >= 0
        keys = torch.cat([self.k[:, :, valid], k], dim=2)
        vals = torch.cat([self.v[:, :, valid], v], dim=2)
        kpos = torch.cat([self.slot_pos[valid], new_pos])
        keep = min(t, w)
        slots = new_pos[-keep:] % w
        self.k[:, :, slots] = k[:, :, -keep:]
        self.v[:, :, slots] = v[:, :, -keep:]
        self.slot_pos[slots] = new_pos[-keep:]
        self.length = pos + t
        return keys, vals, kpos

    def update_at(
        self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token at the position held by the device tensor pos [1] (a CUDA graph step; static ring):
        the whole ring, empty slots at -1. `length` is the caller's to set."""
        k, v = to_cache_dtype(k, self.k.dtype), to_cache_dtype(v, self.v.dtype)
        slot = pos % self.k.shape[2]
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        self.slot_pos.index_copy_(0, slot, pos)
        return self.k, self.v, self.slot_pos

    def repeat_batch(self, n: int) -> None:
        self.k, self.v = (
            repeat_rows(self.k, n),
            repeat_rows(self.v, n),
        )  # slot positions are shared by all rows

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
        from tinytitan.models.kv_quant import QuantFullLayerCache, QuantRingLayerCache

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

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def allocated_bytes(self) -> int:
        return sum(layer.allocated_bytes() for layer in self.layers)

    def describe(self) -> dict[str, int]:
        ring = [c for c in self.layers if hasattr(c, "window")]
        full = [c for c in self.layers if not hasattr(c, "window")]
        return {
            "global_layers": len(full),
            "sliding_layers": len(ring),
            "positions": self.length,
            "bytes": self.nbytes(),
            "allocated_bytes": self.allocated_bytes(),
        }
