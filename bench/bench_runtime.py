"""Runtime benchmark: tinytitan vs llama.cpp (llama-cpp-python) on the same GGUF and threads.

    python bench/bench_runtime.py [--models gemma-3-270m smollm2-135m-instruct] [--threads 2] [--long]

Each measurement runs in a fresh subprocess, so peak RSS is that of one engine doing one job:
load time, prefill tokens/s (512-token prompt), decode tokens/s (128 tokens after it), peak RSS, and with
--long the peak RSS (and time) of a 32,768-token prompt on Gemma 3 270M. Prints ours, llama.cpp and
the ratio; `--json FILE` keeps the raw numbers. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_text() -> str:
    if TEXT.exists():
        return TEXT.read_text(encoding="utf-8")[:400_000]
    return "The history of the city begins with a small fishing village on the river. " * 4000


def worker_ours(model: str, task: str, threads: int, dtype: str, variant: str | None) -> dict:
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    import tinytitan as tt
    from tinytitan.engine import prefill

    m = tt.load(model, dtype=dtype, variant=variant)
    load_s = time.perf_counter() - t0
    ids = m.tokenizer.encode(prompt_text(), add_bos=True)
    out: dict = {"load_s": load_s}
    if task == "speed":
        prompt = ids[:512]
        with torch.inference_mode():
            cache = m.new_cache(1024)
            t = time.perf_counter()
            logits = prefill(m.module, prompt, cache, device=m.device)
            out["prefill_tps"] = len(prompt) / (time.perf_counter() - t)
        with torch.inference_mode():
            cache = m.new_cache(1024)
            logits = prefill(m.module, prompt, cache, device=m.device)
            tok = int(logits.argmax())
            t = time.perf_counter()
            for i in range(128):
                x = torch.tensor([[tok]])
                tok = int(m.module(x, cache=cache, start=len(prompt) + i, last_only=True)[0, -1].argmax())
            out["decode_tps"] = 128 / (time.perf_counter() - t)
    elif task == "long":
        prompt = ids[:32768]
        t = time.perf_counter()
        with torch.inference_mode():
            cache = m.new_cache(len(prompt) + 1)
            prefill(m.module, prompt, cache, device=m.device)
        out["long_prompt_tokens"] = len(prompt)
        out["long_s"] = time.perf_counter() - t
        out["kv_bytes"] = cache.nbytes()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def worker_llama(model: str, task: str, threads: int) -> dict:
    t0 = time.perf_counter()
    import llama_cpp

    from tinytitan import zoo

    path = str(zoo.resolve(model))
    n_ctx = 32768 + 8 if task == "long" else 1024
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    load_s = time.perf_counter() - t0
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
    ids = llm.tokenize(prompt_text().encode(), add_bos=add_bos)
    out: dict = {"load_s": load_s}
    if task == "speed":
        prompt = ids[:512]
        t = time.perf_counter()
        llm.eval(prompt)
        out["prefill_tps"] = len(prompt) / (time.perf_counter() - t)
        import numpy as np

        n_vocab = llm.n_vocab()

        def last_logits() -> np.ndarray:  # the newest position's logits (no logits_all copy)
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

        tok = int(np.argmax(last_logits()))
        t = time.perf_counter()
        for _ in range(128):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
        out["decode_tps"] = 128 / (time.perf_counter() - t)
    elif task == "long":
        prompt = ids[:32768]
        t = time.perf_counter()
        llm.eval(prompt)
        out["long_prompt_tokens"] = len(prompt)
        out["long_s"] = time.perf_counter() - t
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_worker(engine: str, model: str, task: str, threads: int, dtype: str, variant: str | None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        engine,
        "--models",
        model,
        "--task",
        task,
        "--threads",
        str(threads),
        "--dtype",
        dtype,
    ]
    if variant:
        cmd += ["--variant", variant]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{engine} {model} {task} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m-instruct"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--variant", default=None, help="a tinytitan variant for our side (e.g. w8, w4g32)")
    ap.add_argument("--long", action="store_true", help="also the 32K-token prompt on Gemma 3 270M")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", choices=["ours", "llama"], default=None)
    ap.add_argument("--task", default="speed")
    args = ap.parse_args()
    if args.worker:
        if args.worker == "ours":
            res = worker_ours(args.models[0], args.task, args.threads, args.dtype, args.variant)
        else:
            res = worker_llama(args.models[0], args.task, args.threads)
        print(json.dumps(res))
        return
    rows = []
    for model in args.models:
        tasks = ["speed"] + (["long"] if args.long and model.startswith("gemma") else [])
        for task in tasks:
            ours = run_worker("ours", model, task, args.threads, args.dtype, args.variant)
            ref = run_worker("llama", model, task, args.threads, args.dtype, None)
            rows.append({"model": model, "task": task, "ours": ours, "llama_cpp": ref})
            print(
                f"\n{model} [{task}] ours ({args.dtype}{', ' + args.variant if args.variant else ''}) "
                f"vs llama.cpp, {args.threads} threads"
            )
            print(f"  {'metric':<22}{'ours':>12}{'llama.cpp':>12}{'ratio':>8}")
            for key in ours:
                if key in ref and isinstance(ours[key], int | float):
                    a, b = ours[key], ref[key]
                    print(f"  {key:<22}{a:>12.2f}{b:>12.2f}{(a / b if b else float('nan')):>8.2f}")
            if "kv_bytes" in ours:
                print(f"  {'our KV cache MB':<22}{ours['kv_bytes'] / 1e6:>12.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
