"""`tinytitan leaderboard`: the measured variants of a model, ranked by quality for their size."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("leaderboard", help="table, Markdown or HTML page of the measured variants")
    p.add_argument("--model", default=None, help="model name as swept (default: the latest measured)")
    p.add_argument("--store", default=None, help="results database (default ~/.cache/tinytitan)")
    p.add_argument("--md", default=None, help="write the table as Markdown to this file")
    p.add_argument("--html", default=None, help="write one self-contained HTML page (plots, provenance)")
    p.add_argument(
        "--budget",
        default=None,
        help="only the jobs a sweep of this budget runs (quick | standard | full), so every variant's cell "
        "of a task comes from the same items (default: each metric's latest measurement)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tinytitan.errors import TinyTitanError
    from tinytitan.report.leaderboard import build
    from tinytitan.store import default_store_path

    store = Path(args.store) if args.store else default_store_path()
    if not store.exists():
        raise TinyTitanError(f"no results store at {store}: run `tinytitan sweep MODEL` first")
    runs = None
    if args.budget:
        from tinytitan.sweep.plan import budget_tasks

        runs = budget_tasks(args.budget)
    board = build(store, args.model, runs)
    if not board.entries:
        raise TinyTitanError(f"no results for {args.model or 'any model'} in {store}")
    show(board, args.md, args.html)
    return 0


def show(board, md: str | None, html: str | None) -> None:
    """The table on the terminal, and the Markdown / HTML files when asked for."""
    from tinytitan.report.html import write_html
    from tinytitan.report.leaderboard import print_table, write_markdown

    print_table(board)
    if md:
        write_markdown(board, Path(md))
        print(f"wrote {md}")
    if html:
        write_html(board, Path(html))
        print(f"wrote {html}")
