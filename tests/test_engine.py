"""Sampling, stop strings and streaming on a real model."""

from __future__ import annotations

import torch

from tests.conftest import loaded_model
from tinytitan.engine import Sampler, SamplingParams, StopMatcher


def test_greedy_is_argmax_and_top_k_1_is_greedy() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert Sampler(SamplingParams())(logits) == int(logits.argmax())
    assert Sampler(SamplingParams(temperature=1.0, top_k=1, seed=3))(logits) == int(logits.argmax())
    assert Sampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=3))(logits) == int(logits.argmax())


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed() -> None:
    logits = torch.zeros(50)
    draws = lambda seed: [Sampler(SamplingParams(temperature=1.0, seed=seed))(logits) for _ in range(1)]  # noqa: E731
    s = Sampler(SamplingParams(temperature=1.0, seed=7))
    a = [s(logits) for _ in range(20)]
    s = Sampler(SamplingParams(temperature=1.0, seed=7))
    assert a == [s(logits) for _ in range(20)]
    s = Sampler(SamplingParams(temperature=1.0, seed=8))
    assert a != [s(logits) for _ in range(20)]
    assert draws(1) == draws(1)


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=0))
    seen = {s(logits) for _ in range(300)}
    assert seen == {0, 1}


def test_stop_matcher_holds_back_prefixes() -> None:
    m = StopMatcher(["\n\n", "END"])
    out = m.push("hello E") + m.push("N") + m.push("D more")
    assert out == "hello " and m.stopped
    m = StopMatcher(["END"])
    assert m.push("EN") == ""
    assert m.push("x") == "ENx"


def test_stream_equals_generate_and_stops() -> None:
    model = loaded_model("smollm2-135m-instruct")
    prompt = "The capital of France is"
    text = model.generate(prompt, max_tokens=24)
    assert "".join(model.stream(prompt, max_tokens=24)) == text
    assert "Paris" in text
    first_word = text.split()[0]
    cut = model.generate(prompt, max_tokens=24, stop=[first_word])
    assert first_word not in cut and text.startswith(cut)


def test_seeded_generation_is_reproducible() -> None:
    model = loaded_model("smollm2-135m-instruct")
    kw = dict(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    assert model.generate("Once upon a time", **kw) == model.generate("Once upon a time", **kw)


def test_chat_uses_the_template_and_answers() -> None:
    model = loaded_model("smollm2-135m-instruct")
    ids = model.chat_prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    im_start = model.tokenizer.encode("<|im_start|>", add_bos=False, special=True)
    assert len(im_start) == 1 and ids.count(im_start[0]) == 3  # system, user, assistant turn
    reply = model.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=24)
    assert "Paris" in reply


def test_generation_stops_at_the_context_end() -> None:
    model = loaded_model("smollm2-135m-instruct")
    saved = model.ctx
    model.ctx = 12
    try:
        ids = model.tokenizer.encode("one two three four five")
        out = model.complete(ids, max_tokens=50)
        assert len(ids) + len(out.token_ids) <= 13
        assert out.finish_reason == "length"
    finally:
        model.ctx = saved
