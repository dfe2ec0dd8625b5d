"""The decode step as a CUDA graph: one launch per token instead of one per operator.

At batch 1 a token of Gemma 3 270M is ~1,500 small kernels; on a GPU each launch costs the CPU a few
microseconds and the GPU sits idle between them. A CUDA graph records the step's kernels once and replays
them with a single launch. A graph replays the same kernels on the same memory, so nothing that changes
from step to step may be a Python value: the token id and its position live in device tensors the graph
reads (the model's forward takes a tensor position: `Rotary.forward`, `cache_update`), and the KV cache
is a fixed-shape buffer written in place, read whole, empty slots masked (`FullLayerCache.update_at`).

A graph is bound to one cache's buffers, so it is recorded for each generation's cache (warm-up and
recording: milliseconds, not a compilation) and the previous one is dropped. Caches that cannot be read
without host values (int8/int4 KV caches, growing caches) run eagerly.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tinytitan.models.cache import FullLayerCache, KVCache, RingLayerCache
from tinytitan.models.layers import Rotary

log = logging.getLogger(__name__)

WARMUP = 2  # eager runs on a side stream before recording (lazy initialisations happen outside the graph)


def graphable(cache: KVCache) -> bool:
    """Whether a graph can replay steps on this cache: fixed-shape float buffers on a CUDA device."""
    for layer in cache.layers:
        if type(layer) is FullLayerCache:
            if layer.k.shape[2] != layer.max_len + 1:  # a growing cache (static ones keep one spare slot)
                return False
        elif type(layer) is RingLayerCache:
            if not layer.padded:
                return False
        else:  # quantized caches read their scales back to the host
            return False
        if layer.k.device.type != "cuda":
            return False
    return bool(cache.layers)


class GraphedStep:
    """(ids [B, 1], cache, start) -> logits [B, V], replayed from a CUDA graph recorded for `cache`."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._rotaries = [m for m in module.modules() if isinstance(m, Rotary)]
        self._cache: KVCache | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._ids = self._pos = self._out = None
        self.recorded = 0  # graphs recorded so far (tests, reports)

    def __call__(self, ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        new = cache is not self._cache or self._ids is None or self._ids.shape != ids.shape
        if new and not self._record(ids, cache, start):
            return self.module(ids, cache=cache, start=start, last_only=True)[:, -1]
        assert self._graph is not None and self._ids is not None and self._pos is not None
        self._ids.copy_(ids)
        self._pos.fill_(start)
        self._graph.replay()
        for layer in cache.layers:  # the Python side of the cache, which a replay does not run
            layer.length = start + 1
        assert self._out is not None
        return self._out[:, -1].clone()  # the graph's output buffer is overwritten by the next replay

    def _record(self, ids: torch.Tensor, cache: KVCache, start: int) -> bool:
        """Warm up and record the step on this cache, at the current position (the warm-up writes exactly
        what the first replay writes again). False when the cache or the tables do not allow a graph."""
        self._graph = self._cache = self._out = None
        if not graphable(cache):
            return False
        # every table covers the whole cache before recording: a graph cannot grow one
        if any(r.reserve(cache.max_len + 1) < cache.max_len + 1 for r in self._rotaries):
            return False  # no table yet (no forward pass has run on this module)
        self._ids = ids.clone()
        self._pos = torch.full((1,), start, dtype=torch.long, device=ids.device)
        side = torch.cuda.Stream(device=ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self.module(self._ids, cache=cache, start=self._pos, last_only=True)
        torch.cuda.current_stream(ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._out = self.module(self._ids, cache=cache, start=self._pos, last_only=True)
        self._graph, self._cache = graph, cache
        self.recorded += 1
        log.debug("decode step recorded as a CUDA graph (cache of %d positions)", cache.max_len)
        return True
