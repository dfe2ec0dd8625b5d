"""What a task runner gets: the options of one `evaluate` call, the progress reporter, and a Run (the
model, its store and identity, and the state its kind's `prepare` found). Each task kind's preparation
and scoring live beside its metrics (eval/multiple_choice.py, perplexity.py, kld.py, longcontext.py,
efficiency.py, generation.py); eval/runner.py orchestrates them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinytitan.eval.registry import TaskSpec
from tinytitan.store import JobIdentity, ResultRow, Store, canonical_json


@dataclass
class EvalConfig:
    """Options of one `evaluate` call (the CLI's flags)."""

    limit: int | None = None  # items (questions, perplexity windows, samples per long-context cell)
    num_fewshot: int | None = None  # None: the spec's default
    seed: int = 1234  # few-shot sampling and long-context prompts
    data: list[str] = field(default_factory=list)  # --data DIR | TASK=PATH
    batch_size: int = 16
    reference: str | None = None  # kld: reference model (default: the same model, no variant)
    reference_variant: Any = None
    reference_model: Any = None  # kld: an already loaded reference Model (instead of loading `reference`)
    lengths: list[int] | None = None  # long-context grid (default: the spec's, up to the model's context)
    depths: list[float] | None = None
    haystack: str | None = None  # a text file whose sentences fill the haystack (default: filler)
    samples: int | None = None  # long context: prompts per (length, depth) cell (default: the spec's)
    contexts: list[int] | None = None  # speed: context lengths
    decode_tokens: int | None = None
    core_watts: float | None = None
    speed_in_process: bool = False  # measure speed here instead of in a fresh process (tests)
    heatmap_dir: Path | None = None
    force: bool = False  # forget finished jobs and their items, and recompute


class Reporter:
    """Progress callbacks (the CLI draws bars; the default is silent)."""

    def task_start(self, task: str, total: int, done: int, what: str = "items") -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def task_end(self, task: str, rows: list[ResultRow], cached: bool) -> None: ...

    def note(self, message: str) -> None: ...


@dataclass
class Run:
    """What a task runner gets."""

    spec: TaskSpec
    cfg: EvalConfig
    store: Store
    model: Any  # tinytitan.Model
    lm: Any  # RuntimeLM
    name: str
    variant: Any
    variant_json: str
    reporter: Reporter
    state: Any = None  # what its kind's `prepare` found: that kind's own dataclass (McState, PplState, ...)
    scope: str = ""
    ident: JobIdentity | None = None


def variant_config(model, variant: Any) -> str:
    """Canonical JSON of the variant's full config ('' when the model is used as loaded)."""
    if model.quant is not None:  # a quantized variant: its QuantConfig
        return canonical_json(model.quant.config.to_dict())
    return "" if variant is None else canonical_json(variant)


def dtype_name(model) -> str:
    return str(model.dtype).removeprefix("torch.")


def variant_label(r: Run) -> str:
    if not r.variant_json:
        return "base"
    if isinstance(r.variant, str):
        return r.variant
    name = json.loads(r.variant_json).get("name") if r.variant_json.startswith("{") else None
    return str(name or (r.ident.variant_hash if r.ident else "variant"))
