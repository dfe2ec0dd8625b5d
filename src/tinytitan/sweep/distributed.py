"""Run a sweep's variants as Ray tasks; every worker writes into the same results store.

Each variant (build or load it, then its unfinished tasks) is one task. Speed and memory are not measured
on the workers (they would time each other): those jobs run on the driver, one at a time, at the end.
The base model's jobs run first (they fill the KLD reference cache the variants read), and a KV-cache
variant waits for the variant whose weights it reuses. The store is a SQLite file: on a multi-machine
cluster it must sit on a filesystem every node mounts (pass --store); on one machine any path works.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from tinytitan.errors import TinyTitanError
from tinytitan.store import Store
from tinytitan.sweep.jobs import JobOutcome, SweepConfig, SweepReporter, base_loader_for, run_variant
from tinytitan.sweep.plan import TaskRun
from tinytitan.sweep.variants import weights_name

RAY_EXTRA = "pip install 'tinytitan[ray]'"


def _variant_task(cfg: SweepConfig, variant: str, runs: list[TaskRun], *after: Any) -> list[dict]:
    """Runs inside a Ray worker process."""
    import torch

    torch.set_num_threads(1)  # one CPU per task, as requested from Ray: workers must not oversubscribe
    spec = next(v for v in cfg.variants if v.name == variant)
    with Store(cfg.store) as store:
        outs = run_variant(cfg, spec, runs, store, SweepReporter(), base_loader_for(cfg))
    return [asdict(o) for o in outs]


def _is_speed(run: TaskRun) -> bool:
    from tinytitan.eval.registry import parse_task_list

    return parse_task_list([run.task])[0].type == "efficiency"


def connect(address: str) -> None:
    """'local' starts a Ray instance here; 'auto' or HOST:PORT joins a running cluster."""
    try:
        import ray
    except ImportError:
        raise TinyTitanError(f"--ray needs Ray: {RAY_EXTRA}") from None
    if ray.is_initialized():
        return
    try:
        ray.init(address=None if address == "local" else address, log_to_driver=False)
    except ConnectionError as e:
        raise TinyTitanError(f"cannot reach a Ray cluster at {address!r}: {e}") from None


def run_on_ray(
    cfg: SweepConfig, todo: dict[str, list[TaskRun]], rep: SweepReporter, address: str
) -> list[JobOutcome]:
    import ray

    connect(address)
    task = ray.remote(num_cpus=1)(_variant_task)
    outcomes = [
        JobOutcome(v.name, r.task, "cached") for v in cfg.variants for r in cfg.tasks if r not in todo[v.name]
    ]
    local = {n: [r for r in runs if _is_speed(r)] for n, runs in todo.items()}
    todo = {n: [r for r in runs if not _is_speed(r)] for n, runs in todo.items()}
    names = [v.name for v in cfg.variants if todo[v.name]]
    first = [n for n in names if n == "base"]
    refs: dict[str, Any] = {}

    def collect(ref_list: list[Any]) -> None:
        for ref in ref_list:
            for o in ray.get(ref):
                out = JobOutcome(**o)
                rep.job_end(out)
                outcomes.append(out)

    if first:  # the reference's jobs first: the variants' KLD jobs read its cache
        rep.note("ray: base model jobs first")
        collect([task.remote(cfg, "base", todo["base"])])
    for n in names:
        if n == "base":
            continue
        w = weights_name(n)
        deps = [refs[w]] if w != n and w in refs else []
        refs[n] = task.remote(cfg, n, todo[n], *deps)
    waiting = list(refs.values())
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        collect(ready)
    if local:  # speed is measured here, one variant at a time, on a machine the workers have left
        with Store(cfg.store) as store:
            base = base_loader_for(cfg)
            for v in cfg.variants:
                if local.get(v.name):
                    outcomes.extend(run_variant(cfg, v, local[v.name], store, rep, base))
    return outcomes
