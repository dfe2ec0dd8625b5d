"""The background build of a stored compiled decode step: `python -m tinytitan.aot_build --key KEY ...`,
started by tinytitan.aot_step.build_in_background. It loads the model as the arguments say, checks that it
is the model whose key the parent computed, then builds and stores its step."""

from __future__ import annotations

import argparse
import sys

from tinytitan.aot_step import build, step_key, steps_dir
from tinytitan.loader import load
from tinytitan.runtime import DTYPES


def main(argv: list[str] | None = None) -> int:
    """The background build: load the model as the arguments say, check that it is the model whose key
    the parent computed, build and store its step."""
    p = argparse.ArgumentParser(prog="python -m tinytitan.aot_build")
    p.add_argument("--key", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cache-dtype", default="float32")
    p.add_argument("--reference", action="store_true")
    args = p.parse_args(argv)
    lock = steps_dir() / f".{args.key}.building"
    try:
        model = load(args.path, dtype=args.dtype, device="cpu", reference=args.reference, compile=False)
        cache_dtype = DTYPES[args.cache_dtype]
        key = step_key(model.module, model.config, model.dtype, cache_dtype)
        if key != args.key:
            print(f"the model loaded from {args.path} has key {key}, not {args.key}: nothing built")
            return 1
        folder = build(model.module, model.config, model.dtype, cache_dtype)
        print(f"built {folder}")
        return 0
    finally:
        lock.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
