"""A/B in one process: what dynamo's per-call work costs a compiled decode step.

    python bench/ab_step_overhead.py ~/.cache/tinytitan/bench/smollm2-135m-instruct-w4g32 [--blocks 8]
        [--kv f16]

Three copies of the artifact decode after the same prompt in alternating blocks of 32 tokens:
`inputs` (the module's weights and tables traced as graph inputs, which dynamo gathers before every
call: the step before this change), `constants` (traced with `install_free_tensors`, as the runtime
compiles it now: the tensors are attributes of the graph) and `noguard` (as `constants`, run under
`set_stance(skip_guard_eval_unsafe=True)` after its warm-up: no guard checks at all, which the runtime
does not do). Compiled steps (up to a minute of compilation per copy); the median block is reported.
Run it on an otherwise idle machine.
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
    ap.add_argument("--kv", default=None, help="KV cache type (f16; default float32)")
    a = ap.parse_args()

    import torch

    import tinytitan as tt
    from tinytitan import decode_step

    torch.set_num_threads(a.threads)
    names = ("inputs", "constants", "noguard")
    models = {n: tt.load(a.artifact).set_kv_cache(a.kv) for n in names}
    as_constants = decode_step._trace_options
    seen: set[str] = set()

    def as_inputs():
        return torch._dynamo.config.patch(specialize_float=True, install_free_tensors=False)

    def switch(name: str) -> None:  # first call: before the copy's warm-up, which must run with guards
        decode_step._trace_options = as_inputs if name == "inputs" else as_constants
        torch.compiler.set_stance("default", skip_guard_eval_unsafe=name == "noguard" and name in seen)
        seen.add(name)

    runs = alternate(models, prompt_ids(models["inputs"]), a.blocks, True, switch)
    torch.compiler.set_stance("default")
    base = statistics.median(runs["inputs"]["tps"])
    for n in names[1:]:
        print(f"ratio {n} / inputs: {statistics.median(runs[n]['tps']) / base:.3f}")


if __name__ == "__main__":
    main()
