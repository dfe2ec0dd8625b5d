"""A/B in one process: decode tokens/s of an artifact with q/k/v and gate/up fused into one matmul each
(the runtime's default for int4 and bf16 matrices) vs the same artifact loaded again and unfused.

    python bench/ab_fused_projections.py ~/.cache/tinytitan/bench/smollm2-135m-instruct-w4g32 [--eager]

Both copies decode after the same 512-token prompt, compiled (or --eager), in alternating blocks of 32
tokens, so drifting machine load hits both alike; the median block is reported. Compiling takes about a
minute per copy. Run it on an otherwise idle machine.
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
    ap.add_argument("--eager", action="store_true", help="eager decode steps (default: compiled)")
    ap.add_argument("--blocks", type=int, default=8, help="alternating blocks of 32 tokens per copy")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch

    import tinytitan as tt
    from tinytitan.decode_step import DecodeStep
    from tinytitan.engine import prefill
    from tinytitan.quant.modules import FusedLinear, unfuse_projections

    torch.set_num_threads(a.threads)
    models = {"fused": tt.load(a.artifact), "separate": tt.load(a.artifact)}
    unfuse_projections(models["separate"].module)
    n_fused = sum(isinstance(m, FusedLinear) for m in models["fused"].module.modules())
    print(f"{a.artifact}: {n_fused} fused groups, {'eager' if a.eager else 'compiled'}")
    first = models["fused"]
    text = TEXT.read_text(encoding="utf-8")[:8000] if TEXT.exists() else "The river town grew. " * 400
    ids = first.tokenizer.encode(text, add_bos=True)[:512]
    runs = {}
    with torch.inference_mode():
        for name, m in models.items():
            step = DecodeStep(m.module, compiled=not a.eager)
            cache = m.new_cache(len(ids) + 32 * a.blocks + 8, static=step.static_cache)
            tok = int(prefill(m.module, ids, cache).argmax())
            t = time.perf_counter()
            for i in range(3):  # compiles the step
                tok = int(step(torch.tensor([[tok]]), cache, len(ids) + i)[0].argmax())
            assert step.fallback_reason is None, step.fallback_reason
            print(f"{name}: warm-up {time.perf_counter() - t:.1f} s")
            runs[name] = {"step": step, "cache": cache, "tok": tok, "pos": len(ids) + 3, "tps": []}
        for _ in range(a.blocks):
            for r in runs.values():
                t = time.perf_counter()
                for _ in range(32):
                    logits = r["step"](torch.tensor([[r["tok"]]]), r["cache"], r["pos"])
                    r["tok"], r["pos"] = int(logits[0].argmax()), r["pos"] + 1
                r["tps"].append(32 / (time.perf_counter() - t))
    for name, r in runs.items():
        blocks = " ".join(f"{x:.1f}" for x in r["tps"])
        print(f"{name:9s} median {statistics.median(r['tps']):6.1f} tok/s   blocks: {blocks}")
    same = runs["fused"]["tok"] == runs["separate"]["tok"]
    print(f"same last token after {32 * a.blocks + 3} greedy steps: {same}")
    fused, sep = (statistics.median(runs[k]["tps"]) for k in ("fused", "separate"))
    print(f"ratio fused / separate: {fused / sep:.3f}")


if __name__ == "__main__":
    main()
