"""`tinytitan` entry point: dispatch to subcommands; user errors become one clean line, exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tinytitan.errors import TinyTitanError

EPILOG = """examples:
  tinytitan models
  tinytitan pull gemma-3-270m
  tinytitan run gemma-3-270m "The capital of France is" --max-tokens 32
  tinytitan chat smollm2-135m-instruct
"""


def build_parser() -> argparse.ArgumentParser:
    from tinytitan.cli import (
        chat,
        eval,
        finetune,
        leaderboard,
        models,
        pull,
        quantize,
        recommend,
        run,
        serve,
        sweep,
    )

    parser = argparse.ArgumentParser(
        prog="tinytitan",
        description="Tiny long-context language models, run, measured and shipped on ordinary hardware.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (models, pull, run, chat, quantize, serve, eval, sweep, leaderboard, recommend, finetune):
        module.register(sub)
    return parser


def _version() -> str:
    from tinytitan.version import __version__

    return f"tinytitan {__version__}"


_quick_exit = False  # set by a command whose process may end without tearing its objects down


def main(argv: Sequence[str] | None = None) -> int:
    global _quick_exit
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        rc = int(args.func(args) or 0)
        _quick_exit = bool(getattr(args, "quick_exit", False))
        return rc
    except TinyTitanError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message holds
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `tinytitan` command: main(); a command that wrote everything it had to (`run`) then ends the
    process without tearing its objects down (0.7 s for Gemma 3 270M's 262k-token vocabulary and torch)."""
    rc = main()
    if _quick_exit:
        import logging
        import os

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
