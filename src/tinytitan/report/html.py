"""The leaderboard as one self-contained HTML page: plotly (embedded, works offline), table, provenance."""

from __future__ import annotations

import html
import time
from pathlib import Path

from tinytitan.io.folders import atomic_write_text
from tinytitan.report.leaderboard import QPS_DEFINITION, Board, Entry, columns, footnotes

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th { background: #f3f3f3; }
td.l, th.l { text-align: left; }
tr.frontier td:first-child { font-weight: bold; }
.note { color: #555; max-width: 60em; }
details { margin: 1em 0; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
"""


def _scatter(
    board: Board, x_of, x_title: str, frontier_attr: str, log_x: bool, div_id: str, first: bool
) -> str:
    import plotly.graph_objects as go

    pts = [(e, x_of(e)) for e in board.entries if x_of(e) is not None and e.kld is not None]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[x for _, x in pts],
            y=[max(e.kld, 1e-5) for e, _ in pts],  # type: ignore[arg-type]
            mode="markers+text",
            text=[e.label for e, _ in pts],
            textposition="top center",
            marker={
                "size": 10,
                "color": ["#d62728" if getattr(e, frontier_attr) else "#1f77b4" for e, _ in pts],
            },
            name="variants",
            hovertemplate="%{text}<br>%{x}<br>KLD %{y:.4f}<extra></extra>",
        )
    )
    front = sorted((x, max(e.kld, 1e-5)) for e, x in pts if getattr(e, frontier_attr))  # type: ignore[arg-type]
    if front:
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in front],
                y=[p[1] for p in front],
                mode="lines",
                line={"shape": "hv", "dash": "dash", "color": "#d62728"},
                name="Pareto frontier",
            )
        )
    fig.update_layout(
        title=f"mean KLD vs {x_title} (lower is better)",
        xaxis_title=x_title,
        yaxis_title="mean KLD to the reference (log)",
        yaxis_type="log",
        xaxis_type="log" if log_x else "linear",
        width=620,
        height=440,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    return fig.to_html(full_html=False, include_plotlyjs=first, div_id=div_id)


def _heatmaps(board: Board) -> str:
    import plotly.graph_objects as go

    out = []
    for task in board.long_tasks:
        for e in board.entries:
            cells = e.heatmaps.get(task)
            if not cells:
                continue
            lengths = sorted({L for L, _ in cells})
            depths = sorted({d for _, d in cells})
            z = [[cells.get((L, d)) for L in lengths] for d in depths]
            fig = go.Figure(
                go.Heatmap(
                    z=z,
                    x=[str(L) for L in lengths],
                    y=[f"{d:.2f}" for d in depths],
                    zmin=0,
                    zmax=1,
                    colorscale="RdYlGn",
                    text=[[("" if v is None else f"{v:.2f}") for v in row] for row in z],
                    texttemplate="%{text}",
                )
            )
            fig.update_layout(
                title=f"{task}: {e.label}",
                xaxis_title="context length (tokens)",
                yaxis_title="needle depth",
                width=380,
                height=300,
                margin={"l": 60, "r": 10, "t": 40, "b": 50},
            )
            out.append(fig.to_html(full_html=False, include_plotlyjs=False))
    return "".join(out)


def _table(board: Board) -> str:
    cols = columns(board)
    head = "".join(
        f'<th class="{"l" if h in ("variant", "frontier") else ""}">{html.escape(h)}</th>' for h, _ in cols
    )
    body = []
    for e in board.entries:
        cls = ' class="frontier"' if e.on_size_frontier else ""
        cells = "".join(
            f'<td class="{"l" if h in ("variant", "frontier") else ""}">{html.escape(fn(e))}</td>'
            for h, fn in cols
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f'<table id="leaderboard"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


# how a paired difference is shown: accuracies are fractions (shown in points), top-1 is already in %
_UNITS = {
    "acc": (100.0, " pts"),
    "acc_norm": (100.0, " pts"),
    "exact_match": (100.0, " pts"),
    "same_top_p": (1.0, " pts"),
    "kld_mean": (1.0, " nats"),
    "nll": (1.0, " nats/token"),
}


def _paired(board: Board) -> str:
    """Every variant's paired comparison with the reference, one row per (variant, metric)."""
    rows = []
    for e in board.entries:
        for key, p in sorted(e.paired.items()):
            scale, unit = _UNITS.get(p.metric, (1.0, ""))
            cells = (
                e.label,
                key,
                f"{scale * p.delta:+.4g}{unit}",
                f"[{scale * p.lo:+.4g}, {scale * p.hi:+.4g}]",
                p.n,
                "" if p.p_value is None else f"{p.p_value:.3g}",
                "distinguishable" if p.distinguishable else "not distinguishable (noise)",
                p.method,
            )
            rows.append(
                "<tr>" + "".join(f'<td class="l">{html.escape(str(c))}</td>' for c in cells) + "</tr>"
            )
    if not rows:
        return "<p>No paired comparisons: no variant shares measured items with the reference.</p>"
    head = "".join(
        f'<th class="l">{h}</th>'
        for h in ("variant", "metric", "variant − reference", "95% interval", "n", "McNemar p", "", "method")
    )
    return f'<table id="paired"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _provenance(entries: list[Entry]) -> str:
    rows = []
    for e in entries:
        for r in e.sources:
            rows.append(
                "<tr>"
                + "".join(
                    f'<td class="l">{html.escape(str(v))}</td>'
                    for v in (
                        e.label,
                        r.task,
                        r.metric,
                        "" if r.value is None else f"{r.value:.6g}",
                        "" if r.stderr is None else f"{r.stderr:.3g}",
                        r.n,
                        r.task_version,
                        r.model_sha256[:16],
                        r.machine,
                        r.tool_version,
                        r.time,
                        r.job_key[:12],
                    )
                )
                + "</tr>"
            )
    head = "".join(
        f'<th class="l">{h}</th>'
        for h in (
            "variant",
            "task",
            "metric",
            "value",
            "± stderr",
            "n",
            "task version",
            "model sha256",
            "machine",
            "tool",
            "time",
            "job",
        )
    )
    return f'<table id="provenance"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def render(board: Board) -> str:
    title = f"tinytitan leaderboard: {board.model}"
    plots = [
        _scatter(
            board,
            lambda e: None if e.size is None else e.size / 1e6,
            "file size (MB)",
            "on_size_frontier",
            True,
            "pareto-size",
            True,
        ),
        _scatter(
            board, lambda e: e.decode, "decode tokens/s", "on_speed_frontier", False, "pareto-speed", False
        ),
    ]
    configs = "".join(
        f"<li><b>{html.escape(e.label)}</b>: "
        f"<code>{html.escape(str(e.variant) if e.variant else 'the model as loaded')}</code></li>"
        for e in board.entries
    )
    made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    table = _table(board)  # first: it numbers the notes of blank cells
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in footnotes(board)[1:])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="note">Generated {made} from {html.escape(str(board.store))}.
KLD and top-1: mean KL divergence and same-top-token share of each variant against the reference on the
same tokens. {html.escape(QPS_DEFINITION)}. Red points lie on the Pareto frontier (no other variant is both
smaller, or faster, and closer to the reference).</p>
{table}
<ul class="note" id="notes">{notes}</ul>
<div class="plots">{"".join(plots)}</div>
<h2>Long context</h2>
<div class="plots">{_heatmaps(board) or "<p>No long-context results.</p>"}</div>
<h2>Paired comparisons with the reference</h2>
<p class="note">The same items scored by both models; an interval that includes zero is noise.</p>
{_paired(board)}
<h2>Variants</h2><ul>{configs}</ul>
<details><summary>Provenance of every number</summary>{_provenance(board.entries)}</details>
</body></html>
"""


def write_html(board: Board, path: Path) -> None:
    """The page, published atomically (a reader never sees half of it)."""
    atomic_write_text(path, render(board))
