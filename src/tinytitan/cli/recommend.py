"""`tinytitan recommend --ram 300MB`: the best measured variant that fits a device."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recommend", help="pick the best measured variant for a memory/speed budget")
    p.add_argument("--ram", required=True, help="memory for the model process, e.g. 300MB or 1.5GB")
    p.add_argument("--context", type=int, default=4096, help="context length to fit (default 4096)")
    p.add_argument("--min-decode-tps", type=float, default=None, help="decode tokens/s at least")
    p.add_argument("--min-top1", type=float, default=None, help="top-1 agreement at least (0.9 or 90)")
    p.add_argument("--model", default=None, help="model name as swept (default: the latest measured)")
    p.add_argument("--store", default=None, help="results database (default ~/.cache/tinytitan)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tinytitan.cli.quantize import parse_size
    from tinytitan.errors import TinyTitanError
    from tinytitan.report.leaderboard import build
    from tinytitan.report.recommend import recommend
    from tinytitan.store import default_store_path

    store = Path(args.store) if args.store else default_store_path()
    if not store.exists():
        raise TinyTitanError(f"no results store at {store}: run `tinytitan sweep MODEL` first")
    if args.context < 1:
        raise TinyTitanError("--context must be a positive number of tokens")
    board = build(store, args.model)
    if not board.entries:
        raise TinyTitanError(f"no results for {args.model or 'any model'} in {store}")
    ram = parse_size(args.ram)
    rec = recommend(board, ram, args.context, args.min_decode_tps, args.min_top1)
    want = f"{ram / 1e6:.0f} MB at {args.context} tokens"
    if rec.best is None:
        print(f"nothing measured for {board.model} fits {want}.")
        for n in rec.rejected:
            print(f"  {n.entry.label}: {'; '.join(n.why_not)}")
        for a in rec.advice:
            print(f"what would: {a}")
        return 1
    e = rec.best.entry
    print(f"recommended for {want}: {e.label}")
    print(
        f"  why: lowest mean KLD among the variants that fit ({_q(e)}), needs "
        f"{(rec.best.bytes or 0) / 1e6:.0f} MB" + (f", decodes {e.decode:.1f} tok/s" if e.decode else "")
    )
    if rec.runner_up:
        r = rec.runner_up.entry
        print(f"  runner-up: {r.label} ({_q(r)}, needs {(rec.runner_up.bytes or 0) / 1e6:.0f} MB)")
    for n in rec.rejected:
        print(f"  not {n.entry.label}: {'; '.join(n.why_not)}")
    print(f"  memory estimate: {rec.formula}")
    return 0


def _q(e) -> str:
    parts = []
    if e.kld is not None:
        parts.append(f"KLD {e.kld:.4f}")
    if e.top1 is not None:
        parts.append(f"top-1 {e.top1:.1f}%")
    if e.size:
        parts.append(f"{e.size / 1e6:.0f} MB file")
    return ", ".join(parts) or "no quality measurement"
