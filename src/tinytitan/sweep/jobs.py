"""A sweep's jobs: its config, one (variant, task) job's index key and outcome, how a variant's jobs run
on this machine (build or load the variant, then evaluate each unfinished task), and the progress
reporter. `run_sweep` (sweep/run.py) runs them here, `run_on_ray` (sweep/distributed.py) on a cluster.
"""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinytitan.errors import DataError, TaskError, TinyTitanError
from tinytitan.eval.runner import EvalConfig, Reporter, evaluate
from tinytitan.store import Store, canonical_json, default_store_path, short_hash
from tinytitan.sweep.plan import TaskRun, VariantSpec
from tinytitan.sweep.variants import materialize, variants_folder

INDEX_VERSION = 1
STATS_CACHE: dict = {}  # calibration statistics of the base model, shared by the variants of one process


@dataclass
class SweepConfig:
    model: str
    variants: list[VariantSpec]
    tasks: list[TaskRun]
    budget: str = "quick"
    data: list[str] = field(default_factory=list)
    calib_text: str | None = None
    seed: int = 1234
    store: Path = field(default_factory=default_store_path)
    dtype: str = "float32"
    device: str | None = None
    redo: tuple[str, ...] = ()  # tasks to measure again even where the store has them (e.g. speed)


@dataclass
class JobOutcome:
    variant: str
    task: str
    status: str  # "done" | "cached" | "skipped" | "failed"
    message: str = ""
    seconds: float = 0.0


class SweepReporter(Reporter):
    """What a sweep tells its user; `evaluate`'s per-task callbacks pass through `task`."""

    def sweep_start(self, total: int, done: int) -> None: ...

    def job_start(self, variant: str, task: str) -> None: ...

    def job_end(self, outcome: JobOutcome) -> None: ...


@functools.cache  # hashing a model file takes a while; a sweep asks once per variant
def model_sha256(model: str) -> str:
    """The source file's sha256 as a loaded model reports it, without loading the model."""
    from tinytitan import zoo
    from tinytitan.runtime import checkpoint_sha256

    return checkpoint_sha256(zoo.resolve(model))


def _task_version(task: str) -> str:
    from tinytitan.eval.registry import parse_task_list

    return parse_task_list([task])[0].version


def index_scope(sha: str, variant: VariantSpec, run: TaskRun, cfg: SweepConfig) -> str:
    key = [
        INDEX_VERSION,
        sha,
        variant.name,
        run.task,
        _task_version(run.task),
        run.options,
        cfg.data,
        cfg.seed,
    ]
    if variant.build_id:  # plan: variants are measured again when the planner changes
        key.append(variant.build_id)
    return "sweep:" + short_hash(canonical_json(key), 32)


def job_is_done(store: Store, scope: str) -> bool:
    item = store.items(scope).get("job")
    if not item:
        return False
    j = store.job(item["job_key"])
    return j is not None and j.status == "done"


def eval_config(run: TaskRun, cfg: SweepConfig, reference: Any = None) -> EvalConfig:
    force = run.task in cfg.redo
    return EvalConfig(
        data=list(cfg.data), seed=cfg.seed, reference_model=reference, force=force, **run.options
    )


def run_variant(
    cfg: SweepConfig,
    spec: VariantSpec,
    runs: list[TaskRun],
    store: Store,
    reporter: SweepReporter,
    base_loader: Callable[[], Any],
) -> list[JobOutcome]:
    """Build (or load) one variant and run its unfinished tasks."""
    sha = model_sha256(cfg.model)
    folder = variants_folder(store.folder, cfg.model, sha)
    model = None
    outcomes: list[JobOutcome] = []
    try:
        for run in runs:
            scope = index_scope(sha, spec, run, cfg)
            reporter.job_start(spec.name, run.task)
            t0 = time.perf_counter()
            if run.task not in cfg.redo and job_is_done(store, scope):
                out = JobOutcome(spec.name, run.task, "cached")
            else:
                if model is None:
                    model = materialize(spec, folder, base_loader, cfg.calib_text, reporter.note, STATS_CACHE)
                ref = base_loader() if run.task == "kld" and spec.kind != "base" else None
                try:
                    rows = evaluate(
                        model,
                        [run.task],
                        config=eval_config(run, cfg, ref),
                        store=store,
                        reporter=reporter,
                        name=cfg.model,
                    )
                except (DataError, TaskError) as e:  # e.g. no data for this task here: the others go on
                    out = JobOutcome(spec.name, run.task, "skipped", str(e))
                except TinyTitanError as e:
                    out = JobOutcome(spec.name, run.task, "failed", str(e))
                else:
                    store.save_items(scope, {"job": {"job_key": rows[0].job_key if rows else ""}})
                    out = JobOutcome(spec.name, run.task, "done")
            out.seconds = time.perf_counter() - t0
            reporter.job_end(out)
            outcomes.append(out)
    finally:
        del model
        gc.collect()
    return outcomes


def pending(cfg: SweepConfig, store: Store) -> dict[str, list[TaskRun]]:
    """Variant name -> its tasks not yet in the store."""
    sha = model_sha256(cfg.model)
    return {
        v.name: [
            r for r in cfg.tasks if r.task in cfg.redo or not job_is_done(store, index_scope(sha, v, r, cfg))
        ]
        for v in cfg.variants
    }


def base_loader_for(cfg: SweepConfig) -> Callable[[], Any]:
    """Loads the base model on first use and keeps it (the reference of every KLD job)."""
    held: dict[str, Any] = {}

    def get():
        if "m" not in held:
            from tinytitan.loader import load

            held["m"] = load(cfg.model, dtype=cfg.dtype, device=cfg.device, reference=True)
        return held["m"]

    return get
