"""lm-evaluation-harness through our adapter gives the same numbers as our built-in scorer, item by item."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import loaded_model
from tinytitan.eval.runner import EvalConfig, evaluate
from tinytitan.store import Store

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-evaluation-harness is not installed (pip install 'tinytitan[lmeval]')"
)

FIXTURE_DATA = Path(__file__).parent / "fixtures" / "eval_data"
SMOL = "smollm2-135m-instruct"


def _metrics(name: str) -> list[dict]:
    return [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in name.split(",")]


def _lm_eval_task(name: str, jsonl: Path, cache: Path, **fields) -> dict:
    """An lm-eval task config over a local JSON-lines file, templated exactly like lm-eval's own task."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(jsonl)}, "cache_dir": str(cache)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "metadata": {"version": 1.0},
        **fields,
    }


def test_adapter_matches_builtin_scorer(tmp_path) -> None:
    from lm_eval.tasks import TaskManager

    from tinytitan.eval.lm_eval_adapter import TinyTitanLM

    smol = loaded_model(SMOL)
    cache = tmp_path / "hf"
    arc = tmp_path / "arc.jsonl"
    arc.write_text(
        "".join(json.dumps(d) + "\n" for d in json.loads((FIXTURE_DATA / "arc-easy/test.json").read_text()))
    )
    piqa = tmp_path / "piqa.jsonl"
    labels = (FIXTURE_DATA / "piqa/valid-labels.lst").read_text().split()
    piqa.write_text(
        "".join(
            json.dumps({**json.loads(line), "label": int(lab)}) + "\n"
            for line, lab in zip(
                (FIXTURE_DATA / "piqa/valid.jsonl").read_text().splitlines(), labels, strict=True
            )
        )
    )
    boolq = tmp_path / "boolq.jsonl"
    boolq.write_text(
        "".join(
            json.dumps({**(d := json.loads(line)), "label": int(d["answer"])}) + "\n"
            for line in (FIXTURE_DATA / "boolq/dev.jsonl").read_text().splitlines()
        )
    )
    # the templates of lm-eval's arc_easy.yaml, piqa.yaml and super_glue/boolq/default.yaml
    tasks = [
        _lm_eval_task(
            "t_arc_easy",
            arc,
            cache,
            doc_to_text="Question: {{question}}\nAnswer:",
            doc_to_target="{{choices.label.index(answerKey)}}",
            doc_to_choice="{{choices.text}}",
            metric_list=_metrics("acc,acc_norm"),
        ),
        _lm_eval_task(
            "t_piqa",
            piqa,
            cache,
            doc_to_text="Question: {{goal}}\nAnswer:",
            doc_to_target="label",
            doc_to_choice="{{[sol1, sol2]}}",
            metric_list=_metrics("acc,acc_norm"),
        ),
        _lm_eval_task(
            "t_boolq",
            boolq,
            cache,
            doc_to_text="{{passage}}\nQuestion: {{question}}?\nAnswer:",
            doc_to_target="label",
            doc_to_choice=["no", "yes"],
            metric_list=_metrics("acc"),
        ),
    ]
    out = lm_eval.simple_evaluate(
        model=TinyTitanLM(smol, batch_size=8),
        tasks=tasks,
        num_fewshot=0,
        log_samples=True,
        task_manager=TaskManager(include_defaults=False),
    )
    store = tmp_path / "r.sqlite"
    rows = evaluate(
        smol, "arc_easy,piqa,boolq", config=EvalConfig(data=[str(FIXTURE_DATA)]), store=store, name=SMOL
    )
    ours = {(r.task, r.metric): r for r in rows}
    with Store(store) as st:
        items = {j.task: st.items(j.scope) for j in st.jobs()}
    for ours_name, theirs in (("arc_easy", "t_arc_easy"), ("piqa", "t_piqa"), ("boolq", "t_boolq")):
        res = out["results"][theirs]
        samples = sorted(out["samples"][theirs], key=lambda s: s["doc_id"])
        assert len(samples) == ours[ours_name, "acc"].n
        for s in samples:  # every choice's log-likelihood, every item
            ll_theirs = [float(r[0]) for r in s["filtered_resps"]]
            ll_ours = items[ours_name][str(s["doc_id"])]["ll"]
            assert ll_ours == pytest.approx(ll_theirs, abs=1e-4), (ours_name, s["doc_id"])
        for metric in ("acc", "acc_norm") if ours_name != "boolq" else ("acc",):
            assert ours[ours_name, metric].value == pytest.approx(res[f"{metric},none"], abs=1e-12)
            assert ours[ours_name, metric].stderr == pytest.approx(res[f"{metric}_stderr,none"], abs=1e-12)
