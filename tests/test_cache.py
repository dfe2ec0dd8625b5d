"""KV caches: cached decoding equals one full pass; sliding layers keep only their window."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import loaded_model
from tinytitan.config import preset
from tinytitan.models import KVCache, build_model
from tinytitan.models.cache import FullLayerCache, RingLayerCache


def random_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(preset(name)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def reference_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids)[0]


@pytest.mark.parametrize("arch", ["tiny-gemma3", "tiny-llama"])
def test_token_by_token_decoding_equals_full_pass(arch: str) -> None:
    model = random_model(arch)
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (1, 45), generator=torch.Generator().manual_seed(0))
    full = reference_logits(model, ids)
    cache = KVCache.for_model(cfg, 64)
    steps = []
    with torch.inference_mode():
        for i in range(ids.shape[1]):
            steps.append(model(ids[:, i : i + 1], cache=cache, start=i)[0, 0])
    torch.testing.assert_close(torch.stack(steps), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 7, 16, 17, 45])
def test_chunked_prefill_equals_full_pass(chunk: int) -> None:
    model = random_model("tiny-gemma3")
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (1, 45), generator=torch.Generator().manual_seed(1))
    full = reference_logits(model, ids)
    cache = KVCache.for_model(cfg, 64)
    parts = []
    with torch.inference_mode():
        for s in range(0, 45, chunk):
            parts.append(model(ids[:, s : s + chunk], cache=cache, start=s)[0])
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-4, atol=1e-4)


def test_sliding_window_really_limits_attention() -> None:
    """Changing a token outside every local window changes nothing in a model with no global layer."""
    cfg = preset("tiny-gemma3")
    cfg = type(cfg)(**{**cfg.to_dict(), "n_layers": 2})  # layers 0, 1: both sliding (window 16)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % cfg.vocab_size
    a, b = reference_logits(model, ids), reference_logits(model, changed)
    # position p sees positions > p - 16 in layer 1, which saw > p - 31 in layer 0: p >= 31 is unaffected
    torch.testing.assert_close(a[31:], b[31:])
    assert not torch.allclose(a[:16], b[:16])


def test_cache_kinds_follow_the_layer_pattern() -> None:
    cfg = loaded_model("gemma-3-270m").config
    cache = KVCache.for_model(cfg, 32768)
    kinds = [type(c) for c in cache.layers]
    assert kinds.count(FullLayerCache) == 3 and kinds.count(RingLayerCache) == 15
    assert [i for i, k in enumerate(kinds) if k is FullLayerCache] == [5, 11, 17]


def test_kv_memory_matches_the_arithmetic() -> None:
    """3 global layers x positions + 15 local layers x min(positions, 512), K and V, float32."""
    model = loaded_model("gemma-3-270m")
    per_pos = 2 * 1 * 256 * 4  # K and V, 1 KV head, head_dim 256, 4 bytes
    assert model.kv_bytes(32768) == 3 * 32768 * per_pos + 15 * 512 * per_pos  # 192 MiB + 15 MiB
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 70)[:700]
    list(model.generate_ids(ids, 1))
    report = model.last_cache.describe()
    n = report["positions"]
    assert n == len(ids)
    assert report["bytes"] == 3 * n * per_pos + 15 * 512 * per_pos
    assert report["bytes"] == model.kv_bytes(n)


@pytest.mark.parametrize("kind", ["full", "ring"])
def test_float16_cache_saturates_instead_of_overflowing(kind: str) -> None:
    """Values beyond float16's range are stored as +-65504, not inf (an infinite key makes softmax NaN)."""
    if kind == "full":
        cache = FullLayerCache(1, 1, 16, 8, torch.float16, "cpu", static=True)
    else:
        cache = RingLayerCache(1, 1, 16, 4, torch.float16, "cpu")
    k = torch.full((1, 1, 2, 16), 1e6)
    k[..., 0], k[..., 1] = -1e6, 3.0
    keys, values, _ = cache.update(k, -k, 0)
    assert keys.dtype == torch.float16 and torch.isfinite(keys).all() and torch.isfinite(values).all()
    assert keys[0, 0, 0, 0] == -65504 and keys[0, 0, 0, 2] == 65504 and keys[0, 0, 0, 1] == 3.0
