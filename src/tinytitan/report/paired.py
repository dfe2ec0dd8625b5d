"""Paired comparisons of a variant with the reference on the same items: is a difference more than noise?

Two variants scored on the same questions are not independent samples: most questions are answered the
same way by both, so comparing their scores' own standard errors (what lm-evaluation-harness reports)
hides real differences and invents others. Here every comparison is paired, item by item:

- correct / incorrect per item (multiple choice, passkey): the difference of the two accuracies with a
  95% interval from a paired bootstrap (resampling items, both models together), and McNemar's exact
  p-value from the discordant items (right for one, wrong for the other);
- a continuous score per item (the mean log-likelihood of a perplexity window): the same bootstrap of the
  mean per-item difference;
- mean KLD, top-1 disagreement and ln(PPL ratio) are already paired (one value per position, both models on
  the same tokens): their 95% interval is mean +- 1.96 x the standard error of the per-position values.

A variant is *not distinguishable from the reference* on a metric when the interval includes zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile
RESAMPLES = 10_000
SEED = 20261202  # a fixed seed: the same items give the same interval on every machine


@dataclass(frozen=True)
class Paired:
    """variant - reference on one metric, over n paired items."""

    metric: str
    delta: float
    lo: float  # the 95% interval of delta
    hi: float
    n: int
    method: str
    p_value: float | None = None  # McNemar's exact test, for correct/incorrect items

    @property
    def distinguishable(self) -> bool:
        return not self.lo <= 0.0 <= self.hi

    def to_dict(self) -> dict[str, object]:
        return {
            "metric": self.metric,
            "delta": self.delta,
            "lo": self.lo,
            "hi": self.hi,
            "n": self.n,
            "method": self.method,
            "p_value": self.p_value,
            "distinguishable": self.distinguishable,
        }


def _bootstrap_interval(diff: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile interval (2.5%, 97.5%) of the mean of `diff` over resampled items."""
    n = len(diff)
    if n == 0 or not diff.any():
        return 0.0, 0.0  # identical on every item: every resample is 0
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, 2_000_000 // n)  # bounded memory: ~2M indices at a time
    for s in range(0, resamples, step):
        k = min(step, resamples - s)
        means[s : s + k] = diff[rng.integers(0, n, size=(k, n))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b items right only for one model, c only for the other."""
    m = b + c
    if m == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2.0**m
    return min(1.0, 2.0 * tail)


def paired_binary(
    reference: Sequence[float],
    variant: Sequence[float],
    metric: str = "acc",
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Paired:
    """Accuracy difference of two models scored 0/1 on the same items (index i is the same item)."""
    if len(reference) != len(variant):
        raise ValueError(f"paired items differ in number: {len(reference)} vs {len(variant)}")
    r = np.asarray(reference, dtype=np.float64)
    v = np.asarray(variant, dtype=np.float64)
    diff = v - r
    lo, hi = _bootstrap_interval(diff, resamples, seed)
    b = int(((v == 1) & (r == 0)).sum())
    c = int(((v == 0) & (r == 1)).sum())
    return Paired(
        metric,
        float(diff.mean()) if len(diff) else 0.0,
        lo,
        hi,
        len(diff),
        f"paired bootstrap ({resamples:,} resamples), McNemar exact",
        mcnemar_exact(b, c),
    )


def paired_continuous(
    reference: Sequence[float],
    variant: Sequence[float],
    metric: str,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Paired:
    """Mean difference of a continuous per-item score (e.g. a window's mean NLL) on the same items."""
    if len(reference) != len(variant):
        raise ValueError(f"paired items differ in number: {len(reference)} vs {len(variant)}")
    diff = np.asarray(variant, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    lo, hi = _bootstrap_interval(diff, resamples, seed)
    mean = float(diff.mean()) if len(diff) else 0.0
    return Paired(metric, mean, lo, hi, len(diff), f"paired bootstrap ({resamples:,} resamples)")


def from_stderr(metric: str, delta: float, stderr: float | None, n: int, what: str) -> Paired:
    """An already paired statistic (per-position values of both models on the same tokens) +- 1.96 se."""
    se = stderr or 0.0
    return Paired(metric, delta, delta - Z95 * se, delta + Z95 * se, n, f"{what}: mean +- 1.96 x stderr")
