"""Where a cold start's seconds go: process start to the first generated token, the no-flag path.

    python bench/bench_cold_start.py [--models gemma-3-270m smollm2-135m-instruct] [--repeat 3]

Each run is a fresh process that times its own phases with perf_counter: the torch import, tinytitan's
imports, the GGUF header, the tokenizer, the block kernel's library, `tinytitan.load` (which reads the header
and builds the tokenizer again, then the module over the file's blocks) and the first token of
`complete("hi", max_tokens=1)`; beside them, the whole `tinytitan run MODEL hi --max-tokens 1` command's wall
time. The anchor, in the same run: llama.cpp's `llama-bench -p 0 -n 1 -r 1
--no-warmup` on the same file and threads (process start, load, one token; `make anchors`). Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PHASES = r"""
import time, json, sys
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
torch.set_num_threads(2)
import tinytitan
from tinytitan import zoo
from tinytitan.io.gguf import GGUFFile
from tinytitan.tokenizer import Tokenizer
from tinytitan.quant import ggml_matrix
t2 = time.perf_counter()
path = zoo.resolve(sys.argv[1])
f = GGUFFile(path)
cfg = f.config()
t3 = time.perf_counter()
Tokenizer.from_gguf(dict(f.fields))
t4 = time.perf_counter()
ggml_matrix.available()
t5 = time.perf_counter()
m = tinytitan.load(sys.argv[1])
t6 = time.perf_counter()
m.complete("hi", max_tokens=1)
t7 = time.perf_counter()
print(json.dumps({"import torch": t1 - t0, "import tinytitan": t2 - t1, "GGUF header": t3 - t2,
                  "tokenizer": t4 - t3, "kernel library": t5 - t4,
                  "load (header + tokenizer + blocks)": t6 - t5, "first token": t7 - t6}))
"""


def phases(model: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", PHASES, model], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def cli_wall(model: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "tinytitan", "run", model, "hi", "--max-tokens", "1", "--device", "cpu"]
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True, env=env)
    return time.perf_counter() - t


def llama_one_token(model: str) -> float | None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from anchors import tool
    from tinytitan import zoo

    try:
        bench = tool("llama-bench")
    except Exception:  # no anchors built: no anchor figure
        return None
    cmd = [str(bench), "-m", str(zoo.resolve(model)), "-p", "0", "-n", "1", "-r", "1", "-t", "2"]
    cmd.append("--no-warmup")
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m-instruct"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    phases(args.models[0])  # the kernel's build and the page cache warm: a second run is measured
    for model in args.models:
        runs, walls, anchor = [], [], []
        for _ in range(args.repeat):  # alternating, so drifting machine load hits every figure alike
            runs.append(phases(model))
            walls.append(cli_wall(model))
            anchor.append(llama_one_token(model))
        print(f"\n{model}: median of {args.repeat} fresh processes")
        print("| phase | s |\n|---|---:|")
        for k in runs[0]:
            print(f"| {k} | {statistics.median(r[k] for r in runs):.2f} |")
        wall = statistics.median(walls)
        print(f"| `tinytitan run {model} hi --max-tokens 1`, whole command | {wall:.2f} |")
        if all(a is not None for a in anchor):
            print(
                f"| llama.cpp: `llama-bench -p 0 -n 1 -r 1 --no-warmup`, whole command | "
                f"{statistics.median(anchor):.2f} |"
            )


if __name__ == "__main__":
    main()
