"""Prefill / decode loop with a KV cache, sampling, stop conditions and streaming."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from tinytitan.config import ModelConfig
from tinytitan.decode_step import DecodeStep
from tinytitan.models.cache import KVCache

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
    from tinytitan.quant.ggml_matrix import generating

    start = cache.length
    logits = None
    for i in range(0, len(ids), chunk):
        x = torch.tensor([ids[i : i + chunk]], dtype=torch.long, device=device)
        with generating():
            logits = model(x, cache=cache, start=start + i, last_only=True)
    assert logits is not None, "empty prompt"
    return logits[0, -1]


@torch.inference_mode()
def generate_ids(
    model: nn.Module,
    cfg: ModelConfig,
    prompt_ids: list[int],
    max_tokens: int,
    sampler: Sampler,
    stop_ids: set[int],
    ctx: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    cache: KVCache | None = None,
    step: Callable[[torch.Tensor, KVCache, int], torch.Tensor] | None = None,
) -> Iterator[int]:
    """Yield generated token ids; stops at a stop id (not yielded), max_tokens, or the context's end.

    step: runs one new token (ids [1, 1], cache, position) -> logits [1, V]; default: the module eagerly
    (a compiled `DecodeStep` is the other kind)."""
    if step is None:
        step = DecodeStep(model)
    if cache is None:
        cache = KVCache.for_model(cfg, ctx, 1, dtype, device)
    logits = prefill(model, prompt_ids, cache, device=device)
    pos = len(prompt_ids)
    for i in range(max_tokens):
        token = sampler(logits)
        if token in stop_ids:
            return
        yield token
        if i == max_tokens - 1 or pos >= ctx:  # no decode step for a token nobody will sample after
            return
        x = torch.tensor([[token]], dtype=torch.long, device=device)
        logits = step(x, cache, pos)[0]
        pos += 1


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
