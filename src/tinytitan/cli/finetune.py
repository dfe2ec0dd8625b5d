"""`tinytitan finetune MODEL --data train.jsonl -o ADAPTER` and `tinytitan merge MODEL ADAPTER -o OUT`."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

EPILOG = """examples:
  tinytitan finetune smollm2-135m-instruct --data train.jsonl --eval dev.jsonl -o tickets-lora
  tinytitan finetune gemma-3-270m --data train.jsonl --variant w4g32 --rank 16 -o qlora  # QLoRA
  tinytitan finetune smollm2-135m-instruct --data train.jsonl -o tickets-lora --max-minutes 10
  tinytitan run smollm2-135m-instruct "..." --adapter tickets-lora

Data: one JSON object per line, {"prompt": ..., "completion": ...} or {"messages": [...]} (chat template
applied; the loss covers the assistant replies only). An interrupted run (Ctrl-C, --max-minutes, a kill)
resumes from its last checkpoint when the same command is run again.
"""

MERGE_EPILOG = """examples:
  tinytitan merge smollm2-135m-instruct tickets-lora -o tickets-bf16           # artifact folder (bf16)
  tinytitan merge smollm2-135m-instruct tickets-lora -o tickets-w4 --variant w4g32
  tinytitan merge smollm2-135m-instruct tickets-lora -o tickets.gguf            # for llama.cpp / Ollama
  tinytitan run tickets-w4 "..."
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="train a LoRA adapter on a frozen (optionally quantized) base",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="known name, .gguf path or Hugging Face checkpoint directory")
    p.add_argument("--data", required=True, help="training examples (JSONL)")
    p.add_argument("--eval", default=None, help="evaluation examples (JSONL): loss reported each epoch")
    p.add_argument("-o", "--output", required=True, help="adapter folder to write")
    p.add_argument("--variant", default=None, help="quantize the frozen base first (QLoRA), e.g. w4g32, w8")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha/r")
    p.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapter input (default 0.05)")
    p.add_argument(
        "--targets", default="all", help="all | attn | mlp | comma-separated names, e.g. q_proj,v_proj"
    )
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="forward passes per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=10, help="warmup steps (default 10)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--max-len", type=int, default=512, help="longest example in tokens (default 512)")
    p.add_argument("--seed", type=int, default=0, help="adapter init, data order and dropout (default 0)")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints (default 50)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
    p.add_argument("--fp32", action="store_true", help="float32 matmuls for a float base (default bf16)")
    p.add_argument("--force", action="store_true", help="discard an existing adapter/checkpoint in OUTPUT")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.set_defaults(func=run_finetune)

    m = sub.add_parser(
        "merge",
        help="merge a LoRA adapter into its base and save an artifact or GGUF",
        epilog=MERGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("model", help="the base: known name, .gguf path or Hugging Face checkpoint directory")
    m.add_argument("adapter", help="adapter folder (tinytitan finetune -o ...)")
    m.add_argument("-o", "--output", required=True, help="OUT/ (tinytitan artifact) or OUT.gguf")
    m.add_argument("--variant", default=None, help="quantize the merged model, e.g. w4g32, q4_0")
    m.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    m.set_defaults(func=run_merge)


def run_finetune(args: argparse.Namespace) -> int:
    from tinytitan.cli.common import config_from_args
    from tinytitan.errors import TinyTitanError
    from tinytitan.finetune.data import read_examples
    from tinytitan.finetune.lora import LoraConfig, parse_targets
    from tinytitan.finetune.trainer import TrainConfig, Trainer
    from tinytitan.loader import load

    out = Path(args.output)
    if args.force and out.exists():
        shutil.rmtree(out)
    elif out.exists() and not (out / "checkpoint").exists() and any(out.iterdir()):
        raise TinyTitanError(f"{out} exists and holds no checkpoint to resume; pass --force to replace it")
    lora = LoraConfig(args.rank, args.alpha, args.dropout, parse_targets(args.targets))
    cfg = config_from_args(TrainConfig, args, bf16=not args.fp32)
    model = load(args.model, device=args.device, variant=args.variant, progress=True, reference=True)
    train = read_examples(args.data, model.tokenizer, args.max_len)  # bad data fails before training
    dev = read_examples(args.eval, model.tokenizer, args.max_len) if args.eval else None
    reporter = _RichReporter()
    try:
        trainer = Trainer(model, train, lora, cfg, out, dev, reporter, args.max_minutes)
        reporter.note(
            f"{len(train)} examples, {trainer.total_steps} steps, LoRA r={lora.rank} on "
            f"{len(trainer.attached.names)} modules: {trainer.attached.n_params:,} trainable parameters"
        )
        result = trainer.run()
    finally:
        reporter.close()
    state = "complete" if result.complete else f"stopped at step {result.steps}/{result.total_steps}"
    print(f"adapter written to {out} ({state}, {result.seconds / 60:.1f} min)")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from tinytitan.finetune.merge import merge_adapter, save_merged
    from tinytitan.loader import load

    model = load(args.model, adapter=args.adapter, progress=True, reference=True)
    path = save_merged(merge_adapter(model), args.output, args.variant, force=args.force)
    print(f"merged model written to {path} (load it with tinytitan.load({str(path)!r}))")
    return 0


class _RichReporter:
    """A progress bar with loss, learning rate and tokens/s on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("finetune"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = None

    def start(self, total_steps: int, done: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=done, loss="-", lr="-", tps="-"
        )

    def step(self, rec) -> None:
        tps = rec.tokens / rec.seconds if rec.seconds else 0.0
        if not self.console.is_terminal and rec.step % 10 == 0:  # a log file gets a line now and then
            self.console.print(f"step {rec.step}: loss {rec.loss:.4f}, lr {rec.lr:.2e}, {tps:.0f} tok/s")
        if self.task is not None:
            self.progress.update(
                self.task, advance=1, loss=f"{rec.loss:.4f}", lr=f"{rec.lr:.2e}", tps=f"{tps:.0f}"
            )

    def note(self, message: str) -> None:
        self.console.print(message)

    def close(self) -> None:
        self.progress.stop()
