"""The SQLite results store: identities, rows, progress items, resumability semantics."""

from __future__ import annotations

import sqlite3

from tinytitan.store import JobIdentity, Metric, Store


def _ident(**kw) -> JobIdentity:
    base = dict(
        model="m", model_sha256="abc", variant="", task="arc_easy", task_version="1", options={"limit": 10}
    )
    base.update(kw)
    return JobIdentity(**base)


def test_job_key_is_stable_and_sensitive_to_what_matters() -> None:
    a = _ident()
    assert a.job_key == _ident().job_key
    assert a.job_key == _ident(model="another name, same file").job_key  # keyed on the file, not the name
    for changed in (
        _ident(model_sha256="def"),
        _ident(variant='{"bits":4}'),
        _ident(task="piqa"),
        _ident(task_version="2"),
        _ident(options={"limit": 20}),
    ):
        assert changed.job_key != a.job_key
    # the progress scope ignores --limit (items are reused across limits) but nothing else
    assert _ident(options={"limit": 20}).scope == a.scope
    assert _ident(options={"limit": 10, "num_fewshot": 5}).scope != a.scope
    assert a.variant_hash == "base" and _ident(variant='{"bits":4}').variant_hash != "base"


def test_rows_roundtrip_filters_and_done(tmp_path) -> None:
    with Store(tmp_path / "r.sqlite") as st:
        a, b = _ident(), _ident(task="piqa")
        assert not st.is_done(a)
        st.start_job(a)
        assert not st.is_done(a) and st.job(a.job_key).status == "running"
        rows = st.finish_job(
            a,
            [Metric("acc", 0.5, 0.1, 10), Metric("acc_norm", 0.6, None, 10, {"unit": "x"})],
            "0.1.0",
            "machine-1",
        )
        st.finish_job(b, [Metric("acc", 0.7, 0.05, 10)], "0.1.0", "machine-1")
        assert st.is_done(a)
        assert [r.metric for r in rows] == ["acc", "acc_norm"]
        back = st.rows(job_key=a.job_key)
        assert back == rows  # every field survives the database
        assert back[1].extra == {"unit": "x"} and back[1].stderr is None
        assert {r.task for r in st.rows(model_sha256="abc")} == {"arc_easy", "piqa"}
        assert [r.value for r in st.rows(task="piqa", metric="acc")] == [0.7]
        assert len(st.jobs(status="done")) == 2
        r0 = back[0]
        assert (r0.model, r0.tool_version, r0.machine, r0.n, r0.options) == (
            "m",
            "0.1.0",
            "machine-1",
            10,
            {"limit": 10},
        )
        assert r0.time.endswith("+00:00")


def test_progress_items_and_forget(tmp_path) -> None:
    path = tmp_path / "r.sqlite"
    a = _ident()
    with Store(path) as st:
        st.start_job(a)
        st.save_items(a.scope, {"0": {"ll": [-1.0, -2.0]}, "1": {"ll": [-3.0]}})
    with Store(path) as st:  # a new process sees what was committed
        assert st.items(a.scope) == {"0": {"ll": [-1.0, -2.0]}, "1": {"ll": [-3.0]}}
        st.finish_job(a, [Metric("acc", 1.0, 0.0, 2)], "v", "m")
        st.forget(a)
        assert st.items(a.scope) == {} and st.rows() == [] and st.job(a.job_key) is None


def test_wal_mode_and_schema(tmp_path) -> None:
    Store(tmp_path / "r.sqlite").close()
    c = sqlite3.connect(tmp_path / "r.sqlite")
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = {r[1] for r in c.execute("PRAGMA table_info(results)")}
    for needed in (
        "model",
        "model_sha256",
        "variant",
        "task",
        "task_version",
        "metric",
        "value",
        "stderr",
        "n",
        "tool_version",
        "machine",
        "time",
    ):
        assert needed in cols
