"""The long fuzz run: the generators of the fuzz suite (tests/fuzzing.py) for 10,000+ cases.

    python bench/bench_fuzz.py [--seed 1] [--gguf 5000] [--manifest 2000] [--safetensors 2000]
                               [--templates 500] [--http 1000]

Every case must end in success or one of tinytitan's own errors with a one-line message. Model files,
manifests, safetensors headers and templates run in this process; the HTTP bodies go to a real
`tinytitan serve` process on the fuzz model (started here, on a free port), whose /health must still
answer at the end. Prints the counts per kind and result, the slowest case of each kind and every failure
with the (kind, seed, index) that regenerates it; exits 1 when any case failed. The seed-0 prefix of each
kind is what `make test` runs (tests/test_fuzz.py): use another seed here.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import fuzzing as fz  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tinytitan serve` on the fuzz model, in its own process."""

    def __init__(self, model: Path, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tinytitan", "serve", str(model), "--port", str(self.port),
               "--served-name", "fuzz", "--max-tokens-limit", "16", "--log-level", "error"]  # fmt: skip
        self.log = log.open("w")
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise SystemExit(f"tinytitan serve did not become healthy (log: {log})")

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def _run(progress: Progress, label: str, n: int, outcomes: Iterator[fz.Outcome]) -> list[fz.Outcome]:
    task = progress.add_task(label, total=n)
    done = []
    for o in outcomes:
        done.append(o)
        progress.advance(task)
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gguf", type=int, default=5000)
    ap.add_argument("--manifest", type=int, default=2000)
    ap.add_argument("--safetensors", type=int, default=2000)
    ap.add_argument("--templates", type=int, default=500)
    ap.add_argument("--http", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = ap.parse_args()
    import tinytitan as tt

    console = Console()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tinytitan-fuzz-") as tmp:
        work = Path(tmp)
        base = work / "fuzz.gguf"
        base.write_bytes(fz.base_gguf("gemma3").to_bytes())
        fz.load_and_run(base)  # first-use costs outside the cases
        arts = fz.make_artifacts(work / "artifacts")
        fixtures = ROOT / "tests" / "fixtures"
        st_bases = [*arts, fixtures / "hf_tiny_llama", fixtures / "hf_tiny_gemma3"]
        tokenizer = tt.load(base, compile=False).tokenizer
        rss0 = psutil.Process().memory_info().rss
        t_all = time.perf_counter()
        with Progress(console=console) as progress:
            kinds = {
                "gguf": (args.gguf, lambda n: fz.gguf_outcomes(args.seed, n, work / "gguf")),
                "manifest": (args.manifest, lambda n: fz.manifest_outcomes(arts, args.seed, n, work / "m")),
                "safetensors": (
                    args.safetensors,
                    lambda n: fz.safetensors_outcomes(st_bases, args.seed, n, work / "st"),
                ),
                "template": (args.templates, lambda n: fz.template_outcomes(tokenizer, args.seed, n)),
            }
            for kind, (n, make) in kinds.items():
                t0 = time.perf_counter()
                done = _run(progress, kind, n, make(n))
                results[kind] = {**fz.summarize(done), "seconds": round(time.perf_counter() - t0, 1)}
            if args.http:
                server = Server(base, work / "serve.log")
                try:
                    srv0 = server.rss()
                    t0 = time.perf_counter()
                    done = _run(
                        progress, "http", args.http, fz.http_outcomes(server.url, args.seed, args.http)
                    )
                    results["http"] = {**fz.summarize(done), "seconds": round(time.perf_counter() - t0, 1)}
                    health = httpx.get(f"{server.url}/health", timeout=10).json()
                    results["http"]["healthy_after"] = health.get("status") == "ok"
                    results["http"]["server_rss_growth_mib"] = round((server.rss() - srv0) / 2**20, 1)
                finally:
                    server.close()
        growth = (psutil.Process().memory_info().rss - rss0) / 2**20
    table = Table(title=f"fuzz seed {args.seed}: {sum(r['cases'] for r in results.values())} cases")
    for col in ("kind", "cases", "results", "slowest case (s)", "failures", "seconds"):
        table.add_column(col)
    for kind, r in results.items():
        counts = ", ".join(f"{k} {v}" for k, v in r["counts"].items())
        table.add_row(kind, str(r["cases"]), counts, str(r["slowest"][2] if r["slowest"] else "-"),
                      str(len(r["failures"])), str(r["seconds"]))  # fmt: skip
    console.print(table)
    console.print(f"this process's resident memory grew {growth:.0f} MiB over the file kinds; total "
                  f"{time.perf_counter() - t_all:.0f} s")  # fmt: skip
    if "http" in results:
        h = results["http"]
        console.print(
            f"server healthy after: {h['healthy_after']}; its memory grew {h['server_rss_growth_mib']} MiB"
        )
    failures = [(k, args.seed, *f) for k, r in results.items() for f in r["failures"]]
    for f in failures[:50]:
        console.print(f"FAIL {f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if failures or not results.get("http", {}).get("healthy_after", True) else 0


if __name__ == "__main__":
    raise SystemExit(main())
