"""Speed pairs of equal work against llama.cpp's own llama-bench, in one run, on the same threads.

    python bench/bench_pairs.py [--models gemma-3-270m smollm2-135m-instruct] [--threads 2] [--repeat 3]
                                [--json FILE] [--eager] [--pairs "same file,equal bytes,8-bit"]

Pairs, per model (each states what is paired):
  same file     our runtime on the GGUF as shipped (`tt.load(FILE)`, no flags) vs llama-bench on that file;
  equal bytes   the same block layout in every tensor, embedding and head included: our w4g32 vs Q4_1 and
                our w4g32s vs Q4_0 (llama-quantize --token-embedding-type/--output-tensor-type q4_1 / q4_0);
  8-bit         our w8 (a scale per row) vs Q8_0 (a scale per 32 weights): ~8% apart, and the table says so.
The byte ratio is printed; a pair more than 5% apart is flagged.
Ours: a fresh process per run (bench/bench_runtime.py's worker): prefill of a 512-token WikiText-2 prompt
and 128 greedy tokens after it, batch 1, like llama-bench's pp512 and tg128. llama.cpp: `llama-bench -p 512
-n 128 -r 1 -t THREADS -o json`, its own figures. The engines alternate for every repeat, medians of
--repeat runs. The tools come from `make anchors` (bench/anchors.py). Our decode step is the no-flag
path's once the machine has its stored compiled step (built before the timed steps when missing; see
bench_runtime.py); --eager times the eager step (a first run, `--no-compile`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchors import build_info, tool
from bench_runtime import bench_dir, our_path, run_worker

# (label, our variant or "file", llama.cpp type or "file", llama-quantize options)
PAIRS = [
    ("same file", "file", "file", []),
    # the same block layout, every tensor 4-bit (embedding and head too): Q4_1 is scale + minimum (fp16) per
    # 32 weights, like our asymmetric w4g32; Q4_0 is a scale per 32, like our symmetric w4g32s
    ("equal bytes", "w4g32", "Q4_1", ["--token-embedding-type", "q4_1", "--output-tensor-type", "q4_1"]),
    ("equal bytes", "w4g32s", "Q4_0", ["--token-embedding-type", "q4_0", "--output-tensor-type", "q4_0"]),
    # 8-bit: ours keeps one scale per row (8.03 bits/weight), Q8_0 one per 32 (8.5): ours reads ~8% less
    ("8-bit", "w8", "Q8_0", []),
]


def llama_file(model: str, ftype: str, options: list[str], threads: int) -> Path:
    """The source GGUF, or a llama-quantize output made from it once (kept under $TINYTITAN_HOME/bench)."""
    from tinytitan import zoo

    src = zoo.resolve(model)
    if ftype == "file":
        return src
    tag = f"-{options[1]}-head" if options else ""
    out = bench_dir() / f"{model}-{ftype}{tag}.llama-quantize.gguf"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        cmd = [str(tool("llama-quantize")), "--allow-requantize", *options, str(src), str(tmp), ftype]
        subprocess.run([*cmd, str(threads)], check=True, capture_output=True)
        tmp.rename(out)
    return out


def our_bytes(path: str) -> int:
    p = Path(path)
    if p.is_dir():
        return int(json.loads((p / "tinytitan.json").read_text())["size_bytes"])
    return p.stat().st_size


def llama_bench(path: Path, threads: int) -> dict:
    cmd = [str(tool("llama-bench")), "-m", str(path), "-p", "512", "-n", "128", "-r", "1"]
    proc = subprocess.run([*cmd, "-t", str(threads), "-o", "json"], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"llama-bench failed:\n{proc.stderr[-2000:]}")
    out = {}
    for r in json.loads(proc.stdout):
        key = "prefill_tps" if r["n_prompt"] else "decode_tps"
        out[key] = float(r["avg_ts"])
    return out


def measure(model: str, label: str, ours: str, ftype: str, options: list[str], args) -> dict:
    from tinytitan import zoo

    lp = llama_file(model, ftype, options, args.threads)
    op = str(zoo.resolve(model)) if ours == "file" else our_path(model, ours)
    a, b = [], []
    for _ in range(args.repeat):
        a.append(run_worker("ours", op, "speed", args.threads, eager=args.eager))
        b.append(llama_bench(lp, args.threads))
    med = {k: statistics.median(r[k] for r in a) for k in ("prefill_tps", "decode_tps", "peak_rss_mb")}
    theirs = {k: statistics.median(r[k] for r in b) for k in ("prefill_tps", "decode_tps")}
    return {
        "model": model,
        "pair": label,
        "ours": ("GGUF as shipped" if ours == "file" else ours)
        + (" +eager" if args.eager else (", no flags" if ours == "file" else "")),
        "llama_cpp": "GGUF as shipped"
        if ftype == "file"
        else ftype + (f" + {options[1].upper()} embedding/head" if options else ""),
        "ours_bytes": our_bytes(op),
        "llama_bytes": lp.stat().st_size,
        "ours_runs": a,
        "llama_runs": b,
        "ours_median": med,
        "llama_median": theirs,
    }


def table(rows: list[dict], threads: int, repeat: int) -> str:
    lines = [
        f"{threads} threads, median of {repeat} alternating runs; ratio = ours / llama.cpp (>= 1: ours wins)",
        "",
        "| model | pair | ours | llama.cpp | MB ours / theirs | prefill 512 tok/s ours / llama-bench "
        "| ratio | decode tok/s ours / llama-bench (tg128) | ratio |",
        "|---|---|---|---|---|---|---:|---|---:|",
    ]
    for r in rows:
        o, t = r["ours_median"], r["llama_median"]
        size = r["ours_bytes"] / r["llama_bytes"]
        flag = "" if abs(size - 1) <= 0.05 else f" (**{size:.2f}x**)"
        lines.append(
            f"| {r['model']} | {r['pair']} | {r['ours']} | {r['llama_cpp']} | "
            f"{r['ours_bytes'] / 1e6:.1f} / {r['llama_bytes'] / 1e6:.1f}{flag} | "
            f"{o['prefill_tps']:.1f} / {t['prefill_tps']:.1f} | {o['prefill_tps'] / t['prefill_tps']:.2f} | "
            f"{o['decode_tps']:.1f} / {t['decode_tps']:.1f} | {o['decode_tps'] / t['decode_tps']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m-instruct"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--eager", action="store_true", help="our decode step eager (`--no-compile`)")
    ap.add_argument(
        "--pairs", default="same file,equal bytes,8-bit", help="which pairs (comma-separated labels)"
    )
    args = ap.parse_args()
    rows = []
    for model in args.models:
        for label, ours, ftype, options in PAIRS:
            if label not in args.pairs.split(","):
                continue
            print(f"{model}: {label}: ours {ours} vs llama.cpp {ftype} ...", file=sys.stderr, flush=True)
            rows.append(measure(model, label, ours, ftype, options, args))
    text = table(rows, args.threads, args.repeat)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"anchors": build_info(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
