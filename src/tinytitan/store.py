"""SQLite results store: one row per measurement, resumable jobs, per-item progress.

A *job* is one (model file, variant, task, task version, task options) measurement. Its key is a hash of
exactly those, so a finished job is recognised and skipped on a rerun. While a job runs, each finished item
(a perplexity window, a multiple-choice question, a long-context cell) is committed to the `progress` table
under the job's *scope* (the same identity without `limit`), so an interrupted run loses at most the item in
flight, and a later run with a larger `--limit` reuses the items already scored. When a job finishes, all its
metric rows are written in one transaction together with the job's `done` mark.

A job that cannot run (no data here, an option the model cannot take) is recorded with its reason
(`Store.note_skip`), so the leaderboard shows a blank with the reason instead of a number; a later
successful job of the same task for the same variant clears it.

Later stages (sweep, leaderboard) read rows through `Store.rows(...)` / `Store.jobs(...)` / `Store.skips()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_key      TEXT PRIMARY KEY,
    scope        TEXT NOT NULL,          -- the job's identity without `limit`: keys its progress items
    model        TEXT NOT NULL,          -- the name or path the user gave
    model_sha256 TEXT NOT NULL,          -- sha256 of the source file(s)
    variant      TEXT NOT NULL,          -- canonical JSON of the variant's full config ('' = as loaded)
    variant_hash TEXT NOT NULL,
    task         TEXT NOT NULL,
    task_version TEXT NOT NULL,
    options      TEXT NOT NULL,          -- JSON: limit, num_fewshot, seed, n_ctx, lengths, ...
    status       TEXT NOT NULL,          -- 'running' | 'done'
    started_at   TEXT NOT NULL,
    finished_at  TEXT
);
CREATE TABLE IF NOT EXISTS results (
    id           INTEGER PRIMARY KEY,
    job_key      TEXT NOT NULL REFERENCES jobs(job_key),
    model        TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    variant      TEXT NOT NULL,
    variant_hash TEXT NOT NULL,
    task         TEXT NOT NULL,
    task_version TEXT NOT NULL,
    metric       TEXT NOT NULL,
    value        REAL,
    stderr       REAL,
    n            INTEGER NOT NULL,
    tool_version TEXT NOT NULL,
    machine      TEXT NOT NULL,
    time         TEXT NOT NULL,
    options      TEXT NOT NULL,
    extra        TEXT NOT NULL,          -- JSON: per-row notes (e.g. energy measured | estimated)
    UNIQUE (job_key, metric)
);
CREATE INDEX IF NOT EXISTS results_by_model ON results (model_sha256, variant_hash, task);
CREATE TABLE IF NOT EXISTS skips (        -- jobs that could not run, and why (the leaderboard's footnotes)
    model_sha256 TEXT NOT NULL,
    variant_hash TEXT NOT NULL,
    task         TEXT NOT NULL,
    model        TEXT NOT NULL,
    variant      TEXT NOT NULL,
    status       TEXT NOT NULL,          -- 'skipped' (no data, an option the model cannot take) | 'failed'
    reason       TEXT NOT NULL,
    time         TEXT NOT NULL,
    PRIMARY KEY (model_sha256, variant_hash, task)
);
CREATE TABLE IF NOT EXISTS progress (
    scope   TEXT NOT NULL,
    item    TEXT NOT NULL,
    payload TEXT NOT NULL,               -- JSON of what the task needs to aggregate the item
    time    TEXT NOT NULL,
    PRIMARY KEY (scope, item)
);
"""


def canonical_json(obj: Any) -> str:
    """Stable JSON (sorted keys, no spaces): the text that identities are hashed from."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | frozenset | tuple):
        return sorted(obj) if isinstance(obj, set | frozenset) else list(obj)
    return str(obj)


def short_hash(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def machine_id() -> str:
    """host | CPU model | logical CPUs | torch version and device kind (what a speed row depends on)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        dev = "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        tv = f"torch {torch.__version__} {dev}"
    except Exception:  # torch import problems must not stop a results write
        tv = "torch ?"
    return f"{platform.node()} | {cpu} | {os.cpu_count()} cpus | {tv}"


@dataclass(frozen=True)
class JobIdentity:
    """What makes two measurements the same measurement."""

    model: str
    model_sha256: str
    variant: str  # canonical JSON of the variant config, '' when the model is used as loaded
    task: str
    task_version: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def variant_hash(self) -> str:
        return short_hash(self.variant) if self.variant else "base"

    @property
    def job_key(self) -> str:
        return short_hash(
            canonical_json(
                [self.model_sha256, self.variant_hash, self.task, self.task_version, self.options]
            ),
            32,
        )

    @property
    def scope(self) -> str:
        """Identity without `limit`: items scored under --limit 10 are reused by --limit 100."""
        opts = {k: v for k, v in self.options.items() if k != "limit"}
        return short_hash(
            canonical_json([self.model_sha256, self.variant_hash, self.task, self.task_version, opts]), 32
        )


@dataclass(frozen=True)
class ResultRow:
    model: str
    model_sha256: str
    variant: str
    variant_hash: str
    task: str
    task_version: str
    metric: str
    value: float | None
    stderr: float | None
    n: int
    tool_version: str
    machine: str
    time: str
    job_key: str
    options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Metric:
    """What a task returns: one measured quantity; the store adds the provenance."""

    name: str
    value: float | None
    stderr: float | None
    n: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobRecord:
    job_key: str
    scope: str
    model: str
    model_sha256: str
    variant: str
    variant_hash: str
    task: str
    task_version: str
    options: dict[str, Any]
    status: str
    started_at: str
    finished_at: str | None


@dataclass(frozen=True)
class SkipRecord:
    model_sha256: str
    variant_hash: str
    task: str
    model: str
    variant: str
    status: str
    reason: str
    time: str


class Store:
    """A results database (SQLite, WAL). Safe to open from several processes; writes are short."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_SCHEMA)
        with self._tx():
            self.conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

    @property
    def folder(self) -> Path:
        """Where side files (reference log-prob caches, heatmaps) live, next to the database."""
        return self.path.parent

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        for attempt in range(20):
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as e:  # another process holds the write lock past `timeout`
                if "locked" not in str(e) or attempt == 19:
                    raise
                time.sleep(0.5)
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    # -- jobs ---------------------------------------------------------------------------------------
    def job(self, job_key: str) -> JobRecord | None:
        r = self.conn.execute("SELECT * FROM jobs WHERE job_key = ?", (job_key,)).fetchone()
        return _job(r) if r else None

    def is_done(self, ident: JobIdentity) -> bool:
        j = self.job(ident.job_key)
        return j is not None and j.status == "done"

    def start_job(self, ident: JobIdentity) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO jobs (job_key, scope, model, model_sha256, variant, variant_hash,"
                " task, task_version, options, status, started_at) VALUES (?,?,?,?,?,?,?,?,?,'running',?)",
                (
                    ident.job_key,
                    ident.scope,
                    ident.model,
                    ident.model_sha256,
                    ident.variant,
                    ident.variant_hash,
                    ident.task,
                    ident.task_version,
                    canonical_json(ident.options),
                    now_iso(),
                ),
            )

    def finish_job(
        self, ident: JobIdentity, metrics: Sequence[Metric], tool_version: str, machine: str
    ) -> list[ResultRow]:
        """Write every metric row of a job and mark it done, atomically."""
        t = now_iso()
        rows = [
            ResultRow(
                model=ident.model,
                model_sha256=ident.model_sha256,
                variant=ident.variant,
                variant_hash=ident.variant_hash,
                task=ident.task,
                task_version=ident.task_version,
                metric=m.name,
                value=None if m.value is None else float(m.value),
                stderr=None if m.stderr is None else float(m.stderr),
                n=int(m.n),
                tool_version=tool_version,
                machine=machine,
                time=t,
                job_key=ident.job_key,
                options=dict(ident.options),
                extra=dict(m.extra),
            )
            for m in metrics
        ]
        self.start_job(ident)
        with self._tx() as c:
            for r in rows:
                c.execute(
                    "INSERT OR REPLACE INTO results (job_key, model, model_sha256, variant, variant_hash,"
                    " task, task_version, metric, value, stderr, n, tool_version, machine, time, options,"
                    " extra)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        r.job_key,
                        r.model,
                        r.model_sha256,
                        r.variant,
                        r.variant_hash,
                        r.task,
                        r.task_version,
                        r.metric,
                        r.value,
                        r.stderr,
                        r.n,
                        r.tool_version,
                        r.machine,
                        r.time,
                        canonical_json(r.options),
                        canonical_json(r.extra),
                    ),
                )
            c.execute(
                "UPDATE jobs SET status = 'done', finished_at = ? WHERE job_key = ?", (t, ident.job_key)
            )
            c.execute(
                "DELETE FROM skips WHERE model_sha256 = ? AND variant_hash = ? AND task = ?",
                (ident.model_sha256, ident.variant_hash, ident.task),
            )
        return rows

    # -- jobs that could not run --------------------------------------------------------------------
    def note_skip(
        self, model: str, model_sha256: str, variant: str, task: str, reason: str, status: str = "skipped"
    ) -> None:
        """Record why (model, variant, task) has no result; replaces an older reason."""
        vh = short_hash(variant) if variant else "base"
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO skips (model_sha256, variant_hash, task, model, variant, status,"
                " reason, time) VALUES (?,?,?,?,?,?,?,?)",
                (model_sha256, vh, task, model, variant, status, reason, now_iso()),
            )

    def skips(self, model: str | None = None) -> list[SkipRecord]:
        where, args = _where(model=model)
        cur = self.conn.execute(f"SELECT * FROM skips{where} ORDER BY time", args)
        return [SkipRecord(**dict(zip(r.keys(), tuple(r), strict=True))) for r in cur]

    def forget(self, ident: JobIdentity) -> None:
        """Delete a job, its rows and its progress items (`--force`)."""
        with self._tx() as c:
            c.execute("DELETE FROM results WHERE job_key = ?", (ident.job_key,))
            c.execute("DELETE FROM jobs WHERE job_key = ?", (ident.job_key,))
            c.execute("DELETE FROM progress WHERE scope = ?", (ident.scope,))

    def jobs(
        self,
        model_sha256: str | None = None,
        variant_hash: str | None = None,
        task: str | None = None,
        status: str | None = None,
    ) -> list[JobRecord]:
        where, args = _where(model_sha256=model_sha256, variant_hash=variant_hash, task=task, status=status)
        return [_job(r) for r in self.conn.execute(f"SELECT * FROM jobs{where} ORDER BY started_at", args)]

    # -- progress items -----------------------------------------------------------------------------
    def items(self, scope: str) -> dict[str, Any]:
        cur = self.conn.execute("SELECT item, payload FROM progress WHERE scope = ?", (scope,))
        return {r["item"]: json.loads(r["payload"]) for r in cur}

    def save_items(self, scope: str, items: dict[str, Any]) -> None:
        """Commit finished items (one transaction: a chunk is either all there or not at all)."""
        if not items:
            return
        t = now_iso()
        with self._tx() as c:
            c.executemany(
                "INSERT OR REPLACE INTO progress (scope, item, payload, time) VALUES (?,?,?,?)",
                [(scope, k, canonical_json(v), t) for k, v in items.items()],
            )

    # -- rows ---------------------------------------------------------------------------------------
    def rows(
        self,
        model: str | None = None,
        model_sha256: str | None = None,
        variant_hash: str | None = None,
        task: str | None = None,
        metric: str | None = None,
        job_key: str | None = None,
    ) -> list[ResultRow]:
        """Result rows, oldest first, filtered by any of the given fields."""
        where, args = _where(
            model=model,
            model_sha256=model_sha256,
            variant_hash=variant_hash,
            task=task,
            metric=metric,
            job_key=job_key,
        )
        cur = self.conn.execute(f"SELECT * FROM results{where} ORDER BY id", args)
        return [_row(r) for r in cur]


def _where(**filters: Any) -> tuple[str, list[Any]]:
    parts, args = [], []
    for k, v in filters.items():
        if v is not None:
            parts.append(f"{k} = ?")
            args.append(v)
    return (" WHERE " + " AND ".join(parts) if parts else ""), args


def _row(r: sqlite3.Row) -> ResultRow:
    return ResultRow(
        model=r["model"],
        model_sha256=r["model_sha256"],
        variant=r["variant"],
        variant_hash=r["variant_hash"],
        task=r["task"],
        task_version=r["task_version"],
        metric=r["metric"],
        value=r["value"],
        stderr=r["stderr"],
        n=r["n"],
        tool_version=r["tool_version"],
        machine=r["machine"],
        time=r["time"],
        job_key=r["job_key"],
        options=json.loads(r["options"]),
        extra=json.loads(r["extra"]),
    )


def _job(r: sqlite3.Row) -> JobRecord:
    return JobRecord(
        job_key=r["job_key"],
        scope=r["scope"],
        model=r["model"],
        model_sha256=r["model_sha256"],
        variant=r["variant"],
        variant_hash=r["variant_hash"],
        task=r["task"],
        task_version=r["task_version"],
        options=json.loads(r["options"]),
        status=r["status"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
    )


def default_store_path() -> Path:
    from tinytitan import zoo

    return zoo.home() / "results.sqlite"
