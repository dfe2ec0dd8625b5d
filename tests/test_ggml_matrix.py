"""The default runtime of a GGUF file: its GGML blocks multiplied by the C++ kernel (quant/ggml_matrix.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REAL_MODELS, loaded_model
from tinytitan.quant import ggml_matrix
from tinytitan.quant.ggml_formats import FORMATS
from tinytitan.quant.ggml_matrix import TYPES, GgmlMatrix
from tinytitan.quant.modules import QuantLinear, gemm_dtype

PACK = Path(__file__).resolve().parents[1] / "src" / "tinytitan" / "eval" / "pack"


@pytest.fixture(scope="module")
def kernel():
    if not ggml_matrix.available():
        pytest.skip(f"the GGML block kernel did not build here: {ggml_matrix.failure()}")


@pytest.mark.parametrize("gtype", sorted(TYPES))
def test_kernel_decodes_every_type_as_the_reference_dequantizer(kernel, gtype: str) -> None:
    gen = np.random.default_rng(7)
    n, k = 48, 512  # k-quant rows need multiples of 256
    w = gen.standard_normal((n, k)).astype(np.float32) * np.linspace(0.1, 2.0, k, dtype=np.float32)
    fmt = FORMATS[gtype]
    raw = fmt.quantize_blocks(w)
    want = torch.from_numpy(fmt.dequantize_blocks(raw))
    m = GgmlMatrix(gtype, torch.from_numpy(raw), k)
    assert torch.equal(m.dequantized(0, n), want)  # bit for bit: the same order of float32 operations
    ids = torch.tensor([[3, 0], [47, 3]])
    assert torch.equal(m.rows(ids), want[ids])
    for rows in (1, 3, 5, ggml_matrix.KERNEL_MAX_ROWS + 4):  # the kernel, its row passes, the GEMM path
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        exact = x @ want.T
        m.exact = True  # float32 products of the decoded values
        torch.testing.assert_close(m.matmul(x), exact, rtol=1e-5, atol=1e-4)
        m.exact = False  # the default: inputs rounded to int8 per 32 values on x86 (none beyond the kernel)
        fast = m.matmul(x)
        if rows > ggml_matrix.KERNEL_MAX_ROWS:  # scoring: a float32 GEMM of decoded slices
            torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-4)
            with ggml_matrix.generating():  # a generation's prefill: in bf16 where the CPU computes in it
                prefill = m.matmul(x)
            dt = gemm_dtype()
            torch.testing.assert_close(prefill, (x.to(dt) @ want.to(dt).T).float(), rtol=1e-5, atol=1e-4)
            assert float((prefill - exact).abs().max() / exact.abs().max()) < 0.02
        elif not ggml_matrix.int8_inputs():
            torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-4)
        else:
            torch.testing.assert_close(fast, int8_inputs(x) @ want.T, rtol=1e-5, atol=1e-4)
            assert float((fast - exact).abs().max() / exact.abs().max()) < 0.02


def int8_inputs(x: torch.Tensor) -> torch.Tensor:
    """What the kernel multiplies on x86: each 32 inputs as int8 codes (round half to even) times a float16
    scale of their largest magnitude / 127."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = (amax / 127).half().float()
    codes = torch.round(blocks * torch.where(amax > 0, 127 / amax, 0.0))
    return (codes * scale).reshape(x.shape)


def test_kernel_refuses_blocks_that_do_not_hold_the_row(kernel) -> None:
    raw = torch.zeros(4, 33, dtype=torch.uint8)  # Q8_0 rows of 32 values are 34 bytes
    with pytest.raises(RuntimeError, match="bytes per row"):
        torch.ops.tinytitan_ggml.matmul(torch.zeros(1, 32), raw, TYPES["Q8_0"], 32, False)


@pytest.mark.parametrize("name", REAL_MODELS)
def test_default_load_runs_the_files_blocks_without_float_matrices(kernel, name: str) -> None:
    model = loaded_model(name, shipped=True)
    assert model.packed
    params = model.module.named_parameters()
    floats = [(n, tuple(p.shape)) for n, p in params if p.is_floating_point() and p.dim() > 1]
    assert floats == []  # only the norms (1-D) are float32
    linears = [m for m in model.module.modules() if isinstance(m, QuantLinear)]
    assert linears and all(isinstance(m.matrix, GgmlMatrix) for m in linears)
    types = {m.matrix.gtype for m in linears}
    assert types <= set(model.source.tensor_types.values())  # the file's own types, none converted
    assert model.module.lm_head.matrix is model.module.embed_tokens.matrix  # the tied head: one copy
    # the blocks are the file's bytes (views of its memory map), not copies
    emb = model.module.embed_tokens.matrix.blocks
    assert not emb.numpy().flags.owndata


def decode_log_probs(model, ids: list[int]) -> torch.Tensor:
    """Next-token log-probabilities one token at a time: the path generation takes (the kernel's)."""
    cache = model.new_cache(len(ids))
    with torch.inference_mode():
        rows = [model.decode_step(torch.tensor([[t]]), cache, i).reshape(-1) for i, t in enumerate(ids)]
    return torch.stack(rows).log_softmax(-1)


@pytest.mark.parametrize("name", REAL_MODELS)
def test_default_load_stays_within_the_issue_bound_of_the_reference(kernel, name: str) -> None:
    shipped, ref = loaded_model(name, shipped=True), loaded_model(name)
    text = (PACK / "wikitext-2-test-head.txt").read_text(encoding="utf-8")[:3000]
    ids = ref.tokenizer.encode(text, add_bos=True)[:160]
    lr = ref.logits(ids).log_softmax(-1)
    lp = decode_log_probs(shipped, ids)
    kl = (lr.exp() * (lr - lp)).sum(-1)
    # int8 inputs (x86) cost what llama.cpp's do: measured mean KL ~0.002-0.003 on 200 positions
    print(f"{name}: default path vs the float32 reference, mean KL {float(kl.mean()):.5f}")
    assert float(kl.mean()) <= 0.005
    # the exact path: the same weights, only the order of float32 sums differs (measured ~1e-7)
    matrices = {id(m.matrix): m.matrix for m in shipped.module.modules() if isinstance(m, QuantLinear)}
    try:
        for m in matrices.values():
            m.exact = True
        le = decode_log_probs(shipped, ids[:48])
    finally:
        for m in matrices.values():
            m.exact = False
    kl = (lr[:48].exp() * (lr[:48] - le)).sum(-1)
    assert float(kl.mean()) <= 1e-5, float(kl.mean())


def test_quantizing_or_training_a_packed_model_says_to_use_the_reference(kernel) -> None:
    from tinytitan.errors import TinyTitanError
    from tinytitan.finetune.lora import LoraConfig
    from tinytitan.finetune.trainer import TrainConfig, Trainer
    from tinytitan.quant.api import quantize
    from tinytitan.quant.schemes import QuantConfigError, parse_variant

    model = loaded_model("smollm2-135m-instruct", shipped=True)
    with pytest.raises(QuantConfigError, match="reference=True"):
        quantize(model, parse_variant("w8"))
    with pytest.raises(TinyTitanError, match="reference=True"):
        Trainer(model, [], LoraConfig(rank=2), TrainConfig(max_steps=1), "/nonexistent")
