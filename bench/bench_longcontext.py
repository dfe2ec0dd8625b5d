"""Long-context grid: a reference model vs a 4-bit variant, lengths x needle depths, exact match.

Default: Gemma 3 270M as shipped vs `w4g32` (int4, groups of 32), passkey and single-needle retrieval at
1K, 4K, 16K and 32K tokens x depths 0, 25, 50, 75, 100 %. Every prompt's result is stored as soon as it is
scored, so an interrupted run continues where it stopped. A full 32K-token prefill of Gemma in float32 on
2 cores takes several minutes per prompt: the full grid takes hours.

    python bench/bench_longcontext.py --lengths 1024 --depths 0,1 --tasks passkey      # quick check
    python bench/bench_longcontext.py --write-results                                 # the full grid
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _eval_common import PrintReporter, write_section

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--variant", default="w4g32", help="the quantized variant compared with the reference")
    ap.add_argument("--tasks", default="passkey,niah_single")
    ap.add_argument("--lengths", default="1024,4096,16384,32768")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--samples", type=int, default=1, help="prompts per (length, depth) cell")
    ap.add_argument("--haystack", default=None, help="a text file for the haystack (default: filler text)")
    ap.add_argument("--store", default=None, help="results database (default: tinytitan's)")
    ap.add_argument("--out", default=str(HERE), help="where the comparison heatmaps go")
    ap.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    a = ap.parse_args()

    from tinytitan.eval.longcontext import heatmap
    from tinytitan.eval.runner import EvalConfig, evaluate, load_model

    lengths = [int(x) for x in a.lengths.split(",")]
    depths = [float(x) for x in a.depths.split(",")]
    cfg = EvalConfig(lengths=lengths, depths=depths, samples=a.samples, haystack=a.haystack)
    results: dict[str, dict[str, dict[tuple[int, float], float]]] = {}
    t0 = time.time()
    for label, variant in (("reference", None), (a.variant, a.variant)):
        print(f"== {a.model} {label}", file=sys.stderr)
        model = load_model(a.model, variant)
        rows = evaluate(
            model, a.tasks, variant=variant, config=cfg, store=a.store, reporter=PrintReporter(), name=a.model
        )
        for r in rows:
            if "depth" in r.extra and r.metric.startswith("exact_match@"):
                results.setdefault(r.task, {}).setdefault(label, {})[
                    (r.extra["length"], r.extra["depth"])
                ] = r.value
        del model
    lines = [
        f"Model `{a.model}`: reference (GGUF as shipped) vs `{a.variant}`; {a.samples} prompt(s) per cell, "
        f"greedy, exact match (all expected answers in the output); haystack: "
        f"{'`' + a.haystack + '`' if a.haystack else 'filler text'}.",
        "",
    ]
    for task, panels in results.items():
        png = heatmap(panels, Path(a.out) / f"longcontext_{task}.png", f"{a.model} {task}")
        print(f"{task}: heatmap {png}")
        lines += [
            f"### {task}",
            "",
            f"![{task}]({png.name})",
            "",
            "| length | depth | " + " | ".join(panels) + " |",
            "|---|---|" + "---|" * len(panels),
        ]
        for L in lengths:
            for d in depths:
                vals = " | ".join(f"{panels[p].get((L, d), float('nan')):.2f}" for p in panels)
                lines.append(f"| {L} | {d:.0%} | {vals} |")
                print(f"{task:<14} {L:>6} {d:>5.0%}  {vals}")
        lines.append("")
    lines.append(f"{time.time() - t0:.0f} s this run (finished prompts are read back from the store).")
    if a.write_results:
        write_section("longcontext", "## Long context: reference vs 4-bit\n\n" + "\n".join(lines))
        print("bench/RESULTS.md updated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
