"""llama.cpp's own tools as anchors (built by `make anchors`; skipped with the reason when absent): our
evaluator's KLD of one of our exported GGUF files agrees with llama-perplexity --kl-divergence on it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import model_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from anchors import AnchorMissing, tool

TEXT = (
    Path(__file__).resolve().parents[1] / "src" / "tinytitan" / "eval" / "pack" / "wikitext-2-test-head.txt"
)


def _tool(name: str) -> Path:
    try:
        return tool(name)
    except AnchorMissing as e:
        pytest.skip(str(e))


def test_a_missing_tool_says_how_to_build_it(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TINYTITAN_LLAMA_CPP", str(tmp_path))
    with pytest.raises(AnchorMissing, match=r"llama-bench not found in .*: run `make anchors`"):
        tool("llama-bench")


@pytest.mark.slow
def test_llama_perplexity_kld_agrees_with_ours_on_an_exported_file(tmp_path) -> None:
    perplexity = _tool("llama-perplexity")
    src = model_path("smollm2-135m-instruct")
    from tinytitan import load
    from tinytitan.eval.runner import EvalConfig, evaluate
    from tinytitan.quant.export import export_gguf

    out = export_gguf(load("smollm2-135m-instruct", variant="w4g32"), tmp_path / "w4g32.gguf")
    windows = 4
    common = ["-f", str(TEXT), "-c", "512", "--chunks", str(windows), "-t", "2"]
    base = tmp_path / "base.kld"
    subprocess.run([str(perplexity), "-m", str(src), *common, "--kl-divergence-base", str(base)], check=True,
                   capture_output=True)  # fmt: skip
    proc = subprocess.run(
        [str(perplexity), "-m", str(out), *common, "--kl-divergence-base", str(base), "--kl-divergence"],
        capture_output=True,
        text=True,
        check=True,
    )
    m = re.search(r"Mean\s+KLD:\s+([-0-9.]+)", proc.stdout + proc.stderr)
    assert m is not None, (proc.stdout + proc.stderr)[-2000:]
    theirs = float(m[1])
    cfg = EvalConfig(limit=windows, reference=str(src), data=[f"kld={TEXT}"])
    rows = evaluate(str(out), ["kld"], config=cfg, store=tmp_path / "r.sqlite")
    ours = next(r.value for r in rows if r.metric == "kld_mean")
    # llama.cpp rounds activations to 8 bits in its quantized matmuls, for the reference run and the
    # variant alike; on a 4-bit file that noise is small next to the quantization's own KL
    assert ours > 0.01 and abs(theirs / ours - 1) < 0.10, (ours, theirs)
