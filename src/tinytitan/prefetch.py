"""A GGUF file's header and tokenizer read in a thread while the process is still importing torch.

A command's cold start is mostly three serial costs (bench/RESULTS.md): importing torch (~1.1 s), parsing
the header and building the tokenizer (~0.6 + 1.2 s for Gemma 3 270M's 262k-token vocabulary), and the
module over the file's blocks. The CLI calls `start(MODEL)` before anything imports torch (the header
reader and the tokenizer need numpy and `tokenizers` only); `tinytitan.load` then takes what the thread
made for that path (`take`) instead of reading it again. Both mostly hold the GIL, so the overlap saves a
part (about 0.3-0.6 s measured), not the sum. Anything that fails in the thread is left for `load` to meet
again and report.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

_jobs: dict[Path, tuple[threading.Thread, dict[str, Any]]] = {}


def start(name_or_path: str) -> None:
    """Begin reading the header and building the tokenizer of an existing .gguf file (a zoo name that is
    ready, or a path); anything else is left to `load`."""
    from tinytitan import zoo

    try:
        p = Path(name_or_path)
        if not p.exists():
            e = zoo.ZOO.get(str(name_or_path))
            if e is None or not e.ready():
                return
            p = e.target()
        if p.is_dir() or p.suffix != ".gguf":
            return
        p = p.resolve()
    except OSError:
        return
    box: dict[str, Any] = {}
    thread = threading.Thread(target=_read, args=(p, box), daemon=True, name="tinytitan-prefetch")
    _jobs[p] = (thread, box)
    thread.start()


def _read(path: Path, box: dict[str, Any]) -> None:
    try:
        from tinytitan.io.gguf import GGUFFile
        from tinytitan.tokenizer import Tokenizer

        f = GGUFFile(path)
        box["file"] = f
        box["tokenizer"] = Tokenizer.from_gguf(dict(f.fields))
    except Exception:  # load() reads it again and reports the error itself
        box.clear()


def take(path: Path) -> tuple[Any, Any] | None:
    """(GGUFFile, Tokenizer) read for this path by `start`, waiting for the thread; None if none."""
    job = _jobs.pop(Path(path).resolve(), None)
    if job is None:
        return None
    job[0].join()
    box = job[1]
    return (box["file"], box["tokenizer"]) if "tokenizer" in box else None
