"""`tinytitan run MODEL "prompt"`: stream a continuation to the terminal as tokens are made."""

from __future__ import annotations

import argparse
import sys
import time

from tinytitan.cli.common import add_generation_args, load_model, sampling_kwargs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate a continuation of a prompt, streamed")
    p.add_argument("model", help="known name, .gguf path or Hugging Face checkpoint directory")
    p.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--stats", action="store_true", help="print timing to stderr at the end")
    add_generation_args(p)
    p.set_defaults(func=run, quick_exit=True)


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    t0 = time.perf_counter()
    model = load_model(args)
    t1 = time.perf_counter()
    n = 0
    first = None
    for piece in model.stream(prompt, stop=args.stop, **sampling_kwargs(args)):
        if first is None:
            first = time.perf_counter()
        sys.stdout.write(piece)
        sys.stdout.flush()
        n += 1
    sys.stdout.write("\n")
    if args.stats:
        end = time.perf_counter()
        ttft = (first or end) - t1
        print(
            f"[load {t1 - t0:.2f} s, first token {ttft:.2f} s, {n} pieces in {end - t1:.2f} s]",
            file=sys.stderr,
        )
    return 0
