"""`tinytitan quantize MODEL --scheme NAME -o OUT`: write a quantized artifact (and optionally a GGUF)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tinytitan.errors import TinyTitanError

EPILOG = """examples:
  tinytitan quantize --list
  tinytitan quantize gemma-3-270m --scheme w4g32-e8 -o out/gemma-w4
  tinytitan quantize gemma-3-270m --scheme w4g32-gptq --calib notes.txt -o out/gemma-gptq
  tinytitan quantize gemma-3-270m --target-size 150MB -o out/gemma-150
  tinytitan quantize smollm2-135m-instruct --scheme q4_0 --gguf out/smollm2-q4_0.gguf
  tinytitan quantize out/smollm2-w4 --gguf out/smollm2-w4.gguf     # an artifact folder, exported
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="make a smaller variant of a model",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", help="known name, .gguf path or checkpoint directory")
    p.add_argument("--scheme", default=None, help="a preset or spelled-out scheme (see --list)")
    p.add_argument("--list", action="store_true", help="list the schemes with their bits per weight")
    p.add_argument("--calib", default=None, help="calibration text file (default: self-generated)")
    p.add_argument("--target-size", default=None, help="mixed precision to a file size, e.g. 150MB")
    p.add_argument("--target-bpw", type=float, default=None, help="mixed precision to bits per weight")
    p.add_argument(
        "--recover",
        type=int,
        default=None,
        metavar="STEPS",
        help="then train scales, zeros and norms against the reference for STEPS steps of 512 tokens "
        "(recovery by distillation; the same as -kdSTEPS in a scheme name)",
    )
    p.add_argument("-o", "--out", default=None, help="artifact folder to write")
    p.add_argument("--gguf", default=None, help="also (or only) write a GGUF file llama.cpp runs")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    p.set_defaults(func=run)


def _bar_report(bar, what: str) -> Callable[[str, int, int], None]:
    """A quantize / recover progress callback drawing one rich bar."""
    task = bar.add_task(what, total=1)

    def report(msg: str, i: int, n: int) -> None:
        bar.update(task, description=f"{what}: {msg}", completed=i, total=max(n, 1))

    return report


def parse_size(text: str) -> int:
    t = text.strip().upper().replace(" ", "")
    for unit, mult in (
        ("GIB", 1 << 30),
        ("MIB", 1 << 20),
        ("KIB", 1 << 10),
        ("GB", 10**9),
        ("MB", 10**6),
        ("KB", 10**3),
        ("B", 1),
    ):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    raise TinyTitanError(f"cannot read size {text!r} (e.g. 150MB, 0.2GB, 120MiB)")


def list_schemes() -> int:
    from rich.console import Console
    from rich.table import Table

    from tinytitan.quant.schemes import PRESETS, parse_variant

    t = Table(title="quantization schemes (bits per weight on 640-wide rows, scales included)")
    for c in ("scheme", "blocks", "embedding/head", "bpw blocks", "bpw embedding", "method", "what"):
        t.add_column(c)
    for name, (_, desc) in PRESETS.items():
        cfg = parse_variant(name)
        try:
            b, e = cfg.blocks.bits_per_weight(640), cfg.embedding.bits_per_weight(640)
            bpw = f"{b:.2f}", f"{e:.2f}"
        except ImportError:
            bpw = ("?", "?")
        t.add_row(name, cfg.blocks.label(), cfg.embedding.label(), *bpw, cfg.method, desc)
    Console(width=max(160, Console().width)).print(t)
    print(
        "spell out others: w{8,4,3,2}[g32|g64|g128][s] [-e<scheme>] [-gptq|-awq|-imatrix], e.g. w4g64-e8-gptq"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return list_schemes()
    if not args.model:
        raise TinyTitanError("name a model to quantize (or --list the schemes)")
    if not args.out and not args.gguf:
        raise TinyTitanError("give -o OUT (artifact folder) and/or --gguf OUT.gguf")
    for target in (args.out, args.gguf):
        if target and Path(target).exists() and not args.force:
            raise TinyTitanError(f"{target} exists; pass --force to replace it")
    calib_text = None
    if args.calib:
        p = Path(args.calib)
        if not p.is_file():
            raise TinyTitanError(f"calibration file not found: {p}")
        calib_text = p.read_text(encoding="utf-8", errors="replace")
    from rich.console import Console
    from rich.progress import Progress

    from tinytitan.loader import load
    from tinytitan.quant.api import quantize
    from tinytitan.quant.schemes import parse_variant

    console = Console(stderr=True)
    artifact = Path(args.model).is_dir() and (Path(args.model) / "tinytitan.json").is_file()
    if artifact and not (args.scheme or args.target_size or args.target_bpw):
        model = load(args.model)  # an artifact already made: written again (e.g. --gguf) as it is
        qcfg = model.quant.config
    elif args.target_size or args.target_bpw:
        from tinytitan.quant.mixed import plan_to_budget

        base = load(args.model, progress=True, reference=True)
        budget = parse_size(args.target_size) if args.target_size else None
        with Progress(console=console, transient=True) as bar:
            model = plan_to_budget(
                base,
                budget_bytes=budget,
                target_bpw=args.target_bpw,
                calib_text=calib_text,
                console=console,
                recover_steps=args.recover or 0,
                progress=_bar_report(bar, "recovering"),
            )
        qcfg = model.quant.config
    else:
        if not args.scheme:
            raise TinyTitanError("give --scheme NAME (see --list) or a --target-size / --target-bpw")
        qcfg = parse_variant(args.scheme)
        if args.recover is not None:
            if args.recover <= 0:
                raise TinyTitanError(f"--recover takes a positive number of steps, not {args.recover}")
            qcfg = replace(qcfg, recover_steps=args.recover)
        base = load(args.model, progress=True, reference=True)
        with Progress(console=console, transient=True) as bar:
            model = quantize(base, qcfg, calib_text=calib_text, progress=_bar_report(bar, "quantizing"))
    info = model.quant
    console.print(f"{qcfg.name}: {info.file_bytes() / 1e6:.1f} MB, {info.bits_per_weight():.2f} bits/weight")
    for note in info.notes:
        console.print(f"  note: {note}")
    if args.out:
        from tinytitan.quant.artifact import save_artifact

        path = save_artifact(model, args.out, force=args.force)
        console.print(f"wrote {path}")
    if args.gguf:
        from tinytitan.quant.export import export_gguf

        path = export_gguf(model, args.gguf, force=args.force)
        console.print(f"wrote {path}")
    return 0
