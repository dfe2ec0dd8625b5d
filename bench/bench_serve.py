"""A bounded load run against `tinytitan serve` on loopback: requests/s, latency, time to first token.

    python bench/bench_serve.py --requests 16 --concurrency 4            # starts its own server
    python bench/bench_serve.py --url http://127.0.0.1:8000 --api-key K  # or measures a running one

Each request streams a completion (greedy, `--max-tokens` tokens) and asks for usage, so the table
counts the tokens the server says it generated. Prompts rotate through a small fixed set; with
`--concurrency 1` the run measures single-stream latency, above it how the worker's interleaving
shares the machine.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List five uses for a paperclip.",
    "Describe the water cycle to a child.",
]


@dataclass
class Sample:
    latency: float  # seconds from sending to the last byte
    ttft: float  # seconds to the first content
    tokens: int  # completion tokens, as the server's usage reports them
    error: str | None = None


def one_request(client: httpx.Client, url: str, body: dict, headers: dict[str, str]) -> Sample:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                r.read()
                return Sample(time.perf_counter() - t0, 0.0, 0, f"HTTP {r.status_code}: {r.text[:80]}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Sample(time.perf_counter() - t0, 0.0, 0, chunk["error"]["message"][:80])
                if ttft is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return Sample(time.perf_counter() - t0, 0.0, 0, f"{type(e).__name__}: {e}")
    end = time.perf_counter() - t0
    return Sample(end, end if ttft is None else ttft, tokens)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def run_load(base: str, args: argparse.Namespace, model_id: str) -> tuple[list[Sample], float]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = f"{base}/v1/chat/completions"

    def body(i: int) -> dict:
        return {
            "model": model_id,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    limits = httpx.Limits(max_connections=args.concurrency)
    with httpx.Client(timeout=args.timeout, limits=limits) as client:
        one_request(client, url, {**body(0), "max_tokens": 1}, headers)  # warm up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            samples = list(
                pool.map(lambda i: one_request(client, url, body(i), headers), range(args.requests))
            )
        wall = time.perf_counter() - t0
    return samples, wall


def report(samples: list[Sample], wall: float, args: argparse.Namespace) -> None:
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.tokens for s in ok)
    lat, ttft = [s.latency for s in ok], [s.ttft for s in ok]
    rows = [
        ("requests", f"{len(samples)} ({len(samples) - len(ok)} failed)"),
        ("concurrency", str(args.concurrency)),
        ("max tokens", str(args.max_tokens)),
        ("wall time", f"{wall:.2f} s"),
        ("requests/s", f"{len(ok) / wall:.2f}"),
        ("latency p50 / p95", f"{percentile(lat, 0.5):.2f} / {percentile(lat, 0.95):.2f} s"),
        ("first token p50 / p95", f"{percentile(ttft, 0.5):.2f} / {percentile(ttft, 0.95):.2f} s"),
        ("completion tokens", str(tokens)),
        ("tokens/s (all streams)", f"{tokens / wall:.1f}"),
        ("tokens/s per stream", f"{statistics.mean(s.tokens / s.latency for s in ok):.1f}" if ok else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  {'-' * 24}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for s in samples:
        if s.error:
            print(f"error: {s.error}", file=sys.stderr)
            break


def start_server(args: argparse.Namespace):  # -> (base url, stop function)
    import uvicorn

    import tinytitan as tt
    from tinytitan.serve import ServeConfig, create_app

    model = tt.load(args.model, dtype=args.dtype, device=args.device)
    app = create_app(
        model, ServeConfig(model_id=args.model, api_key=args.api_key, max_active=args.max_active)
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit("the server did not start")
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)

    host, port = sock.getsockname()
    return f"http://{host}:{port}", stop


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model to load (or the id at --url)")
    p.add_argument("--url", default=None, help="measure a running server instead of starting one")
    p.add_argument("--api-key", default=None)
    p.add_argument("--requests", type=int, default=32, help="requests in the run (1..10000)")
    p.add_argument("--concurrency", type=int, default=4, help="clients sending at once (1..256)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-active", type=int, default=8, help="the started server's --max-active")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default=None)
    args = p.parse_args()
    if not 1 <= args.requests <= 10000 or not 1 <= args.concurrency <= 256 or args.max_tokens < 1:
        p.error("--requests must be in 1..10000, --concurrency in 1..256, --max-tokens at least 1")
    stop = None
    base = args.url
    if base is None:
        base, stop = start_server(args)
    try:
        samples, wall = run_load(base.rstrip("/"), args, args.model)
    finally:
        if stop is not None:
            stop()
    report(samples, wall, args)
    return 0 if all(s.error is None for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
