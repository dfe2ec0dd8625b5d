"""The decode step on fixed-shape caches, eager and compiled: same logits as a full pass, one compilation."""

from __future__ import annotations

import pytest
import torch

from tests.test_cache import random_model, reference_logits
from tinytitan.decode_step import DecodeStep, compile_available
from tinytitan.models import KVCache


def decode_all(
    step: DecodeStep,
    model: torch.nn.Module,
    ids: torch.Tensor,
    max_len: int,
    static: bool,
    kv: str | None = None,
):
    """Prefill the first token, then decode the rest one by one through `step`; logits of every position."""
    cache = KVCache.for_model(model.cfg, max_len, static=static, kv_quant=kv)
    out = []
    with torch.inference_mode():
        out.append(model(ids[:, :1], cache=cache, start=0)[0, 0])
        for i in range(1, ids.shape[1]):
            out.append(step(ids[:, i : i + 1], cache, i)[0])
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["tiny-gemma3", "tiny-llama"])
def test_static_caches_decode_like_a_full_pass(arch: str) -> None:
    """Fixed-shape caches (whole ring returned, empty slots masked) past the 16-token window."""
    model = random_model(arch)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 45), generator=torch.Generator().manual_seed(2))
    full = reference_logits(model, ids)
    got = decode_all(DecodeStep(model), model, ids, 45, static=True)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["tiny-gemma3", "tiny-llama"])
def test_float16_cache_decodes_like_a_full_pass(arch: str) -> None:
    """Keys and values stored in float16 (half the bytes), attention computed in float32: static and
    growing caches, prefill chunks and single tokens, past the sliding window."""
    model = random_model(arch)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 45), generator=torch.Generator().manual_seed(5))
    full = reference_logits(model, ids)
    for static in (True, False):
        cache = KVCache.for_model(model.cfg, 45, static=static, kv_quant="f16")
        assert all(layer.k.dtype == torch.float16 for layer in cache.layers)
        with torch.inference_mode():
            out = [model(ids[:, :20], cache=cache, start=0)[0]]  # a prefill chunk, then one by one
            step = DecodeStep(model)
            out += [step(ids[:, i : i + 1], cache, i) for i in range(20, 45)]
        got = torch.cat(out)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, full, rtol=0, atol=5e-3)  # float16 rounding of k and v only
        assert not torch.equal(got, full)  # the keys really were rounded


def test_static_ring_is_padded_and_full_cache_preallocated() -> None:
    model = random_model("tiny-gemma3")
    cfg = model.cfg
    cache = KVCache.for_model(cfg, 40, static=True)
    window = cfg.layer_window(0)
    assert window is not None and cache.layers[0].k.shape[2] == window and cache.layers[0].padded
    glob = [c for i, c in enumerate(cache.layers) if cfg.layer_window(i) is None]
    # allocated at once (no growing branch), with one spare slot (a full buffer would be traced again)
    assert glob and all(c.k.shape[2] == 41 for c in glob)
    short = KVCache.for_model(cfg, window // 2, static=True)  # shorter than the window: a ring all the same
    assert type(short.layers[0]) is type(cache.layers[0]) and short.layers[0].k.shape[2] == window // 2


@pytest.mark.skipif(not compile_available(), reason="torch.compile needs a C++ compiler (g++ or clang++)")
def test_compiled_step_matches_eager_and_compiles_once() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = random_model("tiny-gemma3")
    step = DecodeStep(model, compiled=True)
    assert step.static_cache
    gen = torch.Generator().manual_seed(3)
    before = counters["stats"]["unique_graphs"]
    for n in (40, 23):  # two requests of different lengths, both past the window of 16
        ids = torch.randint(0, model.cfg.vocab_size, (1, n), generator=gen)
        got = decode_all(step, model, ids, n, static=True)
        assert step.fallback_reason is None, step.fallback_reason
        torch.testing.assert_close(got, reference_logits(model, ids), rtol=1e-4, atol=1e-4)
    # one graph for every position, cache length and request (symbolic shapes, tensor slot indices)
    assert counters["stats"]["unique_graphs"] - before == 1
    # guards on the modules are skipped, so another model must never run this graph: it gets its own
    # (here one that differs only in a module's structure: a bias the first graph knows nothing of)
    other = random_model("tiny-gemma3")
    down = other.layers[0].mlp.down_proj
    biased = torch.nn.Linear(down.in_features, down.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(down.weight)
        biased.bias.fill_(0.5)
    other.layers[0].mlp.down_proj = biased
    ids = torch.randint(0, other.cfg.vocab_size, (1, 20), generator=gen)
    got = decode_all(DecodeStep(other, compiled=True), other, ids, 20, static=True)
    torch.testing.assert_close(got, reference_logits(other, ids), rtol=1e-4, atol=1e-4)
    ids = ids % model.cfg.vocab_size
    again = decode_all(step, model, ids, 20, static=True)  # and the first model still runs its own
    torch.testing.assert_close(again, reference_logits(model, ids), rtol=1e-4, atol=1e-4)
    # A float16 cache is another graph (other dtypes). The compiled and the eager step compute each key
    # and value in float32 in a different order, so now and then one rounds to the neighbouring float16
    # (a relative step of 2^-11, a thousand times float32's), and that flip travels through the later
    # positions: a fresh clone once saw 3.7e-4 against a 1e-4 bound. So the bound is what float16
    # storage itself implies: the two steps differ by a small part of what storing in float16 changes
    # (the eager float16 cache against the eager float32 one; seeds 0-2 gave at most 18% of its largest
    # and 11% of its mean difference).
    f16 = decode_all(step, model, ids, 20, static=True, kv="f16")
    eager_f16 = decode_all(DecodeStep(model), model, ids, 20, True, "f16")
    storage = (eager_f16 - decode_all(DecodeStep(model), model, ids, 20, True)).abs()
    diff = (f16 - eager_f16).abs()
    assert diff.max() <= 0.5 * storage.max(), (diff.max(), storage.max())
    assert diff.mean() <= 0.3 * storage.mean(), (diff.mean(), storage.mean())
    assert step.fallback_reason is None, step.fallback_reason


@pytest.mark.skipif(not compile_available(), reason="torch.compile needs a C++ compiler (g++ or clang++)")
def test_compiled_step_is_not_traced_again_past_the_rotary_table() -> None:
    """The rotary tables start at 1,024 positions and grow; grown inside the graph, each growth traced the
    whole step again (~40 s on SmolLM2) the first time a request passed position 1,024."""
    from torch._dynamo.utils import counters

    from tinytitan.models.layers import Rotary

    torch._dynamo.reset()
    model = random_model("tiny-llama")
    step = DecodeStep(model, compiled=True)
    n = 1030
    ids = torch.randint(0, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(4))
    cache = KVCache.for_model(model.cfg, n, static=True)
    before = counters["stats"]["unique_graphs"]
    got = []
    with torch.inference_mode():
        model(ids[:, :1015], cache=cache, start=0)  # tables of 1,024 positions
        assert {r._cos.shape[0] for r in model.modules() if isinstance(r, Rotary)} == {1024}
        for i in range(1015, n):
            got.append(step(ids[:, i : i + 1], cache, i)[0])
    assert step.fallback_reason is None, step.fallback_reason
    assert counters["stats"]["unique_graphs"] - before == 1
    torch.testing.assert_close(torch.stack(got), reference_logits(model, ids)[1015:], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not compile_available(), reason="torch.compile needs a C++ compiler (g++ or clang++)")
def test_compiled_step_follows_grown_tables_and_weights_changed_in_place() -> None:
    """The module's tensors are constants of the compiled graph: a rotary table grown by a longer request
    (here by its prompt) makes a new graph (the old one would read past its table), and weights changed
    in place are seen without one."""
    from torch._dynamo.utils import counters

    from tinytitan.decode_step import RESERVE

    torch._dynamo.reset()
    model = random_model("tiny-llama")
    step = DecodeStep(model, compiled=True)
    n = RESERVE + 8
    ids = torch.randint(0, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(5))
    before = counters["stats"]["unique_graphs"]

    def request(length: int, prompt: int) -> torch.Tensor:
        cache = KVCache.for_model(model.cfg, length, static=True)
        with torch.inference_mode():
            model(ids[:, :prompt], cache=cache, start=0)
            return torch.stack([step(ids[:, i : i + 1], cache, i)[0] for i in range(prompt, length)])

    short = request(24, 16)
    assert counters["stats"]["unique_graphs"] - before == 1
    torch.testing.assert_close(short, reference_logits(model, ids[:, :24])[16:], rtol=1e-4, atol=1e-4)
    long = request(n, n - 4)  # the prompt grows the tables past RESERVE positions
    assert step.fallback_reason is None, step.fallback_reason
    assert counters["stats"]["unique_graphs"] - before == 2
    torch.testing.assert_close(long, reference_logits(model, ids)[n - 4 :], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        model.norm.weight.mul_(0.5)
        model.layers[0].mlp.down_proj.weight.mul_(-1.0)
    changed = request(24, 16)
    assert counters["stats"]["unique_graphs"] - before == 2
    torch.testing.assert_close(changed, reference_logits(model, ids[:, :24])[16:], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(changed, short, atol=1e-2)


@pytest.mark.skipif(not compile_available(), reason="torch.compile needs a C++ compiler (g++ or clang++)")
def test_compiled_step_as_the_first_forward_pass_is_traced_once() -> None:
    """No prompt pass before the first step (a one-token prompt): the rotary tables do not exist yet, so
    that step runs eagerly and makes them; made inside the graph, they made the next step trace it again."""
    from torch._dynamo.utils import counters

    from tinytitan.models.layers import Rotary

    torch._dynamo.reset()
    model = random_model("tiny-gemma3")
    for r in model.modules():
        if isinstance(r, Rotary):
            r._cos = r._sin = None
    step = DecodeStep(model, compiled=True)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(6))
    cache = KVCache.for_model(model.cfg, 12, static=True)
    before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        got = torch.stack([step(ids[:, i : i + 1], cache, i)[0] for i in range(12)])
    assert step.fallback_reason is None, step.fallback_reason
    assert counters["stats"]["unique_graphs"] - before == 1
    torch.testing.assert_close(got, reference_logits(model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not compile_available(), reason="torch.compile needs a C++ compiler (g++ or clang++)")
def test_load_with_compile_generates_what_eager_generates(tmp_path) -> None:
    """The user-facing path: tt.load(..., compile=True) on a real (tiny, random) Gemma 3 checkpoint (the
    stored compiled step, built at load), greedy and seeded sampling past the sliding window, two requests
    of different lengths."""
    from tests.conftest import FIXTURES
    from tests.test_hf_checkpoint import write_checkpoint
    from tinytitan.loader import load

    if not (FIXTURES / "hf_tiny_llama" / "tokenizer.json").exists():
        pytest.skip("tokenizer fixture missing")
    write_checkpoint(tmp_path, "gemma3")
    eager, compiled = load(tmp_path, device="cpu", compile=False), load(tmp_path, device="cpu", compile=True)
    assert compiled.decode_step.stored is not None and eager.decode_step.stored is None
    sampled = {"temperature": 0.8, "seed": 3}
    for prompt, kw in (("red green blue", {}), ("cat dog sun moon tree fish", sampled)):
        a = eager.complete(prompt, max_tokens=40, **kw).token_ids
        b = compiled.complete(prompt, max_tokens=40, **kw).token_ids
        assert a == b and len(a) > 20
        assert compiled.decode_step.ran == "stored" and eager.decode_step.ran == "eager"
    assert compiled.decode_step.fallback_reason is None
    assert compiled.last_cache is not None and compiled.last_cache.layers[0].padded  # fixed-shape caches
    # a float16 KV cache has a stored step of its own (int8 / int4 caches decode eagerly)
    for m in (eager, compiled):
        m.set_kv_cache("f16")
    a = eager.complete("red green blue", max_tokens=30).token_ids
    assert compiled.complete("red green blue", max_tokens=30).token_ids == a
    assert compiled.decode_step.ran == "stored"
    assert compiled.last_cache.layers[-1].k.dtype == torch.float16
    compiled.set_kv_cache("int8")
    compiled.complete("red green blue", max_tokens=3)
    assert compiled.decode_step.ran == "eager"
