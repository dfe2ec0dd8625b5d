"""`tinytitan pull NAME`: make a known model ready (assemble its chunks, verify its sha256)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="make a known model ready to load")
    p.add_argument("name", help="a known model name (see `tinytitan models`)")
    p.add_argument("--force", action="store_true", help="assemble again even if the file exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tinytitan import zoo

    path = zoo.pull(args.name, progress=True, force=args.force)
    print(f"{args.name}: ready at {path}")
    return 0
