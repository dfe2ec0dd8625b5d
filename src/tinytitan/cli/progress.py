"""Progress bars for a sweep: one overall bar with an ETA over its jobs, one for the current task."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from tinytitan.sweep.jobs import JobOutcome, SweepReporter


class SweepBars(SweepReporter):
    """Live bars on a terminal; in a log (not a terminal) one line per finished job, with the ETA."""

    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        self.total = self.finished = self.ran = 0
        self.t0 = time.monotonic()
        self.progress = Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[what]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        if self.live:
            self.progress.start()
        self.overall = self.progress.add_task("sweep", total=0, what="jobs")
        self.current: int | None = None

    def sweep_start(self, total: int, done: int) -> None:
        self.total, self.finished, self.t0 = total, done, time.monotonic()
        self.ran = 0
        self.progress.update(self.overall, total=total, completed=done)
        if done:
            self.console.print(f"{done} of {total} jobs are already in the store")

    def job_start(self, variant: str, task: str) -> None:
        self.progress.update(self.overall, description=f"sweep: {variant} / {task}")

    def job_end(self, outcome: JobOutcome) -> None:
        self._drop_current()
        self.progress.advance(self.overall)
        self.finished += 1
        if outcome.status == "done":
            self.ran += 1
            left = (time.monotonic() - self.t0) / self.ran * (self.total - self.finished)
            eta = "" if self.live else f", about {left / 60:.0f} min left"
            self.console.print(
                f"[{self.finished}/{self.total}] {outcome.variant} / {outcome.task}: "
                f"done in {outcome.seconds:.0f} s{eta}"
            )
        elif outcome.status in ("failed", "skipped"):
            self.console.print(f"{outcome.variant} / {outcome.task}: {outcome.status}: {outcome.message}")

    # evaluate()'s callbacks (the current task's items)
    def task_start(self, task: str, total: int, done: int, what: str = "items") -> None:
        self._drop_current()
        self.current = self.progress.add_task(f"  {task}", total=total, completed=done, what=what)

    def advance(self, n: int = 1) -> None:
        if self.current is not None:
            self.progress.advance(self.current, n)

    def note(self, message: str) -> None:
        self.console.print(message)

    def _drop_current(self) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
            self.current = None

    def close(self) -> None:
        if self.live:
            self.progress.stop()
