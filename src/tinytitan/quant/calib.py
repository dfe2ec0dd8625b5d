"""Calibration data and activation statistics for calibrated methods (GPTQ, AWQ, imatrix).

Text comes from the user or, with none, from the reference model itself (data-free): it samples
sequences from BOS, which are cached per model so a second run costs nothing. For the two embedded
models the text ships with the package (`tinytitan/precomputed/calib/`, written by this same function):
sampling it with the float32 reference takes ~6 minutes on a 2-core AVX2 CPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tinytitan import zoo
from tinytitan.errors import TinyTitanError
from tinytitan.io.folders import atomic_write_text
from tinytitan.models.cache import KVCache
from tinytitan.models.head import head_positions

SEQ_LEN = 512
MIN_TOKENS = 256


class CalibrationError(TinyTitanError):
    """Calibration text missing or too short."""


def calibration_sequences(
    model, text: str | None, n_tokens: int, seed: int = 0, progress: Callable[[str], None] | None = None
) -> list[list[int]]:
    """Token sequences of up to SEQ_LEN tokens totalling about n_tokens."""
    if text is not None:
        ids = model.tokenizer.encode(text, add_bos=False)
        if len(ids) < MIN_TOKENS:
            raise CalibrationError(
                f"calibration text is too short: {len(ids)} tokens, at least {MIN_TOKENS} are needed"
            )
        seqs = []
        body = SEQ_LEN - (1 if model.tokenizer.add_bos else 0)
        for i in range(0, min(len(ids), n_tokens), body):
            chunk = ids[i : i + body]
            if len(chunk) < 16:
                break
            seqs.append(([model.tokenizer.bos_id] if model.tokenizer.add_bos else []) + chunk)
        return seqs
    return self_generated(model, n_tokens, seed, progress)


@torch.inference_mode()
def self_generated(
    model, n_tokens: int, seed: int = 0, progress: Callable[[str], None] | None = None
) -> list[list[int]]:
    """Data-free calibration: the reference model writes its own text (temperature 1, batched)."""
    n_seq = max(1, -(-n_tokens // SEQ_LEN))
    relative = f"calib/{model.source.sha256[:16]}-{n_seq}x{SEQ_LEN}-s{seed}.json"
    found = zoo.cached(relative)
    if found is not None:
        return json.loads(found.read_text())
    cache_file = zoo.home() / relative
    tok = model.tokenizer
    start = tok.bos_id if tok.bos_id is not None else next(iter(tok.eos_ids))
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache.for_model(model.config, SEQ_LEN, n_seq, model.dtype, model.device)
    seqs = [[start] for _ in range(n_seq)]
    x = torch.tensor([[start]] * n_seq)
    for pos in range(SEQ_LEN - 1):
        logits = model.module(x, cache=cache, start=pos, last_only=True)[:, -1]
        probs = torch.softmax(logits.float(), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        for s, t in zip(seqs, nxt[:, 0].tolist(), strict=True):
            s.append(t)
        x = nxt
        if progress and pos % 64 == 0:
            progress(f"self-generating calibration text {pos}/{SEQ_LEN}")
    atomic_write_text(cache_file, json.dumps(seqs))
    return seqs


@dataclass
class ActivationStats:
    """Per Linear input: H = sum x x^T (for GPTQ), sum x^2 (imatrix) and sum |x| (AWQ), token count."""

    hessian: dict[str, torch.Tensor] = field(default_factory=dict)
    sq: dict[str, torch.Tensor] = field(default_factory=dict)
    absmean: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)  # a few rows of inputs (AWQ search)
    tokens: int = 0
    token_mass: torch.Tensor | None = None  # [vocab] sum over positions of the reference's probabilities
    token_count: torch.Tensor | None = None  # [vocab] how often each token was an input
    positions: int = 0

    def importance(self, name: str) -> torch.Tensor | None:
        return self.sq[name] / max(self.tokens, 1) if name in self.sq else None


@torch.inference_mode()
def collect_stats(
    module: nn.Module,
    seqs: list[list[int]],
    want_hessian: bool,
    progress: Callable[[int, int], None] | None = None,
    sample_rows: int = 256,
    want_token_mass: bool = True,
) -> ActivationStats:
    """Run the float model on the calibration sequences and record each Linear's input statistics.

    want_token_mass: also the reference's probability of every token at every position (row tiers rank
    the embedding's rows by it). Without it the output head is not run at all (its input statistics are
    still recorded): on Gemma 3 the 262k-row head is half of the work."""
    stats = ActivationStats()
    hooks = []

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            if name not in stats.sq:
                stats.sq[name] = torch.zeros(x.shape[1])
                stats.absmean[name] = torch.zeros(x.shape[1])
                if want_hessian:
                    stats.hessian[name] = torch.zeros(x.shape[1], x.shape[1])
            stats.sq[name] += (x * x).sum(0)
            stats.absmean[name] += x.abs().sum(0)
            if want_hessian:
                stats.hessian[name] += x.T @ x
            have = stats.samples.get(name)
            if have is None or have.shape[0] < sample_rows:
                take = x[torch.linspace(0, x.shape[0] - 1, min(64, x.shape[0])).long()]
                stats.samples[name] = take if have is None else torch.cat([have, take])[:sample_rows]

        return fn

    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_pre_hook(hook(name)))
    try:
        for i, s in enumerate(seqs):
            ids = torch.tensor([s])
            if not want_token_mass:
                with head_positions(module, torch.empty(0, dtype=torch.long), defer=True):
                    module(ids)  # the hooks above see the head's input; the head itself does nothing
                stats.positions += len(s)
                stats.tokens += len(s)
                if progress:
                    progress(i + 1, len(seqs))
                continue
            logits = module(ids)[0]
            if stats.token_mass is None:
                stats.token_mass = torch.zeros(logits.shape[-1])
                stats.token_count = torch.zeros(logits.shape[-1])
            for r in range(0, logits.shape[0], 128):  # bounded scratch: 128 x 262k probabilities at a time
                stats.token_mass += logits[r : r + 128].float().softmax(-1).sum(0)
            vocab = logits.shape[-1]
            stats.token_count += torch.bincount(ids[0], minlength=vocab)[:vocab].float()
            stats.positions += logits.shape[0]
            stats.tokens += len(s)
            if progress:
                progress(i + 1, len(seqs))
    finally:
        for h in hooks:
            h.remove()
    return stats
