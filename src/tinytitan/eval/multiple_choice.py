"""Multiple-choice and single-continuation tasks from their specs, scored by log-likelihood.

Requests are built as lm-evaluation-harness builds them: for each choice, (context, target_delimiter +
choice); with `multiple_input` (WinoGrande) each choice is a context and the continuation is shared.
A few-shot context is `fewshot_delimiter.join(text(d) + target_delimiter + gold(d))` + fewshot_delimiter +
text(doc), the shots drawn with `random.Random(f"{seed}:{task}:{doc index}")` from the few-shot pool (a
separate training split when there is one, else the other documents of the evaluated set).

Metrics, exactly as lm-evaluation-harness's `process_results` / `mean_stderr`:
- acc = 1 if argmax_i ll_i == gold (ties: the first choice), averaged;
- acc_norm = 1 if argmax_i ll_i / len(choice_i) == gold, with len the choice's length in characters
  (without the delimiter; for `multiple_input` the choices are the contexts);
- stderr = sample standard deviation (n - 1) / sqrt(n);
- loglikelihood tasks: acc = greedy decoding reproduces the continuation; perplexity = exp(-mean ll).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from tinytitan.errors import DataError, TaskError
from tinytitan.eval.data import Docs
from tinytitan.eval.registry import TaskSpec
from tinytitan.store import Metric

if TYPE_CHECKING:
    from tinytitan.eval.run_state import Run


@lru_cache(maxsize=1)
def _env():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)


@lru_cache(maxsize=256)
def _template(src: str):
    return _env().from_string(src)


@lru_cache(maxsize=256)
def expression(src: str):
    return _env().compile_expression(src)


class Prompter:
    """Renders one spec's templates for a document; errors name the document's file and line."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        try:  # parse every template and expression once, up front: a broken spec fails before any work
            if spec.text is not None:
                _template(spec.text)
            if spec.continuation is not None:
                expression(spec.continuation)
            if isinstance(spec.choices, str):
                expression(spec.choices)
            for c in spec.choices if isinstance(spec.choices, list) else []:
                _template(c)
            if spec.target is not None:
                expression(spec.target)
        except Exception as e:
            raise TaskError(f"{spec.path}: a template does not parse: {e}") from None

    def _run(self, what: str, fn, doc: dict[str, Any], where: str) -> Any:
        try:
            return fn(doc)
        except DataError:
            raise
        except Exception as e:
            raise DataError(
                f"{where}: cannot build the {self.spec.name} {what} ({type(e).__name__}: {e})"
            ) from None

    def text(self, doc: dict[str, Any], where: str) -> str:
        return self._run("prompt", lambda d: _template(self.spec.text).render(**d), doc, where)

    def choices(self, doc: dict[str, Any], where: str) -> list[str]:
        spec = self.spec

        def build(d: dict[str, Any]) -> list[str]:
            if isinstance(spec.choices, list):
                return [_template(c).render(**d) for c in spec.choices]
            out = expression(spec.choices)(**d)
            if not isinstance(out, list | tuple) or not all(isinstance(c, str) for c in out):
                raise DataError(f"{where}: `choices` must give a list of strings, got {out!r:.80}")
            return list(out)

        return self._run("choices", build, doc, where)

    def continuation(self, doc: dict[str, Any], where: str) -> str:
        out = self._run("continuation", lambda d: expression(self.spec.continuation)(**d), doc, where)
        if not isinstance(out, str):
            raise DataError(f"{where}: the continuation must be a string, got {out!r:.80}")
        return out

    def gold(self, doc: dict[str, Any], choices: list[str], where: str) -> int:
        g = self._run("target", lambda d: expression(self.spec.target)(**d), doc, where)
        if isinstance(g, str) and not g.lstrip("-").isdigit():
            if g not in choices:
                raise DataError(f"{where}: the target {g!r:.60} is not one of the choices")
            return choices.index(g)
        try:
            g = int(g)
        except (TypeError, ValueError):
            raise DataError(f"{where}: the target {g!r:.60} is not a choice index") from None
        if not 0 <= g < len(choices):
            raise DataError(f"{where}: target index {g} is out of range for {len(choices)} choices")
        return g

    def shot(self, doc: dict[str, Any], where: str) -> str:
        """One solved example for a few-shot context."""
        spec = self.spec
        if spec.type == "loglikelihood":
            return self.text(doc, where) + self.continuation(doc, where)
        choices = self.choices(doc, where)
        g = self.gold(doc, choices, where)
        if spec.multiple_input:
            return choices[g] + spec.target_delimiter + self.continuation(doc, where)
        return self.text(doc, where) + spec.target_delimiter + choices[g]


@dataclass
class Item:
    index: int
    requests: list[tuple[str, str]]
    gold: int  # -1 for loglikelihood tasks (one request, no choice)
    lengths: list[int]  # characters of each choice (acc_norm)


def build_items(
    spec: TaskSpec, docs: Docs, num_fewshot: int, seed: int, limit: int | None = None
) -> list[Item]:
    p = Prompter(spec)
    n = len(docs.docs) if limit is None else min(limit, len(docs.docs))
    pool = docs.fewshot
    separate_pool = pool is not None
    if pool is None:
        pool = docs.docs
    if num_fewshot and len(pool) < num_fewshot + (0 if separate_pool else 1):
        raise TaskError(
            f"{spec.name}: {num_fewshot}-shot needs more documents than the {len(pool)} available"
        )
    items = []
    for i in range(n):
        doc, where = docs.docs[i], docs.where[i]
        prefix = ""
        if num_fewshot:
            rnd = random.Random(f"{seed}:{spec.name}:{i}")
            if separate_pool:
                picks = rnd.sample(range(len(pool)), num_fewshot)
            else:
                picks = [j for j in rnd.sample(range(len(pool)), num_fewshot + 1) if j != i][:num_fewshot]
            shots = [p.shot(pool[j], f"few-shot document {j + 1}") for j in picks]
            prefix = spec.fewshot_delimiter.join(shots) + spec.fewshot_delimiter
        if spec.type == "loglikelihood":
            items.append(Item(i, [(prefix + p.text(doc, where), p.continuation(doc, where))], -1, []))
            continue
        choices = p.choices(doc, where)
        if not choices:
            raise DataError(f"{where}: no choices")
        gold = p.gold(doc, choices, where)
        if spec.multiple_input:
            cont = spec.target_delimiter + p.continuation(doc, where)
            reqs = [(prefix + c, cont) for c in choices]
        else:
            ctx = prefix + p.text(doc, where)
            reqs = [(ctx, spec.target_delimiter + c) for c in choices]
        items.append(Item(i, reqs, gold, [len(c) for c in choices]))
    return items


def score_items(lm, items: Sequence[Item]) -> dict[str, dict[str, Any]]:
    """Run the items' requests (batched together) -> per-item records for the progress table."""
    reqs = [r for it in items for r in it.requests]
    res = lm.loglikelihood(reqs)
    out, k = {}, 0
    for it in items:
        part = res[k : k + len(it.requests)]
        k += len(it.requests)
        out[str(it.index)] = {
            "ll": [lp for lp, _ in part],
            "greedy": [bool(g) for _, g in part],
            "gold": it.gold,
            "len": it.lengths,
        }
    return out


def mean_stderr(values: Sequence[float]) -> float:
    """lm-evaluation-harness's `mean_stderr`: sample standard deviation / sqrt(n)."""
    n = len(values)
    if n < 2:
        return 0.0
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def item_scores(record: dict[str, Any]) -> dict[str, float]:
    lls = np.array(record["ll"], dtype=np.float64)
    if record["gold"] < 0:  # loglikelihood task: one continuation
        return {"acc": float(record["greedy"][0]), "ll": float(lls[0])}
    lengths = np.array(record["len"], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pred_norm = int(np.argmax(lls / lengths))
    return {
        "acc": 1.0 if int(np.argmax(lls)) == record["gold"] else 0.0,
        "acc_norm": 1.0 if pred_norm == record["gold"] else 0.0,
    }


def aggregate(spec: TaskSpec, records: Sequence[dict[str, Any]]) -> list[tuple[str, float, float, int]]:
    """(metric, value, stderr, n) for the spec's metrics."""
    scores = [item_scores(r) for r in records]
    n = len(scores)
    out = []
    for m in spec.metrics:
        if m == "perplexity":
            lls = [s["ll"] for s in scores]
            mean = sum(lls) / n
            ppl = math.exp(-mean)
            out.append((m, ppl, ppl * mean_stderr(lls), n))  # delta method
        elif m in ("acc", "acc_norm"):
            vals = [s[m] for s in scores]
            out.append((m, sum(vals) / n, mean_stderr(vals), n))
        else:
            raise TaskError(f"{spec.path}: metric {m!r} is not computed by {spec.type} tasks")
    return out


# -- the task kind: preparation (options of its job identity) and scoring, for eval/runner.py ------------
MC_CHUNK = 8  # questions committed together (a kill loses at most this many)


@dataclass
class McState:
    docs: Docs
    num_fewshot: int


def prepare_task(r: Run) -> dict[str, Any]:
    from tinytitan.eval.data import load_docs

    docs = load_docs(r.spec.name, r.spec.data, r.cfg.data, r.cfg.limit)
    k = r.spec.num_fewshot if r.cfg.num_fewshot is None else r.cfg.num_fewshot
    r.state = McState(docs, k)
    return {"limit": r.cfg.limit, "num_fewshot": k, "seed": r.cfg.seed, **docs.identity()}


def run_task(r: Run) -> list[Metric]:
    st: McState = r.state
    items = build_items(r.spec, st.docs, st.num_fewshot, r.cfg.seed, r.cfg.limit)
    done = r.store.items(r.scope)
    todo = [it for it in items if str(it.index) not in done]
    r.reporter.task_start(r.spec.name, len(items), len(items) - len(todo), "questions")
    for s in range(0, len(todo), MC_CHUNK):
        chunk = todo[s : s + MC_CHUNK]
        records = score_items(r.lm, chunk)
        r.store.save_items(r.scope, records)
        done.update(records)
        r.reporter.advance(len(chunk))
    records = [done[str(it.index)] for it in items]
    return [Metric(m, v, se, n) for m, v, se, n in aggregate(r.spec, records)]
