"""`evaluate()`: run tasks on a model (or a quantized variant of one), resumably, into the results store.

For each task: its job identity (model file sha256, variant config, task, spec version, options such as
--limit, few-shot count, seed, data file sha256) is checked against the store. A finished job is not run
again: its rows are returned from the store. Otherwise the job's finished items (perplexity windows,
questions, long-context cells) are read back from the store's progress table, only the missing ones are
computed (each committed as soon as it is done), and the metric rows are written when the job completes.

Each task kind's preparation and scoring live beside its metrics; `_kind` finds them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinytitan.errors import ContextLengthError, DataError, TaskError, TinyTitanError
from tinytitan.eval.loading import load_model
from tinytitan.eval.registry import TaskSpec, parse_task_list
from tinytitan.eval.run_state import EvalConfig, Reporter, Run, dtype_name, variant_config
from tinytitan.store import JobIdentity, Metric, ResultRow, Store, default_store_path, machine_id

__all__ = ["EvalConfig", "Reporter", "evaluate", "load_model", "rows_to_json", "variant_config"]

SKIPPED, FAILED = "skipped", "failed"  # why a job has no rows (Store.note_skip)

Prepare = Callable[[Run], dict[str, Any]]  # sets run.state, returns the job's options (its identity)
Score = Callable[[Run], list[Metric]]


def _kind(task_type: str) -> tuple[Prepare, Score]:
    """A task type's preparation and scoring (imported when a task of that type runs)."""
    if task_type in ("multiple_choice", "loglikelihood"):
        from tinytitan.eval import multiple_choice as kind
    elif task_type == "perplexity":
        from tinytitan.eval import perplexity as kind
    elif task_type == "kld":
        from tinytitan.eval import kld as kind
    elif task_type == "longcontext":
        from tinytitan.eval import longcontext as kind
    elif task_type == "efficiency":
        from tinytitan.eval import efficiency as kind
    elif task_type == "generate":
        from tinytitan.eval.generation import prepare_generate, run_generate

        return prepare_generate, run_generate
    else:
        raise TaskError(f"unknown task type {task_type!r}")
    return kind.prepare_task, kind.run_task


def evaluate(
    model: Any,
    tasks: str | list[str] | list[TaskSpec],
    *,
    variant: Any = None,
    config: EvalConfig | None = None,
    store: Store | str | Path | None = None,
    reporter: Reporter | None = None,
    name: str | None = None,
    lm: Any = None,
) -> list[ResultRow]:
    """Run `tasks` on `model` (a zoo name, a path, or a loaded tinytitan Model) and return the rows.

    variant: passed to `tinytitan.load(..., variant=...)` when `model` is a name, and recorded in the rows.
    """
    from tinytitan.eval.api import RuntimeLM
    from tinytitan.version import __version__

    cfg = config or EvalConfig()
    rep = reporter or Reporter()
    specs = (
        tasks
        if tasks and isinstance(tasks, list) and isinstance(tasks[0], TaskSpec)
        else parse_task_list(tasks)
    )  # type: ignore[arg-type]
    own_store = not isinstance(store, Store)
    st = store if isinstance(store, Store) else Store(store or default_store_path())
    try:
        if isinstance(model, str | Path):
            name = name or str(model)
            model = load_model(str(model), variant)
        name = name or model.source.name
        vjson = variant_config(model, variant)
        lm = lm or RuntimeLM(model, batch_size=cfg.batch_size)
        machine = machine_id()
        rows: list[ResultRow] = []
        for spec in specs:
            run = Run(spec, cfg, st, model, lm, name, variant, vjson, rep)
            prepare, execute = _kind(spec.type)
            try:
                options = {"dtype": dtype_name(model), **prepare(run)}
                ident = JobIdentity(name, model.source.sha256, vjson, spec.name, spec.version, options)
                run.ident, run.scope = ident, ident.scope
                if cfg.force:
                    st.forget(ident)
                elif st.is_done(ident):
                    done_rows = st.rows(job_key=ident.job_key)
                    rep.task_end(spec.name, done_rows, True)
                    rows += done_rows
                    continue
                st.start_job(ident)
                metrics = execute(run)
            except TinyTitanError as e:  # the board shows a blank with this reason instead of a number
                skipped = isinstance(e, DataError | TaskError | ContextLengthError)
                st.note_skip(
                    name, model.source.sha256, vjson, spec.name, str(e), SKIPPED if skipped else FAILED
                )
                raise
            new_rows = st.finish_job(ident, metrics, __version__, machine)
            rep.task_end(spec.name, new_rows, False)
            rows += new_rows
        return rows
    finally:
        if own_store:
            st.close()


def rows_to_json(rows: list[ResultRow]) -> str:
    return json.dumps([r.to_dict() for r in rows], indent=1)
