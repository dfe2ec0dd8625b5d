"""Continuous batching (tinytitan.engine.Stepper): every sequence of a batch decodes in one forward, each
row at its own position, and gets what it would get alone."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REAL_MODELS, loaded_model, same_or_near_tie
from tinytitan.engine import Generation, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):\n",
    "A list of prime numbers: 2, 3, 5,",
    "The three primary colours are",
]


def _run(stepper, gens: list[Generation], join_after: int = 0) -> int:
    """Step until every sequence has ended; the k-th joins once the (k-1)-th has `join_after` tokens.
    Returns the most sequences one step decoded."""
    waiting, widest = list(gens), 0
    stepper.add(waiting.pop(0))
    while stepper.busy or waiting:
        if waiting and (not stepper.active or len(stepper.active[-1].tokens) >= join_after):
            stepper.add(waiting.pop(0))
        widest = max(widest, sum(1 for g in stepper.active if g.pending is not None))
        stepper.step()
    return widest


@pytest.mark.parametrize("name", REAL_MODELS)
def test_batched_greedy_equals_lone_on_real_models(name: str) -> None:
    model = loaded_model(name, shipped=True)
    ids = [model.tokenizer.encode(p) for p in PROMPTS]
    lone = [list(model.generate_ids(x, 16)) for x in ids]
    gens = [Generation(x, 16, SamplingParams(), model.tokenizer.eos_ids) for x in ids]
    stepper = model.stepper(8)
    widest = _run(stepper, gens, join_after=2)  # rows join while others are mid-generation
    assert widest >= 3, "the rows did not decode together"
    for x, g, alone in zip(ids, gens, lone, strict=True):
        assert g.finished in ("stop", "length")
        same_or_near_tie(model, x, g.tokens, alone)
    assert stepper.cache is None and not stepper.active  # everything left; the memory went back


def test_a_wide_batch_decodes_in_several_forwards_with_the_same_outputs() -> None:
    """More decoding rows than one forward carries (decode_rows) are split into forwards over row ranges:
    each row still gets its lone output."""
    from tinytitan.engine import Stepper

    model = loaded_model("smollm2-135m-instruct", shipped=True)
    ids = [model.tokenizer.encode(p) for p in PROMPTS]
    lone = [list(model.generate_ids(x, 10, SamplingParams(), set())) for x in ids]
    gens = [Generation(x, 10) for x in ids]
    widest = _run(Stepper(model, max_rows=8, decode_rows=2), gens)
    assert widest >= 4
    for x, g, alone in zip(ids, gens, lone, strict=True):
        same_or_near_tie(model, x, g.tokens, alone)


def test_seeded_sampling_is_per_request_whatever_else_is_in_the_batch() -> None:
    model = loaded_model("gemma-3-270m", shipped=True)
    ids = [model.tokenizer.encode(p) for p in PROMPTS[:3]]
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=s) for s in (1, 2, 3)]
    lone = [list(model.generate_ids(x, 12, p, set())) for x, p in zip(ids, params, strict=True)]
    gens = [Generation(x, 12, p) for x, p in zip(ids, params, strict=True)]
    _run(model.stepper(8), gens)
    for x, g, alone in zip(ids, gens, lone, strict=True):
        same_or_near_tie(model, x, g.tokens, alone)
    assert len({tuple(g.tokens) for g in gens}) == 3


def test_rows_leave_mid_batch_and_the_rest_stay_correct() -> None:
    """A sequence dropped mid-generation (its client left) frees its row at once; the last row moves into
    the hole and every remaining sequence still gets its lone output."""
    model = loaded_model("smollm2-135m-instruct", shipped=True)
    ids = [model.tokenizer.encode(p) for p in PROMPTS]
    budgets = [20, 4, 20, 6, 20]  # two finish early (length), one is dropped
    lone = [
        list(model.generate_ids(x, n, SamplingParams(), set())) for x, n in zip(ids, budgets, strict=True)
    ]
    stepper = model.stepper(8)
    gens = [stepper.add(Generation(x, n)) for x, n in zip(ids, budgets, strict=True)]
    dropped = gens[2]
    steps = 0
    while stepper.busy:
        stepper.step()
        steps += 1
        if steps == 8:
            assert dropped in stepper.active
            stepper.drop(dropped)
            assert dropped.finished == "cancelled" and dropped.row is None
            rows = sorted(g.row for g in stepper.active if g.row is not None)
            assert rows == list(range(len(rows))), "rows are not dense after a departure"
    for i, (x, g, alone) in enumerate(zip(ids, gens, lone, strict=True)):
        if g is dropped:
            assert 0 < len(g.tokens) < budgets[i] and g.tokens == alone[: len(g.tokens)]
            continue
        assert g.finished == "length" and len(g.tokens) == budgets[i]
        same_or_near_tie(model, x, g.tokens, alone)


def test_a_long_prompt_does_not_stall_the_others() -> None:
    """A 1,500-token prompt is prefilled a chunk per step while the decoding rows go on: each step still
    gives every decoding sequence a token."""
    model = loaded_model("gemma-3-270m", shipped=True)
    short = [model.tokenizer.encode(p) for p in PROMPTS[:2]]
    long_ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 160)[:1500]
    stepper = model.stepper(8)
    gens = [stepper.add(Generation(x, 40)) for x in short]
    while not all(g.pending is not None for g in gens):
        stepper.step()
    late = stepper.add(Generation(long_ids, 4))
    while late.prefilled < len(long_ids):
        before = [len(g.tokens) for g in gens]
        events = stepper.step()
        assert late in [g for g, _ in events]
        assert [len(g.tokens) for g in gens] == [b + 1 for b in before], "a prefill chunk stalled decoding"
    while stepper.busy:
        stepper.step()
    assert len(late.tokens) == 4
    same_or_near_tie(
        model, long_ids, late.tokens, list(model.generate_ids(long_ids, 4, SamplingParams(), set()))
    )


def test_rows_at_different_positions_on_sliding_window_rings() -> None:
    """Gemma's local layers keep a 512-slot ring per row: one row past its window and one short row in the
    same step each see their own keys (the long row's outputs equal its lone run)."""
    model = loaded_model("gemma-3-270m", shipped=True)
    long_ids = model.tokenizer.encode("In the beginning there was nothing but the sea. " * 60)[:600]
    short = model.tokenizer.encode(PROMPTS[0])
    lone = [list(model.generate_ids(x, 10, SamplingParams(), set())) for x in (long_ids, short)]
    gens = [Generation(long_ids, 10), Generation(short, 10)]
    _run(model.stepper(4), gens)
    for x, g, alone in zip((long_ids, short), gens, lone, strict=True):
        same_or_near_tie(model, x, g.tokens, alone)


def test_int8_kv_cache_sequences_each_keep_their_own_cache() -> None:
    """An int8 KV cache holds positions per cache, not per row: each sequence has its own, and a batch of
    them gives each its lone output."""
    model = loaded_model("smollm2-135m-instruct", shipped=True)
    model.set_kv_cache("int8")
    try:
        ids = [model.tokenizer.encode(p) for p in PROMPTS[:3]]
        lone = [list(model.generate_ids(x, 10, SamplingParams(), set())) for x in ids]
        stepper = model.stepper(8)
        gens = [Generation(x, 10) for x in ids]
        _run(stepper, gens)
        for g, alone in zip(gens, lone, strict=True):
            assert g.tokens == alone  # each row runs alone here: exactly equal
        assert model.last_cache is not None and type(model.last_cache.layers[0]).__name__.startswith("Quant")
    finally:
        model.set_kv_cache(None)


def test_the_speed_task_measures_a_variant_through_its_own_cache() -> None:
    from tinytitan.eval.efficiency import measure

    model = loaded_model("smollm2-135m-instruct", shipped=True)
    plain = measure("smollm2-135m-instruct", None, contexts=[64], decode_tokens=4, model=model).contexts[0]
    model.set_kv_cache("int8")
    try:
        kv8 = measure("smollm2-135m-instruct", None, contexts=[64], decode_tokens=4, model=model).contexts[0]
    finally:
        model.set_kv_cache(None)
    assert plain.kv_cache == "float32" and kv8.kv_cache == "int8/token"
    assert 0 < kv8.kv_bytes < plain.kv_bytes / 2  # codes and scales against float32 keys and values
    assert plain.decode_step == kv8.decode_step == "eager"  # the tests run with compilation off


def test_a_row_view_writes_into_the_shared_cache() -> None:
    from tinytitan.models.cache import KVCache

    cfg = loaded_model("gemma-3-270m", shipped=True).config
    cache = KVCache.for_model(cfg, 40, 3, torch.float32, "cpu", static=True)
    row = cache.row(1)
    k = torch.randn(1, cfg.n_kv_heads, 5, cfg.head_dim)
    row.layers[0].update(k, k, 0)
    assert torch.equal(cache.layers[0].k[1:2, :, :5], k) and not cache.layers[0].k[0].any()
    cache.move_row(1, 0)
    assert torch.equal(cache.layers[0].k[0:1, :, :5], k)
    bigger = cache.resized(
        5, 80, lambda n, r: KVCache.for_model(cfg, n, r, torch.float32, "cpu", static=True)
    )
    assert bigger.layers[0].k.shape[0] == 5 and torch.equal(bigger.layers[0].k[0:1, :, :5], k)
