"""`tinytitan sweep MODEL`: build a model's variants, measure them all (resumably), show the leaderboard."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  tinytitan sweep gemma-3-270m --data ../shared/data                 # the default variants, quick tasks
  tinytitan sweep gemma-3-270m --variants base,w8,w4g32-imatrix,plan:150MB --budget standard
  tinytitan sweep smollm2-135m-instruct --variants base,q8_0,w4g32 --tasks kld,speed
  tinytitan sweep gemma-3-270m --ray auto                             # jobs on a running Ray cluster

Ctrl-C stops; the same command resumes: finished jobs and items are read back from the store.
Budgets: quick (default), standard, full. Exit status 1 when a job failed, or when a task named with
--tasks could not run (no data, for instance); the budget's own tasks are skipped with their reason.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="build and measure a model's variants, then show the leaderboard",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="known name, .gguf path or checkpoint directory")
    p.add_argument("--variants", default=None, help="comma-separated: base, schemes, plan:150MB, plan:4bpw")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: the budget's set)")
    p.add_argument("--budget", default="quick", help="quick | standard | full (default quick)")
    p.add_argument("--data", action="append", default=[], help="a data folder, or TASK=FILE (repeatable)")
    p.add_argument("--calib", default=None, help="calibration text file (default: self-generated)")
    p.add_argument("--store", default=None, help="results database (default ~/.cache/tinytitan)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling and long-context prompts")
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="run jobs on Ray: auto, HOST:PORT or local")
    p.add_argument("--md", default=None, help="also write the leaderboard as Markdown to this file")
    p.add_argument("--html", default=None, help="also write the leaderboard page (one offline HTML file)")
    p.add_argument("--redo", default="", help="tasks to measure again although stored, e.g. speed")
    p.add_argument("--list", action="store_true", help="show the variants and tasks, run nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tinytitan.errors import TinyTitanError
    from tinytitan.store import default_store_path
    from tinytitan.sweep.plan import budget_tasks, parse_variants
    from tinytitan.sweep.run import SweepConfig, run_sweep

    variants = parse_variants(args.variants)
    tasks = budget_tasks(args.budget, args.tasks)
    calib = None
    if args.calib:
        try:
            calib = Path(args.calib).read_text(encoding="utf-8")
        except OSError as e:
            raise TinyTitanError(f"cannot read calibration text {args.calib}: {e.strerror}") from None
    store = Path(args.store) if args.store else default_store_path()
    redo = tuple(t.strip() for t in args.redo.split(",") if t.strip())
    unknown = [t for t in redo if t not in {r.task for r in tasks}]
    if unknown:
        raise TinyTitanError(
            f"--redo {unknown[0]}: not one of this sweep's tasks ({', '.join(r.task for r in tasks)})"
        )
    cfg = SweepConfig(
        args.model, variants, tasks, args.budget, list(args.data), calib, args.seed, store, redo=redo
    )
    if args.list:
        print("variants:", ", ".join(v.name for v in variants))
        for t in tasks:
            print(f"task {t.task}: {t.options or 'defaults'}")
        return 0
    from tinytitan.cli.progress import SweepBars

    bars = SweepBars()
    try:
        outcomes = run_sweep(cfg, bars, ray_address=args.ray)
    finally:
        bars.close()
    bad = [o for o in outcomes if o.status in ("failed", "skipped")]
    from rich.markup import escape

    for o in bad:
        bars.console.print(f"[yellow]{o.status}[/]: {escape(f'{o.variant} {o.task}: {o.message}')}")
    from tinytitan.cli.leaderboard import show
    from tinytitan.report.leaderboard import build

    show(build(store, args.model, tasks), args.md, args.html)
    # a task the user named that could not run is a failure of the command; the budget's own set
    # skips what has no data here and says so on the board
    named = {t.task for t in tasks} if args.tasks else set()
    return 1 if any(o.status == "failed" or (o.status == "skipped" and o.task in named) for o in bad) else 0
