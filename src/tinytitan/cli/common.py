"""Options shared by the subcommands that load a model and generate, and the one mapping from parsed
options to a config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

C = TypeVar("C")


def config_from_args(cls: type[C], args: argparse.Namespace, **given: Any) -> C:
    """A config dataclass from options named like its fields (`--batch-size` -> `batch_size`); `given`
    sets the fields whose option needs reading first (a list in one string, a negated flag)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {n: getattr(args, n) for n in names if hasattr(args, n)}
    return cls(**(values | given))


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--ctx", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--variant", default=None, help="quantize on the fly, e.g. w4g32 (quantize --list)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (tinytitan finetune) to apply")
    add_compile_arg(p)
    add_reference_arg(p)


def add_reference_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reference",
        action="store_true",
        help="dequantize a GGUF file's weights to float32 (the exact reference); default: run its blocks",
    )


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--compile",
        dest="compile",
        action="store_const",
        const=True,
        help="build the compiled decode step now if this machine has none for the model (~1 min, once), "
        "then decode with it; default: use it when stored, else build it in the background, decode eagerly",
    )
    g.add_argument("--no-compile", dest="compile", action="store_const", const=False, help="decode eagerly")


def load_model(args: argparse.Namespace):  # -> tinytitan.Model
    from tinytitan.loader import load

    return load(
        args.model,
        dtype=args.dtype,
        device=args.device,
        ctx=args.ctx,
        progress=True,
        variant=args.variant,
        adapter=args.adapter,
        compile=args.compile,
        reference=getattr(args, "reference", False),
    )


def sampling_kwargs(args: argparse.Namespace) -> dict[str, object]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
    }
