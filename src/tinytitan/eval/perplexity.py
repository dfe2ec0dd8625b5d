"""Perplexity the way llama.cpp's perplexity tool computes it.

The text is tokenized once (BOS in front when the model's metadata asks for it), cut into consecutive
windows of n_ctx tokens, each window evaluated from an empty cache with its first token replaced by BOS
(again only when the model adds BOS), and only the second half of each window is scored: the tokens at
window offsets n_ctx/2 + 1 .. n_ctx - 1, predicted from the logits one position earlier. So every scored
token has at least n_ctx/2 tokens of context.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tinytitan.errors import ContextLengthError


@dataclass
class PerplexityResult:
    ppl: float
    ppl_stderr: float  # uncertainty of ppl from the spread of the per-token NLL (delta method)
    nll: float  # mean negative log-likelihood (nats/token)
    n_tokens: int  # scored tokens
    n_windows: int
    n_ctx: int


def window_nll(logits: torch.Tensor, window: list[int], first: int) -> torch.Tensor:
    """NLL of window[j + 1] given logits[j] for j in first .. n_ctx - 2."""
    lp = torch.log_softmax(logits[first:-1].double(), dim=-1)
    targets = torch.tensor(window[first + 1 :], dtype=torch.long)
    return -lp.gather(-1, targets[:, None])[:, 0]


def summarize(nll: torch.Tensor, n_windows: int, n_ctx: int) -> PerplexityResult:
    mean = float(nll.mean())
    n = nll.numel()
    sd = float(nll.std(unbiased=True)) / math.sqrt(n - 1) if n > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(
        ppl=ppl, ppl_stderr=ppl * sd, nll=mean, n_tokens=n, n_windows=n_windows, n_ctx=n_ctx
    )


def perplexity(
    logits_fn: Callable[[list[int]], torch.Tensor],
    tokens: list[int],
    n_ctx: int = 512,
    bos_id: int | None = None,
    max_windows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """tokens: the whole text, tokenized once; bos_id: set when the model adds BOS (SPM models, Gemma)."""
    n_windows = len(tokens) // n_ctx
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ContextLengthError(f"perplexity needs at least {n_ctx} tokens; the text has {len(tokens)}")
    first = n_ctx // 2
    nlls = []
    for i in range(n_windows):
        window = list(tokens[i * n_ctx : (i + 1) * n_ctx])
        scored = list(window)
        if bos_id is not None:
            window[0] = bos_id
        nlls.append(window_nll(logits_fn(window), scored, first))
        if progress:
            progress(i + 1, n_windows)
    return summarize(torch.cat(nlls), n_windows, n_ctx)
