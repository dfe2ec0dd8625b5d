"""Batched decode steps: our decode step on B rows at once beside llama.cpp's `llama-batched-bench` (same
GGUF, same threads, same prompt length per row), in one run.

    python bench/bench_batch_step.py --model gemma-3-270m --rows 1 4 8 16

Ours: B rows are each prefilled with `--prompt` tokens into one static cache (their own rows), then
`--steps` decode steps run all B rows in one forward through the model's decode step (the stored compiled
step, built first if missing, as `tinytitan pull` does); tokens/s = B x steps / time. llama.cpp:
`llama-batched-bench -npp PROMPT -ntg STEPS -npl B` reports S_TG, its generation tokens/s over B parallel
sequences. Both exclude the prefill.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchors import tool


def ours(model, rows: int, prompt: int, steps: int) -> float:
    from tinytitan.engine import _prefill_chunk

    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * (prompt // 8 + 2))[:prompt]
    with torch.inference_mode():
        cache = model.new_cache(prompt + steps + 8, rows, static=True)
        for r in range(rows):
            _prefill_chunk(model.module, ids, cache.row(r), 0, "cpu")
        tok = torch.full((rows, 1), 5)
        for i in range(3):  # warm-up (not timed)
            model.decode_step(tok, cache, torch.full((rows,), prompt + i))
        t0 = time.perf_counter()
        for i in range(steps):
            model.decode_step(tok, cache, torch.full((rows,), prompt + 3 + i))
        return rows * steps / (time.perf_counter() - t0)


def llama(gguf: Path, rows: list[int], prompt: int, steps: int, threads: int) -> dict[int, float]:
    cmd = [str(tool("llama-batched-bench")), "-m", str(gguf), "-c", str(max(rows) * (prompt + steps + 8)),
           "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(steps),
           "-npl", ",".join(map(str, rows)), "-t", str(threads), "-tb", str(threads),
           "--output-format", "jsonl"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            found[int(d["pl"])] = float(d["speed_tg"])
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import tinytitan as tt
    from tinytitan import zoo

    model = tt.load(args.model, compile=True)  # the stored step, built now when missing
    mine = {b: ours(model, b, args.prompt, args.steps) for b in args.rows}
    del model
    theirs = llama(zoo.resolve(args.model), args.rows, args.prompt, args.steps, args.threads)
    print(f"{args.model}, {args.threads} threads, {args.prompt}-token rows, {args.steps} steps")
    print("| rows | ours tok/s | llama.cpp S_TG tok/s | ratio |\n|---|---|---|---|")
    for b in args.rows:
        t = theirs.get(b)
        ratio = f"{mine[b] / t:.2f}" if t else "-"
        print(f"| {b} | {mine[b]:.1f} | {'-' if t is None else f'{t:.1f}'} | {ratio} |")
    if args.json:
        rows = [{"rows": b, "ours_tok_s": mine[b], "llama_tok_s": theirs.get(b)} for b in args.rows]
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
