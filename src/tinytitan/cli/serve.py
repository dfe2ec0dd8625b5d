"""`tinytitan serve MODEL`: an OpenAI-compatible HTTP server (loopback only unless told otherwise)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from tinytitan.cli.common import add_compile_arg, add_reference_arg
from tinytitan.errors import TinyTitanError

EPILOG = """examples:
  tinytitan serve smollm2-135m-instruct                      # http://127.0.0.1:8000/v1
  tinytitan serve gemma-3-270m --port 8080 --api-key s3cret  # clients send Authorization: Bearer s3cret
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}'
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="known name, .gguf path or Hugging Face checkpoint directory")
    p.add_argument("--variant", default=None, help="a quantized variant of the model")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (tinytitan finetune) to apply")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("TINYTITAN_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $TINYTITAN_API_KEY)",
    )
    p.add_argument("--served-name", default=None, help="the model id clients use (default: MODEL)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="most tokens per choice (default 1024)")
    p.add_argument("--max-active", type=int, default=8, help="sequences decoded as one batch (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="choices that may wait for a slot (default 64)")
    p.add_argument(
        "--max-request-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)"
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a request body may take to arrive; then 408 and the connection closes (default 30)",
    )
    p.add_argument(
        "--parse-special",
        action="store_true",
        help="read special-token texts inside chat messages as special tokens (default: plain text, so a"
        " client cannot forge turns such as '<|im_start|>system')",
    )
    p.add_argument("--ctx", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    add_compile_arg(p)
    add_reference_arg(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def load_for_serving(args: argparse.Namespace):  # -> tinytitan.Model
    from tinytitan.loader import load

    kwargs = {"dtype": args.dtype, "device": args.device, "ctx": args.ctx, "progress": True}
    kwargs["reference"] = getattr(args, "reference", False)
    if args.variant is not None:
        kwargs["variant"] = args.variant
    if getattr(args, "adapter", None):
        kwargs["adapter"] = args.adapter
    if getattr(args, "compile", None) is not None:
        kwargs["compile"] = args.compile
    return load(args.model, **kwargs)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads so a busy port fails fast and cleanly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise TinyTitanError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from tinytitan.serve import ServeConfig, create_app

    for name in ("max_tokens_limit", "max_active", "max_queue", "max_request_bytes"):
        if getattr(args, name) < 1:
            raise TinyTitanError(f"--{name.replace('_', '-')} must be at least 1")
    if not args.body_timeout > 0:
        raise TinyTitanError("--body-timeout must be more than 0 seconds")
    sock = bind(args.host, args.port)
    model = load_for_serving(args)
    config = ServeConfig(
        model_id=args.served_name or args.model,
        api_key=args.api_key or None,
        max_tokens_limit=args.max_tokens_limit,
        max_active=args.max_active,
        max_queue=args.max_queue,
        max_request_bytes=args.max_request_bytes,
        body_timeout_s=args.body_timeout,
        parse_special=args.parse_special,
    )
    host, port = sock.getsockname()[:2]
    if not _is_loopback(args.host) and not config.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)  # fmt: skip
    url_host = f"[{host}]" if ":" in host else host
    print(f"serving {config.model_id} at http://{url_host}:{port}/v1 (Ctrl-C to stop)", flush=True)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(model, config),
            log_level=args.log_level,
            limit_concurrency=config.max_queue + config.max_active + 16,  # beyond that: 503 at once
            timeout_graceful_shutdown=5,
        )
    )
    server.run(sockets=[sock])
    return 0
