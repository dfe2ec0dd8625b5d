"""Evaluation data: find a task's file, read it in its format, and say exactly where it is malformed.

Where a task's data comes from, first match wins:
1. `--data TASK=PATH`: that file (a folder is searched like a data root);
2. `--data DIR` (repeatable), then $TINYTITAN_DATA: DIR / the spec's `data.local.path`;
3. Hugging Face datasets (the spec's `data.hf`), when the `datasets` package is installed and the network
   reaches the Hub.

Formats (a `.bz2` or `.gz` suffix is decompressed first):
- `json`: one JSON array of objects;  `jsonl`: one object per line (blank lines allowed);
- `hellaswag_text`: 6 lines per item (context, gold label 0-3, four endings), llama.cpp's HellaSwag file;
- `text`: the whole file is one document `{"text": ...}` (perplexity, KLD);
- `labels` (optional, beside the data file): one integer per line, line-aligned with the items (PIQA).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinytitan.errors import DataError


@dataclass
class Docs:
    docs: list[dict[str, Any]]
    where: list[str]  # "file:line" (or "hf:id[index]") of each doc, for error messages
    source: str  # a file path or "hf:path/name/split"
    sha256: str  # of the file(s) read, or the HF fingerprint
    fewshot: list[dict[str, Any]] | None = None  # a separate few-shot pool (HF train split), if any
    files: list[str] = field(default_factory=list)


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        if path.suffix == ".bz2":
            return bz2.decompress(raw)
        if path.suffix == ".gz":
            return gzip.decompress(raw)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a valid {path.suffix[1:]} file ({e})") from None
    return raw


def _read_text(path: Path) -> str:
    raw = _read_bytes(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8") from None


def read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    docs, where = [], []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, found {type(obj).__name__}")
        docs.append(obj)
        where.append(f"{path.name}:{n}")
    return docs, where


def read_json(path: Path) -> tuple[list[dict], list[str]]:
    text = _read_text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of objects, found {type(obj).__name__}")
    # line of each top-level object, for messages: positions of the objects' opening braces at depth 1
    starts = _top_level_object_lines(text)
    docs, where = [], []
    for i, d in enumerate(obj):
        line = starts[i] if i < len(starts) else 0
        if not isinstance(d, dict):
            raise DataError(f"{path}:{line}: item {i + 1} is a {type(d).__name__}, expected an object")
        docs.append(d)
        where.append(f"{path.name}:{line} (item {i + 1})")
    return docs, where


def _top_level_object_lines(text: str) -> list[int]:
    lines, depth, line, in_str, esc = [], 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{":
            if ch == "{" and depth == 1:
                lines.append(line)
            depth += 1
        elif ch in "]}":
            depth -= 1
    return lines


def read_hellaswag_text(path: Path) -> tuple[list[dict], list[str]]:
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(
            f"{path}:{len(lines) - len(lines) % 6 + 1}: incomplete item: HellaSwag text files have 6 lines"
            f" per item (context, label, 4 endings); the file has {len(lines)} lines"
        )
    docs, where = [], []
    for i in range(0, len(lines), 6):
        label = lines[i + 1].strip()
        if label not in ("0", "1", "2", "3"):
            raise DataError(f"{path}:{i + 2}: expected the gold label 0-3, found {label[:40]!r}")
        docs.append({"query": lines[i], "label": int(label), "endings": lines[i + 2 : i + 6]})
        where.append(f"{path.name}:{i + 1}")
    return docs, where


def read_text(path: Path) -> tuple[list[dict], list[str]]:
    return [{"text": _read_text(path)}], [path.name]


def read_labels(path: Path, n_docs: int) -> list[int]:
    labels = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            labels.append(int(line.strip()))
        except ValueError:
            raise DataError(f"{path}:{n}: expected an integer label, found {line.strip()[:40]!r}") from None
    if len(labels) != n_docs:
        raise DataError(f"{path}: {len(labels)} labels for {n_docs} items; the files must be line-aligned")
    return labels


READERS: dict[str, Callable[[Path], tuple[list[dict], list[str]]]] = {
    "json": read_json,
    "jsonl": read_jsonl,
    "hellaswag_text": read_hellaswag_text,
    "text": read_text,
}


# -- Hugging Face rows -> the local formats' fields ------------------------------------------------------
def _hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_hf(doc: dict) -> dict:
    # lm-evaluation-harness's HellaSwag: ctx_b capitalized, WikiHow bracket markers removed
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
        "endings": [_hellaswag_preprocess(e) for e in doc["endings"]],
        "label": int(doc["label"]),
    }


PROCESSORS: dict[str, Callable[[dict], dict]] = {"hellaswag_hf": _hellaswag_hf}


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _parse_data_args(data: list[str] | None) -> tuple[dict[str, Path], list[Path]]:
    explicit: dict[str, Path] = {}
    roots: list[Path] = []
    for d in data or []:
        if "=" in d and not Path(d).exists():
            task, _, p = d.partition("=")
            explicit[task.strip()] = Path(p).expanduser()
        else:
            roots.append(Path(d).expanduser())
    env = os.environ.get("TINYTITAN_DATA")
    if env:
        roots.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    return explicit, roots


def load_docs(task: str, data_spec: dict[str, Any], data: list[str] | None) -> Docs:
    """Read a task's documents (see the module docstring for where they are looked for)."""
    local = data_spec.get("local") or {}
    explicit, roots = _parse_data_args(data)
    tried: list[str] = []
    path: Path | None = None
    labels: Path | None = None
    if task in explicit:
        p = explicit[task]
        if p.is_dir():
            roots = [p, *roots]
        else:
            if not p.exists():
                raise DataError(f"{task}: data file {p} does not exist")
            path = p
            if local.get("labels"):
                labels = p.parent / Path(local["labels"]).name
    if path is None and local.get("path"):
        for r in roots:
            c = r / local["path"]
            tried.append(str(c))
            if c.exists():
                path = c
                if local.get("labels"):
                    labels = r / local["labels"]
                break
    if path is not None:
        fmt = local.get("format", "jsonl")
        docs, where = READERS[fmt](path)
        files = [path]
        if labels is not None:
            if not labels.exists():
                raise DataError(f"{task}: labels file {labels} (beside {path.name}) does not exist")
            for d, lab in zip(docs, read_labels(labels, len(docs)), strict=True):
                d[local.get("label_field", "label")] = lab
            files.append(labels)
        return Docs(docs, where, str(path), sha256_files(files), files=[str(f) for f in files])
    hf = data_spec.get("hf")
    if hf:
        return _load_hf(task, hf, tried)
    raise DataError(
        f"{task}: no data found (looked for {', '.join(tried) or 'nothing: no --data given'}); "
        f"pass --data DIR (a folder holding {local.get('path', '?')}) or --data {task}=FILE"
    )


def _load_hf(task: str, hf: dict[str, Any], tried: list[str]) -> Docs:
    try:
        import datasets  # optional: `pip install datasets`
    except ImportError:
        raise DataError(
            f"{task}: no local data (looked for {', '.join(tried) or 'nothing'}) and the `datasets` package "
            "is not installed; pass --data DIR or --data TASK=FILE"
        ) from None
    ident = f"{hf['path']}/{hf.get('name') or ''}/{hf['split']}"
    try:
        ds = datasets.load_dataset(hf["path"], hf.get("name"), split=hf["split"])
        few = (
            datasets.load_dataset(hf["path"], hf.get("name"), split=hf["fewshot_split"])
            if hf.get("fewshot_split")
            else None
        )
    except Exception as e:  # network, auth, unknown dataset: one clean message
        raise DataError(
            f"{task}: no local data (looked for {', '.join(tried) or 'nothing'}) and Hugging Face dataset "
            f"{ident} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    proc = PROCESSORS.get(hf.get("process", ""), lambda d: d)
    docs = [proc(dict(d)) for d in ds]
    fewshot = [proc(dict(d)) for d in few] if few is not None else None
    fp = getattr(ds, "_fingerprint", "") or ident
    return Docs(docs, [f"hf:{ident}[{i}]" for i in range(len(docs))], f"hf:{ident}", str(fp), fewshot)
