"""Generation: sampling, chunked prefill, and the Stepper that decodes every sequence of a batch together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from tinytitan.models.cache import KVCache

if TYPE_CHECKING:
    from tinytitan.runtime import Model

# rows one decode forward carries at most; more decoding rows run as several forwards a step: Gemma 3
# 270M's head logits for 16 rows (16.8 MB) spill the caches, so two forwards of 8 are faster than one of
# 16 (bench/RESULTS.md, "Continuous batching"); at most the stored compiled step's widest batch (16)
DECODE_ROWS = 8
PREFILL_CHUNK = 512  # long prompts are prefilled in chunks: bounded attention scores and activations


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] float32 -> a token id."""
        p = self.params
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        logits = logits.float() / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_p, dim=-1)
            # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
            drop = cumulative - sorted_p >= p.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        # drawn on the CPU whatever device made the logits: the generator is a CPU one, and a seed then
        # draws the same tokens on every device (the filtering above stays where the logits are)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))


def prefill(
    model: nn.Module,
    ids: list[int],
    cache: KVCache,
    chunk: int = PREFILL_CHUNK,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Run the prompt through the model in chunks; return the last position's logits [V]. A generation's
    prefill: GGML block matrices may multiply in bf16 (tinytitan.quant.ggml_matrix.generating)."""
    start = cache.length
    logits = None
    for i in range(0, len(ids), chunk):
        logits = _prefill_chunk(model, ids[i : i + chunk], cache, start + i, device)
    assert logits is not None, "empty prompt"
    return logits


def _prefill_chunk(
    model: nn.Module, ids: list[int], cache: KVCache, start: int, device: torch.device | str
) -> torch.Tensor:
    from tinytitan.quant.ggml_matrix import generating

    x = torch.tensor([ids], dtype=torch.long, device=device)
    with generating():
        return model(x, cache=cache, start=start, last_only=True)[0, -1]


class Generation:
    """One sequence a Stepper generates: its prompt, its budget, how it picks each token, where it is.

    `choose` turns the logits after the latest position into the next token, or None when the sequence
    ends (a stop id); the sequence also ends after `max_tokens` tokens or at the context's end. A caller
    that needs more per token (text, stop strings, log-probabilities) overrides `choose`."""

    def __init__(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        params: SamplingParams | None = None,
        stop_ids: set[int] | frozenset[int] = frozenset(),
        sampler: Callable[[torch.Tensor], int] | None = None,
    ) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.params = params or SamplingParams()
        self.stop_ids = stop_ids
        self.sampler = sampler or Sampler(self.params)
        self.tokens: list[int] = []
        self.prefilled = 0  # prompt tokens in the cache
        self.pending: int | None = None  # the latest token, not yet in the cache
        self.finished: str | None = None  # "stop" | "length" | "cancelled" once it has ended
        self.cache: KVCache | None = None  # its own cache (when the batch cannot share one)
        self.row: int | None = None  # its row in the shared cache

    @property
    def pos(self) -> int:
        """Positions in the cache (the next token is written at this position)."""
        return self.prefilled + max(0, len(self.tokens) - 1)

    def choose(self, logits: torch.Tensor) -> int | None:
        token = self.sampler(logits.float().cpu())
        if token in self.stop_ids:
            self.finished = "stop"
            return None
        return token

    def accept(self, logits: torch.Tensor, ctx: int) -> int | None:
        """The next token from these logits, recorded (None when the sequence ends here)."""
        token = self.choose(logits)
        if token is None:
            self.finished = self.finished or "stop"
            return None
        self.tokens.append(token)
        if self.finished is None and (len(self.tokens) >= self.max_tokens or self.pos >= ctx):
            self.finished = "length"  # no decode step for a token nobody will sample after
        self.pending = None if self.finished else token
        return token


class Stepper:
    """Generates any number of sequences together: every step runs one forward over all sequences that
    are decoding (one token each, each row at its own position) and, between steps, one prompt chunk of
    the oldest sequence still prefilling, so a long prompt never stalls the others. Sequences join with
    `add` and leave when they end or are `drop`ped, at once. A single request is a batch of one: the
    model's generation calls, the CLI, the server and the speed task all generate here.

    The rows share one fixed-shape cache (float or float16 KV) that the model's decode step (the stored
    compiled step, a CUDA graph for one row, or eager) runs on whole; the rows stay dense (a row that
    leaves is filled by the last one) and the cache grows in rows and length as sequences need; more than
    `decode_rows` decoding rows are decoded as several forwards over ranges of rows. A model
    with an int8/int4 KV cache keeps one cache per sequence, each decoded on its own (the quantized
    caches hold positions per cache, not per row)."""

    def __init__(self, model: Model, max_rows: int = 64, decode_rows: int = DECODE_ROWS) -> None:
        self.model = model
        self.max_rows = max_rows
        self.decode_rows = decode_rows  # rows one forward decodes at most (more: several forwards a step)
        self.shared = model.kv_quant in (None, "f16")
        self.active: list[Generation] = []  # in arrival order
        self.cache: KVCache | None = None
        self._views: dict[tuple[int, int], KVCache] = {}  # rows a..b as a cache of their own
        self._ready: list[Generation] = []  # decoding, in row order (row i is _ready[i])
        self._filling: Generation | None = None  # the sequence whose prompt is being prefilled

    # -- membership ---------------------------------------------------------------------------------
    def add(self, gen: Generation) -> Generation:
        budget = len(gen.prompt_ids) + gen.max_tokens
        if len(gen.prompt_ids) > self.model.ctx:
            raise ValueError(f"the prompt is {len(gen.prompt_ids)} tokens, beyond the context")
        gen.max_tokens = min(gen.max_tokens, self.model.ctx - len(gen.prompt_ids) + 1)
        if not self.shared:
            gen.cache = self.model.new_cache(min(self.model.ctx, budget))
        self.active.append(gen)
        return gen

    @torch.inference_mode()  # the cache's rows are inference tensors (written in step)
    def drop(self, gen: Generation, reason: str = "cancelled") -> None:
        """Take a sequence out now (its client left); its row is freed."""
        gen.finished = gen.finished or reason
        self._leave(gen)

    def _leave(self, gen: Generation) -> None:
        if gen in self.active:
            self.active.remove(gen)
        if self._filling is gen:
            self._filling = None
        if gen in self._ready:
            i = self._ready.index(gen)
            last = self._ready.pop()
            if last is not gen:  # the last row fills the hole: rows stay dense
                assert self.cache is not None
                self.cache.move_row(len(self._ready), i)
                self._ready[i] = last
                last.row = i
        gen.row, gen.cache = None, None
        if self._filling is not None and self._filling.row != len(self._ready):
            self._place(self._filling, move=True)
        if not self.active:  # nothing left: the memory goes back
            self.cache, self._views = None, {}

    @property
    def busy(self) -> bool:
        return bool(self.active)

    @property
    def decoding(self) -> int:
        """Sequences the next step decodes together."""
        return len(self._decoding())

    def _decoding(self) -> list[Generation]:
        if self.shared:
            return list(self._ready)
        return [g for g in self.active if g.pending is not None]

    # -- the step -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[Generation, int | None]]:
        """One prompt chunk (of the oldest sequence still prefilling) and one decode step of every decoding
        sequence. Returns each sequence that advanced with its new token (None: it ended without one);
        ended sequences have left."""
        events: list[tuple[Generation, int | None]] = []
        filling = self._filling or next((g for g in self.active if g.prefilled < len(g.prompt_ids)), None)
        decoding = self._decoding()
        if filling is not None:
            events.append(self._prefill(filling))
        if decoding:
            events += self._decode(decoding)
        for gen, _ in events:
            if gen.finished:
                self._leave(gen)
        return events

    def _prefill(self, gen: Generation) -> tuple[Generation, int | None]:
        m = self.model
        if self.shared and gen.row is None:
            self._filling = gen
            self._place(gen)
        chunk = gen.prompt_ids[gen.prefilled : gen.prefilled + PREFILL_CHUNK]
        cache = gen.cache if not self.shared else self.cache.row(gen.row, gen.prefilled)  # type: ignore[union-attr]
        assert cache is not None
        logits = _prefill_chunk(m.module, chunk, cache, gen.prefilled, m.device)
        gen.prefilled += len(chunk)
        if self.shared:
            self._note_length(gen.prefilled)
        if gen.prefilled < len(gen.prompt_ids):
            return gen, None
        self._filling = None
        token = gen.accept(logits, m.ctx)
        if self.shared and gen.pending is not None:
            self._ready.append(gen)  # its row is already the one after the decoding rows
        return gen, token

    def _decode(self, gens: list[Generation]) -> list[tuple[Generation, int | None]]:
        m = self.model
        if not self.shared:
            out = []
            for gen in gens:
                x = torch.tensor([[gen.pending]], dtype=torch.long, device=m.device)
                assert gen.cache is not None
                logits = m.decode_step(x, gen.cache, gen.pos)[0]
                out.append((gen, gen.accept(logits, m.ctx)))
            return out
        out = []
        for a in range(0, len(gens), self.decode_rows):  # rows a..b are one forward
            part = gens[a : a + self.decode_rows]
            view = self._view(a, a + len(part))
            ids = torch.tensor([[g.pending] for g in part], dtype=torch.long, device=m.device)
            positions = [g.pos for g in part]
            pos = torch.tensor(positions, dtype=torch.long, device=m.device)
            logits = m.decode_step(ids, view, pos)
            self._note_length(max(positions) + 1)
            out += [(g, g.accept(logits[i], m.ctx)) for i, g in enumerate(part)]
        return out

    # -- the shared cache ---------------------------------------------------------------------------
    def _place(self, gen: Generation, move: bool = False) -> None:
        """Give the prefilling sequence the row after the decoding ones (moving its rows there when it had
        another), growing the cache when it lacks the rows or the length."""
        row = len(self._ready)
        need_len = max(len(g.prompt_ids) + g.max_tokens for g in [*self._ready, gen])
        need_len = min(self.model.ctx, need_len)
        cache = self.cache
        rows = 0 if cache is None else cache.layers[0].k.shape[0]
        if cache is None or row >= rows or need_len > cache.max_len:
            new_rows = min(self.max_rows, max(row + 1, 2 * rows if row >= rows else rows, 1))
            new_len = need_len if cache is None else min(self.model.ctx, max(need_len, cache.max_len))
            if cache is None:
                self.cache = self._make(new_len, new_rows)
            else:
                self.cache = cache.resized(new_rows, new_len, self._make)
            self._views = {}
        assert self.cache is not None
        if move and gen.row is not None and gen.row != row:
            self.cache.move_row(gen.row, row)
        elif not move:
            self.cache.clear_row(row)
        gen.row = row

    def _note_length(self, n: int) -> None:
        """The cache's Python side (memory reports): the positions of its longest row. (Views' lengths are
        never read: a batched step takes each row's position as a tensor.)"""
        assert self.cache is not None
        for layer in self.cache.layers:
            layer.length = max(layer.length, n)

    def _make(self, max_len: int, rows: int) -> KVCache:
        return self.model.new_cache(max_len, rows, static=True)

    def _view(self, a: int, b: int) -> KVCache:
        """Rows a..b as a cache (kept while the cache is the same, so a step keeps its bindings)."""
        view = self._views.get((a, b))
        if view is None:
            assert self.cache is not None
            whole = (a, b) == (0, self.cache.layers[0].k.shape[0])
            view = self.cache if whole else self.cache.rows(a, b)
            self._views[(a, b)] = view
        return view


class StopMatcher:
    """Holds back streamed text that might be the start of a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        for s in self.stops:
            idx = self.pending.find(s)
            if idx >= 0:
                out, self.pending, self.stopped = self.pending[:idx], "", True
                return out
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
