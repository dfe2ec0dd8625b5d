"""`evaluate` end to end on SmolLM2: rows in the store, resume after an interruption or a kill,
perplexity/KLD, long-context grid, speed, and the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import loaded_model
from tinytitan.errors import ContextLengthError
from tinytitan.eval.api import LM, RuntimeLM
from tinytitan.eval.runner import EvalConfig, evaluate
from tinytitan.store import Store

FIXTURE_DATA = Path(__file__).parent / "fixtures" / "eval_data"
SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol():
    return loaded_model(SMOL)


class CountingLM(LM):
    """Counts the loglikelihood requests that reach the model; can 'crash' before the Nth call."""

    def __init__(self, inner: RuntimeLM, fail_on_call: int | None = None) -> None:
        self.inner, self.fail_on_call = inner, fail_on_call
        self.calls = self.requests = 0

    def loglikelihood(self, requests, progress=None):
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise KeyboardInterrupt("simulated interruption")
        self.requests += len(requests)
        return self.inner.loglikelihood(requests, progress)

    def loglikelihood_rolling(self, texts, progress=None):
        return self.inner.loglikelihood_rolling(texts, progress)

    def generate_until(self, requests, progress=None):
        return self.inner.generate_until(requests, progress)


def key(rows):
    return [(r.task, r.metric, r.value, r.stderr, r.n, r.job_key) for r in rows]


@pytest.fixture(scope="module")
def baseline(smol, tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "results.sqlite"
    lm = CountingLM(RuntimeLM(smol))
    rows = evaluate(
        smol, "arc_easy", config=EvalConfig(data=[str(FIXTURE_DATA)]), store=path, lm=lm, name=SMOL
    )
    return rows, lm.requests


def test_rows_carry_full_provenance(baseline, smol) -> None:
    rows, n_requests = baseline
    assert n_requests == 24 * 4 - 1 + 1  # 24 questions: 22 with 4 choices, one with 3, one with 5
    by = {r.metric: r for r in rows}
    assert set(by) == {"acc", "acc_norm"}
    r = by["acc"]
    assert r.n == 24 and 0 <= r.value <= 1 and r.stderr > 0
    assert r.model == SMOL and r.model_sha256 == smol.source.sha256 and r.variant == ""
    assert r.task == "arc_easy" and r.task_version == "1" and r.tool_version and r.machine and r.time
    assert r.options["data"] and r.options["num_fewshot"] == 0 and r.options["dtype"] == "float32"
    assert by["acc"].value >= 0.5  # SmolLM2 knows grade-school science better than chance (0.25)


def test_interrupted_run_resumes_without_recomputing(baseline, smol, tmp_path) -> None:
    rows0, total = baseline
    path = tmp_path / "results.sqlite"
    cfg = EvalConfig(data=[str(FIXTURE_DATA)])
    crash = CountingLM(RuntimeLM(smol), fail_on_call=3)  # dies as the third chunk starts
    with pytest.raises(KeyboardInterrupt):
        evaluate(smol, "arc_easy", config=cfg, store=path, lm=crash, name=SMOL)
    with Store(path) as st:
        (job,) = st.jobs()
        assert job.status == "running" and st.rows() == []
        assert len(st.items(job.scope)) == 16  # two committed chunks survived
    resume = CountingLM(RuntimeLM(smol))
    rows = evaluate(smol, "arc_easy", config=cfg, store=path, lm=resume, name=SMOL)
    assert resume.requests == total - crash.requests  # only the missing questions ran
    assert key(rows) == key(rows0)  # the same rows as an uninterrupted run
    again = CountingLM(RuntimeLM(smol))
    assert key(evaluate(smol, "arc_easy", config=cfg, store=path, lm=again, name=SMOL)) == key(rows0)
    assert again.requests == 0  # a finished job is not run again
    forced = CountingLM(RuntimeLM(smol))
    cfg.force, cfg.limit = True, 2  # --force recomputes (a 2-question job keeps the test short)
    evaluate(smol, "arc_easy", config=cfg, store=path, lm=forced, name=SMOL)
    assert forced.requests == 8


def test_larger_limit_reuses_scored_items(smol, tmp_path) -> None:
    path = tmp_path / "results.sqlite"
    lm = CountingLM(RuntimeLM(smol))
    evaluate(smol, "piqa", config=EvalConfig(data=[str(FIXTURE_DATA)], limit=2), store=path, lm=lm, name=SMOL)
    assert lm.requests == 4
    lm2 = CountingLM(RuntimeLM(smol))
    rows = evaluate(smol, "piqa", config=EvalConfig(data=[str(FIXTURE_DATA)]), store=path, lm=lm2, name=SMOL)
    assert lm2.requests == 4 and rows[0].n == 4  # only questions 3 and 4 were new


CHILD = """
import sys, time
from tinytitan.eval.api import RuntimeLM
from tinytitan.eval.runner import EvalConfig, evaluate, load_model

class Slow(RuntimeLM):
    def loglikelihood(self, requests, progress=None):
        out = super().loglikelihood(requests, progress)
        time.sleep(1.0)  # leave time to be killed between commits
        return out

m = load_model(sys.argv[1])
print("loaded", flush=True)
cfg = EvalConfig(data=[sys.argv[3]])
evaluate(m, "arc_easy", config=cfg, store=sys.argv[2], lm=Slow(m), name=sys.argv[1])
"""


def test_kill_mid_run_then_rerun(baseline, smol, tmp_path) -> None:
    rows0, _ = baseline
    path = tmp_path / "results.sqlite"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen(
        [sys.executable, str(script), SMOL, str(path), str(FIXTURE_DATA)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 240
        done = 0
        while time.time() < deadline and child.poll() is None:
            if path.exists():
                with Store(path) as st:
                    jobs = st.jobs()
                    done = len(st.items(jobs[0].scope)) if jobs else 0
                if done >= 8:
                    break
            time.sleep(0.1)
        assert child.poll() is None, f"the child ended first: {child.stderr.read().decode()[-500:]}"
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    with Store(path) as st:
        (job,) = st.jobs()
        saved = st.items(job.scope)
        assert job.status == "running" and st.rows() == [] and 8 <= len(saved) < 24
    resume = CountingLM(RuntimeLM(smol))
    rows = evaluate(
        smol, "arc_easy", config=EvalConfig(data=[str(FIXTURE_DATA)]), store=path, lm=resume, name=SMOL
    )
    choices = json.loads((FIXTURE_DATA / "arc-easy" / "test.json").read_text())
    expected = sum(len(q["choices"]["text"]) for i, q in enumerate(choices) if str(i) not in saved)
    assert resume.requests == expected  # nothing that was committed before the kill ran again
    with Store(path) as st:
        for k, v in saved.items():  # and the committed items are untouched
            assert st.items(job.scope)[k] == v
    assert [(r.metric, r.value, r.n) for r in rows] == [(r.metric, r.value, r.n) for r in rows0]


def test_perplexity_and_self_kld(smol, shared_data, tmp_path) -> None:
    from tinytitan.eval.perplexity import perplexity

    cfg = EvalConfig(data=[str(shared_data)], limit=1)
    rows = evaluate(smol, "ppl,kld", config=cfg, store=tmp_path / "r.sqlite", name=SMOL)
    by = {(r.task, r.metric): r for r in rows}
    text = (shared_data / "wikitext-2" / "test.txt").read_text()
    ref = perplexity(smol.logits, smol.tokenizer.encode(text), 512, None, max_windows=1)
    assert by["ppl", "ppl"].value == pytest.approx(ref.ppl, rel=1e-4)  # head-sliced == full logits
    assert by["ppl", "ppl"].stderr == pytest.approx(ref.ppl_stderr, rel=1e-3)
    assert by["ppl", "ppl"].n == 255
    assert by["kld", "kld_mean"].value == pytest.approx(0.0, abs=1e-4)  # against itself (float rounding)
    assert by["kld", "same_top_p"].value == 100.0 and by["kld", "ppl"].value == pytest.approx(
        ref.ppl, rel=1e-4
    )
    cache = Path(by["kld", "kld_mean"].extra["cache"])
    assert sorted(p.name for p in cache.iterdir()) == ["w000000.safetensors"]


def test_kld_of_a_variant_is_exact_over_the_whole_vocabulary(smol, shared_data, tmp_path) -> None:
    import torch

    from tinytitan.eval.runner import load_model

    q = load_model(SMOL, "w4g32")
    cfg = EvalConfig(data=[str(shared_data)], limit=1, reference_model=smol)
    rows = evaluate(q, "kld", variant="w4g32", config=cfg, store=tmp_path / "r.sqlite", name=SMOL)
    by = {r.metric: r for r in rows}
    ids = smol.tokenizer.encode((shared_data / "wikitext-2" / "test.txt").read_text())[:512]
    p_log = torch.log_softmax(smol.logits(ids)[256:511].double(), -1)  # the reference, full vocabulary
    q_log = torch.log_softmax(q.logits(ids)[256:511].double(), -1)
    direct = (p_log.exp() * (p_log - q_log)).sum(-1)
    assert by["kld_mean"].value == pytest.approx(float(direct.mean()), rel=1e-3)
    assert by["kld_max"].value == pytest.approx(float(direct.max()), rel=1e-3)
    assert by["kld_mean"].value > 1e-3 and by["kld_mean"].extra["mode"] == "hidden"
    same = float((p_log.argmax(-1) == q_log.argmax(-1)).double().mean())
    assert by["same_top_p"].value == pytest.approx(100 * same, abs=100 / 255 + 1e-9)  # at most one near-tie


def test_kld_of_an_artifact_defaults_to_its_source_file(smol, shared_data, tmp_path) -> None:
    """`tinytitan eval OUT --tasks kld` on a quantized artifact compares it with the file it came from
    (not with itself), and shares the reference cache with the source model's own runs."""
    import tinytitan as tt
    from tinytitan.quant.api import quantize
    from tinytitan.quant.artifact import save_artifact
    from tinytitan.quant.schemes import parse_variant

    art = tt.load(save_artifact(quantize(smol, parse_variant("w4g32")), tmp_path / "art"))
    cfg = EvalConfig(data=[str(shared_data)], limit=1)
    direct = evaluate(art, "kld", config=cfg, store=tmp_path / "a.sqlite", name=str(tmp_path / "art"))
    given = EvalConfig(data=[str(shared_data)], limit=1, reference_model=smol)
    explicit = evaluate(art, "kld", config=given, store=tmp_path / "b.sqlite", name=str(tmp_path / "art"))
    by = {r.metric: r.value for r in direct}
    assert by["kld_mean"] > 1e-3
    assert by["kld_mean"] == pytest.approx({r.metric: r.value for r in explicit}["kld_mean"], rel=1e-6)


def test_long_context_grid_and_refusal(smol, tmp_path) -> None:
    cfg = EvalConfig(lengths=[256, 512], depths=[0.0, 1.0], heatmap_dir=tmp_path / "maps")
    rows = evaluate(smol, "passkey,kv_retrieval", config=cfg, store=tmp_path / "r.sqlite", name=SMOL)
    by = {(r.task, r.metric): r for r in rows}
    for task in ("passkey", "kv_retrieval"):
        assert by[task, "exact_match"].n == 4
        cell = by[task, "exact_match@len=512,depth=1.00"]
        assert cell.extra["prompt_tokens"][0] <= 512 and cell.extra["prompt_tokens"][0] > 480
        assert Path(by[task, "exact_match"].extra["heatmap"]).stat().st_size > 1000
    assert by["passkey", "exact_match@len=256,depth=0.00"].value in (0.0, 1.0)
    with pytest.raises(ContextLengthError, match="beyond the model's context of 8192"):
        evaluate(smol, "passkey", config=EvalConfig(lengths=[16384]), store=tmp_path / "r.sqlite", name=SMOL)


def test_speed_rows_say_how_energy_was_obtained(smol, tmp_path) -> None:
    cfg = EvalConfig(contexts=[64], decode_tokens=4, speed_in_process=True)
    rows = evaluate(smol, "speed", config=cfg, store=tmp_path / "r.sqlite", name=SMOL)
    by = {r.metric: r for r in rows}
    assert by["file_bytes"].value == smol.source.path.stat().st_size
    assert 3 < by["bits_per_weight"].value < 40 and by["bits_per_weight"].extra["n_params"] > 100e6
    assert by["prefill_tok_s@ctx=64"].value > 0 and by["decode_tok_s@ctx=64"].value > 0
    energy = by["energy_j_per_1k_tokens@ctx=64"]
    assert energy.value > 0 and energy.extra["method"].startswith(("measured", "estimated"))
    assert by["peak_rss_bytes"].value > 100e6


def test_rapl_counters_with_wraparound(tmp_path) -> None:
    from tinytitan.eval.efficiency import RaplMeter

    pkg = tmp_path / "intel-rapl:0"
    (pkg / "intel-rapl:0:0").mkdir(parents=True)  # a sub-zone: not counted
    (pkg / "energy_uj").write_text("999000000\n")
    (pkg / "max_energy_range_uj").write_text("1000000000\n")
    m = RaplMeter(tmp_path)
    assert m.available and len(m.domains) == 1
    a = m.read()
    (pkg / "energy_uj").write_text("1000000\n")  # wrapped past the range
    assert m.joules(a, m.read()) == pytest.approx(2.0)
    assert not RaplMeter(tmp_path / "absent").available


def test_quantized_variant_is_passed_through_and_recorded(smol, tmp_path) -> None:
    cfg = EvalConfig(data=[str(FIXTURE_DATA)], limit=2)
    path = tmp_path / "r.sqlite"
    rows = evaluate(SMOL, "piqa", variant="w8", config=cfg, store=path)
    base = evaluate(smol, "piqa", config=cfg, store=path, name=SMOL)
    r, b = rows[0], base[0]
    assert r.variant and json.loads(r.variant)["name"] == "w8" and r.variant_hash != "base"
    assert b.variant == "" and b.variant_hash == "base"
    assert r.model_sha256 == b.model_sha256 and r.job_key != b.job_key
    with Store(path) as st:
        assert {x.variant_hash for x in st.rows(task="piqa", metric="acc")} == {"base", r.variant_hash}


def test_cli_unknown_task_and_json_rows(tmp_path, capsys) -> None:
    from tinytitan.cli.main import main

    assert main(["eval", SMOL, "--tasks", "arc_easy,hellaswagg"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'hellaswagg'" in err and "known tasks:" in err and "arc_easy" in err
    code = main(
        [
            "eval",
            SMOL,
            "--tasks",
            "piqa",
            "--limit",
            "2",
            "--data",
            str(FIXTURE_DATA),
            "--store",
            str(tmp_path / "r.sqlite"),
            "--json",
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["metric"] for r in rows} == {"acc", "acc_norm"} and rows[0]["n"] == 2
    code = main(
        ["eval", SMOL, "--tasks", "passkey", "--lengths", "100000", "--store", str(tmp_path / "r.sqlite")]
    )
    assert code == 2 and "beyond the model's context" in capsys.readouterr().err
