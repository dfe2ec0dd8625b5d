"""`type: generate` tasks: greedy generation scored against a gold answer (exact match, JSON fields).

Spec fields: `target` (a Jinja expression giving the gold string) and the prompt, either
- `params.messages`: a Jinja expression giving a chat (a list of {role, content}) rendered with the model's
  chat template and a generation prompt (an instruct model, a chat-tuned adapter), or
- `text`: a Jinja template giving a plain prompt (with `params.chat: true` it becomes the user message).
Other params: `max_tokens` (default 64), `stop` (strings; EOS always stops), `system` (a system message
for `text` + `chat`).

Metrics (each a mean over items, stderr = sample std / sqrt(n)):
- `exact_match`: the output, stripped, equals the gold, stripped;
- `json_valid`: the output parses as a JSON object;
- `field_acc`: the share of the gold JSON object's fields whose value the output's object has equal
  (0 when the output is not a JSON object).
"""

from __future__ import annotations

import json
import math
from typing import Any

from tinytitan.errors import DataError
from tinytitan.store import Metric

METRICS = ("exact_match", "json_valid", "field_acc")
CHUNK = 8  # items committed together (a kill loses at most this many)


def score(output: str, gold: str) -> dict[str, float]:
    """The three metrics for one item."""
    out = {"exact_match": float(output.strip() == gold.strip())}
    got = _json_object(output)
    want = _json_object(gold)
    out["json_valid"] = float(got is not None)
    if want:
        out["field_acc"] = (
            0.0 if got is None else sum(1.0 for k, v in want.items() if got.get(k) == v) / len(want)
        )
    else:
        out["field_acc"] = out["exact_match"]
    return out


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _prompt_ids(r, doc: dict[str, Any], where: str) -> list[int]:
    from tinytitan.eval.multiple_choice import Prompter, expression

    p = r.spec.params
    if p.get("messages"):
        try:
            msgs = expression(p["messages"])(**doc)
        except Exception as e:
            raise DataError(
                f"{where}: cannot build the {r.spec.name} messages ({type(e).__name__}: {e})"
            ) from None
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise DataError(f"{where}: `messages` must give a list of {{role, content}} objects")
        return r.model.chat_prompt_ids([{"role": m["role"], "content": m["content"]} for m in msgs])
    text = Prompter(r.spec).text(doc, where)
    if p.get("chat"):
        msgs = ([{"role": "system", "content": p["system"]}] if p.get("system") else []) + [
            {"role": "user", "content": text}
        ]
        return r.model.chat_prompt_ids(msgs)
    return r.model.tokenizer.encode(text)


def _gold(r, doc: dict[str, Any], where: str) -> str:
    from tinytitan.eval.multiple_choice import expression

    try:
        g = expression(r.spec.target)(**doc)
    except Exception as e:
        raise DataError(f"{where}: cannot build the {r.spec.name} target ({type(e).__name__}: {e})") from None
    if not isinstance(g, str):
        raise DataError(f"{where}: the target must be a string, got {g!r:.80}")
    return g


def prepare_generate(r) -> dict[str, Any]:
    from tinytitan.eval.data import load_docs

    docs = load_docs(r.spec.name, r.spec.data, r.cfg.data, r.cfg.limit)
    r.state = docs
    return {"limit": r.cfg.limit, **docs.identity()}


def run_generate(r) -> list[Metric]:
    from tinytitan.eval.api import GenerateRequest

    docs = r.state
    n = len(docs.docs) if r.cfg.limit is None else min(r.cfg.limit, len(docs.docs))
    p = r.spec.params
    max_tokens, stop = int(p.get("max_tokens", 64)), list(p.get("stop", []))
    done = r.store.items(r.scope)
    todo = [i for i in range(n) if str(i) not in done]
    r.reporter.task_start(r.spec.name, n, n - len(todo), "answers")
    for s in range(0, len(todo), CHUNK):
        chunk = todo[s : s + CHUNK]
        reqs, golds = [], []
        for i in chunk:
            doc, where = docs.docs[i], docs.where[i]
            reqs.append(GenerateRequest(_prompt_ids(r, doc, where), stop, max_tokens))
            golds.append(_gold(r, doc, where))
        outputs = r.lm.generate_until(reqs)
        records = {
            str(i): {**score(o, g), "output": o} for i, o, g in zip(chunk, outputs, golds, strict=True)
        }
        r.store.save_items(r.scope, records)
        done.update(records)
        r.reporter.advance(len(chunk))
    records = [done[str(i)] for i in range(n)]
    metrics = []
    for name in r.spec.metrics:
        vals = [float(rec[name]) for rec in records]
        mean = sum(vals) / len(vals) if vals else float("nan")
        var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
        metrics.append(Metric(name, mean, math.sqrt(var / len(vals)) if vals else None, len(vals)))
    return metrics
