"""Quantization benchmark: every scheme and llama.cpp's own quantizer, side by side, one run.

    python bench/bench_quant.py --model gemma-3-270m [--schemes w8 w4g32 ...] [--windows 8]
           [--plan 150MB] [--calib ../shared/data/pg2701-moby-dick/2701-0.txt] [--no-llama]

Reference: the source GGUF dequantized to float32 (our runtime, bit-identical to transformers). Text:
WikiText-2 test, windows of 512 tokens (>= 4,096 positions with the default 8 windows), scored as
llama.cpp's perplexity tool does. For every variant: file size, bits per weight, weights in memory,
mean KLD (+- stderr) and top-1 agreement against the reference at every position, and perplexity.
llama.cpp's variants are made with llama_model_quantize (requantize allowed, same source file), with
its default embedding handling and with the embedding/output type set explicitly (its expert setting);
their quality is measured with the same evaluator, on the same tokens.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_SCHEMES = [
    "w8",
    "w4g32-e8",
    "w4g32-imatrix",
    "w4g64-imatrix",
    "w4g32-e4g64-gptq",
    "w4g32-awq",
    "w3g32-imatrix",
    "keep-e8@10+4g32@20+2g32-imatrix",  # row tiers on the embedding, the source's own blocks
    "w4g32-e8@10+4g32@20+2g32-imatrix",
    "q8_0",
    "q5_0",
    "q4_k",
    "q4_0",
    "w4g32",
    "w4g32-kv8",  # minus the w4g32 row: what the int8 KV cache costs
]
LLAMA_TYPES = [  # (label, ftype name, embedding/output type or None for llama.cpp's default)
    ("llama.cpp Q8_0", "Q8_0", None),
    ("llama.cpp Q5_0", "Q5_0", None),
    ("llama.cpp Q4_K_M", "Q4_K_M", None),
    ("llama.cpp Q4_0", "Q4_0", None),
    ("llama.cpp Q4_0 emb Q5_0", "Q4_0", "Q5_0"),
    ("llama.cpp Q4_0 emb Q4_0", "Q4_0", "Q4_0"),
    ("llama.cpp Q4_K_M emb Q4_K", "Q4_K_M", "Q4_K"),
    ("llama.cpp Q3_K_M emb Q3_K", "Q3_K_M", "Q3_K"),
]


def llama_quantize(src: Path, dst: Path, ftype: str, emb: str | None, threads: int) -> None:
    """In a child process: llama.cpp aborts the whole process (GGML_ASSERT) on some explicit embedding
    types for rows that are not multiples of 256, and that must not take the benchmark down with it."""
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(
        target=_llama_quantize, args=(str(src), str(dst), ftype, emb, threads)
    )
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not dst.exists():
        raise RuntimeError(f"llama_model_quantize failed for {ftype} (exit code {proc.exitcode})")


def _llama_quantize(src: str, dst: str, ftype: str, emb: str | None, threads: int) -> None:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.nthread = threads
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    p.allow_requantize = True
    if emb:
        t = getattr(llama_cpp, f"GGML_TYPE_{emb}")
        p.token_embedding_type = t
        p.output_tensor_type = t
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(rc)


class Evaluator:
    def __init__(self, ref, windows: int) -> None:
        text = (DATA / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
        tok = ref.tokenizer
        ids = tok.encode(text, add_bos=True)
        self.windows = []
        for w in range(windows):
            win = list(ids[w * 512 : (w + 1) * 512])
            if tok.add_bos:
                win[0] = tok.bos_id
            self.windows.append(win)
        self.targets = [list(ids[w * 512 : (w + 1) * 512]) for w in range(windows)]
        self.ref_lp = [torch.log_softmax(ref.logits(w).double(), -1).half() for w in self.windows]

    def score(self, model) -> dict:
        kls, agree, nll = [], [], []
        for win, tgt, ref in zip(self.windows, self.targets, self.ref_lp, strict=True):
            lp = torch.log_softmax(model.logits(win).double(), -1)
            r = ref.double()
            kls.append((r.exp() * (r - lp)).sum(-1))
            agree.append(lp.argmax(-1) == r.argmax(-1))
            nll.append(-lp[256:-1].gather(-1, torch.tensor(tgt[257:])[:, None])[:, 0])
        kl, ag, nl = torch.cat(kls), torch.cat(agree).float(), torch.cat(nll)
        return {
            "kld": float(kl.mean()),
            "kld_se": float(kl.std() / math.sqrt(kl.numel())),
            "kld_p99": float(kl.quantile(0.99)),
            "top1": float(ag.mean()),
            "ppl": math.exp(float(nl.mean())),
            "positions": kl.numel(),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--schemes", nargs="*", default=DEFAULT_SCHEMES)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--plan", nargs="*", default=[], help="budget-planned variants, e.g. 150MB")
    ap.add_argument("--calib", default=str(DATA / "pg2701-moby-dick" / "2701-0.txt"))
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import tinytitan as tt
    from tinytitan.quant.api import quantize
    from tinytitan.quant.schemes import parse_variant
    from tinytitan.quant.stored import param_counts

    calib = (
        Path(args.calib).read_text(encoding="utf-8", errors="replace")[50_000:150_000] if args.calib else None
    )
    ref = tt.load(args.model, reference=True)  # the float32 reference every variant is made from
    ev = Evaluator(ref, args.windows)
    n_params = param_counts(ref.module)[0]
    rows: list[dict] = []

    def report(label: str, model, size: int, started: float | None) -> None:
        """Score one variant and print its row; `size` is its file (or artifact) size in bytes."""
        row = {
            "variant": label,
            "size_mb": size / 1e6,
            "bpw": 8 * size / n_params,
            "runtime_mb": model.weight_bytes() / 1e6,
            **ev.score(model),
            "seconds": 0.0 if started is None else time.perf_counter() - started,
        }
        rows.append(row)
        print(
            f"{row['variant']:<28}{row['size_mb']:>9.1f} MB {row['bpw']:>6.2f} bpw"
            f"  mem {row['runtime_mb']:>7.1f} MB"
            f"  KLD {row['kld']:.4f}±{row['kld_se']:.4f}  top1 {row['top1']:.3f}  ppl {row['ppl']:.3f}"
            f"  ({row['seconds']:.0f}s)",
            flush=True,
        )

    report(f"source GGUF ({args.model})", ref, ref.source.path.stat().st_size, None)
    for scheme in args.schemes:
        t = time.perf_counter()
        cfg = parse_variant(scheme)
        q = quantize(ref, cfg, calib_text=calib)
        if cfg.kv_cache:
            q.set_kv_cache(cfg.kv_cache, cfg.kv_axis)
        report(scheme, q, q.quant.file_bytes(), t)
    for budget in args.plan:
        from rich.console import Console

        from tinytitan.cli.quantize import parse_size
        from tinytitan.quant.mixed import plan_to_budget

        t = time.perf_counter()
        q = plan_to_budget(
            ref, budget_bytes=parse_size(budget), calib_text=calib, console=Console(stderr=True)
        )
        report(f"mixed {budget}", q, q.quant.file_bytes(), t)
    if not args.no_llama:
        with tempfile.TemporaryDirectory() as tmp:
            for label, ftype, emb in LLAMA_TYPES:
                t = time.perf_counter()
                dst = Path(tmp) / f"{ftype}-{emb}.gguf"
                try:
                    llama_quantize(ref.source.path, dst, ftype, emb, args.threads)
                except RuntimeError as e:  # e.g. a k-quant embedding type on rows not a multiple of 256
                    print(f"{label:<28} not produced: {e}", flush=True)
                    continue
                m = tt.load(dst)
                report(label, m, dst.stat().st_size, t)
                del m
                os.unlink(dst)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
