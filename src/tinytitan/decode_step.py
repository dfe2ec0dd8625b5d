"""One decode step (a single new token through the model): eager, the stored compiled step on CPU
(tinytitan.aot_step: compiled once per machine and model, reused by every later process), compiled by
torch.compile, or (on a CUDA device) replayed as a CUDA graph (tinytitan.cuda_graph).

At batch 1 a token costs ~1,500 small operators on Gemma 3 270M, and in eager mode each pays Python and
dispatcher time; compiling the step fuses the small ops (norms, RoPE, casts, residuals) into a few
generated C++ loops and leaves the quantized matmul kernels as calls. The compiled step is traced with
symbolic positions and cache lengths, and runs on fixed-shape caches (`KVCache.for_model(static=True)`),
so one compilation serves every position and every request. Attention runs on a C++ kernel built on
the first compiled step (tinytitan.models.attention_kernel; eager steps use it once built). Compilation
needs a C++ compiler and takes tens of seconds on the first step (torch's inductor caches the result on
disk for later processes); when it fails, the step falls back to eager with a warning and generation
goes on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tinytitan import aot_step
from tinytitan.config import ModelConfig
from tinytitan.cuda_graph import GraphedStep
from tinytitan.errors import first_line
from tinytitan.models import attention_kernel
from tinytitan.models.cache import KVCache
from tinytitan.models.layers import Rotary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredSpec:
    """How a decode step finds its stored compiled step (tinytitan.aot_step): the model's config and compute
    dtype (parts of the key), whether a missing step is built now (in this process, before the first token)
    or in the background, and how a separate process loads the same model (None: no background build)."""

    cfg: ModelConfig
    dtype: torch.dtype
    build_now: bool = False
    rebuild: tuple[str, ...] | None = None


class DecodeStep:
    """Callable (ids [B, 1], cache, start) -> logits [B, V] of the new position.

    stored: run steps on fixed-shape float caches with the stored compiled step (built in the
    background or now, as the spec says); until it exists, and for any other cache, steps run eagerly."""

    def __init__(
        self,
        module: nn.Module,
        compiled: bool = False,
        cuda_graphs: bool = True,
        stored: StoredSpec | None = None,
    ) -> None:
        self.module = module
        self.compiled = compiled
        self.stored = stored
        self._stored: dict[torch.dtype, aot_step.Stored] = {}
        self.fallback_reason: str | None = None
        self.ran: str | None = None  # what the latest step ran: "stored", "compiled", "graph" or "eager"
        self._fn = None
        self._rotaries = [m for m in module.modules() if isinstance(m, Rotary)]
        self._covered = 0  # positions every rotary table holds
        self._tables: list[torch.Tensor | None] | None = None  # the rotary tables the compiled graph holds
        self._graphed: GraphedStep | None = None  # on CUDA: the step replayed as a CUDA graph
        tensors = list(itertools.chain(module.parameters(), module.buffers()))
        if all(t.device.type == "cpu" for t in tensors):
            # the step's attention as one C++ call: built for a compiled step (once, ~10 s), used by an
            # eager one when a build exists
            attention_kernel.load(build=compiled)
        if cuda_graphs and tensors and all(t.device.type == "cuda" for t in tensors):
            # On a GPU at batch 1 the launches are the cost: the step is replayed as a CUDA graph, compiled
            # or not (compiled: the graph replays inductor's fused kernels; a first step of tens of seconds)
            self._graphed = GraphedStep(
                module, _compile(module, cpu=False) if compiled else None, _gpu_tracing
            )
        elif compiled:
            self._fn = _compile(module)

    @property
    def static_cache(self) -> bool:
        """Whether the caches this step runs on should be fixed-shape (compiled steps, CUDA graphs)."""
        return self._fn is not None or self._graphed is not None or self.stored is not None

    def stored_step(self, cache: KVCache) -> aot_step.AotStep | None:
        """The stored compiled step for this cache's dtype, once it exists (a missing one is built now or
        started in the background, as the spec says, the first time a cache of that dtype comes)."""
        spec = self.stored
        if spec is None:
            return None
        dtype = cache.layers[0].k.dtype
        st = self._stored.get(dtype)
        if st is None:
            rebuild = list(spec.rebuild) if spec.rebuild is not None else None
            st = self._stored[dtype] = aot_step.Stored(self.module, spec.cfg, spec.dtype, dtype, rebuild)
            if spec.build_now:
                st.build_now()
            else:
                st.start_background()
        return st.ready()

    def __call__(self, ids: torch.Tensor, cache: KVCache, start: int | torch.Tensor) -> torch.Tensor:
        """start: every row's position, or a tensor [B] of each row's own (static float caches: a batch
        whose rows stand at different positions, tinytitan.engine.Stepper; the caller keeps them within
        the cache and sets the layers' lengths)."""
        if isinstance(start, torch.Tensor):
            for r in self._rotaries:  # the positions' tables exist before the step reads them
                r.reserve(cache.max_len + 1)
            if self._graphed is not None and ids.shape[0] == 1:
                start = int(start[0])  # a CUDA graph replays one row
        if self.stored is not None and aot_step.supported(cache):
            step = self.stored_step(cache)
            if step is not None and ids.shape[0] <= step.max_batch:
                try:
                    out = step(ids, cache, start)
                    self.ran = "stored"
                    return out
                except Exception as e:  # an op the library calls is missing here, ...
                    self.fallback_reason = first_line(e)
                    log.warning("stored compiled step failed (%s); running eagerly", self.fallback_reason)
                    self.stored = None
        if self._graphed is not None and not isinstance(start, torch.Tensor):
            self.ran = "graph"
            return self._graphed(ids, cache, start)
        if self._fn is not None:
            needed = cache.max_len + 1 if isinstance(start, torch.Tensor) else max(cache.max_len, start + 1)
            if needed > self._covered and not self._reserve_tables(needed):  # a request's first step
                # no rotary table yet (this is the module's first forward): one eager step makes them, so
                # they are never made inside the graph (which would then be traced again)
                return self.module(ids, cache=cache, start=start, last_only=True)[:, -1]
            try:
                with _no_duck_shapes(), _trace_options():
                    out = self._fn(ids, cache, start)[:, -1]
                    self.ran = "compiled"
                    return out
            except Exception as e:  # no C++ compiler, an op inductor cannot lower, ...
                self.fallback_reason = first_line(e)
                log.warning("compiled decode step failed (%s); running eagerly", self.fallback_reason)
                self._fn = None
        self.ran = "eager"
        return self.module(ids, cache=cache, start=start, last_only=True)[:, -1]

    def _reserve_tables(self, n: int) -> bool:
        """Rotary tables for n positions, grown here, never inside the graph (that would trace it again in
        the middle of a generation), to at least RESERVE positions and by doubling. The graph holds the
        tables it was traced with as constants: a table grown later means a new graph (traced once per
        doubling, at a request's first step). False while a table does not exist yet."""
        self._covered = min((r.reserve(max(n, RESERVE)) for r in self._rotaries), default=1 << 62)
        tables = [r.table for r in self._rotaries]
        if any(t is None for t in tables):
            return False
        if self._tables is not None and any(a is not b for a, b in zip(tables, self._tables, strict=True)):
            log.info("rotary tables grown to %d positions: compiling the decode step again", self._covered)
            self._fn = _compile(self.module)
        self._tables = tables
        return True


_instances = itertools.count()

# positions the rotary tables of a compiled step cover at least (Gemma 3 270M: 16 MB of tables; SmolLM2: 2 MB)
RESERVE = 4096


def _compile(module: nn.Module, cpu: bool = True) -> Callable[[torch.Tensor, KVCache, int], torch.Tensor]:
    """torch.compile of `module`'s one-token forward, private to this module object.

    dynamic: the position and the cache lengths are symbols, not constants (one compilation for every
    step). Guards on the model's modules are skipped: checking them before every call cost ~2 ms of a
    13 ms SmolLM2 step (bench). That is safe only while this graph can never serve another module or a
    changed one, so the traced function gets a code object of its own (dynamo keeps compiled graphs per
    code object) and whoever changes the module's structure builds a new DecodeStep (apply_adapter does).
    For the same reason the module's tensors are constants of the graph, not inputs gathered before every
    call (`_trace_options`): a tensor changed in place is seen, one replaced by another is not.
    cpu=False: for a CUDA graph to record (tinytitan.cuda_graph), which replays the kernels without any of
    the Python above: only the inductor options that are not CPU tuning.
    """

    def step(ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        return module(ids, cache=cache, start=start, last_only=True)

    code = step.__code__.replace(co_name=f"decode_step_{next(_instances)}")
    own = types.FunctionType(code, step.__globals__, code.co_name, step.__defaults__, step.__closure__)
    options = {
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
        # Every computed value is written once and read back, never recomputed inside a consumer's loop:
        # by default inductor recomputed the final norm inside the int8 head's loop over 262k rows
        # (12.5 vs 6.3 ms of a Gemma w8 step; bench).
        "realize_opcount_threshold": 1,
        # No size and stride checks in the generated wrapper (~640 per SmolLM2 step, +3.4% tokens/s;
        # bench): the graph serves this module only, and the caches and token ids still pass dynamo's guards.
        "size_asserts": False,
        "alignment_asserts": False,
        "scalar_asserts": False,
    }
    if not cpu:
        del options["realize_opcount_threshold"]
    return torch.compile(own, dynamic=True, options=options)


@contextlib.contextmanager
def _gpu_tracing():
    """While a step for a CUDA graph may be traced: as for the CPU step, but the weights and tables stay
    graph inputs (a replay never gathers them, and a graph recorded for a longer cache must read the
    grown tables)."""
    with _no_duck_shapes(), _trace_options(constants=False):
        yield


def _no_duck_shapes():
    """Caches of equal length by chance (a 512-slot ring and 512 cached positions) must not be traced as
    one symbol: the next step would recompile."""
    from torch.fx.experimental import _config

    return _config.patch(use_duck_shape=False)


def _trace_options(constants: bool = True):
    """specialize_float: the model's float attributes (norm eps, attention scale) as constants from the
    start: traced as symbols (dynamic=True's default), they made dynamo trace the whole step a second time
    once it found they must be constants (SmolLM2 w4g32's first compiled step 28 -> 12 s with a warm
    inductor cache). install_free_tensors (constants): the module's weights and tables are attributes of
    the graph; as inputs, dynamo gathered ~360 of them before every call (~0.3 ms of a 7 ms SmolLM2 step;
    +4.7% tokens/s, bench/ab_step_overhead.py)."""
    return torch._dynamo.config.patch(specialize_float=True, install_free_tensors=constants)


def compile_available() -> bool:
    """Whether torch.compile can build CPU kernels here (a C++ compiler on PATH, or CXX set)."""
    import shutil

    found = [shutil.which(c) for c in ("g++", "c++", "clang++")]
    return bool(os.environ.get("CXX") or any(found))
