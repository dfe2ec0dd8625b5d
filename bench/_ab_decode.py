"""Shared by the in-process A/B scripts: copies of one artifact decode after the same prompt, alternating
in blocks of 32 tokens, so drifting machine load hits every copy alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"


def prompt_ids(model, n: int = 512) -> list[int]:
    """The first n tokens of WikiText-2's test text (a repeated sentence without ../shared)."""
    chars = max(8000, 8 * n)
    fallback = "The river town grew. " * (chars // 20)
    text = TEXT.read_text(encoding="utf-8")[:chars] if TEXT.exists() else fallback
    return model.tokenizer.encode(text, add_bos=True)[:n]


def alternate(
    models: dict, ids: list[int], blocks: int, compiled: bool, switch: Callable[[str], None] = lambda n: None
) -> dict[str, dict]:
    """Decode tokens/s per block for every copy; `switch(name)` runs before a copy's warm-up (after its
    step is made) and before each of its blocks. Returns name -> {"tps": [...], "tok": last token}."""
    import torch

    from tinytitan.decode_step import DecodeStep
    from tinytitan.engine import prefill

    runs = {}
    with torch.inference_mode():
        for name, m in models.items():
            step = DecodeStep(m.module, compiled=compiled)
            switch(name)
            cache = m.new_cache(len(ids) + 32 * blocks + 8, static=step.static_cache)
            tok = int(prefill(m.module, ids, cache).argmax())
            t = time.perf_counter()
            for i in range(3):  # compiles a compiled step
                tok = int(step(torch.tensor([[tok]]), cache, len(ids) + i)[0].argmax())
            assert step.fallback_reason is None, step.fallback_reason
            print(f"{name}: warm-up {time.perf_counter() - t:.1f} s")
            runs[name] = {"step": step, "cache": cache, "tok": tok, "pos": len(ids) + 3, "tps": []}
        for _ in range(blocks):
            for name, r in runs.items():
                switch(name)
                t = time.perf_counter()
                for _ in range(32):
                    logits = r["step"](torch.tensor([[r["tok"]]]), r["cache"], r["pos"])
                    r["tok"], r["pos"] = int(logits[0].argmax()), r["pos"] + 1
                r["tps"].append(32 / (time.perf_counter() - t))
    for name, r in runs.items():
        shown = " ".join(f"{x:.1f}" for x in r["tps"])
        print(f"{name:9s} median {statistics.median(r['tps']):6.1f} tok/s   blocks: {shown}")
    return runs
