"""`recommend`: the best measured variant that fits a device budget, with the reason and the runner-up.

Memory needed at a context of C tokens, from measurements (the speed task's fresh-process peak RSS at its
smallest measured context c0, and the KV-cache size the same task recorded per context length):

    need(C) = peak_rss(c0) - kv(c0) + kv(C) + scratch(C) - scratch(c0)

where scratch(C) = C x the speed task's `attn_scratch_bytes_per_position` (a prefill chunk's global-attention
scores: the part of the runtime's working memory that grows with the context). "Best" is the
lowest mean KLD to the reference (ties: smaller size); variants without a KLD measurement rank after those
with one, by size.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from tinytitan.report.leaderboard import Board, Entry


@dataclass
class Need:
    entry: Entry
    bytes: float | None  # None: not measured (no speed row)
    why_not: list[str]


@dataclass
class Recommendation:
    best: Need | None
    runner_up: Need | None
    rejected: list[Need]
    advice: list[str]  # when nothing fits: what would
    formula: str


def _kv(entry: Entry, ctx: int) -> float | None:
    """KV bytes at ctx from the recorded sizes (linear between recorded lengths, exact at them)."""
    pts = [(c, v) for c, v in entry.by_context("speed/kv_bytes") if v is not None]
    if not pts:
        return None
    for (c0, v0), (c1, v1) in itertools.pairwise(pts):
        if c0 <= ctx <= c1:
            return v0 + (v1 - v0) * (ctx - c0) / (c1 - c0)
    if ctx <= pts[0][0]:
        return pts[0][1] * ctx / pts[0][0]
    (c0, v0), (c1, v1) = pts[-2] if len(pts) > 1 else (0, 0.0), pts[-1]
    return v1 + (v1 - v0) * (ctx - c1) / max(c1 - c0, 1)


def max_context(entry: Entry) -> int | None:
    pts = entry.by_context("speed/kv_bytes")
    return pts[-1][0] if pts else None


def _measured_context(entry: Entry) -> int | None:
    ctxs = entry.by_context("speed/decode_tok_s")
    return ctxs[0][0] if ctxs else None


def memory_needed(entry: Entry, ctx: int) -> float | None:
    rss, c0 = entry.peak_rss, _measured_context(entry)
    if rss is None or c0 is None:
        return None
    kv0, kv = _kv(entry, c0), _kv(entry, ctx)
    if kv0 is None or kv is None:
        return None
    scratch = entry.get("speed/attn_scratch_bytes_per_position") or 0.0
    return rss - kv0 + kv + scratch * (max(ctx, c0) - c0)


def recommend(
    board: Board,
    ram_bytes: float,
    context: int = 4096,
    min_decode_tps: float | None = None,
    min_top1: float | None = None,
) -> Recommendation:
    """min_top1 as a fraction (0.9) or a percentage (90)."""
    if min_top1 is not None and min_top1 <= 1.0:
        min_top1 *= 100.0
    needs: list[Need] = []
    for e in board.entries:
        why: list[str] = []
        need = memory_needed(e, context)
        if need is None:
            why.append("no memory measurement (run the speed task)")
        elif need > ram_bytes:
            why.append(f"needs {need / 1e6:.0f} MB at {context} tokens")
        top = max_context(e)
        if top is not None and context > top:
            why.append(f"its context is {top} tokens")
        if min_decode_tps is not None:
            if e.decode is None:
                why.append("decode speed not measured")
            elif e.decode < min_decode_tps:
                why.append(f"decodes {e.decode:.1f} tok/s")
        if min_top1 is not None:
            if e.top1 is None:
                why.append("top-1 agreement not measured")
            elif e.top1 < min_top1:
                why.append(f"top-1 agreement {e.top1:.1f}%")
        needs.append(Need(e, need, why))

    def rank(n: Need) -> tuple:
        k = n.entry.kld
        return (k is None, k if k is not None else 0.0, n.entry.size or math.inf)

    fits = sorted((n for n in needs if not n.why_not), key=rank)
    rejected = [n for n in needs if n.why_not]
    advice: list[str] = []
    if not fits:
        advice = _advice(needs, ram_bytes, context)
    return Recommendation(
        fits[0] if fits else None,
        fits[1] if len(fits) > 1 else None,
        rejected,
        advice,
        "need(C) = peak RSS at the measured context - its KV cache + KV cache at C + attention scratch",
    )


def _advice(needs: list[Need], ram: float, context: int) -> list[str]:
    out = []
    measured = [n for n in needs if n.bytes is not None]
    if not measured:
        return [
            "no variant has memory measurements yet: run `tinytitan sweep` (its speed task measures them)"
        ]
    smallest = min(measured, key=lambda n: n.bytes or 0.0)
    if smallest.bytes and smallest.bytes > ram:
        lo, hi = 0, context
        while lo < hi:  # the longest context at which the smallest variant still fits
            mid = (lo + hi + 1) // 2
            nb = memory_needed(smallest.entry, mid)
            if nb is not None and nb <= ram:
                lo = mid
            else:
                hi = mid - 1
        if lo >= 256:
            out.append(f"{smallest.entry.label} fits with a context of up to {lo} tokens")
        out.append(
            f"the smallest variant, {smallest.entry.label}, needs {smallest.bytes / 1e6:.0f} MB at {context} "
            "tokens: quantize further (e.g. plan:SIZE in a sweep) or add memory"
        )
    for n in sorted(needs, key=lambda n: n.bytes or math.inf)[:3]:
        memory_ok = n.bytes is not None and n.bytes <= ram
        if memory_ok:
            out.append(f"{n.entry.label} fits in memory but: {'; '.join(n.why_not)}")
    return out
