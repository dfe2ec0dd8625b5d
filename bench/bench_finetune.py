"""Fine-tuning benchmark (issue 8): the worked example, base vs tuned vs tuned + 4-bit, one run.

    python bench/bench_finetune.py [--out runs/tickets] [--model smollm2-135m-instruct]
           [--max-steps 60] [--limit 100] [--max-minutes 17]

1. makes the data set (examples/tickets/make_data.py: support message -> JSON ticket) in OUT/data;
2. trains a LoRA adapter on the train split (the `tinytitan finetune` defaults but for the flags below),
   unless OUT/adapter already holds a finished one (an interrupted run resumes);
3. merges it and quantizes the merged model to int4 (w4g32) as an artifact in OUT/merged-w4g32;
4. with --qlora V, trains a second adapter on the base quantized to V (QLoRA: the base stays packed while
   training) into OUT/qlora-V, and scores the packed base + that adapter as it would ship;
5. scores base, base + adapter, the merged 4-bit artifact (and the QLoRA pair) on the held-out test split
   with the task spec examples/tickets/tickets.yaml (exact match, field accuracy, JSON validity), and
   prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tickets"


def make_data(out: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_data", EXAMPLE / "make_data.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in mod.make_splits().items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def score(model, name: str, data: Path, limit: int, store: Path) -> dict[str, float]:
    from tinytitan.eval.runner import EvalConfig, evaluate

    t = time.perf_counter()
    rows = evaluate(
        model,
        [str(EXAMPLE / "tickets.yaml")],
        config=EvalConfig(limit=limit, data=[str(data)]),
        store=store,
        name=name,
    )
    out = {r.metric: r.value for r in rows}
    out.update({f"{r.metric}_se": r.stderr for r in rows})
    out["eval_s"] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/tickets")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-minutes", type=float, default=17)
    ap.add_argument("--limit", type=int, default=100, help="test examples scored per model")
    ap.add_argument("--no-train", action="store_true", help="score the adapter in OUT as it is")
    ap.add_argument("--qlora", default=None, metavar="V", help="also train on the base quantized to V")
    args = ap.parse_args()

    import tinytitan.eval.runner  # noqa: F401  (everything imported before the long run starts)
    from tinytitan.cli import finetune  # noqa: F401
    from tinytitan.cli.main import main as cli
    from tinytitan.finetune.merge import merge_adapter, save_merged
    from tinytitan.loader import load

    out = Path(args.out)
    data, adapter, merged = out / "data", out / "adapter", out / "merged-w4g32"
    make_data(data)

    def train(dest: Path, *extra: str) -> tuple[float, dict]:
        cmd = [
            "finetune", args.model, "--data", str(data / "train.jsonl"), "--eval", str(data / "dev.jsonl"),
            "-o", str(dest), "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--rank", str(args.rank), "--warmup", "5", "--save-every", "20",
            "--max-minutes", str(args.max_minutes), *extra,
        ]  # fmt: skip
        print("tinytitan " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        if not args.no_train and cli(cmd) != 0:
            raise SystemExit("training failed")
        return time.perf_counter() - t0, json.loads((dest / "adapter.json").read_text())["training"]

    runs = {"LoRA": train(adapter)}
    qadapter = out / f"qlora-{args.qlora}"
    if args.qlora:
        runs[f"QLoRA on {args.qlora}"] = train(qadapter, "--variant", args.qlora)

    if not merged.exists():
        save_merged(merge_adapter(load(args.model, adapter=adapter)), merged, "w4g32")
    store = out / "results.sqlite"
    results = {
        "base": score(load(args.model), args.model, data, args.limit, store),
        f"tuned (LoRA r={args.rank})": score(
            load(args.model, adapter=adapter), f"{args.model}+lora", data, args.limit, store
        ),
        "tuned, merged, w4g32": score(load(merged), str(merged), data, args.limit, store),
    }
    if args.qlora:
        results[f"{args.qlora} base (no adapter)"] = score(
            load(args.model, variant=args.qlora), f"{args.model}@{args.qlora}", data, args.limit, store
        )
        results[f"QLoRA: {args.qlora} base + adapter trained on it"] = score(
            load(args.model, variant=args.qlora, adapter=qadapter),
            f"{args.model}@{args.qlora}+qlora",
            data,
            args.limit,
            store,
        )
    print()
    for name, (train_s, manifest) in runs.items():
        print(f"{name} training: {manifest['steps']} steps of {args.batch_size} examples, "
              f"{train_s / 60:.1f} min here (complete: {manifest['complete']}), "
              f"final train loss {manifest['final_loss']:.4f}, "
              f"eval loss {[round(e['eval_loss'], 4) for e in manifest['eval_losses']]}")  # fmt: skip
    print(f"test examples per model: {args.limit}")
    print("| model | exact match | field accuracy | valid JSON | eval time |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['exact_match']:.3f} ± {r['exact_match_se']:.3f} | {r['field_acc']:.3f} ± "
            f"{r['field_acc_se']:.3f} | {r['json_valid']:.3f} | {r['eval_s']:.0f} s |"
        )


if __name__ == "__main__":
    main()
