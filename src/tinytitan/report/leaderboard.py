"""The leaderboard: one line per measured variant of a model, from the results store.

Where several jobs measured the same metric of a variant (different --limit, a rerun with --force), the
latest one counts; every number keeps its provenance (`Entry.sources`).

Quality per size (`qps`): exp(-mean KLD) x (reference size / variant size). exp(-KLD) is 1 for a variant
that predicts exactly like the reference and falls toward 0 as its next-token distributions drift; the size
ratio is how many times smaller the variant's file is than the reference's. The reference scores 1.0;
higher is better. A variant is on the size frontier when no other variant is both no larger and no worse
in mean KLD (and strictly better in one); likewise for the speed frontier with decode tokens/s.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinytitan.store import ResultRow, Store

QPS_DEFINITION = (
    "quality per size = exp(-mean KLD) x (reference file size / variant file size); the reference scores "
    "1.0, higher is better"
)
MC_TASKS = ("arc_easy", "piqa", "boolq", "hellaswag", "winogrande", "lambada_openai")
LONG_TASKS = ("passkey", "niah_single", "niah_multi", "kv_retrieval", "variable_tracking")
_CELL = re.compile(r"^(?P<m>[a-z_]+)@len=(?P<len>\d+),depth=(?P<depth>[0-9.]+)$")


@dataclass
class Entry:
    label: str
    variant_hash: str
    variant: dict[str, Any]
    metrics: dict[str, float | None] = field(default_factory=dict)  # "task/metric" -> value
    stderr: dict[str, float | None] = field(default_factory=dict)
    sources: list[ResultRow] = field(default_factory=list)
    heatmaps: dict[str, dict[tuple[int, float], float]] = field(default_factory=dict)  # task -> cells
    on_size_frontier: bool = False
    on_speed_frontier: bool = False
    qps: float | None = None

    def get(self, key: str) -> float | None:
        return self.metrics.get(key)

    def by_context(self, prefix: str) -> list[tuple[int, float | None]]:
        """(context, value) of every `prefix@ctx=N` metric, by context."""
        return sorted(
            (int(k.rsplit("=", 1)[1]), v) for k, v in self.metrics.items() if k.startswith(prefix + "@ctx=")
        )

    @property
    def is_reference(self) -> bool:
        return self.variant_hash == "base"

    @property
    def size(self) -> float | None:
        return self.get("speed/file_bytes")

    @property
    def kld(self) -> float | None:
        v = self.get("kld/kld_mean")
        if v is None:
            return 0.0 if self.is_reference else None
        return max(v, 0.0)  # the reference against itself: float rounding can give -1e-9

    @property
    def top1(self) -> float | None:
        v = self.get("kld/same_top_p")
        return 100.0 if v is None and self.is_reference else v

    @property
    def ppl(self) -> float | None:
        return self.get("kld/ppl") or self.get("ppl/ppl")

    @property
    def decode(self) -> float | None:
        return self._at_smallest_context("speed/decode_tok_s")

    @property
    def prefill(self) -> float | None:
        return self._at_smallest_context("speed/prefill_tok_s")

    def _at_smallest_context(self, prefix: str) -> float | None:
        return next((v for _, v in self.by_context(prefix) if v is not None), None)

    @property
    def peak_rss(self) -> float | None:
        return self.get("speed/peak_rss_bytes")

    @property
    def bpw(self) -> float | None:
        return self.get("speed/bits_per_weight")

    def task_score(self, task: str) -> float | None:
        for m in ("acc_norm", "acc", "exact_match"):
            v = self.get(f"{task}/{m}")
            if v is not None:
                return v
        return None

    def long_score(self) -> tuple[str, float] | None:
        for t in LONG_TASKS:
            v = self.get(f"{t}/exact_match")
            if v is not None:
                return t, v
        return None


@dataclass
class Board:
    model: str
    entries: list[Entry]
    tasks: list[str]  # multiple-choice tasks present
    long_tasks: list[str]
    store: Path

    @property
    def reference(self) -> Entry | None:
        return next((e for e in self.entries if e.is_reference), None)


def label_of(variant_json: str) -> str:
    if not variant_json:
        return "base"
    try:
        d = json.loads(variant_json)
    except json.JSONDecodeError:
        return variant_json[:24]
    return str(d.get("name") or d) if isinstance(d, dict) else str(d)


def build(store_path: Path | str, model: str | None = None) -> Board:
    """All variants measured for `model` (default: the model with the most recent rows)."""
    with Store(store_path) as st:
        rows = st.rows(model=model) if model else st.rows()
    if not model and rows:
        model = rows[-1].model
        rows = [r for r in rows if r.model == model]
    latest: dict[tuple[str, str, str], ResultRow] = {}
    for r in rows:  # oldest first: later rows replace earlier ones
        latest[(r.variant_hash, r.task, r.metric)] = r
    entries: dict[str, Entry] = {}
    for (vh, task, metric), r in latest.items():
        e = entries.get(vh)
        if e is None:
            e = entries[vh] = Entry(label_of(r.variant), vh, json.loads(r.variant) if r.variant else {})
        m = _CELL.match(metric)
        if m:
            if m["m"] in ("exact_match",):
                e.heatmaps.setdefault(task, {})[(int(m["len"]), float(m["depth"]))] = r.value or 0.0
            continue
        e.metrics[f"{task}/{metric}"] = r.value
        e.stderr[f"{task}/{metric}"] = r.stderr
        e.sources.append(r)
    # One row per name: a variant rebuilt under the same name (a plan: after the planner changed) replaces
    # the older build, whose rows stay in the store.
    newest: dict[str, tuple[str, str]] = {}  # name -> (time of its latest row, variant hash)
    for vh, e in entries.items():
        last = max(r.time for r in latest.values() if r.variant_hash == vh)
        newest[e.label] = max(newest.get(e.label, ("", "")), (last, vh))
    entries = {vh: e for vh, e in entries.items() if newest[e.label][1] == vh}
    board = Board(
        model or "",
        list(entries.values()),
        [t for t in MC_TASKS if any(e.task_score(t) is not None for e in entries.values())],
        [t for t in LONG_TASKS if any(f"{t}/exact_match" in e.metrics for e in entries.values())],
        Path(store_path),
    )
    _score(board)
    board.entries.sort(key=lambda e: (not e.is_reference, -(e.qps or -1.0), e.label))
    return board


def frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto-optimal points when both coordinates are to be minimised."""
    out = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            out.append(i)
    return out


def _score(board: Board) -> None:
    ref = board.reference
    ref_size = ref.size if ref else None
    for e in board.entries:
        if ref_size and e.size and e.kld is not None:
            e.qps = math.exp(-e.kld) * ref_size / e.size
    sized = [e for e in board.entries if e.size is not None and e.kld is not None]
    for i in frontier([(e.size, e.kld) for e in sized]):  # type: ignore[misc]
        sized[i].on_size_frontier = True
    fast = [e for e in board.entries if e.decode is not None and e.kld is not None]
    for i in frontier([(-e.decode, e.kld) for e in fast]):  # type: ignore[operator, misc]
        fast[i].on_speed_frontier = True


# -- output ------------------------------------------------------------------------------------------
def _mb(v: float | None) -> str:
    return "" if v is None else f"{v / 1e6:.1f}"


def _f(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def columns(board: Board) -> list[tuple[str, Any]]:
    """(header, Entry -> text) for every column of the table."""
    cols: list[tuple[str, Any]] = [
        ("variant", lambda e: e.label + (" (reference)" if e.is_reference else "")),
        ("size MB", lambda e: _mb(e.size)),
        ("bits/w", lambda e: _f(e.bpw, ".2f")),
        ("peak RSS MB", lambda e: _mb(e.peak_rss)),
        ("decode tok/s", lambda e: _f(e.decode, ".1f")),
        ("KLD", lambda e: _f(e.kld, ".4f")),
        ("top-1 %", lambda e: _f(e.top1, ".1f")),
        ("PPL", lambda e: _f(e.ppl, ".2f")),
    ]
    for t in board.tasks:
        cols.append((t, lambda e, t=t: _f(None if e.task_score(t) is None else 100 * e.task_score(t), ".1f")))
    for t in board.long_tasks:
        cols.append(
            (
                f"{t} %",
                lambda e, t=t: _f(
                    None if e.get(f"{t}/exact_match") is None else 100 * e.get(f"{t}/exact_match"), ".0f"
                ),
            )
        )
    cols.append(("quality/size", lambda e: _f(e.qps, ".2f")))
    cols.append(
        ("frontier", lambda e: "size" * e.on_size_frontier + (" speed" if e.on_speed_frontier else ""))
    )
    return cols


def print_table(board: Board) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    if not board.entries:
        c.print(f"no results in {board.store}" + (f" for {board.model}" if board.model else ""))
        return
    t = Table(title=f"leaderboard: {board.model}")
    cols = columns(board)
    for h, _ in cols:
        t.add_column(h, justify="left" if h in ("variant", "frontier") else "right")
    for e in board.entries:
        t.add_row(*(fn(e) for _, fn in cols))
    c.print(t)
    c.print(f"{QPS_DEFINITION}. Store: {board.store}")


def markdown(board: Board) -> str:
    cols = columns(board)
    lines = [
        f"| {' | '.join(h for h, _ in cols)} |",
        "|" + "|".join("---" if h in ("variant", "frontier") else "---:" for h, _ in cols) + "|",
    ]
    for e in board.entries:
        lines.append(f"| {' | '.join(fn(e) for _, fn in cols)} |")
    notes = [
        "",
        f"KLD and top-1: mean KL divergence and same-top-token share against the reference; "
        f"{QPS_DEFINITION}.",
    ]
    return "\n".join(lines + notes) + "\n"


def write_markdown(board: Board, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Leaderboard: {board.model}\n\n" + markdown(board))


def write_html(board: Board, path: Path) -> None:
    from tinytitan.report.html import render

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render(board), encoding="utf-8")
    tmp.replace(path)
