"""Tasks are data: one YAML (or JSON) spec per task in `tinytitan/eval/tasks/`, loaded here.

Common fields: `name`, `version` (bump it whenever scores could change: results are keyed on it), `type`,
`description`, `metrics`, `data` (where the documents come from: `local: {path, format, labels}` relative to
a data root, and/or `hf: {path, name, split, fewshot_split, process}`), and `params` (type-specific settings).

`type: multiple_choice` (scored like lm-evaluation-harness's `output_type: multiple_choice`):
- `text`: a Jinja template over a document's fields, the question/context;
- `choices`: a Jinja *expression* giving the list of answer strings (or a YAML list of templates);
- `target`: a Jinja expression giving the gold index (or the gold string);
- `multiple_input: true` (WinoGrande): `choices` are alternative contexts, `continuation` (an expression)
  the shared continuation, and `target` the index of the right context;
- `target_delimiter` (default " "), `fewshot_delimiter` (default "\\n\\n"), `num_fewshot` (default 0).
`type: loglikelihood` (LAMBADA): `text` and `continuation` (expression); metrics `acc` (greedy) and
`perplexity`. `type: perplexity`, `kld`, `longcontext`, `efficiency`: settings under `params`.
`type: generate`: greedy generation scored by exact match / JSON field accuracy (see eval/generation.py).

A user's own spec file can be passed in place of a task name (`--tasks my_task.yaml`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from tinytitan.errors import TaskError

TYPES = ("multiple_choice", "loglikelihood", "perplexity", "kld", "longcontext", "efficiency", "generate")
_FIELDS = {
    "name",
    "version",
    "type",
    "description",
    "metrics",
    "data",
    "params",
    "text",
    "choices",
    "target",
    "continuation",
    "multiple_input",
    "target_delimiter",
    "fewshot_delimiter",
    "num_fewshot",
    "group",
}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    version: str
    type: str
    description: str
    metrics: tuple[str, ...]
    data: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    choices: str | list[str] | None = None
    target: str | None = None
    continuation: str | None = None
    multiple_input: bool = False
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = 0
    path: str = ""


def _parse(text: str, origin: str) -> dict[str, Any]:
    if origin.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskError(f"{origin}:{e.lineno}: malformed JSON task spec ({e.msg})") from None
    import yaml

    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise TaskError(f"{origin}{line}: malformed YAML task spec ({getattr(e, 'problem', e)})") from None
    if not isinstance(obj, dict):
        raise TaskError(f"{origin}: a task spec must be a mapping")
    return obj


def spec_from_dict(d: dict[str, Any], origin: str = "<dict>") -> TaskSpec:
    unknown = set(d) - _FIELDS
    if unknown:
        raise TaskError(f"{origin}: unknown spec field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
    for key in ("name", "version", "type", "metrics"):
        if key not in d:
            raise TaskError(f"{origin}: the spec has no `{key}`")
    if d["type"] not in TYPES:
        raise TaskError(f"{origin}: unknown task type {d['type']!r}; known: {', '.join(TYPES)}")
    need = {
        "multiple_choice": ("text", "choices", "target"),
        "loglikelihood": ("text", "continuation"),
        "generate": ("target",),  # and `text` or `params.messages` (tinytitan.eval.generation)
    }.get(d["type"], ())
    if d.get("multiple_input"):
        need = (*need, "continuation")
    for key in need:
        if key not in d:
            raise TaskError(f"{origin}: a {d['type']} task needs `{key}`")
    kwargs = {k: v for k, v in d.items() if k not in ("group",)}
    kwargs["version"] = str(d["version"])
    kwargs["metrics"] = tuple(d["metrics"])
    kwargs.setdefault("description", "")
    return TaskSpec(**kwargs, path=origin)


@lru_cache(maxsize=1)
def builtin_specs() -> dict[str, TaskSpec]:
    out: dict[str, TaskSpec] = {}
    folder = resources.files("tinytitan.eval") / "tasks"
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith((".yaml", ".yml", ".json")):
            spec = spec_from_dict(_parse(entry.read_text(encoding="utf-8"), entry.name), entry.name)
            if spec.name in out:
                raise TaskError(f"two built-in specs are named {spec.name!r}")
            out[spec.name] = spec
    return out


def known_tasks() -> list[str]:
    return sorted(builtin_specs())


def get_task(name: str) -> TaskSpec:
    """A built-in task by name, or a user's spec file by path."""
    if name.endswith((".yaml", ".yml", ".json")):
        p = Path(name).expanduser()
        if not p.exists():
            raise TaskError(f"task spec file {p} does not exist")
        return spec_from_dict(_parse(p.read_text(encoding="utf-8"), str(p)), str(p))
    specs = builtin_specs()
    if name not in specs:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(specs))}")
    return specs[name]


def parse_task_list(tasks: str | list[str]) -> list[TaskSpec]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise TaskError(f"no tasks given; known tasks: {', '.join(known_tasks())}")
    unknown = [n for n in names if not n.endswith((".yaml", ".yml", ".json")) and n not in builtin_specs()]
    if unknown:
        raise TaskError(
            f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"known tasks: {', '.join(known_tasks())}"
        )
    return [get_task(n) for n in names]
