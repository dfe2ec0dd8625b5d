"""Evaluation data: find a task's file, read it in its format, and say exactly where it is malformed.

Where a task's data comes from, first match wins:
1. `--data TASK=PATH`: that file (a folder is searched like a data root);
2. `--data DIR` (repeatable), then $TINYTITAN_DATA: DIR / the spec's `data.local.path`;
3. the embedded evaluation pack (`tinytitan/eval/pack/`: the first few hundred items of public sets, with
   their licences), when the run asks for a `limit` the pack holds (`pack.json`: items per task, and for
   perplexity texts the number of 512-token windows);
4. Hugging Face datasets (the spec's `data.hf`), when the `datasets` package is installed and the Hub (or
   its local cache) has the set; the rows read are kept as JSON under $TINYTITAN_HOME/data/hf, so later
   runs read them without `datasets` or a network. A text spec (`text: FIELD`) joins the field of every
   row, in order, with `join` (default "") into one document.

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
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from tinytitan.errors import DataError
from tinytitan.io.folders import atomic_write_text
from tinytitan.store import canonical_json


@dataclass
class Docs:
    docs: list[dict[str, Any]]
    where: list[str]  # "file:line" (or "hf:id[index]") of each doc, for error messages
    source: str  # a file path or "hf:path/name/split"
    sha256: str  # of the file(s) read (Hugging Face rows: of the JSON copy kept of them)
    fewshot: list[dict[str, Any]] | None = None  # a separate few-shot pool (HF train split), if any
    files: list[str] = field(default_factory=list)
    origin: str = "file"  # "file" (--data, $TINYTITAN_DATA) | "pack N" (the embedded pack) | "hf ID"

    def identity(self) -> dict[str, str]:
        """What a job records of its data (and is keyed on): where it came from and its sha256."""
        return {"data": self.sha256, "data_source": self.origin}


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
        except RecursionError:
            raise DataError(f"{path}:{n}: JSON nested too deeply") from None
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
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
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


def load_docs(task: str, data_spec: dict[str, Any], data: list[str] | None, limit: int | None = None) -> Docs:
    """Read a task's documents (see the module docstring for where they are looked for).

    limit: how many items (perplexity texts: windows) the run scores; the embedded pack serves a run whose
    limit it holds. None asks for the whole set, which the pack never stands in for.
    """
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
        return _read_local(task, path, local.get("format", "jsonl"), labels, local.get("label_field"))
    packed = pack_docs(task, limit)
    if packed is not None:
        return packed
    tried.append(_pack_holds(task))
    hf = data_spec.get("hf")
    if hf:
        return _load_hf(task, hf, tried)
    raise DataError(
        f"{task}: no data found (looked for {', '.join(tried)}); "
        f"pass --data DIR (a folder holding {local.get('path', '?')}) or --data {task}=FILE"
    )


def _read_local(
    task: str, path: Path, fmt: str, labels: Path | None, label_field: str | None, sha: str | None = None
) -> Docs:
    """sha: the files' sha256 when the caller has already computed it."""
    docs, where = READERS[fmt](path)
    files = [path]
    if labels is not None:
        if not labels.exists():
            raise DataError(f"{task}: labels file {labels} (beside {path.name}) does not exist")
        for d, lab in zip(docs, read_labels(labels, len(docs)), strict=True):
            d[label_field or "label"] = lab
        files.append(labels)
    return Docs(docs, where, str(path), sha or sha256_files(files), files=[str(f) for f in files])


# -- the embedded evaluation pack ---------------------------------------------------------------------
def _pack_folder():
    return resources.files("tinytitan.eval") / "pack"


@lru_cache(maxsize=1)
def pack_manifest() -> dict[str, Any]:
    """pack.json: the pack's version and, per task, its file, format, items, sha256, licence and source."""
    return json.loads((_pack_folder() / "pack.json").read_text(encoding="utf-8"))


def pack_capacity(task: str) -> int:
    """How large a `limit` the pack serves for `task` (0: none): items, or for a text the 512-token
    windows the fewest of the embedded models' tokenizers make of it."""
    entry = pack_manifest()["tasks"].get(task)
    if entry is None:
        return 0
    if entry["format"] == "text":
        return min(entry.get("windows", {}).values(), default=0)
    return int(entry["items"])


def _pack_holds(task: str) -> str:
    n = pack_capacity(task)
    unit = "windows" if pack_manifest()["tasks"].get(task, {}).get("format") == "text" else "items"
    return f"the embedded pack ({n} {unit}: a run with --limit {n} or less)" if n else "the embedded pack"


def pack_docs(task: str, limit: int | None) -> Docs | None:
    """The pack's documents of `task` when it holds `limit` of them, else None."""
    if limit is None or not 0 < limit <= pack_capacity(task):
        return None
    m = pack_manifest()
    entry = m["tasks"][task]
    folder = Path(str(_pack_folder()))
    files = [folder / entry["path"], *([folder / entry["labels"]] if entry.get("labels") else [])]
    sha = sha256_files(files)
    if sha != entry["sha256"]:
        raise DataError(
            f"{task}: the embedded pack's {entry['path']} is damaged (its sha256 is not the one"
            " in pack.json); reinstall tinytitan"
        )
    docs = _read_local(task, files[0], entry["format"], files[1] if len(files) > 1 else None, None, sha)
    docs.origin = f"pack {m['version']}"
    docs.source = f"tinytitan evaluation pack {m['version']}: {entry['path']}"
    return docs


# -- Hugging Face datasets ----------------------------------------------------------------------------
_HF_FAILED: dict[str, str] = {}  # what could not be loaded in this process, and why (no 5 retries again)


def _hf_cache_file(ident: str) -> Path:
    from tinytitan import zoo

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", ident).strip("_")
    return zoo.home() / "data" / "hf" / f"{slug}-{hashlib.sha256(ident.encode()).hexdigest()[:8]}.json"


def _load_hf(task: str, hf: dict[str, Any], tried: list[str]) -> Docs:
    ident = f"{hf['path']}/{hf.get('name') or ''}/{hf['split']}"
    cache = _hf_cache_file(canonical_json(hf))
    if cache.exists():
        return _hf_docs(task, hf, ident, cache)
    looked = ", ".join(tried) or "nothing"
    if ident in _HF_FAILED:
        raise DataError(_HF_FAILED[ident])
    try:
        import datasets  # optional: `pip install datasets`
    except ImportError:
        raise DataError(
            f"{task}: no local data (looked for {looked}) and the `datasets` package is not installed; "
            "pass --data DIR or --data TASK=FILE"
        ) from None
    try:
        ds = datasets.load_dataset(hf["path"], hf.get("name"), split=hf["split"])
        few = (
            datasets.load_dataset(hf["path"], hf.get("name"), split=hf["fewshot_split"])
            if hf.get("fewshot_split")
            else None
        )
    except Exception as e:  # network, auth, unknown dataset: one clean message
        msg = (
            f"{task}: no local data (looked for {looked}) and Hugging Face dataset {ident} could not be "
            f"loaded ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
        )
        _HF_FAILED[ident] = msg
        raise DataError(msg) from None
    rows = {
        "ident": ident,
        "fingerprint": str(getattr(ds, "_fingerprint", "")),
        "rows": [dict(d) for d in ds],
        "fewshot": [dict(d) for d in few] if few is not None else None,
    }
    atomic_write_text(cache, json.dumps(rows, ensure_ascii=False, default=str))
    return _hf_docs(task, hf, ident, cache)


def _hf_docs(task: str, hf: dict[str, Any], ident: str, cache: Path) -> Docs:
    raw = _read_bytes(cache)
    try:
        cached = json.loads(raw.decode("utf-8"))
        rows, few = cached["rows"], cached["fewshot"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{task}: the kept copy {cache} of hf:{ident} is damaged ({e}); delete it") from None
    sha = hashlib.sha256(raw).hexdigest()
    if hf.get("text"):  # a text task: every row's field joined into one document, in order
        field_name = hf["text"]
        missing = next((i for i, d in enumerate(rows) if not isinstance(d.get(field_name), str)), None)
        if missing is not None:
            raise DataError(f"{task}: hf:{ident}[{missing}] has no text field {field_name!r}")
        text = str(hf.get("join", "")).join(d[field_name] for d in rows)
        return Docs(
            [{"text": text}], [f"hf:{ident}"], f"hf:{ident}", sha, files=[str(cache)], origin=f"hf {ident}"
        )
    proc = PROCESSORS.get(hf.get("process", ""), lambda d: d)
    docs = [proc(dict(d)) for d in rows]
    fewshot = [proc(dict(d)) for d in few] if few is not None else None
    where = [f"hf:{ident}[{i}]" for i in range(len(docs))]
    return Docs(docs, where, f"hf:{ident}", sha, fewshot, [str(cache)], origin=f"hf {ident}")
