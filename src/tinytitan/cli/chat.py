"""`tinytitan chat MODEL`: an interactive conversation using the model's chat template."""

from __future__ import annotations

import argparse
import sys

from tinytitan.cli.common import add_generation_args, load_model, sampling_kwargs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat interactively (the model's chat template)")
    p.add_argument("model", help="known name, .gguf path or Hugging Face checkpoint directory")
    p.add_argument("--system", default=None, help="a system message")
    add_generation_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model} — empty line or Ctrl-D to quit, /reset to start over")
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = model.chat_prompt_ids(messages)
        if interactive:
            print("model> ", end="", flush=True)
        reply = []
        for piece in model.stream(ids, **sampling_kwargs(args)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
