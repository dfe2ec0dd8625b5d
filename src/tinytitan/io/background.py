"""Run one loading step on a second thread while the caller does another.

Loading a model has two independent halves: the tokenizer (Python and Rust, holding the GIL) and the
weights (file reads and torch ops, which release it). On two cores they overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


@contextmanager
def in_background(fn: Callable[[], T]) -> Iterator[Callable[[], T]]:
    """Start fn() on a thread; the body gets a callable that waits for its value (or raises its error).
    Leaving the block waits for the thread, so nothing keeps running after an error in the body."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinytitan-load") as pool:
        future = pool.submit(fn)
        yield future.result
