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

from _ab_decode import alternate, prompt_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--blocks", type=int, default=8, help="alternating blocks of 32 tokens per copy")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eager", action="store_true", help="eager decode steps (default: compiled)")
    a = ap.parse_args()

    import torch

    import tinytitan as tt
    from tinytitan.models import attention_kernel

    torch.set_num_threads(a.threads)
    if not attention_kernel.load():
        raise SystemExit(f"the kernel does not build here: {attention_kernel.failure()}")
    uses = {"kernel": True, "matmuls": False}
    models = {name: tt.load(a.artifact) for name in uses}

    def switch(name: str) -> None:  # read when a step is traced, and guarded on
        attention_kernel._loaded = uses[name]

    runs = alternate(models, prompt_ids(models["kernel"]), a.blocks, not a.eager, switch)
    attention_kernel._loaded = True
    on, off = (statistics.median(runs[k]["tps"]) for k in ("kernel", "matmuls"))
    print(f"ratio kernel / matmuls: {on / off:.3f}")


if __name__ == "__main__":
    main()
