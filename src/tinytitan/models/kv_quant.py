"""Quantized KV caches: int8 or int4 keys and values, selectable at load or run time.

Per-token ("token"): each cached position's vector of one head gets its own scale and minimum over
head_dim; every write is quantized at once. Per-channel ("channel", keys of global layers only, as KIVI
does): positions are quantized in groups of 32 with one scale and minimum per channel, and the newest
incomplete group stays in float until it fills. Reads dequantize into the compute dtype.
"""

from __future__ import annotations

import torch

from tinytitan.models.layer_cache import repeat_rows

GROUP = 32  # positions per per-channel group


def _quant(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    levels = (1 << bits) - 1
    mn, mx = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((mx - mn) / levels).clamp_min(1e-8)
    q = torch.clamp(torch.round((x - mn) / scale), 0, levels).to(torch.uint8)
    return q, scale.half(), mn.half()


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    return q if bits == 8 else (q[..., 0::2] | (q[..., 1::2] << 4))


def _unpack(p: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return p
    return torch.stack([p & 15, p >> 4], dim=-1).flatten(-2)


class TokenQuantStore:
    """Codes [B, H, L, D(/2)] with fp16 scale and minimum [B, H, L, 1]."""

    def __init__(
        self, batch: int, n_kv: int, length: int, head_dim: int, bits: int, device: torch.device
    ) -> None:
        self.bits = bits
        width = head_dim if bits == 8 else head_dim // 2
        self.codes = torch.zeros((batch, n_kv, length, width), dtype=torch.uint8, device=device)
        self.scale = torch.zeros((batch, n_kv, length, 1), dtype=torch.float16, device=device)
        self.zero = torch.zeros_like(self.scale)

    def write(self, index: torch.Tensor | slice, x: torch.Tensor) -> None:
        q, s, z = _quant(x.float(), self.bits, -1)
        self.codes[:, :, index] = _pack(q, self.bits)
        self.scale[:, :, index] = s
        self.zero[:, :, index] = z

    def read(self, index: torch.Tensor | slice, dtype: torch.dtype) -> torch.Tensor:
        q = _unpack(self.codes[:, :, index], self.bits).float()
        return (q * self.scale[:, :, index].float() + self.zero[:, :, index].float()).to(dtype)

    def repeat_batch(self, n: int) -> None:
        self.codes, self.scale, self.zero = (repeat_rows(t, n) for t in (self.codes, self.scale, self.zero))

    def grow(self, new_len: int) -> None:
        for name in ("codes", "scale", "zero"):
            old = getattr(self, name)
            new = old.new_zeros((old.shape[0], old.shape[1], new_len, old.shape[3]))
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def nbytes(self, positions: int) -> int:
        b, h, _, w = self.codes.shape
        return b * h * positions * (w + 4)


class ChannelQuantStore:
    """Keys quantized per channel over groups of GROUP positions; the open group stays in float."""

    def __init__(
        self, batch: int, n_kv: int, head_dim: int, bits: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.bits, self.shape = bits, (batch, n_kv, head_dim)
        self.groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.open = torch.zeros((batch, n_kv, 0, head_dim), dtype=dtype, device=device)

    def append(self, x: torch.Tensor) -> None:
        self.open = torch.cat([self.open, x.to(self.open.dtype)], dim=2)
        while self.open.shape[2] >= GROUP:
            block, self.open = self.open[:, :, :GROUP], self.open[:, :, GROUP:]
            q, s, z = _quant(block.float(), self.bits, 2)  # one scale per channel over the group's positions
            self.groups.append((_pack(q, self.bits), s, z))

    def repeat_batch(self, n: int) -> None:
        self.groups = [(repeat_rows(q, n), repeat_rows(s, n), repeat_rows(z, n)) for q, s, z in self.groups]
        self.open = repeat_rows(self.open, n)
        self.shape = (n, *self.shape[1:])

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        parts = [(_unpack(q, self.bits).float() * s.float() + z.float()).to(dtype) for q, s, z in self.groups]
        return torch.cat([*parts, self.open.to(dtype)], dim=2)

    def nbytes(self) -> int:
        b, h, d = self.shape
        per_group = b * h * (GROUP * (d if self.bits == 8 else d // 2) + 4 * d)
        return len(self.groups) * per_group + self.open.numel() * self.open.element_size()


class QuantFullLayerCache:
    """A global layer's cache (every position) in int8/int4."""

    padded = False

    def __init__(
        self,
        batch: int,
        n_kv: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        bits: int,
        axis: str,
    ) -> None:
        self.max_len, self.length, self.dtype, self.bits = max_len, 0, dtype, bits
        cap = min(max_len, 256)
        self.k_channel = (
            ChannelQuantStore(batch, n_kv, head_dim, bits, device, dtype) if axis == "channel" else None
        )
        self.k = TokenQuantStore(batch, n_kv, cap, head_dim, bits, device) if self.k_channel is None else None
        self.v = TokenQuantStore(batch, n_kv, cap, head_dim, bits, device)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, pos: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        if pos + t > self.max_len:
            raise ValueError(f"KV cache overflow: position {pos + t} > {self.max_len}")
        cap = self.v.codes.shape[2]
        if pos + t > cap:
            new = min(self.max_len, max(pos + t, 2 * cap))
            self.v.grow(new)
            if self.k is not None:
                self.k.grow(new)
        sl = slice(pos, pos + t)
        self.v.write(sl, v)
        if self.k is not None:
            self.k.write(sl, k)
            keys = self.k.read(slice(0, pos + t), k.dtype)
        else:
            assert self.k_channel is not None
            self.k_channel.append(k)
            keys = self.k_channel.read(k.dtype)
        self.length = pos + t
        return keys, self.v.read(slice(0, pos + t), v.dtype), torch.arange(self.length, device=k.device)

    sliding = False

    def graphable(self) -> bool:  # its scales are read back to the host
        return False

    def repeat_batch(self, n: int) -> None:
        for store in (self.k, self.k_channel, self.v):
            if store is not None:
                store.repeat_batch(n)

    def nbytes(self) -> int:
        kb = self.k.nbytes(self.length) if self.k is not None else self.k_channel.nbytes()  # type: ignore[union-attr]
        return kb + self.v.nbytes(self.length)

    def allocated_bytes(self) -> int:
        return self.nbytes()


class QuantRingLayerCache:
    """A sliding-window layer's ring buffer in int8/int4 (always per token)."""

    padded = False

    def __init__(
        self,
        batch: int,
        n_kv: int,
        head_dim: int,
        window: int,
        dtype: torch.dtype,
        device: torch.device,
        bits: int,
    ) -> None:
        self.window, self.length = window, 0
        self.k = TokenQuantStore(batch, n_kv, window, head_dim, bits, device)
        self.v = TokenQuantStore(batch, n_kv, window, head_dim, bits, device)
        self.slot_pos = torch.full((window,), -1, dtype=torch.long, device=device)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, pos: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t, w = k.shape[2], self.window
        new_pos = torch.arange(pos, pos + t, device=k.device)
        valid = self.slot_pos >= 0
        old_k, old_v = self.k.read(valid, k.dtype), self.v.read(valid, v.dtype)
        old_pos = self.slot_pos[valid]
        keep = min(t, w)
        slots = new_pos[-keep:] % w
        self.k.write(slots, k[:, :, -keep:])
        self.v.write(slots, v[:, :, -keep:])
        self.slot_pos[slots] = new_pos[-keep:]
        self.length = pos + t
        if t == 1:  # decode: read back the ring, this position quantized like every cached one
            n = min(pos + 1, w)
            idx = slice(0, n)
            return self.k.read(idx, k.dtype), self.v.read(idx, v.dtype), self.slot_pos[:n]
        # prefill chunk: this chunk's keys go through the same int8/int4 rounding as cached ones
        qk, qv = self.k.read(slots, k.dtype), self.v.read(slots, v.dtype)
        k_all = (
            torch.cat([old_k, k[:, :, : t - keep], qk], dim=2) if t > keep else torch.cat([old_k, qk], dim=2)
        )
        v_all = (
            torch.cat([old_v, v[:, :, : t - keep], qv], dim=2) if t > keep else torch.cat([old_v, qv], dim=2)
        )
        return k_all, v_all, torch.cat([old_pos, new_pos])

    sliding = True

    def graphable(self) -> bool:  # its scales are read back to the host
        return False

    def repeat_batch(self, n: int) -> None:
        self.k.repeat_batch(n)
        self.v.repeat_batch(n)

    def nbytes(self) -> int:
        n = min(self.length, self.window)
        return self.k.nbytes(n) + self.v.nbytes(n)

    def allocated_bytes(self) -> int:
        return self.k.nbytes(self.window) + self.v.nbytes(self.window)
