"""The sweep on the real SmolLM2: variants built once and saved, every job in the store, and an interrupted
sweep that resumes without repeating or losing anything; also through a local Ray instance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import model_path
from tinytitan.errors import TinyTitanError
from tinytitan.store import Store
from tinytitan.sweep.plan import TaskRun, budget_tasks, parse_variants
from tinytitan.sweep.run import JobOutcome, SweepConfig, SweepReporter, run_sweep

SMOL = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DATA = Path(__file__).parent / "fixtures" / "eval_data"
# the project's own README is the perplexity text here (tests must not need ../shared)
DATA = [f"kld={ROOT / 'README.md'}", str(FIXTURE_DATA)]
TASKS = [
    TaskRun("kld", {"limit": 2}),
    TaskRun("arc_easy", {"limit": 4}),
    TaskRun("speed", {"contexts": [64], "decode_tokens": 4}),
]


class Recorder(SweepReporter):
    def __init__(self, stop_after: int | None = None) -> None:
        self.ended: list[JobOutcome] = []
        self.stop_after = stop_after
        self.start: tuple[int, int] | None = None

    def sweep_start(self, total: int, done: int) -> None:
        self.start = (total, done)

    def job_end(self, outcome: JobOutcome) -> None:
        self.ended.append(outcome)
        if self.stop_after is not None and len(self.ended) >= self.stop_after:
            raise KeyboardInterrupt("simulated Ctrl-C")


def _config(tmp_path: Path, variants: str = "base,w8,w4g32-kv8") -> SweepConfig:
    model_path(SMOL)
    return SweepConfig(SMOL, parse_variants(variants), TASKS, data=DATA, store=tmp_path / "results.sqlite")


def _snapshot(store: Path) -> list[tuple]:
    with Store(store) as st:
        return [(r.job_key, r.metric, r.value, r.time) for r in st.rows()]


def test_interrupted_sweep_resumes_without_repeating_or_losing(tmp_path) -> None:
    cfg = _config(tmp_path)
    first = Recorder(stop_after=4)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, first)
    assert first.start == (9, 0)
    assert [(o.variant, o.task) for o in first.ended] == [
        ("base", "kld"),
        ("base", "arc_easy"),
        ("base", "speed"),
        ("w8", "kld"),
    ]
    before = _snapshot(cfg.store)
    w8 = tmp_path / "variants"
    (w8_dir,) = [p / "w8" for p in w8.iterdir()]
    built = (w8_dir / "model.safetensors").stat().st_mtime_ns

    second = Recorder()
    outcomes = run_sweep(cfg, second)
    assert second.start == (9, 4)  # four jobs were finished before the interruption
    assert [(o.variant, o.task) for o in second.ended] == [
        ("w8", "arc_easy"),
        ("w8", "speed"),
        ("w4g32-kv8", "kld"),
        ("w4g32-kv8", "arc_easy"),
        ("w4g32-kv8", "speed"),
    ]
    assert all(o.status == "done" for o in second.ended), second.ended
    assert sorted(o.status for o in outcomes).count("cached") == 4
    after = _snapshot(cfg.store)
    assert after[: len(before)] == before  # nothing lost, nothing rewritten
    assert (w8_dir / "model.safetensors").stat().st_mtime_ns == built  # not quantized again

    # the KV variant reuses nothing it should not: its own config, its own rows
    with Store(cfg.store) as st:
        kinds = {json.loads(r.variant)["name"] if r.variant else "base" for r in st.rows(task="kld")}
        assert kinds == {"base", "w8", "w4g32-kv8"}
        kv = [r for r in st.rows(task="speed", metric="kv_bytes@ctx=512") if r.variant]
        by = {json.loads(r.variant)["name"]: r.value for r in kv}
        assert by["w4g32-kv8"] < by["w8"] / 3  # int8 codes + scales vs float32 keys/values
    third = Recorder()
    run_sweep(cfg, third)
    assert third.start == (9, 9) and third.ended == []  # all finished: nothing loaded or run
    assert _snapshot(cfg.store) == after


def test_sweep_results_match_direct_evaluation(tmp_path) -> None:
    """A variant measured by the sweep (saved and reloaded) scores what quantize-in-memory scores."""
    from tinytitan.eval.runner import EvalConfig, evaluate
    from tinytitan.loader import load

    cfg = _config(tmp_path, "base,w8")
    cfg.tasks = [TASKS[0]]
    run_sweep(cfg, Recorder())
    with Store(cfg.store) as st:
        rows = st.rows(metric="kld_mean")
    swept = {json.loads(r.variant)["name"] if r.variant else "base": r for r in rows}
    q = load(SMOL, variant="w8")
    base = load(SMOL, reference=True)
    rows = evaluate(
        q,
        "kld",
        config=EvalConfig(data=DATA, limit=2, reference_model=base),
        store=tmp_path / "direct.sqlite",
        name=SMOL,
    )
    direct = next(r for r in rows if r.metric == "kld_mean")
    assert direct.value == pytest.approx(swept["w8"].value, rel=1e-6)
    assert direct.job_key == swept["w8"].job_key  # the same measurement identity
    assert swept["base"].value == pytest.approx(0.0, abs=1e-4)


def test_bad_sweep_input_is_refused_clearly() -> None:
    with pytest.raises(TinyTitanError, match="unknown quantization scheme 'w5x'"):
        parse_variants("base,w5x")
    with pytest.raises(TinyTitanError, match=r"plan:150MB or plan:4\.0bpw"):
        parse_variants("plan:lots")
    with pytest.raises(TinyTitanError, match=r"unknown budget 'huge'.*quick, standard, full"):
        budget_tasks("huge")
    with pytest.raises(TinyTitanError, match="unknown task"):
        budget_tasks("quick", "kld,nope")
    assert [t.task for t in budget_tasks("quick")] == ["kld", "arc_easy", "piqa", "boolq", "passkey", "speed"]
    assert budget_tasks("quick", "speed")[0].options == {"contexts": [512], "decode_tokens": 32}


def test_missing_data_skips_that_task_and_keeps_going(tmp_path) -> None:
    cfg = _config(tmp_path, "base")
    cfg.tasks = [TaskRun("piqa", {"limit": 2}), TaskRun("arc_easy", {"limit": 2})]
    cfg.data = [f"piqa={tmp_path / 'absent.jsonl'}", str(FIXTURE_DATA)]
    out = run_sweep(cfg, Recorder())
    status = {o.task: o for o in out}
    assert status["piqa"].status == "skipped" and "absent.jsonl" in status["piqa"].message
    assert status["arc_easy"].status == "done"


@pytest.mark.slow
def test_sweep_on_a_local_ray_instance(tmp_path) -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'tinytitan[ray]')")
    cfg = _config(tmp_path, "base,w8,w8-kv8")
    cfg.tasks = [TASKS[0], TASKS[2]]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rep = Recorder()
        out = run_sweep(cfg, rep, ray_address="local")
    finally:
        ray.shutdown()
    assert sorted((o.variant, o.task, o.status) for o in out) == sorted(
        (v, t, "done") for v in ("base", "w8", "w8-kv8") for t in ("kld", "speed")
    )
    with Store(cfg.store) as st:
        rows = st.rows()
        done = st.jobs(status="done")
    assert len(done) == 6
    names = {(json.loads(r.variant)["name"] if r.variant else "base", r.task) for r in rows}
    assert names == {(v, t) for v in ("base", "w8", "w8-kv8") for t in ("kld", "speed")}
    # speed jobs were measured on the driver after the workers finished, one at a time
    assert [o.task for o in out][-3:] == ["speed"] * 3
    again = run_sweep(cfg, Recorder())  # resumes without Ray too: nothing left to do
    assert {o.status for o in again} == {"cached"}


def test_a_new_planner_plans_and_measures_plan_variants_again(monkeypatch) -> None:
    """plan: variants are keyed by the planner's identity (folder and result rows); schemes are not."""
    from tinytitan.quant import mixed
    from tinytitan.sweep.run import index_scope

    plan, scheme = parse_variants(["plan:150MB", "w4g32"])
    run = TaskRun("kld", {})
    cfg = SweepConfig(model="m", variants=[plan, scheme], tasks=[run])
    before = (plan.slug, index_scope("sha", plan, run, cfg), index_scope("sha", scheme, run, cfg))
    assert plan.slug.startswith("plan_150_") and plan.build_id and not scheme.build_id
    monkeypatch.setattr(mixed, "PLANNER_VERSION", mixed.PLANNER_VERSION + 1)
    after = (plan.slug, index_scope("sha", plan, run, cfg), index_scope("sha", scheme, run, cfg))
    assert after[0] != before[0] and after[1] != before[1]  # new folder, new rows
    assert after[2] == before[2]  # a scheme's rows stay valid


def test_cli_exits_nonzero_when_a_named_task_cannot_run(tmp_path, capsys) -> None:
    """A task the user named that has no data is a failure of the command, with its reason on the board;
    the rest of the sweep still runs and is shown."""
    from tinytitan.cli.main import main

    model_path(SMOL)
    store = tmp_path / "r.sqlite"
    md = tmp_path / "board.md"
    args = ["sweep", SMOL, "--variants", "base", "--store", str(store), "--md", str(md)]
    absent = tmp_path / "absent.jsonl"
    assert main([*args, "--tasks", "arc_easy,piqa", "--data", f"piqa={absent}"]) == 1
    out = capsys.readouterr().out
    assert "skipped" in out and "absent.jsonl" in out
    board = md.read_text()
    assert "[1] piqa skipped: piqa: data file" in board  # blank piqa cell, its reason below the table
    assert "| base (reference) |" in board and " ±" in board  # arc_easy ran on the embedded pack
    assert main([*args, "--tasks", "arc_easy"]) == 0  # cached now, and nothing named is missing
