"""Perplexity the way llama.cpp's perplexity tool computes it, and its strided variant.

Default method (llama.cpp `llama-perplexity`): the text is tokenized once (BOS in front when the model's
metadata asks for it), cut into consecutive windows of n_ctx tokens, each window evaluated from an empty
cache with its first token replaced by BOS (again only when the model adds BOS), and only the second half
of each window is scored: the tokens at window offsets n_ctx/2 + 1 .. n_ctx - 1, predicted from the logits
one position earlier. So every scored token has at least n_ctx/2 tokens of context.

Strided method (llama.cpp `--ppl-stride S`): windows of n_ctx tokens start every S tokens
(floor((N - n_ctx + S - 1) / S) windows) and the last S tokens of each window are scored, so every scored
token has at least n_ctx - S tokens of context and windows overlap by n_ctx - S. llama.cpp's code means to
put BOS first in each window but writes it after the window was evaluated; we put it in (as the default
method does), which is what the model expects.

Uncertainty, as llama.cpp reports it: with x the per-token NLL, sd = sqrt((mean(x^2) - mean(x)^2) / (n - 1))
and ppl ± ppl * sd. Per-window sums (n, sum x, sum x^2) are kept so a run can stop and resume per window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tinytitan.errors import ContextLengthError, DataError
from tinytitan.store import Metric

if TYPE_CHECKING:
    from tinytitan.eval.run_state import Run


@dataclass
class PerplexityResult:
    ppl: float
    ppl_stderr: float  # uncertainty of ppl from the spread of the per-token NLL (delta method)
    nll: float  # mean negative log-likelihood (nats/token)
    n_tokens: int  # scored tokens
    n_windows: int
    n_ctx: int
    stride: int | None = None  # None: llama.cpp's default method (second half of each window)


@dataclass(frozen=True)
class Window:
    index: int
    ids: list[int]  # what the model sees (first token replaced by BOS where the model adds BOS)
    targets: list[int]  # the original tokens of the window (what is predicted)
    first: int  # logits at positions first .. n_ctx - 2 predict targets[first + 1 ..]


@dataclass(frozen=True)
class NLLStats:
    """Sufficient statistics of a set of per-token NLLs (exactly mergeable across windows and runs)."""

    n: int
    sum: float
    sum2: float

    @classmethod
    def of(cls, nll: torch.Tensor) -> NLLStats:
        x = nll.double()
        return cls(int(x.numel()), float(x.sum()), float((x * x).sum()))

    @classmethod
    def merge(cls, parts: Iterable[NLLStats]) -> NLLStats:
        n, s, s2 = 0, 0.0, 0.0
        for p in parts:
            n, s, s2 = n + p.n, s + p.sum, s2 + p.sum2
        return cls(n, s, s2)

    def to_list(self) -> list[float]:
        return [self.n, self.sum, self.sum2]


def mean_and_uncertainty(s: NLLStats) -> tuple[float, float]:
    """llama.cpp's estimate: mean, and sqrt((E[x^2] - E[x]^2) / (n - 1)) (0 for n < 2)."""
    if s.n < 1:
        return 0.0, 0.0
    mean = s.sum / s.n
    var = s.sum2 / s.n - mean * mean
    return mean, math.sqrt(var / (s.n - 1)) if var > 0 and s.n > 1 else 0.0


def windows(
    tokens: list[int],
    n_ctx: int = 512,
    bos_id: int | None = None,
    stride: int | None = None,
    max_windows: int | None = None,
) -> list[Window]:
    """The evaluation windows of either method (see the module docstring)."""
    if stride is None:
        count = len(tokens) // n_ctx
        starts = [i * n_ctx for i in range(count)]
        first = n_ctx // 2
    else:
        if not 0 < stride < n_ctx:
            raise ValueError(f"stride must be in 1 .. n_ctx - 1 = {n_ctx - 1}; got {stride}")
        count = max((len(tokens) - n_ctx + stride - 1) // stride, 0)
        starts = [i * stride for i in range(count)]
        first = n_ctx - stride - 1
    if max_windows is not None:
        starts = starts[:max_windows]
    if not starts:
        need = n_ctx if stride is None else n_ctx + 1
        raise ContextLengthError(f"perplexity needs at least {need} tokens; the text has {len(tokens)}")
    out = []
    for i, s in enumerate(starts):
        targets = list(tokens[s : s + n_ctx])
        ids = list(targets)
        if bos_id is not None:
            ids[0] = bos_id
        out.append(Window(i, ids, targets, first))
    return out


def window_nll(logits: torch.Tensor, window: list[int], first: int) -> torch.Tensor:
    """NLL of window[j + 1] given logits[j] for j in first .. n_ctx - 2 (logits: the whole window)."""
    lp = torch.log_softmax(logits[first:-1].double(), dim=-1)
    targets = torch.tensor(window[first + 1 :], dtype=torch.long)
    return -lp.gather(-1, targets[:, None])[:, 0]


def summarize(nll: torch.Tensor, n_windows: int, n_ctx: int, stride: int | None = None) -> PerplexityResult:
    return from_stats(NLLStats.of(nll), n_windows, n_ctx, stride)


def from_stats(stats: NLLStats, n_windows: int, n_ctx: int, stride: int | None = None) -> PerplexityResult:
    mean, sd = mean_and_uncertainty(stats)
    ppl = math.exp(mean)
    return PerplexityResult(
        ppl=ppl,
        ppl_stderr=ppl * sd,
        nll=mean,
        n_tokens=stats.n,
        n_windows=n_windows,
        n_ctx=n_ctx,
        stride=stride,
    )


def perplexity(
    logits_fn: Callable[[list[int]], torch.Tensor],
    tokens: list[int],
    n_ctx: int = 512,
    bos_id: int | None = None,
    max_windows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    stride: int | None = None,
) -> PerplexityResult:
    """tokens: the whole text, tokenized once; bos_id: set when the model adds BOS (SPM models, Gemma).
    logits_fn(window ids) -> float32 [n_ctx, V] (e.g. `Model.logits`)."""
    ws = windows(tokens, n_ctx, bos_id, stride, max_windows)
    stats = []
    for w in ws:
        stats.append(NLLStats.of(window_nll(logits_fn(w.ids), w.targets, w.first)))
        if progress:
            progress(w.index + 1, len(ws))
    return from_stats(NLLStats.merge(stats), len(ws), n_ctx, stride)


def scored_log_probs(lm, w: Window) -> torch.Tensor:
    """log-softmax [n_scored, V] at the scored positions of a window, the head run only there.
    lm: a `tinytitan.eval.api.RuntimeLM`."""
    n_scored = len(w.ids) - 1 - w.first
    return lm._score([w.ids], [n_scored + 1])[0][:-1]  # positions first .. n_ctx - 2


def window_stats(lm, w: Window) -> NLLStats:
    lp = scored_log_probs(lm, w)
    targets = torch.tensor(w.targets[w.first + 1 :], dtype=torch.long)
    return NLLStats.of(-lp.double().gather(-1, targets[:, None])[:, 0])


# -- the task kind: preparation (options of its job identity) and scoring, for eval/runner.py ------------
@dataclass
class PplState:
    docs: Any  # eval.data.Docs
    windows: list[Window]


def _text_docs(r: Run):
    from tinytitan.eval.data import load_docs

    docs = load_docs(r.spec.name, r.spec.data, r.cfg.data, r.cfg.limit)
    return docs


def prepare_task(r: Run) -> dict[str, Any]:
    p = r.spec.params
    n_ctx, stride = int(p.get("n_ctx", 512)), p.get("stride")
    if n_ctx > r.model.ctx:
        raise ContextLengthError(
            f"{r.spec.name}: n_ctx {n_ctx} is beyond the model's context of {r.model.ctx}"
        )
    docs = _text_docs(r)
    tokens = r.model.tokenizer.encode(docs.docs[0]["text"])  # BOS first where the model adds it (llama.cpp)
    bos = r.model.tokenizer.bos_id if r.model.tokenizer.add_bos else None
    ws = windows(tokens, n_ctx, bos, stride, r.cfg.limit)
    if docs.origin.startswith("pack") and r.cfg.limit is not None and len(ws) < r.cfg.limit:
        raise DataError(
            f"{r.spec.name}: the embedded pack's text makes {len(ws)} windows of {n_ctx} tokens for this "
            f"model, fewer than --limit {r.cfg.limit}; pass --data DIR (a folder holding "
            f"{r.spec.data.get('local', {}).get('path', 'the text')}) or a smaller --limit"
        )
    r.state = PplState(docs, ws)
    return {"limit": r.cfg.limit, "n_ctx": n_ctx, "stride": stride, **docs.identity()}


def run_task(r: Run) -> list[Metric]:
    ws = r.state.windows
    done = r.store.items(r.scope)
    r.reporter.task_start(r.spec.name, len(ws), sum(str(w.index) in done for w in ws), "windows")
    for w in ws:
        if str(w.index) in done:
            continue
        s = window_stats(r.lm, w)
        done[str(w.index)] = s.to_list()
        r.store.save_items(r.scope, {str(w.index): s.to_list()})
        r.reporter.advance(1)
    stats = NLLStats.merge(NLLStats(int(done[str(w.index)][0]), *done[str(w.index)][1:]) for w in ws)
    p = r.spec.params
    res = from_stats(stats, len(ws), int(p.get("n_ctx", 512)), p.get("stride"))
    _, nll_unc = mean_and_uncertainty(stats)
    extra = {"windows": len(ws), "n_ctx": res.n_ctx, "stride": res.stride}
    return [
        Metric("ppl", res.ppl, res.ppl_stderr, res.n_tokens, extra),
        Metric("nll", res.nll, nll_unc, res.n_tokens, {**extra, "unit": "nats/token"}),
    ]
