"""The decode-attention C++ kernel: the same attention as torch's matmuls, on random and real caches."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import loaded_model
from tests.test_cache import random_model, reference_logits
from tests.test_decode_step import decode_all
from tinytitan.decode_step import DecodeStep, compile_available
from tinytitan.engine import prefill
from tinytitan.models import attention_kernel


@pytest.fixture(scope="module")
def kernel():
    if not compile_available():
        pytest.skip("the kernel is built with a C++ compiler (g++ or clang++), and none is here")
    if not attention_kernel.load():
        pytest.skip(f"the kernel did not build here: {attention_kernel.failure()}")
    return attention_kernel


@pytest.fixture
def calls(kernel, monkeypatch) -> list[int]:
    """Counts the model code's calls into the kernel (so a test knows the kernel, not the matmuls, ran)."""
    seen: list[int] = []
    real = kernel.decode_attention

    def counted(*args):
        seen.append(1)
        return real(*args)

    monkeypatch.setattr(kernel, "decode_attention", counted)
    return seen


def matmul_attention(q, k, v, kpos, padded):
    scores = q @ k.transpose(-1, -2)
    if padded:
        scores = scores.masked_fill(kpos < 0, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "batch,kv,group,dim,length,padded",
    [
        (1, 3, 3, 64, 577, False),  # SmolLM2's heads; a full cache's view of the first 577 of 700 slots
        (1, 1, 4, 256, 512, True),  # Gemma 3's heads; a sliding ring with empty slots
        (2, 2, 1, 32, 5, True),  # batch 2, few keys (one span), no grouping
        (1, 1, 16, 16, 1000, False),  # the widest group, many spans
        (1, 2, 7, 80, 300, True),  # query blocks of 4 and 3, a head dim of 64 + 16
    ],
)
def test_kernel_matches_matmul_attention(kernel, batch, kv, group, dim, length, padded, cache_dtype) -> None:
    g = torch.Generator().manual_seed(length)
    q = torch.randn(batch, kv, group, dim, generator=g)
    # views of the first `length` slots of larger buffers, as static caches pass them (cast first: casting
    # the view would make it contiguous)
    k = torch.randn(batch, kv, length + 123, dim, generator=g).to(cache_dtype)[:, :, :length]
    v = torch.randn(batch, kv, length + 123, dim, generator=g).to(cache_dtype)[:, :, :length]
    assert k.is_contiguous() == (batch * kv == 1)  # strided wherever more than one head's rows are
    kpos = torch.arange(length)
    if padded:  # a ring before it fills: every third slot still empty, slot 0 always holds a key
        kpos[1::3] = -1
    got = kernel.decode_attention(q, k, v, kpos, padded)
    # a float16 cache is read as the float32 values it holds
    want = matmul_attention(q, k.float(), v.float(), kpos, padded)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.dtype == torch.float32 and kernel.supports(q, k, v)


def test_kernel_refuses_what_it_cannot_take(kernel) -> None:
    q, k = torch.randn(1, 1, 2, 24), torch.randn(1, 1, 8, 24)  # head dim not a multiple of 16
    assert not kernel.supports(q, k, k)
    q, k = torch.randn(1, 1, 2, 32), torch.randn(1, 1, 8, 32)
    assert not kernel.supports(q.bfloat16(), k.bfloat16(), k.bfloat16())
    assert not kernel.supports(q, k.bfloat16(), k.bfloat16())  # float16 caches only
    assert not kernel.supports(q, k.half(), k)  # keys and values of one dtype
    assert not kernel.supports(q, k, k.transpose(2, 3).contiguous().transpose(2, 3))  # different strides
    assert not kernel.supports(q.requires_grad_(), k, k)  # no backward: training keeps torch's matmuls
    with pytest.raises(RuntimeError, match="head shape"):
        kernel.decode_attention(
            torch.randn(1, 1, 2, 24),
            torch.randn(1, 1, 8, 24),
            torch.randn(1, 1, 8, 24),
            torch.arange(8),
            False,
        )


@pytest.mark.parametrize("arch", ["tiny-gemma3", "tiny-llama"])
def test_decode_on_the_kernel_matches_a_full_pass(kernel, calls, arch: str) -> None:
    """Static caches past the sliding window (padded ring) and grouped heads, through the model code."""
    model = random_model(arch)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 45), generator=torch.Generator().manual_seed(3))
    got = decode_all(DecodeStep(model), model, ids, 45, static=True)
    torch.testing.assert_close(got, reference_logits(model, ids), rtol=1e-4, atol=1e-4)
    assert len(calls) == 45 * model.cfg.n_layers  # the first token too (one query)


@pytest.mark.parametrize("name", ["gemma-3-270m", "smollm2-135m-instruct"])
def test_real_model_logits_agree_with_the_matmul_path(kernel, calls, monkeypatch, name: str) -> None:
    """Float32 runtime, real weights, a padded ring (Gemma's local layers): the next token's logits on the
    kernel and on torch's matmuls (the path where no kernel builds) agree to float32 rounding."""
    m = loaded_model(name)
    ids = m.tokenizer.encode("The river town grew up around the old mill, and by the time " * 12)
    cache = m.new_cache(len(ids) + 8, static=True)
    with torch.inference_mode():
        tok = int(prefill(m.module, ids, cache).argmax())
        for i in range(4):
            x, pos = torch.tensor([[tok]]), len(ids) + i
            monkeypatch.setattr(attention_kernel, "_loaded", True)
            on = m.module(x, cache=cache, start=pos, last_only=True)[0, -1]
            monkeypatch.setattr(attention_kernel, "_loaded", False)
            off = m.module(x, cache=cache, start=pos, last_only=True)[0, -1]  # same slot, same values
            assert float((on - off).abs().max()) < 1e-4 * float(off.abs().max())
            assert int(on.argmax()) == int(off.argmax())
            tok = int(on.argmax())
    assert len(calls) == 4 * m.config.n_layers


def test_switched_off_by_the_environment(monkeypatch) -> None:
    monkeypatch.setattr(attention_kernel, "_loaded", False)
    monkeypatch.setattr(attention_kernel, "_failure", None)
    monkeypatch.setenv("TINYTITAN_NO_KERNELS", "1")
    assert not attention_kernel.load()
    assert "TINYTITAN_NO_KERNELS" in (attention_kernel.failure() or "")
    q, k = torch.randn(1, 1, 2, 32), torch.randn(1, 1, 8, 32)
    assert not attention_kernel.supports(q, k, k)  # the model code takes torch's matmuls


def test_eager_steps_use_an_existing_build_and_never_start_one(kernel, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(attention_kernel, "_loaded", False)
    assert attention_kernel.load(build=False)  # the build the fixture made (or found)
    monkeypatch.setattr(attention_kernel, "_loaded", False)
    monkeypatch.setenv("TINYTITAN_HOME", str(tmp_path))  # no build there
    assert not attention_kernel.load(build=False)
    assert attention_kernel.failure() is None and not list(tmp_path.iterdir())
