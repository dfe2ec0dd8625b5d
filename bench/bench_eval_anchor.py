"""Anchor: Gemma 3 270M (pretrained) zero-shot PIQA / ARC-Easy / BoolQ against its model card.

The model card reports PIQA 67.7, ARC-e 57.7, BoolQ 61.4 (0-shot, pretrained model). This runs our
built-in scorer on the shipped GGUF over the full ../shared/data sets (lm-evaluation-harness prompts and
acc / acc_norm), stores every row (resumable: rerun the same command after an interruption), and with
--write-results records the comparison in bench/RESULTS.md.

    python bench/bench_eval_anchor.py                      # full sets (hours on 2 cores)
    python bench/bench_eval_anchor.py --limit 20           # a quick check that everything runs
    python bench/bench_eval_anchor.py --write-results      # full sets, then update RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
import time

from _eval_common import SHARED_DATA, PrintReporter, write_section

MODEL_CARD = {"piqa": 67.7, "arc_easy": 57.7, "boolq": 61.4}  # Gemma 3 270M PT, 0-shot
TOLERANCE = 2.5  # points


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--variant", default=None, help="a quantized variant (default: the GGUF as shipped)")
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--limit", type=int, default=None, help="questions per task (default: all)")
    ap.add_argument("--store", default=None, help="results database (default: tinytitan's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    a = ap.parse_args()

    from tinytitan.eval.runner import EvalConfig, evaluate, load_model

    t0 = time.time()
    model = load_model(a.model, a.variant)
    cfg = EvalConfig(limit=a.limit, num_fewshot=0, data=[a.data], batch_size=a.batch_size)
    rows = evaluate(
        model,
        list(MODEL_CARD),
        variant=a.variant,
        config=cfg,
        store=a.store,
        reporter=PrintReporter(),
        name=a.model,
    )
    by = {(r.task, r.metric): r for r in rows}
    lines = [
        f"Model: `{a.model}`{f' variant `{a.variant}`' if a.variant else ' (GGUF as shipped)'}, 0-shot, "
        f"lm-evaluation-harness prompts, built-in scorer. Data: `../shared/data` "
        f"({'first ' + str(a.limit) + ' questions per task' if a.limit else 'full sets'}).",
        "",
        "| task | n | acc | acc_norm | model card | gap (best of acc, acc_norm) | within 2.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    print(f"{'task':<10} {'n':>5} {'acc':>14} {'acc_norm':>14} {'card':>6} {'gap':>6}")
    for task, card in MODEL_CARD.items():
        acc = by[task, "acc"]
        norm = by.get((task, "acc_norm"))
        vals = [100 * acc.value] + ([100 * norm.value] if norm else [])
        gap = min((v - card for v in vals), key=abs)
        ok = abs(gap) <= TOLERANCE
        fmt = lambda r: f"{100 * r.value:.1f} ± {100 * r.stderr:.1f}" if r else "—"  # noqa: E731
        print(f"{task:<10} {acc.n:>5} {fmt(acc):>14} {fmt(norm):>14} {card:>6.1f} {gap:>+6.1f}")
        lines.append(
            f"| {task} | {acc.n} | {fmt(acc)} | {fmt(norm)} | {card} | {gap:+.1f} | {'yes' if ok else 'no'} |"
        )
    r0 = rows[0]
    lines += [
        "",
        f"Measured {r0.time} on `{r0.machine}`, tinytitan {r0.tool_version}, "
        f"{time.time() - t0:.0f} s this run (finished jobs are read back from the store).",
    ]
    if a.write_results:
        write_section(
            "eval-anchor", "## Zero-shot anchor: Gemma 3 270M vs its model card\n\n" + "\n".join(lines)
        )
        print("bench/RESULTS.md updated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
