"""The decode step as a CUDA graph: one launch per token instead of one per operator.

At batch 1 a token of Gemma 3 270M is ~1,500 small kernels; on a GPU each launch costs the CPU a few
microseconds and the GPU sits idle between them. A CUDA graph records the step's kernels once and replays
them with a single launch. A graph replays the same kernels on the same memory, so nothing that changes
from step to step may be a Python value: the token id and its position live in device tensors the graph
reads (the model's forward takes a tensor position: `Rotary.forward`, `cache_update`), and the KV cache
is a fixed-shape buffer written in place, read whole, empty slots masked (`FullLayerCache.update_at`).

A graph is bound to one cache's buffers, so it is recorded for each generation's cache (warm-up and
recording: milliseconds, not a compilation) and dropped with it. Caches that cannot be read without host
values (int8/int4 KV caches, growing caches) run eagerly. The recorded forward can be a torch.compile of
the module's (`Model.set_compile` on CUDA): the graph then replays inductor's fused kernels.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from tinytitan.errors import first_line
from tinytitan.models.cache import KVCache
from tinytitan.models.layers import Rotary

log = logging.getLogger(__name__)

WARMUP = 2  # eager runs on a side stream before recording (lazy initialisations happen outside the graph)


def graphable(cache: KVCache) -> bool:
    """Whether a graph can replay steps on this cache: fixed-shape float buffers on a CUDA device."""
    return bool(cache.layers) and all(layer.graphable() for layer in cache.layers)


@dataclass
class _Recorded:
    """One graph, its cache (weakly: the graph goes when the cache does) and its input/output buffers."""

    cache: weakref.ref
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor
    pos: torch.Tensor
    out: torch.Tensor
    # The rotary tables the graph reads, held so that a table grown or remade later (a longer prompt, a
    # request interleaved with this one) cannot free memory this graph still reads; they cover its cache.
    tables: list[torch.Tensor | None]


class GraphedStep:
    """(ids [B, 1], cache, start) -> logits [B, V], replayed from a CUDA graph recorded for `cache`.

    fn: the step's forward to record (a torch.compile of the module's, whose fused kernels the graph then
    replays); None: the module itself. tracing: a context entered while fn runs outside a replay (it may
    trace then). A server interleaves requests, each with its own cache: one graph is kept per live cache
    and dropped when the cache is.
    """

    def __init__(
        self,
        module: nn.Module,
        fn: Callable[[torch.Tensor, KVCache, torch.Tensor], torch.Tensor] | None = None,
        tracing: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        self.module = module
        self.fn = fn
        self.tracing = tracing or contextlib.nullcontext
        self.fallback_reason: str | None = None  # why fn was given up for the module itself
        self.disabled: str | None = None  # why no graph can be recorded (then every step runs eagerly)
        self._rotaries = [m for m in module.modules() if isinstance(m, Rotary)]
        self._graphs: dict[int, _Recorded] = {}
        self.recorded = 0  # graphs recorded so far (tests, reports)

    def __call__(self, ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        if start >= cache.max_len:  # as the eager cache refuses it: a graph would write out of bounds
            raise ValueError(f"KV cache overflow: position {start + 1} > {cache.max_len}")
        rec = self._graphs.get(id(cache))
        if rec is None or rec.cache() is not cache or rec.ids.shape != ids.shape:
            rec = self._record(ids, cache, start)
            if rec is None:
                return self.module(ids, cache=cache, start=start, last_only=True)[:, -1]
        rec.ids.copy_(ids)
        rec.pos.fill_(start)
        rec.graph.replay()
        for layer in cache.layers:  # the Python side of the cache, which a replay does not run
            layer.length = start + 1
        return rec.out[:, -1].clone()  # the graph's output buffer is overwritten by the next replay

    def _forward(self, ids: torch.Tensor, cache: KVCache, pos: torch.Tensor) -> torch.Tensor:
        if self.fn is None:
            return self.module(ids, cache=cache, start=pos, last_only=True)
        return self.fn(ids, cache, pos)

    def _record(self, ids: torch.Tensor, cache: KVCache, start: int) -> _Recorded | None:
        """Warm up and record the step on this cache, at the current position (the warm-up writes exactly
        what the first replay writes again). None when the cache or the tables do not allow a graph."""
        self._graphs.pop(id(cache), None)
        for key in [k for k, r in self._graphs.items() if r.cache() is None]:  # caches that are gone
            del self._graphs[key]
        if self.disabled or not graphable(cache):
            return None
        # every table covers the whole cache before recording: a graph cannot grow one
        if any(r.reserve(cache.max_len + 1) < cache.max_len + 1 for r in self._rotaries):
            return None  # no table yet (no forward pass has run on this module)
        with torch.inference_mode(False):  # buffers a step outside inference mode may write too
            ids = ids.clone()
            pos = torch.full((1,), start, dtype=torch.long, device=ids.device)
        side = torch.cuda.Stream(device=ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                try:
                    with self.tracing():
                        self._forward(ids, cache, pos)
                except Exception as e:  # a compilation that failed: record the module itself
                    if self.fn is None:
                        raise
                    self.fallback_reason = first_line(e)
                    log.warning(
                        "compiled decode step failed (%s); recording it uncompiled", self.fallback_reason
                    )
                    self.fn = None
                    self._forward(ids, cache, pos)
        torch.cuda.current_stream(ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with self.tracing(), torch.cuda.graph(graph):
                out = self._forward(ids, cache, pos)
        except Exception as e:
            reason = first_line(e)
            torch.cuda.synchronize(ids.device)
            if self.fn is not None:  # the compiled kernels would not record: the module's next time
                self.fallback_reason, self.fn = reason, None
                log.warning(
                    "compiled decode step could not be recorded (%s); recording it uncompiled", reason
                )
            else:  # something in the step a graph cannot hold: run eagerly from now on
                self.disabled = reason
                log.warning(
                    "the decode step could not be recorded as a CUDA graph (%s); running eagerly", reason
                )
            return None
        tables = [t for r in self._rotaries for t in r.tables()]
        rec = _Recorded(weakref.ref(cache), graph, ids, pos, out, tables)
        self._graphs[id(cache)] = rec
        self.recorded += 1
        log.debug("decode step recorded as a CUDA graph (cache of %d positions)", cache.max_len)
        return rec
