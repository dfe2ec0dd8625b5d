"""Task specs, data readers and prompt building (no model needed), including bad input."""

from __future__ import annotations

import bz2
import json
from pathlib import Path

import pytest

from tinytitan.errors import DataError, TaskError
from tinytitan.eval.data import load_docs
from tinytitan.eval.multiple_choice import build_items
from tinytitan.eval.registry import builtin_specs, get_task, parse_task_list, spec_from_dict

FIXTURE_DATA = Path(__file__).parent / "fixtures" / "eval_data"


def items_for(task: str, data: list[str] | None = None, k: int = 0, limit: int | None = None):
    spec = get_task(task)
    return build_items(spec, load_docs(task, spec.data, data or [str(FIXTURE_DATA)]), k, 1234, limit)


def test_builtin_specs_load_and_are_versioned() -> None:
    specs = builtin_specs()
    for name in (
        "ppl",
        "ppl_strided",
        "kld",
        "arc_easy",
        "piqa",
        "boolq",
        "hellaswag",
        "winogrande",
        "lambada_openai",
        "passkey",
        "niah_single",
        "niah_multi",
        "kv_retrieval",
        "variable_tracking",
        "speed",
    ):
        assert name in specs and specs[name].version


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(TaskError) as e:
        parse_task_list("ppl,arc_easyy,nope")
    msg = str(e.value)
    assert "'arc_easyy'" in msg and "'nope'" in msg and "known tasks:" in msg and "piqa" in msg


def test_bad_specs_are_named(tmp_path) -> None:
    with pytest.raises(TaskError, match="no `version`"):
        spec_from_dict({"name": "x", "type": "multiple_choice", "metrics": ["acc"]}, "x.yaml")
    with pytest.raises(TaskError, match="unknown spec field"):
        spec_from_dict(
            {"name": "x", "version": 1, "type": "perplexity", "metrics": [], "prompt": ""}, "x.yaml"
        )
    with pytest.raises(TaskError, match="needs `choices`"):
        spec_from_dict(
            {"name": "x", "version": 1, "type": "multiple_choice", "metrics": [], "text": "", "target": "0"},
            "x.yaml",
        )
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nversion: 1\n  type: [unclosed\n")
    with pytest.raises(TaskError, match=r"bad.yaml:\d+: malformed YAML"):
        get_task(str(bad))


def test_prompts_follow_lm_eval() -> None:
    arc = items_for("arc_easy")
    assert arc[0].requests[0] == (
        "Question: What do plants need from the air to make food?\nAnswer:",
        " carbon dioxide",
    )
    assert arc[0].gold == 0 and arc[0].lengths == [14, 8, 6, 5]
    assert arc[23].gold == 3  # digit answer keys ("4") index into the labels
    assert len(arc[14].requests) == 3 and len(arc[22].requests) == 5  # 3 and 5 choices
    piqa = items_for("piqa")
    assert piqa[1].gold == 1 and piqa[1].requests[1][1].startswith(" Stuff them")
    boolq = items_for("boolq")
    assert boolq[1].requests[0][0].endswith("\nQuestion: can penguins fly?\nAnswer:")
    assert [r[1] for r in boolq[1].requests] == [" no", " yes"] and boolq[1].gold == 0 and boolq[0].gold == 1
    wino = items_for("winogrande")
    assert wino[0].requests == [
        ("The trophy did not fit in the suitcase because the trophy", " was too big."),
        ("The trophy did not fit in the suitcase because the suitcase", " was too big."),
    ]
    assert [w.gold for w in wino] == [0, 1, 1, 0]
    lam = items_for("lambada_openai")
    ctx, cont = lam[0].requests[0]
    assert cont == " letter" and ctx.endswith("She read the") and lam[0].gold == -1


def test_hellaswag_text_format(tmp_path) -> None:
    raw = (FIXTURE_DATA / "hellaswag" / "hellaswag_tiny.txt").read_bytes()
    p = tmp_path / "hs.txt.bz2"
    p.write_bytes(bz2.compress(raw))
    items = items_for("hellaswag", [f"hellaswag={p}"])
    assert len(items) == 2 and items[0].gold == 1
    assert items[0].requests[1] == (
        "Making tea: A woman fills a kettle with water. she",
        " puts the kettle on the stove to boil.",
    )
    bad = tmp_path / "bad.txt"
    lines = raw.decode().splitlines()
    lines[7] = "seven"  # the second item's label
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad.txt:8: expected the gold label 0-3"):
        items_for("hellaswag", [f"hellaswag={bad}"])
    short = tmp_path / "short.txt"
    short.write_text("\n".join(lines[:9]) + "\n")
    with pytest.raises(DataError, match=r"short.txt:7: incomplete item"):
        items_for("hellaswag", [f"hellaswag={short}"])


def test_malformed_files_name_the_line(tmp_path) -> None:
    bad = tmp_path / "dev.jsonl"
    good = (FIXTURE_DATA / "boolq" / "dev.jsonl").read_text().splitlines()
    bad.write_text(good[0] + "\n" + good[1][:-5] + "\n" + good[2] + "\n")
    with pytest.raises(DataError, match=r"dev.jsonl:2: malformed JSON"):
        items_for("boolq", [f"boolq={bad}"])
    missing_field = tmp_path / "m.jsonl"
    missing_field.write_text(good[0] + "\n" + json.dumps({"question": "q", "answer": True}) + "\n")
    with pytest.raises(DataError, match=r"m.jsonl:2: cannot build the boolq prompt.*passage"):
        items_for("boolq", [f"boolq={missing_field}"])
    arc = json.loads((FIXTURE_DATA / "arc-easy" / "test.json").read_text())
    arc[2]["answerKey"] = "Z"
    p = tmp_path / "arc.json"
    p.write_text(json.dumps(arc, indent=2))
    with pytest.raises(DataError, match=r"arc.json:\d+ \(item 3\): cannot build the arc_easy target"):
        items_for("arc_easy", [f"arc_easy={p}"])
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"a": 1},\n {"a": 2,,}\n]')
    with pytest.raises(DataError, match=r"broken.json:3: malformed JSON"):
        items_for("arc_easy", [f"arc_easy={broken}"])


def test_labels_file_must_align(tmp_path) -> None:
    d = tmp_path / "piqa"
    d.mkdir()
    (d / "valid.jsonl").write_text((FIXTURE_DATA / "piqa" / "valid.jsonl").read_text())
    (d / "valid-labels.lst").write_text("0\n1\nx\n1\n")
    with pytest.raises(DataError, match=r"valid-labels.lst:3: expected an integer label"):
        items_for("piqa", [str(tmp_path)])
    (d / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(DataError, match="2 labels for 4 items"):
        items_for("piqa", [str(tmp_path)])


def test_missing_data_says_how_to_pass_it(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("TINYTITAN_DATA", raising=False)
    spec = get_task("winogrande")
    with pytest.raises(DataError, match="pass --data DIR"):
        load_docs("winogrande", {"local": spec.data["local"]}, [str(tmp_path)])
    with pytest.raises(DataError, match="does not exist"):
        load_docs("winogrande", spec.data, [f"winogrande={tmp_path / 'nope.jsonl'}"])


def test_fewshot_is_seeded_and_never_shows_the_question_itself() -> None:
    a = items_for("arc_easy", k=3)
    b = items_for("arc_easy", k=3)
    assert [i.requests for i in a] == [i.requests for i in b]
    for it in a:
        ctx = it.requests[0][0]
        shots = ctx.split("\n\n")
        assert len(shots) == 4  # three solved examples + the question
        assert shots[-1] not in shots[:-1]
        assert all(s.startswith("Question: ") and "\nAnswer: " in s for s in shots[:-1])
    assert items_for("arc_easy", k=3, limit=5)[4].requests == a[4].requests  # independent of --limit


def test_shared_data_reads_whole_sets(shared_data) -> None:
    for task, n in (("arc_easy", 2376), ("piqa", 1838), ("boolq", 3270), ("hellaswag", 10042)):
        spec = get_task(task)
        docs = load_docs(task, spec.data, [str(shared_data)])
        assert len(docs.docs) == n
        items = build_items(spec, docs, 0, 1234, limit=50)
        assert all(0 <= it.gold < len(it.requests) for it in items)
