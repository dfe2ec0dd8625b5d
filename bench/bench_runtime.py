"""Runtime benchmark: tinytitan's float and quantized variants vs llama.cpp, same source GGUF, same threads.

    python bench/bench_runtime.py [--models gemma-3-270m smollm2-135m-instruct] [--threads 2]
           [--ours shipped fp32 w8 w4g32] [--repeat 3] [--long [--long-variant w4g32]] [--no-load] [--profile]
           [--eager] [--json FILE]

Pairs (ours vs llama.cpp): shipped (`tt.load(FILE)` with no flags: the file's own blocks on our kernel) and
fp32 (`reference=True`: dequantized to float32) vs the source file as shipped, w8 vs Q8_0, w4g32 vs Q4_0
and Q4_K_M; w8-kv16 and w4g32-kv16 are the same weights with a float16 KV cache (llama.cpp's default
cache type; ours float32).
Our variants are quantized once into artifacts (`tinytitan quantize`), llama.cpp's files once with
llama_model_quantize from the same source GGUF (requantize allowed); both are kept under
$TINYTITAN_HOME/bench/ and reused. For every pair, each measurement runs in a fresh subprocess, the two
engines alternate, and with --repeat N the median of N is reported:
  decode tok/s   batch 1, 128 greedy tokens after a 512-token WikiText-2 prompt
  prefill tok/s  the 512-token prompt
  load s         cold start of the CLI to the first generated token (`tinytitan run DIR ... --max-tokens 1`
                 vs a llama-cpp-python script doing the same), wall time of the whole process
  peak RSS MB    of the speed run; with --long also of a 32,768-token prompt (Gemma 3 270M, our
                 --long-variant vs llama.cpp's file of its first pair, each once)
Our decode step is the no-flag path's on a machine that has run the model before: the stored compiled step
(tinytitan.aot_step), built before the timed steps when missing (its build time is "compile s"; 0.0x when
it was stored); variants it cannot export fall back to torch.compile, compiled in the same warm-up.
--eager times the eager step instead (`--no-compile`: what a first run decodes with while the step builds
in the background; rows say "+eager").
--profile prints, for each of our variants, where a decode step's time goes (torch.profiler over 32 steps,
1 process, --threads threads). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
PROMPT, DECODE, LONG = 512, 128, 32768
# ours -> the llama.cpp files it is compared with ("source" = the GGUF as shipped)
PAIRS = {"shipped": ["source"], "fp32": ["source"], "w8": ["Q8_0"], "w4g32": ["Q4_0", "Q4_K_M"]}
REFERENCE = "reference:"  # a worker path so marked loads with reference=True (float32)
# the same weights with a float16 KV cache, as llama.cpp keeps its own by default
PAIRS |= {"w8-kv16": ["Q8_0"], "w4g32-kv16": ["Q4_0", "Q4_K_M"]}


def peak_rss_mb() -> float:
    """VmHWM: ru_maxrss survives exec, so a worker would report at least the driver's own peak."""
    from tinytitan.eval.efficiency import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def prompt_text(task: str) -> str:
    """Enough text for the task's tokens, no more: tokenizing 400K characters alone costs ~2 GB of RSS."""
    n = 200_000 if task == "long" else 8_000
    if TEXT.exists():
        return TEXT.read_text(encoding="utf-8")[:n]
    return ("The history of the city begins with a small fishing village on the river. " * 4000)[:n]


def bench_dir() -> Path:
    from tinytitan import zoo

    d = zoo.home() / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


# -- files ------------------------------------------------------------------------------------------
def our_path(model: str, variant: str) -> str:
    """The model name for the file as shipped (fp32: marked for the reference), else an artifact folder
    (made once)."""
    if variant == "shipped":
        return model
    if variant == "fp32":
        return REFERENCE + model
    out = bench_dir() / f"{model}-{variant}"
    if not (out / "tinytitan.json").exists():
        print(f"  making artifact {out.name} ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "tinytitan", "quantize", model, "--scheme", variant, "-o", str(out)]
        subprocess.run([*cmd, "--force"], check=True, capture_output=True)
    return str(out)


def llama_path(model: str, ftype: str, threads: int) -> str:
    from tinytitan import zoo

    src = zoo.resolve(model)
    if ftype == "source":
        return str(src)
    out = bench_dir() / f"{model}-{ftype}.gguf"
    if not out.exists():
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_quant import llama_quantize

        print(f"  making {out.name} with llama_model_quantize ...", file=sys.stderr)
        llama_quantize(src, out.with_suffix(".tmp"), ftype, None, threads)
        out.with_suffix(".tmp").rename(out)
    return str(out)


# -- workers (each in its own process) --------------------------------------------------------------
def worker_ours(path: str, task: str, threads: int, profile: bool, eager: bool = False) -> dict:
    import torch

    torch.set_num_threads(threads)
    import tinytitan as tt
    from tinytitan.engine import prefill

    t0 = time.perf_counter()
    reference = path.startswith(REFERENCE)
    m = tt.load(path.removeprefix(REFERENCE), reference=reference, compile=False if eager else "auto")
    out: dict = {"load_s": time.perf_counter() - t0}
    ids = m.tokenizer.encode(prompt_text(task), add_bos=True)
    if task == "speed":
        prompt = ids[:PROMPT]
        t = time.perf_counter()
        if not eager:  # the stored step, built now when missing (a first run builds it in the background)
            m.set_compile(True)
        out["compile_s"] = time.perf_counter() - t
        step, static = m.decode_step, m.decode_step.static_cache
        compiled = step.compiled  # torch.compile (a variant the stored step cannot export)
        with torch.inference_mode():
            warm = m.new_cache(64, static=static)
            logits = prefill(m.module, prompt[:32], warm, device=m.device)  # warm-up (first-call costs)
            t = time.perf_counter()
            for i in range(3):  # torch.compile: compiles the step (symbolic positions: once)
                logits = step(torch.tensor([[int(logits.argmax())]]), warm, 32 + i)
            if compiled:
                out["compile_s"] += time.perf_counter() - t
            assert step.fallback_reason is None, step.fallback_reason
            out["step"] = step.ran
            cache = m.new_cache(PROMPT + DECODE + 64, static=static)  # + the profiled steps
            t = time.perf_counter()
            logits = prefill(m.module, prompt, cache, device=m.device)
            out["prefill_tps"] = len(prompt) / (time.perf_counter() - t)
            tok = int(logits.argmax())
            t = time.perf_counter()
            for i in range(DECODE):
                x = torch.tensor([[tok]])
                tok = int(step(x, cache, len(prompt) + i)[0].argmax())
            out["decode_tps"] = DECODE / (time.perf_counter() - t)
            if profile:
                out["profile"] = decode_profile(m, cache, len(prompt) + DECODE, tok)
    elif task == "long":
        prompt = ids[:LONG]
        t = time.perf_counter()
        with torch.inference_mode():
            cache = m.new_cache(len(prompt) + 1)
            prefill(m.module, prompt, cache, device=m.device)
        out["long_prompt_tokens"] = len(prompt)
        out["long_s"] = time.perf_counter() - t
        out["kv_bytes"] = cache.nbytes()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def decode_profile(m, cache, pos: int, tok: int, steps: int = 32) -> dict:
    """ms per decode step by category: output head, block matmuls, attention, sampling, other ops, and
    Python/dispatch overhead (wall time minus the time spent inside operators)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    vocab = m.config.vocab_size
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        for i in range(steps):
            x = torch.tensor([[tok]])
            tok = int(m.decode_step(x, cache, pos + i)[0].argmax())
        wall = time.perf_counter() - t
    cats: dict[str, float] = {}
    matmuls = ("aten::mm", "aten::addmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu")
    for e in prof.key_averages(group_by_input_shape=True):
        shapes = str(e.input_shapes)
        if e.key in matmuls:
            cat = "output head" if str(vocab) in shapes else "block matmuls"
        elif e.key in ("aten::bmm", "aten::_softmax", "tinytitan::decode_attention") or "scaled_dot" in e.key:
            cat = "attention"
        elif e.key in ("aten::argmax", "aten::topk", "aten::sort", "aten::multinomial"):
            cat = "sampling"
        else:
            cat = "other ops"
        cats[cat] = cats.get(cat, 0.0) + e.self_cpu_time_total / 1e3 / steps
    ops = sum(e.count for e in prof.key_averages()) / steps
    cats["python/dispatch (wall - ops)"] = max(0.0, wall * 1e3 / steps - sum(cats.values()))
    return {"ms_per_token": wall * 1e3 / steps, "aten_ops_per_token": ops, "ms": cats}


def worker_llama(path: str, task: str, threads: int) -> dict:
    t0 = time.perf_counter()
    import llama_cpp
    import numpy as np

    n_ctx = LONG + 8 if task == "long" else 1024
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    out: dict = {"load_s": time.perf_counter() - t0}
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
    ids = llm.tokenize(prompt_text(task).encode(), add_bos=add_bos)
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:  # the newest position's logits (no logits_all copy)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    if task == "speed":
        prompt = ids[:PROMPT]
        llm.eval(prompt[:32])  # warm-up, as ours
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        out["prefill_tps"] = len(prompt) / (time.perf_counter() - t)
        tok = int(np.argmax(last_logits()))
        t = time.perf_counter()
        for _ in range(DECODE):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
        out["decode_tps"] = DECODE / (time.perf_counter() - t)
    elif task == "long":
        prompt = ids[:LONG]
        t = time.perf_counter()
        llm.eval(prompt)
        out["long_prompt_tokens"] = len(prompt)
        out["long_s"] = time.perf_counter() - t
    out["peak_rss_mb"] = peak_rss_mb()
    return out


LLAMA_FIRST_TOKEN = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=1024, n_threads={t}, n_threads_batch={t}, verbose=False)
out = llm("The capital of France is", max_tokens=1, temperature=0.0)
print(out["choices"][0]["text"])
"""


def cold_start_s(engine: str, path: str, threads: int) -> float:
    """Wall time of a fresh process that loads the model and prints one generated token."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if engine == "ours":
        cmd = [
            sys.executable,
            "-m",
            "tinytitan",
            "run",
            path.removeprefix(REFERENCE),
            "The capital of France is",
            "--max-tokens",
            "1",
        ]
        cmd += ["--device", "cpu"] + (["--reference"] if path.startswith(REFERENCE) else [])
    else:
        cmd = [sys.executable, "-c", LLAMA_FIRST_TOKEN.format(t=threads), path]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{engine} cold start failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t


def run_worker(
    engine: str, path: str, task: str, threads: int, profile: bool = False, eager: bool = False
) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--path", path, "--task", task]
    cmd += ["--threads", str(threads)] + (["--profile"] if profile else [])
    cmd += ["--eager"] if eager else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{engine} {path} {task} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the comparison ---------------------------------------------------------------------------------
def median_runs(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if isinstance(runs[0][k], int | float)]
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out.update({k: v for k, v in runs[0].items() if k not in out})
    return out


def measure_pair(model: str, ours: str, ref: str, args) -> dict:
    """Alternate ours / llama.cpp for every repeat so that drifting machine load hits both alike."""
    op, lp = our_path(model, ours), llama_path(model, ref, args.threads)
    long = args.long and model.startswith("gemma") and ours == args.long_variant and ref == PAIRS[ours][0]
    tasks = ["speed"] + (["long"] if long else [])  # the 32K prompt once per model: minutes per engine
    res: dict = {"model": model, "ours": ours + ("+eager" if args.eager else ""), "llama_cpp": ref}
    for task in tasks:
        a, b = [], []
        for _ in range(args.repeat if task == "speed" else 1):
            a.append(run_worker("ours", op, task, args.threads, eager=args.eager))
            b.append(run_worker("llama", lp, task, args.threads))
        res[task] = {"ours": median_runs(a), "llama_cpp": median_runs(b)}
    if not args.no_load:
        a, b = [], []
        for _ in range(args.repeat):
            a.append(cold_start_s("ours", op, args.threads))
            b.append(cold_start_s("llama", lp, args.threads))
        res["cold_start"] = {"ours": {"first_token_s": statistics.median(a)}}
        res["cold_start"]["llama_cpp"] = {"first_token_s": statistics.median(b)}
    return res


METRICS = [  # (task, key, label, higher is better)
    ("speed", "decode_tps", "decode tok/s", True),
    ("speed", "prefill_tps", "prefill tok/s (512)", True),
    ("cold_start", "first_token_s", "CLI cold start to 1st token s", False),
    ("speed", "load_s", "load s (in process)", False),
    ("speed", "compile_s", "compile s (first decode steps)", False),
    ("speed", "peak_rss_mb", "peak RSS MB (speed run)", False),
    ("long", "peak_rss_mb", "peak RSS MB (32K prompt)", False),
    ("long", "long_s", "32K prompt s", False),
]


def print_table(rows: list[dict], threads: int, repeat: int) -> None:
    print(
        f"\n{threads} threads, median of {repeat}; ratio = ours / llama.cpp (decode/prefill: >= 1 is a win)"
    )
    print(
        "| model | ours | llama.cpp | metric | ours | llama.cpp | ratio |\n|---|---|---|---|---:|---:|---:|"
    )
    for r in rows:
        for task, key, label, _ in METRICS:
            if task not in r or key not in r[task]["ours"]:
                continue
            a, b = r[task]["ours"][key], r[task]["llama_cpp"].get(key, 0.0)
            ratio = a / b if b else float("nan")
            cells = [r["model"], r["ours"], r["llama_cpp"], label, f"{a:.2f}", f"{b:.2f}", f"{ratio:.2f}"]
            print("| " + " | ".join(cells) + " |")


def print_profile(model: str, variant: str, p: dict) -> None:
    ms, ops = p["ms_per_token"], p["aten_ops_per_token"]
    print(f"\n{model} {variant}: {ms:.2f} ms per decode step, {ops:.0f} aten ops")
    for cat, t in sorted(p["ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {cat:<30}{t:>8.2f} ms  {100 * t / ms:5.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m-instruct"])
    ap.add_argument("--ours", nargs="+", default=["shipped", "w8", "w4g32"], help=f"of {list(PAIRS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per pair; the median is kept")
    ap.add_argument("--long", action="store_true", help="also the 32K-token prompt on Gemma 3 270M")
    ap.add_argument("--long-variant", default="w4g32", help="our variant for the 32K prompt (with --long)")
    ap.add_argument("--no-load", action="store_true", help="skip the CLI cold-start measurement")
    ap.add_argument("--profile", action="store_true", help="where a decode step's time goes, per variant")
    ap.add_argument("--eager", action="store_true", help="our decode step eager (`--no-compile`)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", choices=["ours", "llama"], default=None)
    ap.add_argument("--path", default=None)
    ap.add_argument("--task", default="speed")
    args = ap.parse_args()
    if args.worker:
        if args.worker == "ours":
            res = worker_ours(args.path, args.task, args.threads, args.profile, args.eager)
        else:
            res = worker_llama(args.path, args.task, args.threads)
        print(json.dumps(res))
        return
    rows, profiles = [], []
    for model in args.models:
        for ours in args.ours:
            if args.profile:
                op = our_path(model, ours)
                res = run_worker("ours", op, "speed", args.threads, profile=True, eager=args.eager)
                p = res["profile"]
                print_profile(model, ours, p)
                profiles.append({"model": model, "ours": ours, **p})
            for ref in PAIRS[ours]:
                rows.append(measure_pair(model, ours, ref, args))
                print_table(rows[-1:], args.threads, args.repeat)
    print_table(rows, args.threads, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "profiles": profiles}, indent=1))


if __name__ == "__main__":
    main()
