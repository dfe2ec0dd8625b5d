"""The seeded fuzz suite: hostile model files, artifact manifests, safetensors headers, chat templates and
HTTP bodies. Each case must end in success or one of the project's own errors (one line), within
MAX_CASE_S, with memory growth bounded; the server must stay healthy. A failure names (kind, seed, index):
tests/fuzzing.py regenerates that exact case. bench/bench_fuzz.py runs the same generators for 10,000+.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests import fuzzing as fz
from tests.conftest import serving

SEED = int(os.environ.get("TINYTITAN_FUZZ_SEED", "0"))
MAX_CASE_S = 5.0
MAX_GROWTH = 400 * 2**20  # resident memory a whole kind may add (caches of torch and the allocator)
FIXTURES = Path(__file__).parent / "fixtures"


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _check(outcomes: Iterator[fz.Outcome], n: int, rss0: int) -> dict:
    done = list(outcomes)
    summary = fz.summarize(done)
    assert summary["cases"] == n
    assert not summary["failures"], f"seed {SEED}: {summary['failures'][:5]}"
    slow = [(o.index, o.what, round(o.seconds, 2)) for o in done if o.seconds > MAX_CASE_S]
    assert not slow, f"seed {SEED}: cases over {MAX_CASE_S} s: {slow[:5]}"
    assert _rss() - rss0 < MAX_GROWTH, f"memory grew by {(_rss() - rss0) / 2**20:.0f} MiB"
    assert len(summary["counts"]) > 1, summary["counts"]  # both refusals and successes: the cases bite
    return summary


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz")
    base = path / "warm.gguf"
    base.write_bytes(fz.base_gguf("gemma3").to_bytes())
    fz.load_and_run(base)  # first-use costs (imports, kernels) outside any case's time
    return path


@pytest.fixture(scope="module")
def artifacts(work: Path) -> list[Path]:
    return fz.make_artifacts(work / "artifacts")


def test_gguf_mutations(work: Path) -> None:
    rss0 = _rss()
    summary = _check(fz.gguf_outcomes(SEED, 300, work / "gguf"), 300, rss0)
    assert summary["counts"].get("ok", 0) >= 5 and summary["counts"].get("ModelLoadError", 0) >= 100


def test_manifest_mutations(work: Path, artifacts: list[Path]) -> None:
    rss0 = _rss()
    _check(fz.manifest_outcomes(artifacts, SEED, 100, work / "manifest"), 100, rss0)
    for base in artifacts:  # the cases wrote into hard-linked copies: the bases still load
        fz.load_and_run(base)


def test_safetensors_headers(work: Path, artifacts: list[Path]) -> None:
    bases = [*artifacts, FIXTURES / "hf_tiny_llama", FIXTURES / "hf_tiny_gemma3"]
    sizes = [(b / "model.safetensors").stat().st_size for b in bases]
    rss0 = _rss()
    _check(fz.safetensors_outcomes(bases, SEED, 100, work / "safetensors"), 100, rss0)
    assert [(b / "model.safetensors").stat().st_size for b in bases] == sizes


def test_chat_templates(work: Path) -> None:
    import tinytitan as tt

    tokenizer = tt.load(work / "warm.gguf", compile=False).tokenizer
    rss0 = _rss()
    _check(fz.template_outcomes(tokenizer, SEED, 60), 60, rss0)


def test_http_bodies_against_the_real_server(work: Path) -> None:
    import httpx

    import tinytitan as tt
    from tinytitan.serve import ServeConfig, create_app

    model = tt.load(work / "warm.gguf", compile=False)
    app = create_app(model, ServeConfig(model_id="fuzz", max_tokens_limit=16))
    with serving(app, log_level="critical") as url:
        rss0 = _rss()
        _check(fz.http_outcomes(url, SEED, 200), 200, rss0)
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert health["status"] == "ok"
        body = {"model": "fuzz", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
