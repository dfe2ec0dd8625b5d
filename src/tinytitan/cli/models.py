"""`tinytitan models`: known names, whether they are installed and ready, and local GGUF files."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list known, installed and local models")
    p.add_argument("--dir", action="append", default=[], help="also list .gguf files in this folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tinytitan import zoo

    console = Console()
    table = Table(title="known models")
    for col in ("name", "package", "installed", "ready", "description"):
        table.add_column(col)
    for e in zoo.ZOO.values():
        table.add_row(
            e.name,
            e.package,
            "yes" if e.installed() else "no",
            str(e.target()) if e.ready() else "no (tinytitan pull)",
            e.description,
        )
    console.print(table)
    folders = [Path.cwd(), zoo.home() / "models", *map(Path, args.dir)]
    local = sorted({p.resolve() for d in folders if d.is_dir() for p in d.glob("*.gguf")})
    if local:
        t2 = Table(title="local GGUF files")
        t2.add_column("path")
        t2.add_column("size", justify="right")
        for p in local:
            t2.add_row(str(p), f"{p.stat().st_size / 1e6:.1f} MB")
        console.print(t2)
    return 0
