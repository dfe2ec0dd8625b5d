"""`tinytitan pull NAME`: make a known model ready (assemble its chunks, verify its sha256)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="make a known model ready to load")
    p.add_argument("name", help="a known model name (see `tinytitan models`)")
    p.add_argument("--force", action="store_true", help="assemble again even if the file exists")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="do not build the compiled decode step (default: build it now, ~1 min once per machine)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tinytitan import zoo

    path = zoo.pull(args.name, progress=True, force=args.force)
    print(f"{args.name}: ready at {path}")
    if not args.no_compile:
        from tinytitan.loader import load

        model = load(path, device="cpu", compile=False)
        if model.device.type == "cpu":
            print("building the compiled decode step (about a minute, once per machine) ...", flush=True)
            model.set_compile(True)
            step = model.decode_step.stored_step(model.new_cache(1, static=True))
            print(f"compiled decode step: {step.folder if step else 'not stored (see the warning above)'}")
    return 0
