"""`run_sweep`: every (variant, task) job of a sweep, each skipped when the store already holds it.

The store keeps a sweep index (one item per job: the evaluation job key it produced), so a rerun knows
what is finished without loading or quantizing anything; within a job, `evaluate` resumes item by item.
A variant is built once and saved beside the store (`sweep/variants.py`).
"""

from __future__ import annotations

from tinytitan.store import Store
from tinytitan.sweep.distributed import run_on_ray
from tinytitan.sweep.jobs import (
    JobOutcome,
    SweepConfig,
    SweepReporter,
    base_loader_for,
    index_scope,
    pending,
    run_variant,
)

__all__ = ["JobOutcome", "SweepConfig", "SweepReporter", "index_scope", "run_sweep"]


def run_sweep(
    cfg: SweepConfig, reporter: SweepReporter | None = None, ray_address: str | None = None
) -> list[JobOutcome]:
    """Run every unfinished (variant, task) job; returns one outcome per job (cached ones included)."""
    rep = reporter or SweepReporter()
    with Store(cfg.store) as store:
        todo = pending(cfg, store)
        total = len(cfg.variants) * len(cfg.tasks)
        rep.sweep_start(total, total - sum(len(v) for v in todo.values()))
        if ray_address is not None:
            return run_on_ray(cfg, todo, rep, ray_address)
        base = base_loader_for(cfg)
        outcomes: list[JobOutcome] = []
        for spec in cfg.variants:
            runs = todo[spec.name]
            outcomes += [JobOutcome(spec.name, r.task, "cached") for r in cfg.tasks if r not in runs]
            if runs:
                outcomes += run_variant(cfg, spec, runs, store, rep, base)
        return outcomes
