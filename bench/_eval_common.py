"""Shared bits of the evaluation benchmarks: paths, progress, and updating a section of RESULTS.md."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


class PrintReporter:
    """Plain progress lines on stderr (works in a log file as well as a terminal)."""

    def __init__(self) -> None:
        self.task, self.total, self.done, self.last = "", 0, 0, -1

    def task_start(self, task: str, total: int, done: int, what: str = "items") -> None:
        self.task, self.total, self.done, self.what = task, total, done, what
        print(f"[{task}] {done}/{total} {what} already done", file=sys.stderr, flush=True)

    def advance(self, n: int = 1) -> None:
        self.done += n
        pct = int(100 * self.done / max(self.total, 1))
        if pct // 5 != self.last // 5 or self.done == self.total:
            self.last = pct
            print(f"[{self.task}] {self.done}/{self.total} {self.what} ({pct}%)", file=sys.stderr, flush=True)

    def task_end(self, task: str, rows: list, cached: bool) -> None:
        print(f"[{task}] {'from the store' if cached else 'done'}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


def write_section(name: str, body: str, path: Path = RESULTS_MD) -> None:
    """Replace the text between <!-- name:begin --> and <!-- name:end --> (appended when absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)
