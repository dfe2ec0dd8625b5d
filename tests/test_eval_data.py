"""Where evaluation data comes from: the embedded pack (no ../shared, no $TINYTITAN_DATA, no network), and
the Hugging Face path, exercised offline on small datasets the tests write (multiple choice and
WikiText-style pages), with the copy it keeps for later runs."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest

from tinytitan.errors import DataError
from tinytitan.eval.data import load_docs, pack_capacity, pack_docs, pack_manifest
from tinytitan.eval.multiple_choice import build_items
from tinytitan.eval.registry import get_task
from tinytitan.sweep.plan import budget_tasks

PACK = Path(__file__).resolve().parents[1] / "src" / "tinytitan" / "eval" / "pack"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No data root, no $TINYTITAN_DATA, no `datasets` (so no Hub), a fresh tinytitan home."""
    monkeypatch.delenv("TINYTITAN_DATA", raising=False)
    monkeypatch.setenv("TINYTITAN_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError


def test_every_quick_task_with_data_resolves_to_the_embedded_pack(offline) -> None:
    runs = [r for r in budget_tasks("quick") if get_task(r.task).data]
    assert {r.task for r in runs} >= {"kld", "arc_easy", "piqa", "boolq"}
    for run in runs:
        spec = get_task(run.task)
        docs = load_docs(run.task, spec.data, [], run.options.get("limit"))
        assert docs.origin == f"pack {pack_manifest()['version']}", run.task
        assert docs.identity()["data"] == pack_manifest()["tasks"][run.task]["sha256"]
        if spec.type == "multiple_choice":
            assert len(build_items(spec, docs, 0, 1234, run.options["limit"])) == run.options["limit"]


def test_the_pack_never_stands_in_for_a_whole_set(offline) -> None:
    spec = get_task("arc_easy")
    n = pack_capacity("arc_easy")
    assert pack_docs("arc_easy", None) is None and pack_docs("arc_easy", n + 1) is None
    with pytest.raises(DataError, match=rf"embedded pack \({n} items: a run with --limit {n} or less\)"):
        load_docs("arc_easy", spec.data, [], None)
    with pytest.raises(DataError, match="`datasets` package is not installed"):
        load_docs("arc_easy", spec.data, [], n + 1)


def test_pack_files_match_their_manifest_and_licences() -> None:
    m = pack_manifest()
    readme = (PACK / "README.md").read_text()
    for task, entry in m["tasks"].items():
        files = [entry["path"], *([entry["labels"]] if entry.get("labels") else [])]
        sha = hashlib.sha256(b"".join((PACK / f).read_bytes() for f in files)).hexdigest()
        assert sha == entry["sha256"], task
        assert all(f"`{f}`" in readme for f in files), f"{task}: a file without its licence in README.md"
        assert entry["license"] in readme
        docs = pack_docs(task, 1)
        assert docs is not None
        if entry["format"] != "text":
            assert len(docs.docs) == entry["items"] and 100 <= entry["items"] <= 500  # a few hundred
        else:
            assert min(entry["windows"].values()) >= 6  # the quick budget's KLD windows
    total = sum(p.stat().st_size for p in PACK.iterdir())
    assert total < 1_000_000  # small subsets, never the full sets


def test_a_damaged_pack_file_is_refused(monkeypatch, tmp_path) -> None:
    import tinytitan.eval.data as data

    copy = tmp_path / "pack"
    copy.mkdir()
    for f in PACK.iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    arc = copy / "arc_easy-test.json"
    arc.write_text(arc.read_text().replace("photosynthesis", "photosynthesys", 1))
    monkeypatch.setattr(data, "_pack_folder", lambda: copy)
    with pytest.raises(DataError, match="is damaged"):
        data.pack_docs("arc_easy", 10)


def _write_rows(folder: Path, split: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


ARC_ROWS = [
    {
        "id": f"q{i}",
        "question": f"Which number is {i}?",
        "choices": {"text": [str(i), str(i + 1), str(i + 2)], "label": ["A", "B", "C"]},
        "answerKey": "ABC"[i % 3],
    }
    for i in range(6)
]


def test_hugging_face_rows_for_a_multiple_choice_task(monkeypatch, tmp_path) -> None:
    pytest.importorskip("datasets", reason="the `datasets` package is not installed")
    monkeypatch.delenv("TINYTITAN_DATA", raising=False)
    monkeypatch.setenv("TINYTITAN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = tmp_path / "ai2_arc_local"
    _write_rows(ds, "test", ARC_ROWS)
    _write_rows(ds, "train", ARC_ROWS[:3])
    spec = get_task("arc_easy")
    data_spec = {"hf": {**spec.data["hf"], "path": str(ds), "name": None}}
    docs = load_docs("arc_easy", data_spec, [], None)
    assert docs.origin.startswith("hf ") and [d["id"] for d in docs.docs] == [r["id"] for r in ARC_ROWS]
    assert [d["id"] for d in docs.fewshot or []] == ["q0", "q1", "q2"]  # the train split is the shot pool
    items = build_items(spec, docs, 2, 1234)
    assert [it.gold for it in items] == [i % 3 for i in range(6)]
    assert items[0].requests[0][0].count("Question: ") == 3  # two shots from train, then the question
    # the rows are kept: a later run reads them with neither the dataset folder nor `datasets`
    for f in ds.iterdir():
        f.unlink()
    monkeypatch.setitem(sys.modules, "datasets", None)
    again = load_docs("arc_easy", data_spec, [], None)
    assert again.docs == docs.docs and again.sha256 == docs.sha256
    assert re.fullmatch(r"[0-9a-f]{64}", again.sha256)


def test_hugging_face_wikitext_pages_are_joined_into_one_text(monkeypatch, tmp_path) -> None:
    """The perplexity / KLD specs read every page of the split, in order (not only the first row)."""
    pytest.importorskip("datasets", reason="the `datasets` package is not installed")
    monkeypatch.delenv("TINYTITAN_DATA", raising=False)
    monkeypatch.setenv("TINYTITAN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    pages = [f" = Article {i} = \n \n Body of article {i} . \n \n" for i in range(4)]
    ds = tmp_path / "wikitext_local"
    _write_rows(ds, "test", [{"page": p} for p in pages])
    spec = get_task("kld")
    assert spec.data["hf"]["text"] == "page"
    data_spec = {"hf": {**spec.data["hf"], "path": str(ds), "name": None}}
    docs = load_docs("kld", data_spec, [], None)
    assert len(docs.docs) == 1 and docs.docs[0]["text"] == "".join(pages)
    for task in ("ppl", "ppl_strided"):
        assert get_task(task).data["hf"] == spec.data["hf"]
