"""`tinytitan eval MODEL --tasks ...`: measure a model (or a quantized variant) into the results store."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """examples:
  tinytitan eval gemma-3-270m --tasks kld,arc_easy,piqa,boolq --limit 50         # the embedded pack
  tinytitan eval gemma-3-270m --tasks ppl,kld,arc_easy,piqa,passkey,speed --limit 500 --data ../shared/data
  tinytitan eval smollm2-135m-instruct --tasks arc_easy --num-fewshot 5 --data arc_easy=test.json
  tinytitan eval gemma-3-270m --variant q4_0 --tasks kld,passkey --lengths 1024,4096 --depths 0,0.5,1
  tinytitan eval gemma-3-270m --tasks niah_single --haystack ../shared/data/pg2701-moby-dick/2701-0.txt
  tinytitan eval gemma-3-270m --tasks ppl --json            # rows as JSON on stdout
  tinytitan eval --list-tasks

An interrupted run resumes where it stopped: finished items and jobs are read back from the store.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model: perplexity, KLD, tasks, long context, speed",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", help="known name, .gguf path or Hugging Face checkpoint directory")
    p.add_argument("--tasks", default="ppl", help="comma-separated task names or spec files (default ppl)")
    p.add_argument("--variant", default=None, help="a quantized variant: a name or a JSON config")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (tinytitan finetune) to apply")
    p.add_argument("--limit", type=int, default=None, help="items per task (questions, windows, samples)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the spec's)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling and long-context prompts")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        help="a data folder, or TASK=FILE (repeatable); without one: $TINYTITAN_DATA, the embedded pack "
        "(runs whose --limit it holds), then Hugging Face datasets",
    )
    p.add_argument(
        "--store", default=None, help="results database (default: ~/.cache/tinytitan/results.sqlite)"
    )
    p.add_argument("--json", action="store_true", help="print the result rows as JSON")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument(
        "--reference",
        default=None,
        help="kld: the reference model (default: MODEL without its variant; for a quantized "
        "artifact, the file it was made from)",
    )
    p.add_argument("--lengths", default=None, help="long context: token lengths, e.g. 1024,4096,32768")
    p.add_argument("--depths", default=None, help="long context: needle depths in 0..1, e.g. 0,0.5,1")
    p.add_argument("--haystack", default=None, help="long context: a text file to fill the haystack with")
    p.add_argument("--samples", type=int, default=None, help="long context: prompts per length x depth")
    p.add_argument("--heatmap-dir", default=None, help="long context: where heatmap PNGs go")
    p.add_argument("--contexts", default=None, help="speed: context lengths, e.g. 512,2048")
    p.add_argument("--decode-tokens", type=int, default=None, help="speed: tokens generated per context")
    p.add_argument("--core-watts", type=float, default=None, help="speed: W per busy core when no RAPL")
    p.add_argument("--force", action="store_true", help="recompute finished jobs")
    p.add_argument("--list-tasks", action="store_true", help="list the known tasks and exit")
    p.add_argument("--ctx", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.set_defaults(func=run)


def _ints(text: str | None, what: str) -> list[int] | None:
    from tinytitan.errors import TaskError

    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TaskError(f"{what}: expected comma-separated integers, got {text!r}") from None


def _floats(text: str | None, what: str) -> list[float] | None:
    from tinytitan.errors import TaskError

    if not text:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TaskError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def _variant(text: str | None) -> object:
    if text is None:
        return None
    try:
        return json.loads(text) if text.lstrip().startswith(("{", "[")) else text
    except json.JSONDecodeError as e:
        from tinytitan.errors import TaskError

        raise TaskError(f"--variant: malformed JSON ({e.msg})") from None


def _list_tasks() -> int:
    from rich.console import Console
    from rich.table import Table

    from tinytitan.eval.registry import builtin_specs

    t = Table(title="tasks")
    for col in ("name", "type", "version", "description"):
        t.add_column(col, no_wrap=col != "description")
    for s in builtin_specs().values():
        t.add_row(s.name, s.type, s.version, s.description)
    Console().print(t)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list_tasks:
        return _list_tasks()
    from pathlib import Path

    from tinytitan.cli.common import config_from_args
    from tinytitan.errors import TaskError
    from tinytitan.eval.registry import parse_task_list
    from tinytitan.eval.runner import EvalConfig, evaluate, load_model, rows_to_json
    from tinytitan.store import Store, default_store_path

    if not args.model:
        raise TaskError("which model? (tinytitan eval MODEL --tasks ...; see tinytitan eval --help)")
    specs = parse_task_list(args.tasks)  # unknown names fail before the model loads
    cfg = config_from_args(
        EvalConfig,
        args,
        lengths=_ints(args.lengths, "--lengths"),
        depths=_floats(args.depths, "--depths"),
        contexts=_ints(args.contexts, "--contexts"),
        heatmap_dir=Path(args.heatmap_dir) if args.heatmap_dir else None,
    )
    variant = _variant(args.variant)
    reporter = _RichReporter(quiet=args.json)
    # with an adapter, results are stored under base + adapter, apart from the base's
    model = load_model(
        args.model, variant, dtype=args.dtype, device=args.device, ctx=args.ctx, adapter=args.adapter
    )
    with Store(args.store or default_store_path()) as store:
        try:
            rows = evaluate(
                model,
                specs,
                variant=variant,
                config=cfg,
                store=store,
                reporter=reporter,
                name=model.source.name if args.adapter else args.model,
            )
        finally:
            reporter.close()
    if args.json:
        sys.stdout.write(rows_to_json(rows) + "\n")
    else:
        _summary(rows, store.path)
    return 0


class _RichReporter:
    """Progress bars on stderr (one per task)."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[what]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=quiet and not self.console.is_terminal,
        )
        self.progress.start()
        self.current = None

    def task_start(self, task: str, total: int, done: int, what: str = "items") -> None:
        self.current = self.progress.add_task(task, total=total, completed=done, what=what)

    def advance(self, n: int = 1) -> None:
        if self.current is not None:
            self.progress.advance(self.current, n)

    def task_end(self, task: str, rows: list, cached: bool) -> None:
        if cached:
            self.console.print(f"{task}: already measured (from the store)")

    def note(self, message: str) -> None:
        self.console.print(message)

    def close(self) -> None:
        self.progress.stop()


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    a = abs(v)
    if a >= 1e6:
        return f"{v:.4g}"
    if a >= 100:
        return f"{v:.1f}"
    return f"{v:.4f}"


def _summary(rows: list, store_path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="results")
    for col in ("task", "metric", "value", "± stderr", "n", "note"):
        t.add_column(
            col, justify="right" if col in ("value", "± stderr", "n") else "left", no_wrap=col != "note"
        )
    for r in rows:
        if "depth=" in r.metric:  # long-context cells: the heatmap shows them
            continue
        note = r.extra.get("method") or r.extra.get("unit") or ""
        t.add_row(r.task, r.metric, _fmt(r.value), _fmt(r.stderr), str(r.n), str(note))
    c = Console()
    c.print(t)
    for r in rows:
        if "heatmap" in r.extra:
            c.print(f"{r.task} heatmap: {r.extra['heatmap']}")
    c.print(f"rows stored in {store_path}")
