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

from _ab_decode import alternate, prompt_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--eager", action="store_true", help="eager decode steps (default: compiled)")
    ap.add_argument("--blocks", type=int, default=8, help="alternating blocks of 32 tokens per copy")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch

    import tinytitan as tt
    from tinytitan.quant.modules import FusedLinear, unfuse_projections

    torch.set_num_threads(a.threads)
    models = {"fused": tt.load(a.artifact), "separate": tt.load(a.artifact)}
    unfuse_projections(models["separate"].module)
    n_fused = sum(isinstance(m, FusedLinear) for m in models["fused"].module.modules())
    print(f"{a.artifact}: {n_fused} fused groups, {'eager' if a.eager else 'compiled'}")
    runs = alternate(models, prompt_ids(models["fused"]), a.blocks, compiled=not a.eager)
    same = runs["fused"]["tok"] == runs["separate"]["tok"]
    print(f"same last token after {32 * a.blocks + 3} greedy steps: {same}")
    fused, sep = (statistics.median(runs[k]["tps"]) for k in ("fused", "separate"))
    print(f"ratio fused / separate: {fused / sep:.3f}")


if __name__ == "__main__":
    main()
