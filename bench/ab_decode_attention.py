"""A/B in one process: compiled decode tokens/s with the decode-attention C++ kernel vs torch's matmuls.

    python bench/ab_decode_attention.py ~/.cache/tinytitan/bench/gemma-3-270m-w4g32 [--blocks 8] [--eager]

Two copies of the artifact decode after the same 512-token prompt, each with its own compiled step (one
traced with the kernel, one without), in alternating blocks of 32 tokens, so drifting machine load hits
both alike; the median block is reported. Compiling takes up to a minute per copy. Run it on an otherwise
idle machine. --eager: eager steps instead (no compilation).
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
    ap.add_argument("--blocks", type=int, default=8, help="alternating blocks of 32 tokens per copy")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eager", action="store_true", help="eager decode steps (default: compiled)")
    a = ap.parse_args()

    import torch

    import tinytitan as tt
    from tinytitan.decode_step import DecodeStep
    from tinytitan.engine import prefill
    from tinytitan.models import attention_kernel

    torch.set_num_threads(a.threads)
    if not attention_kernel.load():
        raise SystemExit(f"the kernel does not build here: {attention_kernel.failure()}")
    uses = {"kernel": True, "matmuls": False}
    models = {name: tt.load(a.artifact) for name in uses}
    first = models["kernel"]
    text = TEXT.read_text(encoding="utf-8")[:8000] if TEXT.exists() else "The river town grew. " * 400
    ids = first.tokenizer.encode(text, add_bos=True)[:512]
    runs = {}
    with torch.inference_mode():
        for name, m in models.items():
            step = DecodeStep(m.module, compiled=not a.eager)  # (loads the kernel: switched after it)
            attention_kernel._loaded = uses[name]  # read when the step is traced, and guarded on
            cache = m.new_cache(len(ids) + 32 * a.blocks + 8, static=True)
            tok = int(prefill(m.module, ids, cache).argmax())
            t = time.perf_counter()
            for i in range(3):  # compiles a compiled step
                tok = int(step(torch.tensor([[tok]]), cache, len(ids) + i)[0].argmax())
            assert step.fallback_reason is None, step.fallback_reason
            print(f"{name}: warm-up {time.perf_counter() - t:.1f} s")
            runs[name] = {"step": step, "cache": cache, "tok": tok, "pos": len(ids) + 3, "tps": []}
        for _ in range(a.blocks):
            for name, r in runs.items():
                attention_kernel._loaded = uses[name]
                t = time.perf_counter()
                for _ in range(32):
                    logits = r["step"](torch.tensor([[r["tok"]]]), r["cache"], r["pos"])
                    r["tok"], r["pos"] = int(logits[0].argmax()), r["pos"] + 1
                r["tps"].append(32 / (time.perf_counter() - t))
    attention_kernel._loaded = True
    for name, r in runs.items():
        blocks = " ".join(f"{x:.1f}" for x in r["tps"])
        print(f"{name:8s} median {statistics.median(r['tps']):6.1f} tok/s   blocks: {blocks}")
    on, off = (statistics.median(runs[k]["tps"]) for k in ("kernel", "matmuls"))
    print(f"ratio kernel / matmuls: {on / off:.3f}")


if __name__ == "__main__":
    main()
