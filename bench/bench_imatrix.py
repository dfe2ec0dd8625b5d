"""Our quantizers against llama.cpp's at its best: an importance matrix from llama-imatrix on the same
calibration text ours uses, every llama.cpp type, sizes paired within 5%, one evaluator; and for our
exported GGUF files the KLD of llama-perplexity --kl-divergence beside ours, on the same file and text.

    python bench/bench_imatrix.py [--model gemma-3-270m] [--windows 8] [--types Q4_0 IQ4_NL ...]
                                  [--data ../shared/data] [--json FILE] [--threads 2]

1. Calibration text: what our calibrated methods use by default (the reference's own samples, seed 0,
   `quant.calib.self_generated`), decoded to text, or --calib FILE for both.
2. llama-imatrix on that text (512-token chunks), then `llama-quantize --imatrix` for every type in --types
   (requantizing the source file, as our variants start from it too). Types that fall back to the same
   blocks (rows of 640 are not multiples of 256) give the same file, shown once.
3. Ours: each named scheme, and a mixed-precision plan sized to the smallest of each cluster of llama.cpp
   file sizes within 5% of one another (plan:SIZE), so each llama.cpp type has a partner within 5% of its
   bytes.
4. One evaluator for all: our `kld` task against the source GGUF (float32), on `--windows` 512-token
   windows of WikiText-2 (the embedded pack's excerpt unless --data), resumable through a results store
   under $TINYTITAN_HOME/bench.
5. For our exported GGUF files (`tinytitan quantize --gguf`): llama-perplexity --kl-divergence against the
   source file on the same text and windows, beside our evaluator's KLD of the same file.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchors import build_info, tool
from bench_runtime import bench_dir

ROOT = Path(__file__).resolve().parents[1]
TYPES = [  # every llama-quantize type that is not float; k-quants/IQ fall back on 640-wide rows
    "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "IQ4_NL",
    "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K", "Q2_K_S",
    "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS",
]  # fmt: skip
# llama.cpp keeps the tied embedding/head at 6-8 bits, so on Gemma 3 270M no default type goes below ~150 MB;
# these types are also made with the embedding and head set explicitly (its expert setting) to reach our sizes
LOW_TYPES = ["Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_M", "IQ3_M", "IQ3_XXS", "Q2_K", "IQ2_M"]
OURS = [
    "w8",
    "w4g32-imatrix",
    "w3g64-imatrix",
    "q4_0",
]  # q4_0: our RTN Q4_0 blocks, llama.cpp's without imatrix
EXPORTS = ["w8", "w4g32-imatrix"]  # exported to GGUF and measured by llama-perplexity too


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode:
        raise RuntimeError(f"{Path(str(cmd[0])).name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def calibration_text(model, calib: str | None) -> str:
    if calib:
        return Path(calib).read_text(encoding="utf-8")
    from tinytitan.quant.calib import self_generated

    seqs = self_generated(model, 4096, seed=0)
    return "\n\n".join(model.tokenizer.decode([t for t in s if t != model.tokenizer.bos_id]) for s in seqs)


def kld_text(data: str | None) -> Path:
    if data:
        return Path(data) / "wikitext-2" / "test.txt"
    return ROOT / "src" / "tinytitan" / "eval" / "pack" / "wikitext-2-test-head.txt"


def our_kld(path: Path | str, src: Path, text: Path, windows: int, store: Path) -> dict:
    """Our evaluator: the kld task of `path` (a GGUF file or an artifact) against the source file."""
    from tinytitan.eval.runner import EvalConfig, evaluate

    cfg = EvalConfig(limit=windows, reference=str(src), data=[f"kld={text}"])
    rows = evaluate(str(path), ["kld"], config=cfg, store=store)
    by = {r.metric: r for r in rows}
    return {
        "kld": by["kld_mean"].value,
        "kld_se": by["kld_mean"].stderr,
        "top1": by["same_top_p"].value,
        "ppl": by["ppl"].value,
        "positions": by["kld_mean"].n,
    }


def llama_kld(path: Path, base: Path, text: Path, windows: int, threads: int) -> dict:
    """llama-perplexity --kl-divergence of `path` against the saved logits of the source file."""
    cmd = [tool("llama-perplexity"), "-m", path, "-f", text, "-c", 512, "--chunks", windows, "-t", threads]
    proc = run([*cmd, "--kl-divergence-base", base, "--kl-divergence"])
    out = proc.stdout + proc.stderr  # where it prints its statistics differs between versions
    m = re.search(r"Mean\s+KLD:\s+([-0-9.]+)\s+±\s+([0-9.]+)", out)
    if m is None:
        raise RuntimeError(f"no 'Mean KLD' in llama-perplexity's output:\n{out[-2000:]}")
    top = re.search(r"Same top p:\s+([0-9.]+)\s+±\s+([0-9.]+)\s*%", out)
    return {"kld": float(m[1]), "kld_se": float(m[2]), "top1": float(top[1]) if top else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--types", nargs="*", default=TYPES)
    ap.add_argument("--ours", nargs="*", default=OURS)
    ap.add_argument("--low-types", nargs="*", default=LOW_TYPES, help="types also made with --emb-types")
    ap.add_argument(
        "--emb-types", nargs="*", default=["IQ4_NL", "Q4_0"], help="embedding/head types for them"
    )
    ap.add_argument("--no-plans", action="store_true", help="no plan:SIZE partner per llama.cpp file")
    ap.add_argument("--plan-range", default="90-200", help="MB: llama.cpp file sizes that get a plan partner")
    ap.add_argument("--calib", default=None, help="calibration text file for both (default: self-generated)")
    ap.add_argument("--data", default=None, help="a folder with wikitext-2/test.txt (default: the pack)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import tinytitan as tt
    from tinytitan import zoo

    src = zoo.resolve(args.model)
    work = bench_dir() / f"imatrix-{args.model}"
    work.mkdir(parents=True, exist_ok=True)
    store = work / "results.sqlite"
    text = kld_text(args.data)
    ref = tt.load(args.model)
    calib = work / "calib.txt"
    if not calib.exists():
        calib.write_text(calibration_text(ref, args.calib), encoding="utf-8")
    imatrix = work / "imatrix.gguf"
    if not imatrix.exists():
        print("llama-imatrix ...", file=sys.stderr, flush=True)
        run([tool("llama-imatrix"), "-m", src, "-f", calib, "-o", imatrix, "-c", 512, "-t", args.threads])
    rows: list[dict] = []

    def add(engine: str, label: str, path: Path | str, size: int) -> None:
        print(f"{engine} {label}: {size / 1e6:.1f} MB ...", file=sys.stderr, flush=True)
        rows.append(
            {
                "engine": engine,
                "variant": label,
                "mb": size / 1e6,
                **our_kld(path, src, text, args.windows, store),
            }
        )
        print(f"  KLD {rows[-1]['kld']:.4f}", file=sys.stderr, flush=True)

    seen: dict[int, str] = {}
    jobs = [(t, None) for t in args.types] + [(t, e) for e in args.emb_types for t in args.low_types]
    for t, emb in jobs:
        name = t if emb is None else f"{t} emb {emb}"
        out = work / f"llama-{t}{'' if emb is None else '-emb-' + emb}.gguf"
        if not out.exists():
            cmd = [tool("llama-quantize"), "--allow-requantize", "--imatrix", imatrix]
            if emb is not None:  # the tied embedding / head too (llama.cpp keeps it 6-8 bit by default)
                cmd += ["--token-embedding-type", emb.lower(), "--output-tensor-type", emb.lower()]
            try:
                run([*cmd, src, out.with_suffix(".tmp"), t, args.threads])
            except RuntimeError as e:
                print(f"llama.cpp {name}: not produced ({str(e).splitlines()[0]})", file=sys.stderr)
                continue
            out.with_suffix(".tmp").rename(out)
        size = out.stat().st_size
        if size in seen:  # the same blocks under another name (fallbacks on 640-wide rows)
            rows.append(
                {
                    "engine": "llama.cpp",
                    "variant": f"{name} (= {seen[size]})",
                    "mb": size / 1e6,
                    "same_as": seen[size],
                }
            )
            continue
        seen[size] = name
        add("llama.cpp", f"{name} + imatrix", out, size)

    def ours(scheme: str) -> Path:
        art = work / f"ours-{scheme.replace(':', '_')}"
        if not (art / "tinytitan.json").exists():
            cmd = [sys.executable, "-m", "tinytitan", "quantize", args.model, "-o", art, "--force"]
            if scheme.startswith("plan:"):
                cmd += ["--target-size", scheme.removeprefix("plan:")]
            else:
                cmd += ["--scheme", scheme]
            if args.calib:
                cmd += ["--calib", args.calib]
            run(cmd)
        return art

    lo, hi = (float(x) for x in args.plan_range.split("-"))
    sizes = []  # one plan per cluster of llama.cpp sizes within 5% of its smallest (its partner for all)
    for mb in sorted({s / 1e6 for s in seen if lo <= s / 1e6 <= hi}):
        if not sizes or mb > sizes[-1] * 1.05:
            sizes.append(mb)
    targets = list(args.ours) + ([] if args.no_plans else [f"plan:{mb:.1f}MB" for mb in sizes])
    for scheme in targets:
        try:
            art = ours(scheme)
        except RuntimeError as e:  # e.g. a budget below what the planner can reach
            print(f"ours {scheme}: not built ({str(e).splitlines()[-1][:200]})", file=sys.stderr)
            continue
        size = int(json.loads((art / "tinytitan.json").read_text())["size_bytes"])
        add("tinytitan", scheme, art, size)

    # llama-perplexity's KLD beside ours, on the same GGUF files
    base = work / f"base-{args.windows}.kld"
    if not base.exists():
        cmd = [tool("llama-perplexity"), "-m", src, "-f", text, "-c", 512, "--chunks", args.windows]
        run([*cmd, "-t", args.threads, "--kl-divergence-base", base])
    cross = []
    for scheme in EXPORTS:
        gguf = work / f"ours-{scheme}.gguf"
        if not gguf.exists():
            run([sys.executable, "-m", "tinytitan", "quantize", ours(scheme), "--gguf", gguf, "--force"])
        a = our_kld(gguf, src, text, args.windows, store)
        b = llama_kld(gguf, base, text, args.windows, args.threads)
        cross.append(
            {"file": gguf.name, "ours": a, "llama_perplexity": b, "rel_diff": b["kld"] / a["kld"] - 1}
        )
    for t in ("Q4_0", "IQ4_NL"):
        f = work / f"llama-{t}.gguf"
        if f.exists():
            a = our_kld(f, src, text, args.windows, store)
            b = llama_kld(f, base, text, args.windows, args.threads)
            cross.append(
                {"file": f.name, "ours": a, "llama_perplexity": b, "rel_diff": b["kld"] / a["kld"] - 1}
            )

    n = next((r["positions"] for r in rows if "positions" in r), "?")
    print(f"\n{args.model}: mean KLD against the source GGUF (float32), {n} positions of {text.name}")
    print("| engine | variant | MB | KLD | top-1 % | PPL |\n|---|---|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: -r["mb"]):
        cells = [r["engine"], r["variant"], f"{r['mb']:.1f}"]
        if "same_as" not in r:
            cells += [f"{r['kld']:.4f} ± {r['kld_se']:.4f}", f"{r['top1']:.1f}", f"{r['ppl']:.3f}"]
        print("| " + " | ".join(cells + [""] * (6 - len(cells))) + " |")
    print("\n| GGUF file | our evaluator KLD | llama-perplexity KLD | relative difference |")
    print("|---|---:|---:|---:|")
    for c in cross:
        a, b = c["ours"], c["llama_perplexity"]
        print(
            f"| {c['file']} | {a['kld']:.4f} ± {a['kld_se']:.4f} | {b['kld']:.4f} ± {b['kld_se']:.4f} "
            f"| {100 * c['rel_diff']:+.1f}% |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"anchors": build_info(), "rows": rows, "cross": cross}, indent=1)
        )


if __name__ == "__main__":
    main()
