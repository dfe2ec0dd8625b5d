"""A/B in one process: 512-token prefill of an int4 artifact with the packed int4 kernel for every matmul
vs bf16 GEMMs on weights dequantized per call above INT4_KERNEL_MAX_ROWS rows (the runtime's default).

    python bench/ab_int4_prefill.py ~/.cache/tinytitan/bench/gemma-3-270m-w4g32 [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch

    import tinytitan as tt
    from tinytitan.engine import prefill
    from tinytitan.quant import modules

    torch.set_num_threads(a.threads)
    m = tt.load(a.artifact)
    text = TEXT.read_text(encoding="utf-8")[:8000] if TEXT.exists() else "The river town grew. " * 400
    ids = m.tokenizer.encode(text, add_bos=True)[:512]
    default = modules.INT4_KERNEL_MAX_ROWS
    res: dict[str, list[float]] = {"packed kernel": [], "dequantize + bf16 GEMM": []}
    with torch.inference_mode():
        prefill(m.module, ids[:32], m.new_cache(64))  # warm-up
        for _ in range(a.reps):  # alternating, so drifting machine load hits both alike
            for mode in res:
                modules.INT4_KERNEL_MAX_ROWS = 10**9 if mode == "packed kernel" else default
                t = time.perf_counter()
                prefill(m.module, ids, m.new_cache(len(ids) + 1))
                res[mode].append(len(ids) / (time.perf_counter() - t))
    for mode, v in res.items():
        print(f"{mode:<24} median {statistics.median(v):6.0f} tok/s  {[round(x) for x in v]}")


if __name__ == "__main__":
    main()
