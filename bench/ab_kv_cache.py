"""A/B in one process: decode tokens/s with a float32 KV cache vs a float16 one (llama.cpp's default).

    python bench/ab_kv_cache.py ~/.cache/tinytitan/bench/smollm2-135m-instruct-w4g32 [--blocks 8] [--eager]
        [--prompt 512]

Two copies of the artifact decode after the same prompt, one storing keys and values in float32, one in
float16 (`-kv16`), in alternating blocks of 32 tokens, so drifting machine load hits both alike; the median
block is reported; then the prompt pass alone, alternating (`--prefills` times each). Compiled steps by
default (up to a minute of compilation per copy). Run it on an otherwise idle machine. Then the cost in
quality: the mean KL divergence of the float16 cache's next-token
distributions from the float32 cache's over the prompt (one causal pass each), and how often their top
tokens agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _ab_decode import alternate, prompt_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--blocks", type=int, default=8, help="alternating blocks of 32 tokens per copy")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens before decoding")
    ap.add_argument("--eager", action="store_true", help="eager decode steps (default: compiled)")
    ap.add_argument("--prefills", type=int, default=6, help="alternating prompt passes per copy")
    a = ap.parse_args()

    import torch

    import tinytitan as tt
    from tinytitan.engine import prefill

    torch.set_num_threads(a.threads)
    models = {"float32": tt.load(a.artifact), "float16": tt.load(a.artifact).set_kv_cache("f16")}
    runs = alternate(models, prompt_ids(models["float32"], a.prompt), a.blocks, not a.eager)
    f32, f16 = (statistics.median(runs[k]["tps"]) for k in ("float32", "float16"))
    print(f"ratio float16 / float32 cache: {f16 / f32:.3f}")
    ids = prompt_ids(models["float32"], a.prompt)
    prefill_tps = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(a.prefills):  # the prompt pass alone, alternating, as the engine runs it
            for k, m in models.items():
                cache = m.new_cache(len(ids) + 8, static=not a.eager)
                t = time.perf_counter()
                prefill(m.module, ids, cache)
                prefill_tps[k].append(len(ids) / (time.perf_counter() - t))
    for k, xs in prefill_tps.items():
        runs = " ".join(f"{x:.0f}" for x in xs)
        print(f"{k:9s} prefill median {statistics.median(xs):6.1f} tok/s   runs: {runs}")
    ref, got = (models[k].logits(ids) for k in ("float32", "float16"))
    logp, logq = ref.log_softmax(-1), got.log_softmax(-1)
    kld = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    same = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    print(f"float16 vs float32 cache, {len(ids)} positions: mean KLD {kld:.2e}, same top token {same:.1%}")


if __name__ == "__main__":
    main()
