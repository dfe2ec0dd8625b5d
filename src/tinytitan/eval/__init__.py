"""Evaluation: perplexity, KL divergence against a reference, tasks as data, long context, efficiency.

from tinytitan.eval import evaluate, EvalConfig
rows = evaluate("gemma-3-270m", "ppl,arc_easy", config=EvalConfig(limit=50, data=["../shared/data"]))
"""

from __future__ import annotations

from typing import Any

__all__ = ["EvalConfig", "evaluate"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tinytitan.eval import runner

        return getattr(runner, name)
    raise AttributeError(name)
