"""The decode step's attention as one C++ kernel on CPU (`csrc/decode_attention.cpp`), built on first use.

torch does one-query attention as two batched matmuls and a softmax, which reads a cache of ~600 positions
at about half the memory's speed; the kernel reads each key and value once per KV head and splits long
caches across threads (bench/RESULTS.md has the figures). It is built with torch's C++ extension tooling
(a C++ compiler and ninja, the `ninja` package provides it) the first time a compiled decode step is made
(~10 s once) into $TINYTITAN_HOME/kernels; eager steps use a build that exists and never start one.
Without a compiler, or with TINYTITAN_NO_KERNELS=1 set, decode attention stays the torch matmuls: same
results to float32 rounding.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tinytitan import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "decode_attention.cpp"
# -ffast-math lets the compiler vectorise exp() (the kernel has no infinities or NaNs to lose); -fopenmp
# makes at::parallel_for use torch's OpenMP threads (without it the header's loop runs on one thread)
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
MAX_GROUP = 16  # query heads per KV head the kernel takes

_loaded = False
_failure: str | None = None
_fake_registered = False


def failure() -> str | None:
    """Why the kernel could not be built, once load() has failed."""
    return _failure


def load(build: bool = True) -> bool:
    """Load the kernel, building it first when `build` (the first time, ~10 s); False when it cannot be
    built here (with a warning) or, without `build`, when no build exists yet."""
    global _loaded, _failure
    if _loaded or _failure is not None:
        return _loaded
    why = native.try_load("tinytitan_decode_attention", SOURCE, FLAGS, build, _register_fake)
    if why:  # no compiler, no ninja, a failed build: the matmul path serves
        _failure = why
        log.warning("decode attention kernel unavailable (%s); attention runs as torch matmuls", why)
    _loaded = why is None
    return _loaded


def _register_fake() -> None:
    global _fake_registered
    if not _fake_registered:  # once per process (torch refuses a second one)
        torch.library.register_fake("tinytitan::decode_attention")(_shape_only)
        _fake_registered = True


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these grouped queries [B, KV, G, D] and cache views [B, KV, S, D] (float32
    queries; float32 or float16 keys and values)."""
    return (
        _loaded
        and q.device.type == "cpu"
        and q.dtype == torch.float32
        and k.dtype == v.dtype
        and k.dtype in (torch.float32, torch.float16)  # a float16 cache is widened as it is read
        and not (q.requires_grad or k.requires_grad or v.requires_grad)  # it has no backward
        and q.shape[-1] % 16 == 0
        and q.shape[2] <= MAX_GROUP
        and k.stride(-1) == 1
        and k.stride() == v.stride()
    )


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpos: torch.Tensor, padded: bool
) -> torch.Tensor:
    """softmax(q k^T) v for scaled queries q [B, KV, G, D] over k/v [B, KV, S, D]; keys at kpos < 0 are
    empty slots when padded."""
    return torch.ops.tinytitan.decode_attention(q, k, v, kpos, padded)


def _shape_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpos: torch.Tensor, padded: bool):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
