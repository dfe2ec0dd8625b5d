"""The leaderboard: one line per measured variant of a model, from the results store.

Where several jobs measured the same metric of a variant (different --limit, a rerun with --force), the
latest one counts; every number keeps its provenance (`Entry.sources`).

Quality per size (`qps`): exp(-mean KLD) x (reference size / variant size). exp(-KLD) is 1 for a variant
that predicts exactly like the reference and falls toward 0 as its next-token distributions drift; the size
ratio is how many times smaller the variant's file is than the reference's. The reference scores 1.0;
higher is better. A variant is on the size frontier when no other variant is both no larger and no worse
in mean KLD (and strictly better in one); likewise for the speed frontier with decode tokens/s.

Nothing unmeasured is shown: a cell has a number only where a result row backs it, and derived figures
(quality per size, frontiers) use measured rows only. A job that could not run (`Store.skips`) leaves its
cells blank with a numbered note giving the reason. Every quality cell of a variant is compared with the
reference's on the same items (`report/paired.py`); "≈" marks a difference whose paired 95% interval
includes zero, i.e. one not distinguishable from noise.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinytitan.io.folders import atomic_write_text
from tinytitan.report.paired import Paired, from_stderr, paired_binary, paired_continuous
from tinytitan.store import ResultRow, SkipRecord, Store

QPS_DEFINITION = (
    "quality per size = exp(-mean KLD) x (reference file size / variant file size); the reference scores "
    "1.0, higher is better"
)
NOISE = "≈"
NOISE_DEFINITION = (
    f"{NOISE}: not distinguishable from the reference (the paired 95% interval of the difference on the same"
    " items includes zero; tasks: paired bootstrap over items, KLD / top-1 / PPL: per-position intervals)"
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
    missing: dict[str, SkipRecord] = field(default_factory=dict)  # task -> why it has no result
    paired: dict[str, Paired] = field(default_factory=dict)  # "task/metric" -> comparison with the reference

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
        return None if v is None else max(v, 0.0)  # the reference against itself: rounding can give -1e-9

    @property
    def top1(self) -> float | None:
        return self.get("kld/same_top_p")

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

    def task_metric(self, task: str) -> str | None:
        """The metric a task's cell shows: acc_norm where the task has it, else acc or exact_match."""
        return next(
            (m for m in ("acc_norm", "acc", "exact_match") if self.get(f"{task}/{m}") is not None), None
        )

    def task_score(self, task: str) -> float | None:
        m = self.task_metric(task)
        return None if m is None else self.get(f"{task}/{m}")

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
    notes: list[str] = field(default_factory=list)  # the reasons of blank cells, numbered from 1

    @property
    def reference(self) -> Entry | None:
        return next((e for e in self.entries if e.is_reference), None)

    def note_number(self, skip: SkipRecord) -> int:
        text = f"{skip.task} {skip.status}: {skip.reason}"
        if text not in self.notes:
            self.notes.append(text)
        return self.notes.index(text) + 1


def label_of(variant_json: str) -> str:
    if not variant_json:
        return "base"
    try:
        d = json.loads(variant_json)
    except json.JSONDecodeError:
        return variant_json[:24]
    return str(d.get("name") or d) if isinstance(d, dict) else str(d)


def build(store_path: Path | str, model: str | None = None, runs: Sequence[Any] | None = None) -> Board:
    """All variants measured for `model` (default: the model with the most recent rows).

    runs: the sweep's tasks (`sweep.plan.TaskRun`s); when given, only jobs run with those options count, so
    every variant's cell of a task comes from the same items (a reference measured once on the full set
    does not stand beside variants measured on 40 questions).
    """
    with Store(store_path) as st:
        rows = st.rows(model=model) if model else st.rows()
        if not model and rows:
            model = rows[-1].model
            rows = [r for r in rows if r.model == model]
        skips = st.skips(model) if model else []
        if runs is not None:
            rows = [r for r in rows if _matches(r, runs)]
            wanted = {r.task for r in runs}
            skips = [k for k in skips if k.task in wanted]
        entries = _entries(rows, skips)
        board = Board(
            model or "",
            list(entries.values()),
            [
                t
                for t in MC_TASKS
                if any(e.task_score(t) is not None or t in e.missing for e in entries.values())
            ],
            [
                t
                for t in LONG_TASKS
                if any(f"{t}/exact_match" in e.metrics or t in e.missing for e in entries.values())
            ],
            Path(store_path),
        )
        _score(board)
        _compare(board, st)
    board.entries.sort(key=lambda e: (not e.is_reference, -(e.qps or -1.0), e.label))
    return board


def _matches(row: ResultRow, runs: Sequence[Any]) -> bool:
    """The row's job ran with the options of one of `runs` (the keys both know)."""
    for run in runs:
        if run.task != row.task:
            continue
        if all(_same_option(row.options[k], v) for k, v in run.options.items() if k in row.options):
            return True
    return False


def _same_option(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list | tuple):
        return sorted(a) == sorted(b)
    return a == b


def _entries(rows: list[ResultRow], skips: list[SkipRecord]) -> dict[str, Entry]:
    latest: dict[tuple[str, str, str], ResultRow] = {}
    for r in rows:  # oldest first: later rows replace earlier ones
        latest[(r.variant_hash, r.task, r.metric)] = r
    entries: dict[str, Entry] = {}
    last_time: dict[str, str] = {}

    def entry(vh: str, variant: str) -> Entry:
        if vh not in entries:
            entries[vh] = Entry(label_of(variant), vh, json.loads(variant) if variant else {})
        return entries[vh]

    for (vh, task, metric), r in latest.items():
        e = entry(vh, r.variant)
        last_time[vh] = max(last_time.get(vh, ""), r.time)
        m = _CELL.match(metric)
        if m:
            if m["m"] in ("exact_match",):
                e.heatmaps.setdefault(task, {})[(int(m["len"]), float(m["depth"]))] = r.value or 0.0
            continue
        e.metrics[f"{task}/{metric}"] = r.value
        e.stderr[f"{task}/{metric}"] = r.stderr
        e.sources.append(r)
    for k in skips:
        e = entry(k.variant_hash, k.variant)
        if not any(r.task == k.task for r in e.sources):  # a result of the task from another run stands
            e.missing[k.task] = k
            last_time[k.variant_hash] = max(last_time.get(k.variant_hash, ""), k.time)
    # One row per name: a variant rebuilt under the same name (a plan: after the planner changed) replaces
    # the older build, whose rows stay in the store.
    newest: dict[str, tuple[str, str]] = {}  # name -> (time of its latest row, variant hash)
    for vh, e in entries.items():
        newest[e.label] = max(newest.get(e.label, ("", "")), (last_time[vh], vh))
    return {vh: e for vh, e in entries.items() if newest[e.label][1] == vh}


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


# -- paired comparisons with the reference ----------------------------------------------------------
def _task_type(task: str) -> str | None:
    from tinytitan.eval.registry import builtin_specs

    spec = builtin_specs().get(task)
    return spec.type if spec else None


# the options that must be equal for two jobs to have scored the same items
_SAME_ITEMS = {
    "multiple_choice": ("num_fewshot", "seed", "data"),
    "loglikelihood": ("num_fewshot", "seed", "data"),
    "longcontext": ("lengths", "depths", "limit", "seed", "haystack", "max_tokens"),
    "perplexity": ("n_ctx", "stride", "data"),
}


def _job_row(e: Entry, task: str, metric: str) -> ResultRow | None:
    return next((r for r in reversed(e.sources) if r.task == task and r.metric == metric), None)


def _compare(board: Board, st: Store) -> None:
    ref = board.reference
    for e in board.entries:
        if e.is_reference:
            continue
        row = _job_row(e, "kld", "kld_mean")
        if row is not None:  # already paired: both models on the same tokens, one value per position
            for key, metric, delta, what in (
                ("kld/kld_mean", "kld_mean", e.kld, "KLD"),
                ("kld/same_top_p", "same_top_p", None if e.top1 is None else e.top1 - 100.0, "top-1"),
                ("kld/ppl", "ln_ppl_ratio", e.get("kld/ln_ppl_ratio"), "ln(PPL / PPL of the reference)"),
            ):
                if delta is not None:
                    e.paired[key] = from_stderr(metric, delta, e.stderr.get(f"kld/{metric}"), row.n, what)
        if ref is None:
            continue
        for task in {r.task for r in e.sources}:
            kind = _task_type(task)
            if kind in ("multiple_choice", "loglikelihood", "longcontext"):
                metric = e.task_metric(task)
                if metric and ref.get(f"{task}/{metric}") is not None:
                    p = _paired_items(st, ref, e, task, metric, kind)
                    if p is not None:
                        e.paired[f"{task}/{metric}"] = p
            elif kind == "perplexity" and ref.get(f"{task}/nll") is not None:
                p = _paired_items(st, ref, e, task, "nll", kind)
                if p is not None:
                    e.paired[f"{task}/ppl"] = p


def _paired_items(st: Store, ref: Entry, e: Entry, task: str, metric: str, kind: str) -> Paired | None:
    """The variant's and the reference's per-item scores of one task, paired on the items both scored."""
    from tinytitan.eval.multiple_choice import item_scores

    rr, vr = _job_row(ref, task, metric), _job_row(e, task, metric)
    if rr is None or vr is None:
        return None
    if any(rr.options.get(k) != vr.options.get(k) for k in _SAME_ITEMS[kind]):
        return None  # different items (another data file, seed or grid): no pairing
    rj, vj = st.job(rr.job_key), st.job(vr.job_key)
    if rj is None or vj is None:
        return None
    r_items, v_items = st.items(rj.scope), st.items(vj.scope)
    if kind == "longcontext":
        keys = sorted(_grid_keys(rr.options) & _grid_keys(vr.options) & set(r_items) & set(v_items))
        pairs = [(float(r_items[k][metric]), float(v_items[k][metric])) for k in keys]
        return paired_binary([a for a, _ in pairs], [b for _, b in pairs], metric) if pairs else None
    n = (
        min(rr.n, vr.n)
        if kind != "perplexity"
        else min(rr.options.get("limit") or 10**9, vr.options.get("limit") or 10**9)
    )
    keys = [k for k in map(str, range(n)) if k in r_items and k in v_items]
    if not keys:
        return None
    if kind == "perplexity":  # mean NLL of each window (items are [n, sum, sum of squares])
        ref_nll = [r_items[k][1] / r_items[k][0] for k in keys]
        var_nll = [v_items[k][1] / v_items[k][0] for k in keys]
        return paired_continuous(ref_nll, var_nll, "nll")
    ref_s = [item_scores(r_items[k])[metric] for k in keys]
    var_s = [item_scores(v_items[k])[metric] for k in keys]
    return paired_binary(ref_s, var_s, metric)


def _grid_keys(options: dict[str, Any]) -> set[str]:
    """The long-context cells a job scored ("length:depth:sample", as eval/runner.py keys them)."""
    return {
        f"{L}:{d:.4f}:{s}"
        for L in options.get("lengths", [])
        for d in options.get("depths", [])
        for s in range(int(options.get("limit") or 1))
    }


# -- output ------------------------------------------------------------------------------------------
def _mb(v: float | None) -> str:
    return "" if v is None else f"{v / 1e6:.1f}"


def _f(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def columns(board: Board) -> list[tuple[str, Any]]:
    """(header, Entry -> text) for every column of the table.

    A blank value whose task could not run shows the number of the note that says why ("[1]"); a value
    not distinguishable from the reference's on the same items is followed by "≈".
    """

    def cell(text_of, tasks: tuple[str, ...], paired: tuple[str, ...] = ()):
        def fn(e: Entry) -> str:
            text = text_of(e)
            if not text:
                why = [e.missing[t] for t in tasks if t in e.missing]
                return " ".join(f"[{board.note_number(k)}]" for k in why)
            p = next((e.paired[k] for k in paired if k in e.paired), None)
            return f"{text} {NOISE}" if p is not None and not p.distinguishable else text

        return fn

    def pct(key: str, fmt: str):
        return lambda e: _f(None if e.get(key) is None else 100 * e.get(key), fmt)  # type: ignore[operator]

    def score(task: str):
        def text(e: Entry) -> str:
            m = e.task_metric(task)
            if m is None:
                return ""
            se = e.stderr.get(f"{task}/{m}")
            return _f(100 * e.get(f"{task}/{m}"), ".1f") + ("" if se is None else f" ±{100 * se:.1f}")  # type: ignore[operator]

        return text

    speed = ("speed",)
    quality = ("kld", "ppl")
    cols: list[tuple[str, Any]] = [
        ("variant", lambda e: e.label + (" (reference)" if e.is_reference else "")),
        ("size MB", cell(lambda e: _mb(e.size), speed)),
        ("bits/w", cell(lambda e: _f(e.bpw, ".2f"), speed)),
        ("peak RSS MB", cell(lambda e: _mb(e.peak_rss), speed)),
        ("decode tok/s", cell(lambda e: _f(e.decode, ".1f"), speed)),
        ("KLD", cell(lambda e: _f(e.kld, ".4f"), ("kld",), ("kld/kld_mean",))),
        ("top-1 %", cell(lambda e: _f(e.top1, ".1f"), ("kld",), ("kld/same_top_p",))),
        ("PPL", cell(lambda e: _f(e.ppl, ".2f"), quality, ("kld/ppl", "ppl/ppl"))),
    ]
    for t in board.tasks:
        cols.append((t, cell(score(t), (t,), tuple(f"{t}/{m}" for m in ("acc_norm", "acc", "exact_match")))))
    for t in board.long_tasks:
        cols.append((f"{t} %", cell(pct(f"{t}/exact_match", ".0f"), (t,), (f"{t}/exact_match",))))
    cols.append(("quality/size", cell(lambda e: _f(e.qps, ".2f"), ("kld", "speed"))))
    cols.append(
        ("frontier", lambda e: "size" * e.on_size_frontier + (" speed" if e.on_speed_frontier else ""))
    )
    return cols


def footnotes(board: Board) -> list[str]:
    """The notes below the table: definitions, then the numbered reasons of blank cells."""
    out = [
        "KLD and top-1: mean KL divergence and same-top-token share against the reference; "
        f"{QPS_DEFINITION}.",
        f"{NOISE_DEFINITION}. Task scores are % ± their standard error; size, memory and speed are one "
        "measurement each (no interval).",
    ]
    return out + [f"[{i}] {n}" for i, n in enumerate(board.notes, 1)]


def print_table(board: Board) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    if not c.is_terminal:  # a log or a pipe: the whole table on one line per variant, not 80 columns
        c = Console(width=240)
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
    for line in footnotes(board):
        c.print(line, markup=False, highlight=False)
    c.print(f"Store: {board.store}", markup=False, highlight=False)


def markdown(board: Board) -> str:
    cols = columns(board)
    lines = [
        f"| {' | '.join(h for h, _ in cols)} |",
        "|" + "|".join("---" if h in ("variant", "frontier") else "---:" for h, _ in cols) + "|",
    ]
    for e in board.entries:
        lines.append(f"| {' | '.join(fn(e) for _, fn in cols)} |")
    return "\n".join([*lines, "", *(f"{n}  " for n in footnotes(board))]) + "\n"


def write_markdown(board: Board, path: Path) -> None:
    atomic_write_text(path, f"# Leaderboard: {board.model}\n\n" + markdown(board))
