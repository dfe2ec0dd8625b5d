"""The decode step with its position in a device tensor (what a CUDA graph replays), and the graph itself.

The tensor-position path runs on the CPU too, so its arithmetic is checked everywhere; the tests that record
and replay a graph need a CUDA device and are skipped without one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tinytitan as tt
from tests.test_cache import random_model, reference_logits
from tinytitan.cuda_graph import GraphedStep, graphable
from tinytitan.decode_step import DecodeStep
from tinytitan.models import KVCache

FIXTURES = Path(__file__).parent / "fixtures"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def decode_with_tensor_positions(model, ids: torch.Tensor, max_len: int, kv: str | None, prompt: int = 20):
    """Prefill `prompt` tokens (integer positions), then one token at a time with the position as a tensor,
    setting the cache's lengths as the graph runner does; logits of every position."""
    cache = KVCache.for_model(model.cfg, max_len, static=True, kv_quant=kv, device=ids.device)
    with torch.inference_mode():
        out = [model(ids[:, :prompt], cache=cache, start=0)[0]]
        for r in {m for m in model.modules() if hasattr(m, "reserve")}:
            r.reserve(max_len + 1)
        for i in range(prompt, ids.shape[1]):
            pos = torch.tensor([i], device=ids.device)
            out.append(model(ids[:, i : i + 1], cache=cache, start=pos, last_only=True)[0])
            for layer in cache.layers:
                layer.length = i + 1
    return torch.cat(out)


@pytest.mark.parametrize("arch", ["tiny-gemma3", "tiny-llama"])
@pytest.mark.parametrize("kv", [None, "f16"])
def test_tensor_positions_decode_like_a_full_pass(arch: str, kv: str | None) -> None:
    """Past the 16-token sliding window and up to the static cache's last slot."""
    model = random_model(arch)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 45), generator=torch.Generator().manual_seed(3))
    full = reference_logits(model, ids)
    got = decode_with_tensor_positions(model, ids, 45, kv)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4 if kv is None else 5e-3)


def test_tensor_positions_see_only_written_slots() -> None:
    """A static full cache is read whole at a tensor position: slots past it are masked, so a stale value
    left there (a longer earlier request) changes nothing."""
    model = random_model("tiny-llama")
    ids = torch.randint(0, model.cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(4))
    clean = decode_with_tensor_positions(model, ids, 40, None)
    cache = KVCache.for_model(model.cfg, 40, static=True)
    for layer in cache.layers:
        layer.k.normal_()
        layer.v.normal_()
    with torch.inference_mode():
        model(ids[:, :20], cache=cache, start=0)
        got = [
            model(ids[:, i : i + 1], cache=cache, start=torch.tensor([i]), last_only=True)[0]
            for i in range(20, 30)
        ]
    torch.testing.assert_close(torch.cat(got), clean[20:], rtol=1e-5, atol=1e-5)


def test_only_fixed_shape_float_caches_on_cuda_are_graphable() -> None:
    cfg = random_model("tiny-gemma3").cfg
    assert not graphable(KVCache.for_model(cfg, 32, static=True))  # on the CPU
    assert not graphable(KVCache.for_model(cfg, 32))
    assert not graphable(KVCache.for_model(cfg, 32, static=True, kv_quant="int8"))


@cuda
@pytest.mark.parametrize("kv", [None, "f16"])
def test_graph_replays_the_eager_step(kv: str | None) -> None:
    """Recorded once per cache, replayed past the sliding window: the eager step's logits; a new cache (the
    next request) records again."""
    model = random_model("tiny-gemma3").cuda()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 45), generator=torch.Generator().manual_seed(6)).cuda()
    full = reference_logits(model, ids)
    step = GraphedStep(model)
    for request in range(2):
        cache = KVCache.for_model(model.cfg, 45, static=True, kv_quant=kv, device="cuda")
        with torch.inference_mode():
            out = [model(ids[:, :10], cache=cache, start=0)[0]]
            out += [step(ids[:, i : i + 1], cache, i) for i in range(10, 45)]
        torch.testing.assert_close(torch.cat(out), full, rtol=1e-4, atol=1e-4 if kv is None else 5e-3)
        assert step.recorded == request + 1
        assert cache.length == 45


@cuda
@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_cuda_model_generates_the_cpu_tokens(arch: str) -> None:
    """A checkpoint loaded on the GPU, as a graph (the default) and eagerly, greedy and seeded sampling:
    the CPU's tokens."""
    path = FIXTURES / f"hf_tiny_{arch}"
    cpu = tt.load(path, device="cpu")
    gpu = tt.load(path, device="cuda")
    prompt = "the quick brown fox"
    want = cpu.complete(prompt, max_tokens=40).token_ids
    sampled = cpu.complete(prompt, max_tokens=40, temperature=0.8, seed=1).token_ids
    assert gpu.decode_step.static_cache and gpu.decode_step._graphed is not None
    assert gpu.complete(prompt, max_tokens=40).token_ids == want
    assert gpu.complete(prompt, max_tokens=40, temperature=0.8, seed=1).token_ids == sampled
    assert gpu.decode_step._graphed.recorded == 2
    gpu.decode_step = DecodeStep(gpu.module, cuda_graphs=False)
    assert gpu.complete(prompt, max_tokens=40).token_ids == want


@cuda
def test_interleaved_requests_keep_one_graph_each() -> None:
    """A server steps several requests in turn, each on its own cache: each is recorded once."""
    model = random_model("tiny-llama").cuda()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(7)).cuda()
    step = GraphedStep(model)
    caches = [KVCache.for_model(model.cfg, 30, static=True, device="cuda") for _ in range(2)]
    out: list[list[torch.Tensor]] = [[], []]
    with torch.inference_mode():
        for r in range(2):
            out[r].append(model(ids[r : r + 1, :8], cache=caches[r], start=0)[0])
        for i in range(8, 30):
            for r in range(2):
                out[r].append(step(ids[r : r + 1, i : i + 1], caches[r], i))
    assert step.recorded == 2
    for r in range(2):
        torch.testing.assert_close(
            torch.cat(out[r]), reference_logits(model, ids[r : r + 1]), rtol=1e-4, atol=1e-4
        )


@cuda
def test_compiled_kernels_replayed_as_a_graph() -> None:
    """compiled=True on CUDA: torch.compile's kernels recorded in the graph, traced once for two caches of
    different sizes (the cache length is a symbol)."""
    model = random_model("tiny-gemma3").cuda()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(8)).cuda()
    full = reference_logits(model, ids)
    step = DecodeStep(model, compiled=True)
    assert step._graphed is not None and step._graphed.fn is not None
    for n in (40, 33):
        cache = KVCache.for_model(model.cfg, n, static=True, device="cuda")
        with torch.inference_mode():
            out = [model(ids[:, :10], cache=cache, start=0)[0]]
            out += [step(ids[:, i : i + 1], cache, i) for i in range(10, n)]
        torch.testing.assert_close(torch.cat(out), full[:n], rtol=1e-4, atol=1e-4)
    assert step._graphed.fallback_reason is None and step._graphed.fn is not None
    assert step._graphed.recorded == 2


@cuda
def test_graphs_are_the_default_on_cuda_and_follow_module_changes() -> None:
    model = tt.load(FIXTURES / "hf_tiny_llama", device="cuda")
    assert model.decode_step._graphed is not None
    first = model.decode_step
    model.module_changed()
    assert model.decode_step is not first and model.decode_step._graphed is not None


def test_a_step_past_the_cache_is_refused() -> None:
    """As the eager cache refuses it (a graph would write out of bounds, on CUDA a device-side assert)."""
    model = random_model("tiny-llama")
    cache = KVCache.for_model(model.cfg, 8, static=True)
    with torch.inference_mode():
        model(torch.zeros(1, 8, dtype=torch.long), cache=cache, start=0)
        with pytest.raises(ValueError, match="overflow"):
            GraphedStep(model)(torch.zeros(1, 1, dtype=torch.long), cache, 8)


@cuda
def test_a_graph_outlives_the_rotary_table_it_was_recorded_with() -> None:
    """Another request's long prompt grows (replaces) the rotary tables while a recorded request is still
    decoding: its graph keeps reading the table it holds, and the step also runs outside inference mode."""
    model = random_model("tiny-gemma3").cuda()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(9)).cuda()
    full = reference_logits(model, ids)
    step = GraphedStep(model)
    cache = KVCache.for_model(model.cfg, 30, static=True, device="cuda")
    rotary = next(m for m in model.modules() if hasattr(m, "reserve"))
    with torch.inference_mode():
        out = [model(ids[:, :10], cache=cache, start=0)[0]]
        out += [step(ids[:, i : i + 1], cache, i) for i in range(10, 20)]
        before = rotary.table
        long_ids = torch.zeros(1, 3000, dtype=torch.long, device="cuda")
        model(long_ids, cache=KVCache.for_model(model.cfg, 3000, device="cuda"), start=0)
        assert rotary.table is not before  # grown: the old table is gone from the module
        torch.cuda.empty_cache()
        junk = torch.full((1 << 22,), float("nan"), device="cuda")  # would take the freed memory
    with torch.no_grad():
        out += [step(ids[:, i : i + 1], cache, i) for i in range(20, 30)]
    del junk
    torch.testing.assert_close(torch.cat(out), full, rtol=1e-4, atol=1e-4)
    assert step.recorded == 1
