"""Quantization engine: exact packing, error bounds, kernels, artifacts, KV cache, budget planner."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from tests.conftest import loaded_model
from tinytitan.errors import TinyTitanError
from tinytitan.quant.api import quantize
from tinytitan.quant.artifact import pack_bits, save_artifact, unpack_bits
from tinytitan.quant.calib import CalibrationError, calibration_sequences
from tinytitan.quant.int_quant import gptq, quantize_int
from tinytitan.quant.mixed import BudgetError, Option, solve
from tinytitan.quant.modules import Int4Matrix, Int8Matrix, _int4_block_n, pack_int4_rows
from tinytitan.quant.schemes import QuantConfigError, parse_variant


def kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    a, b = torch.log_softmax(ref.double(), -1), torch.log_softmax(other.double(), -1)
    return float((a.exp() * (a - b)).sum(-1).mean())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_packing_round_trips_exactly(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (1001,), dtype=torch.uint8, generator=gen)
    packed = pack_bits(codes, bits)
    assert packed.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, 1001), codes)


# relative RMSE on gaussian weights: int8 per row, then 4/3/2-bit groups of 32 (asymmetric)
BOUNDS = {
    (8, 0, True): 0.01,
    (4, 32, False): 0.10,
    (4, 64, False): 0.12,
    (4, 32, True): 0.12,
    (3, 32, False): 0.20,
    (2, 32, False): 0.45,
}


@pytest.mark.parametrize("scheme", list(BOUNDS))
def test_error_bounds_on_random_weights(scheme: tuple[int, int, bool]) -> None:
    bits, group, sym = scheme
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    qw = quantize_int(w, bits, group, sym)
    rel = float((qw.dequantize() - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
    assert rel < BOUNDS[scheme]
    assert int(qw.q.max()) < (1 << bits)


def test_error_bounds_on_real_weights() -> None:
    model = loaded_model("smollm2-135m-instruct")
    w = model.module.layers[3].mlp.down_proj.weight.detach()
    for bits, bound in ((8, 0.01), (4, 0.12), (3, 0.25)):
        qw = quantize_int(w, bits, 0 if bits == 8 else 32, bits == 8)
        rel = float((qw.dequantize() - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
        assert rel < bound, (bits, rel)


def test_importance_weighting_lowers_the_weighted_error() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(128, 256, generator=g)
    imp = torch.rand(256, generator=g) ** 4 * 100
    plain, weighted = quantize_int(w, 4, 32, False), quantize_int(w, 4, 32, False, imp)
    err = lambda qw: float(((qw.dequantize() - w) ** 2 * imp).sum())  # noqa: E731
    assert err(weighted) < 0.97 * err(plain)


def test_gptq_lowers_the_output_error() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g)
    mix = torch.randn(128, 128, generator=g) * 0.3 + torch.eye(128)
    x = torch.randn(2048, 128, generator=g) @ mix  # correlated inputs
    rtn, comp = quantize_int(w, 3, 32, False), gptq(w, x.T @ x, 3, 32, False)
    out = lambda qw: float(((x @ qw.dequantize().T - x @ w.T) ** 2).mean())  # noqa: E731
    assert out(comp) < 0.8 * out(rtn)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (3, 64), (2, 32)])
def test_int4_kernel_matmul_and_row_lookup(bits: int, group: int) -> None:
    w = torch.randn(192, 256, generator=torch.Generator().manual_seed(3))
    qw = quantize_int(w, bits, group, False)
    m = Int4Matrix(qw)
    # 5 rows: the packed kernel; 300 rows (prefill): bf16 GEMM on dequantized weights; both agree with
    # the float product to bf16 precision
    for rows in (5, 300):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(4)).bfloat16().float()
        ref = x @ qw.dequantize().T
        assert float((m.matmul(x) - ref).abs().max()) < 0.02 * float(ref.abs().max())
    assert m.block_n is not None
    torch.testing.assert_close(
        m.dequantized(64, 192).float(), m.rows(torch.arange(64, 192)), rtol=0.01, atol=1e-3
    )
    ids = torch.tensor([0, 1, 31, 32, 63, 64, 100, 191])
    # the kernel keeps scale and zero in bf16: lookups agree with the f16-stored form to bf16 precision
    torch.testing.assert_close(m.rows(ids), qw.dequantize()[ids], rtol=0.01, atol=0.03)


@pytest.mark.parametrize("shift", [0, 6])
def test_int4_packing_is_torchs_own(shift: int) -> None:
    # Int4Matrix writes the kernel's layout itself (uint8 ops, 4x faster at load): it must be the very
    # bytes torch's conversion produces, for the block size probed on this machine
    block_n = _int4_block_n()
    if block_n is None:
        pytest.skip("this torch build's CPU int4 packing has no row-block layout we recognise")
    q = torch.randint(0, 16 - shift, (4 * block_n, 96), generator=torch.Generator().manual_seed(6))
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int() + shift, 1)
    assert torch.equal(pack_int4_rows(q.to(torch.uint8), shift, block_n), theirs)


def test_int8_kernel() -> None:
    w = torch.randn(128, 96, generator=torch.Generator().manual_seed(5))
    qw = quantize_int(w, 8, 0, True)
    m = Int8Matrix(qw)
    x = torch.randn(3, 96).bfloat16().float()
    ref = x @ qw.dequantize().T
    assert float((m.matmul(x) - ref).abs().max()) < 0.02 * float(ref.abs().max())
    torch.testing.assert_close(
        m.rows(torch.tensor([0, 7, 127])), qw.dequantize()[[0, 7, 127]], rtol=0.01, atol=0.01
    )


@pytest.fixture(scope="module")
def smol():
    return loaded_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def prompt_ids(smol) -> list[int]:
    text = "The history of the city begins with a small fishing village on the river. "
    return smol.tokenizer.encode(text * 4)


def test_w8_keeps_quality_and_memory_falls_with_bits(smol, prompt_ids) -> None:
    ref = smol.logits(prompt_ids)
    w8 = quantize(smol, parse_variant("w8"))
    w4 = quantize(smol, parse_variant("w4g32"))
    assert kl(ref, w8.logits(prompt_ids)) < 0.02
    assert kl(ref, w4.logits(prompt_ids)) < 0.5
    runtime = lambda m: sum(  # noqa: E731
        b.numel() * b.element_size() for b in m.module.buffers()
    )
    assert w4.quant.file_bytes() < w8.quant.file_bytes() < 0.6 * smol.weight_bytes()
    assert runtime(w4) < runtime(w8)
    assert 7.9 < w8.quant.bits_per_weight() < 8.2 and 4.9 < w4.quant.bits_per_weight() < 5.2
    assert "Paris" in w8.generate("The capital of France is", max_tokens=8)


def test_artifact_reloads_to_identical_logits(smol, prompt_ids, tmp_path: Path) -> None:
    import tinytitan as tt

    q = quantize(smol, parse_variant("w4g64-e8"))
    out = save_artifact(q, tmp_path / "art")
    again = tt.load(out)
    assert torch.equal(q.logits(prompt_ids), again.logits(prompt_ids))
    assert again.quant.config == q.quant.config
    with pytest.raises(TinyTitanError, match="exists"):
        save_artifact(q, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temp folders left behind

    # the loaded artifact keeps no unpacked codes: they are read back from its file when asked for
    from tinytitan.quant.artifact import FileCodes

    codes = [t.int_weight for t in again.quant.tensors.values() if t.int_weight is not None]
    assert codes and all(isinstance(c, FileCodes) for c in codes)
    stored = {n: t.int_weight for n, t in q.quant.tensors.items() if t.int_weight is not None}
    for name, t in again.quant.tensors.items():
        if t.int_weight is not None:
            for field in ("q", "scale", "zero"):  # read back from the file
                assert torch.equal(getattr(t.int_weight, field), getattr(stored[name], field)), field
            assert t.int_weight.nbytes() == stored[name].nbytes()
    # and nothing keeps the file's memory map (whose pages would count in the process's RSS)
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(out / "model.safetensors") not in maps.read_text()
    copy = save_artifact(again, tmp_path / "copy")  # saving a loaded artifact writes the same codes
    assert torch.equal(tt.load(copy).logits(prompt_ids), q.logits(prompt_ids))
    (out / "model.safetensors").write_bytes(b"")  # the file changed under the loaded model
    with pytest.raises(TinyTitanError, match="changed or vanished"):
        codes[0].q  # noqa: B018
    with pytest.raises(TinyTitanError, match="changed or vanished"):
        codes[0].scale  # noqa: B018
    with pytest.raises(TinyTitanError, match="unreadable"):  # a truncated artifact: a clear error
        tt.load(out)


def test_artifact_keeps_the_kv_cache_its_variant_names(smol, prompt_ids, tmp_path: Path) -> None:
    """A -kv16 artifact loads with its float16 cache (tt.load of the folder used to reset it to float32);
    kv_quant= still overrides it."""
    import tinytitan as tt

    q = quantize(smol, parse_variant("w8-kv16")).set_kv_cache("f16")
    out = save_artifact(q, tmp_path / "art")
    again = tt.load(out)
    assert again.kv_quant == "f16"
    assert again.generation_cache(4, 4).layers[0].k.dtype == torch.float16
    prompt = "The capital of France is"
    assert q.generate(prompt, max_tokens=6) == again.generate(prompt, max_tokens=6)
    assert tt.load(out, kv_quant="int8").kv_quant == "int8"


def test_unknown_scheme_lists_the_presets() -> None:
    with pytest.raises(QuantConfigError, match="known: w8, w4g32"):
        parse_variant("w5g7x")
    cfg = parse_variant("w4g64-e8-gptq-kv8c")
    assert (cfg.blocks.bits, cfg.blocks.group, cfg.embedding.bits, cfg.method, cfg.kv_cache, cfg.kv_axis) == (
        4,
        64,
        8,
        "gptq",
        "int8",
        "channel",
    )


def test_calibration_text_too_short(smol) -> None:
    with pytest.raises(CalibrationError, match="too short"):
        calibration_sequences(smol, "just a few words", 4096)


def test_self_generated_calibration_is_sampled_cached_and_seeded(monkeypatch, tmp_path) -> None:
    """Data-free calibration on a tiny checkpoint: the model samples its own text once, a second call
    reads it back, another seed gives other text; for the embedded models the shipped copy is used."""
    import tinytitan as tt
    from tinytitan import zoo
    from tinytitan.quant.calib import SEQ_LEN, self_generated

    monkeypatch.setenv("TINYTITAN_HOME", str(tmp_path))
    tiny = tt.load(Path(__file__).parent / "fixtures" / "hf_tiny_llama")
    seqs = self_generated(tiny, 2 * SEQ_LEN, seed=3)
    assert len(seqs) == 2 and all(len(s) == SEQ_LEN for s in seqs)
    files = list((tmp_path / "calib").glob("*.json"))
    assert len(files) == 1
    assert self_generated(tiny, 2 * SEQ_LEN, seed=3) == seqs  # read back, not sampled again
    assert self_generated(tiny, 2 * SEQ_LEN, seed=4) != seqs
    # the embedded models' text ships: found with an empty home, and a home copy wins over it
    relative = f"calib/{loaded_model('smollm2-135m-instruct').source.sha256[:16]}-8x512-s0.json"
    shipped = zoo.cached(relative)
    assert shipped is not None and "precomputed" in str(shipped)
    (tmp_path / relative).write_text("[[1, 2, 3]]")
    assert zoo.cached(relative) == tmp_path / relative
    monkeypatch.setenv("TINYTITAN_NO_PRECOMPUTED", "1")
    (tmp_path / relative).unlink()
    assert zoo.cached(relative) is None


def test_kv_cache_int8_is_nearly_free_and_saves_memory(smol, prompt_ids) -> None:
    ids = prompt_ids * 4
    ref = smol.logits(ids)
    try:
        smol.set_kv_cache("int8")
        assert kl(ref, smol.logits(ids)) < 0.002
        int8_bytes = smol.kv_bytes(8192)
        smol.set_kv_cache("int4", "channel")
        assert kl(ref, smol.logits(ids)) < 0.1
        assert smol.kv_bytes(8192) < int8_bytes
    finally:
        smol.set_kv_cache(None)
    assert int8_bytes < 0.3 * smol.kv_bytes(8192)
    with pytest.raises(TinyTitanError, match="f16, int8 or int4"):
        smol.set_kv_cache("int3")
    with pytest.raises(TinyTitanError, match="f16 has no axis"):  # per channel means nothing for float16
        smol.set_kv_cache("f16", "channel")
    assert smol.kv_quant is None  # a refused choice changes nothing


def test_kv_cache_float16_keeps_the_logits_and_halves_memory(smol, prompt_ids) -> None:
    ids = prompt_ids * 4
    ref = smol.logits(ids)
    fp32_bytes = smol.kv_bytes(8192)
    try:
        smol.set_kv_cache("f16")
        got = smol.logits(ids)
        assert 0 < kl(ref, got) < 1e-4
        assert smol.kv_bytes(8192) * 2 == fp32_bytes
        assert smol.new_cache(64).layers[0].k.dtype == torch.float16
    finally:
        smol.set_kv_cache(None)
    assert parse_variant("w4g32-kv16").kv_cache == "f16"


def test_budget_solver_is_optimal_on_small_cases() -> None:
    g = torch.Generator().manual_seed(7)
    options = {}
    for t in range(5):
        sizes = sorted(torch.randint(10, 100, (3,), generator=g).tolist())
        losses = sorted(torch.rand(3, generator=g).tolist(), reverse=True)
        options[f"t{t}"] = [Option(f"s{i}", sizes[i], losses[i]) for i in range(3)]
    for budget in (80, 150, 250, 400):
        combos = [c for c in itertools.product(*options.values()) if sum(o.nbytes for o in c) <= budget]
        if not combos:
            with pytest.raises(BudgetError, match="smallest reachable"):
                solve(options, budget)
            continue
        best = min(sum(o.dkl for o in c) for c in combos)
        plan = solve(options, budget)
        assert sum(o.nbytes for o in plan.values()) <= budget
        assert sum(o.dkl for o in plan.values()) <= best * 1.25 + 1e-9


def test_gguf_export_reloads_with_the_quantized_values(smol, prompt_ids, tmp_path: Path) -> None:
    import tinytitan as tt
    from tinytitan.io.gguf import GGUFFile
    from tinytitan.quant.export import export_gguf

    q = quantize(smol, parse_variant("w4g64-e8"))
    path = export_gguf(q, tmp_path / "smol.gguf")
    f = GGUFFile(path)
    types = f.tensor_types()
    assert types["blk.0.ffn_down.weight"] == "Q4_1" and types["token_embd.weight"] == "Q8_0"
    # Q4_1 holds our 4-bit groups exactly
    down = q.quant.tensors["layers.0.mlp.down_proj.weight"].dequantize()
    assert torch.equal(f.dequantize("blk.0.ffn_down.weight"), down)
    again = tt.load(path)
    assert kl(q.logits(prompt_ids), again.logits(prompt_ids)) < 0.02
    with pytest.raises(TinyTitanError, match="exists"):
        export_gguf(q, path)


def test_cli_quantize(tmp_path: Path) -> None:
    from tests.test_errors import run_cli

    proc = run_cli("quantize", "--list", cwd=tmp_path)
    assert proc.returncode == 0 and "w4g32-gptq" in proc.stdout and "q4_k" in proc.stdout
    proc = run_cli("quantize", "smollm2-135m-instruct", "--scheme", "w9", "-o", "x", cwd=tmp_path)
    assert proc.returncode == 2 and "known: w8" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("quantize", "smollm2-135m-instruct", "--scheme", "w8", "-o", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "tinytitan.json").exists()
    proc = run_cli("quantize", "smollm2-135m-instruct", "--scheme", "w8", "-o", "out", cwd=tmp_path)
    assert proc.returncode == 2 and "exists" in proc.stderr
    proc = run_cli("run", "out", "The capital of France is", "--max-tokens", "6", cwd=tmp_path)
    assert proc.returncode == 0 and "Paris" in proc.stdout
    # an artifact made before is exported as it is (no scheme: nothing is quantized again)
    proc = run_cli("quantize", "out", "--gguf", "out.gguf", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("run", "out.gguf", "The capital of France is", "--max-tokens", "6", cwd=tmp_path)
    assert proc.returncode == 0 and "Paris" in proc.stdout
    # or on the fly: `run --variant` (as `eval` and `serve` take it)
    proc = run_cli(
        "run", "smollm2-135m-instruct", "The capital of France is", "--variant", "w8", "--max-tokens", "6",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0 and "Paris" in proc.stdout
    proc = run_cli("run", "smollm2-135m-instruct", "hi", "--variant", "w9", cwd=tmp_path)
    assert proc.returncode == 2 and "known: w8" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_plans_to_a_bit_budget_and_writes_the_artifact(tmp_path, capsys) -> None:
    """`tinytitan quantize --target-bpw` end to end on a tiny checkpoint: plan, measured KL, artifact."""
    from tests.conftest import FIXTURES
    from tinytitan.cli.main import main
    from tinytitan.loader import load

    folder = FIXTURES / "hf_tiny_llama"
    if not folder.exists():
        pytest.skip("run tests/fixtures/make_hf_fixtures.py")
    calib = tmp_path / "calib.txt"
    calib.write_text(Path(__file__).resolve().parents[1].joinpath("README.md").read_text() * 2)
    out = tmp_path / "planned"
    assert main(["quantize", str(folder), "--target-bpw", "6", "--calib", str(calib), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "predicted KL" in err and "measured KL" in err
    q = load(out)
    assert q.quant.bits_per_weight() <= 6.0 + 1e-6
    assert q.quant.config.name.startswith("mixed-")
    assert (
        main(
            ["quantize", str(folder), "--target-bpw", "0.5", "--calib", str(calib), "-o", str(tmp_path / "x")]
        )
        == 2
    )
    assert not (tmp_path / "x").exists()
    assert "smallest reachable" in capsys.readouterr().err
