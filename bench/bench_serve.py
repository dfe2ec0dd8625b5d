"""Serving throughput: the real `tinytitan serve` process against llama.cpp's `llama-server`, same GGUF, same
threads, the same streaming load, side by side in one run.

    python bench/bench_serve.py --model gemma-3-270m --clients 1 4 8 16
    python bench/bench_serve.py --model smollm2-135m-instruct --requests 2 --json bench/serve_smollm2.json

For each number of concurrent clients N, each server is started fresh with N slots (`tinytitan serve
--max-active N`; `llama-server -np N -c N*512`, continuous batching on, its default), given one warm-up
request, then N clients each stream `--requests` completions one after another: a prompt of `--prompt`
tokens (distinct windows of the evaluation pack's WikiText-2 text, sent as token ids, so both servers see
the same tokens), greedy, `--max-tokens` tokens, no stop but the model's own end of sequence. Aggregate
tokens/s = completion tokens / wall time of the whole load; time to first token (TTFT) and the gaps between
streamed tokens (inter-token latency, ITL) as p50 / p95 over all requests. Our server's stored compiled step
is built first (`tinytitan pull`), so no request waits on compilation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchors import build_info, tool

PACK_TEXT = Path(__file__).resolve().parents[1] / "src/tinytitan/eval/pack/wikitext-2-test-head.txt"


@dataclass
class Sample:
    ttft: float  # seconds from sending to the first streamed token
    gaps: list[float] = field(default_factory=list)  # seconds between streamed tokens
    tokens: int = 0  # completion tokens (the server's usage when it reports one, else streamed chunks)
    error: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(model: str, n: int, length: int) -> list[list[int]]:
    """n distinct windows of `length` token ids (BOS first where the model wants one)."""
    import tinytitan as tt

    tok = tt.load(model, compile=False).tokenizer
    ids = tok.encode(PACK_TEXT.read_text(encoding="utf-8"), add_bos=False)
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    body = length - len(bos)
    stride = max(1, (len(ids) - body) // max(1, n))
    return [bos + ids[i * stride : i * stride + body] for i in range(n)]


def one_request(client: httpx.Client, url: str, body: dict) -> Sample:
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    try:
        with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                r.read()
                return Sample(0.0, error=f"HTTP {r.status_code}: {r.text[:80]}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Sample(0.0, error=str(chunk["error"])[:80])
                if any(c.get("text") for c in chunk.get("choices", [])):
                    stamps.append(time.perf_counter())
                if chunk.get("usage"):
                    usage = chunk["usage"].get("completion_tokens")
    except httpx.HTTPError as e:
        return Sample(0.0, error=f"{type(e).__name__}: {e}")
    if not stamps:
        return Sample(0.0, error="no token streamed")
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return Sample(stamps[0] - t0, gaps, usage if usage else len(stamps))


def load(base: str, model_id: str, clients: int, requests: int, ids: list[list[int]], max_tokens: int):
    url = f"{base}/v1/completions"

    def body(i: int) -> dict:
        return {
            "model": model_id, "prompt": ids[i], "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip

    def client_run(c: int) -> list[Sample]:
        # a connection per request: llama-server closes an idle keep-alive connection, and a request sent
        # on it then fails (counted against it although the server was fine)
        out = []
        for r in range(requests):
            with httpx.Client(timeout=600) as client:
                out.append(one_request(client, url, body(c * requests + r)))
        return out

    with httpx.Client(timeout=600) as client:  # warm-up: not timed
        one_request(client, url, {**body(len(ids) - 1), "max_tokens": 8})
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        samples = [s for part in pool.map(client_run, range(clients)) for s in part]
    return samples, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summary(samples: list[Sample], wall: float) -> dict:
    ok = [s for s in samples if s.error is None]
    gaps = [g for s in ok for g in s.gaps]
    tokens = sum(s.tokens for s in ok)
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "error_examples": sorted({s.error for s in samples if s.error})[:3],
        "completion_tokens": tokens,
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall if wall > 0 else None,
        "ttft_p50_s": pct([s.ttft for s in ok], 0.5),
        "ttft_p95_s": pct([s.ttft for s in ok], 0.95),
        "itl_p50_ms": None if not gaps else 1000 * pct(gaps, 0.5),
        "itl_p95_ms": None if not gaps else 1000 * pct(gaps, 0.95),
    }


class Server:
    """A server process, started and waited for; stopped on exit."""

    def __init__(self, cmd: list[str], port: int, env: dict[str, str] | None = None, log: Path | None = None):
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(log or os.devnull, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{cmd[0]} exited ({self.proc.returncode}); see {log}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"{cmd[0]} did not become healthy in 300 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def ours(model: str, n: int, threads: int, ctx: int, log: Path) -> Server:
    port = free_port()
    exe = Path(sys.executable).with_name("tinytitan")
    cmd = [str(exe), "serve", model, "--port", str(port), "--max-active", str(n), "--ctx", str(ctx),
           "--max-queue", str(4 * n + 8), "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return Server(cmd, port, env, log)


def llama(gguf: Path, n: int, threads: int, log: Path) -> Server:
    port = free_port()
    cmd = [str(tool("llama-server")), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
           "-np", str(n), "-c", str(512 * n), "--port", str(port), "--host", "127.0.0.1",
           "--no-webui"]  # fmt: skip
    return Server(cmd, port, None, log)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=2, help="requests each client sends in turn (default 2)")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens (default 256)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()

    from tinytitan import zoo

    gguf = zoo.resolve(args.model)
    exe = Path(sys.executable).with_name("tinytitan")
    subprocess.run([str(exe), "pull", args.model], check=True, capture_output=True)  # its compiled step
    ids = prompts(args.model, max(args.clients) * args.requests + 1, args.prompt)
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    rows = []
    for n in args.clients:
        for name, start in (
            ("tinytitan", lambda n=n: ours(args.model, n, args.threads, 512, logs / "bench_serve_ours.log")),
            ("llama-server", lambda n=n: llama(gguf, n, args.threads, logs / "bench_serve_llama.log")),
        ):
            server = start()
            try:
                samples, wall = load(server.base, args.model, n, args.requests, ids, args.max_tokens)
            finally:
                server.stop()
            row = {"server": name, "clients": n, **summary(samples, wall)}
            rows.append(row)
            print(f"{name:>12} N={n:<3} {_line(row)}", flush=True)
    print()
    print(table(rows))
    if args.json:
        meta = {
            "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": args.threads, "model": args.model, "gguf": str(gguf),
            "prompt_tokens": args.prompt, "max_tokens": args.max_tokens, "requests_per_client": args.requests,
            "llama_cpp": build_info(), "command": " ".join(sys.argv),
        }  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _line(r: dict) -> str:
    return (
        f"{_num(r['aggregate_tok_s'], '7.1f')} tok/s  TTFT p50 {_num(r['ttft_p50_s'], '.2f')} p95 "
        f"{_num(r['ttft_p95_s'], '.2f')} s  ITL p50 {_num(r['itl_p50_ms'], '.0f')} p95 "
        f"{_num(r['itl_p95_ms'], '.0f')} ms  errors {r['errors']}"
    )


def table(rows: list[dict]) -> str:
    by = {(r["server"], r["clients"]): r for r in rows}
    single = by.get(("tinytitan", 1))
    lines = [
        "| clients | ours tok/s | llama-server tok/s | ratio | ours TTFT p50/p95 s | llama TTFT p50/p95 s "
        "| ours ITL p50/p95 ms | llama ITL p50/p95 ms | ours vs our 1 client | errors (ours/llama) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted({r["clients"] for r in rows}):
        a, b = by.get(("tinytitan", n)), by.get(("llama-server", n))
        if a is None or b is None or not a["aggregate_tok_s"] or not b["aggregate_tok_s"]:
            continue
        scale = f"{a['aggregate_tok_s'] / single['aggregate_tok_s']:.2f}x" if single else ""
        cells = [
            str(n), _num(a["aggregate_tok_s"], ".1f"), _num(b["aggregate_tok_s"], ".1f"),
            f"{a['aggregate_tok_s'] / b['aggregate_tok_s']:.2f}",
            f"{_num(a['ttft_p50_s'], '.2f')} / {_num(a['ttft_p95_s'], '.2f')}",
            f"{_num(b['ttft_p50_s'], '.2f')} / {_num(b['ttft_p95_s'], '.2f')}",
            f"{_num(a['itl_p50_ms'], '.0f')} / {_num(a['itl_p95_ms'], '.0f')}",
            f"{_num(b['itl_p50_ms'], '.0f')} / {_num(b['itl_p95_ms'], '.0f')}",
            scale, f"{a['errors']} / {b['errors']}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
