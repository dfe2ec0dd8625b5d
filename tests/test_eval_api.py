"""The three requests on a real model (SmolLM2): batched scores equal one-at-a-time full-logit scores."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import loaded_model
from tinytitan.errors import ContextLengthError
from tinytitan.eval import api
from tinytitan.eval.api import GenerateRequest, RuntimeLM


@pytest.fixture(scope="module")
def smol():
    return loaded_model("smollm2-135m-instruct")


def reference_logprob(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Straight from Model.logits: the whole sequence, every position's logits, no batching."""
    ids = ctx + cont
    lp = torch.log_softmax(model.logits(ids[:-1]).double(), -1)
    rows = lp[len(ctx) - 1 :]
    total = sum(float(rows[j, t]) for j, t in enumerate(cont))
    greedy = all(int(rows[j].argmax()) == t for j, t in enumerate(cont))
    return total, greedy


def test_encode_pair_moves_trailing_space_and_splits_whole_encoding(smol) -> None:
    lm = RuntimeLM(smol)
    ctx, cont = lm.encode_pair("Question: 2+2?\nAnswer: ", "4")
    assert ctx == smol.tokenizer.encode("Question: 2+2?\nAnswer:")
    assert ctx + cont == smol.tokenizer.encode("Question: 2+2?\nAnswer: 4")
    ctx, cont = lm.encode_pair("", "Hello")
    assert ctx == [lm.prefix_token_id] and cont == smol.tokenizer.encode("Hello", add_bos=False)


def test_batched_loglikelihood_equals_unbatched_reference(smol) -> None:
    lm = RuntimeLM(smol, batch_size=4, max_batch_tokens=512)
    reqs = [
        ("Question: What is the capital of France?\nAnswer:", " Paris"),
        ("Question: What is the capital of France?\nAnswer:", " a large cheese"),
        ("The cat sat on the", " mat"),
        ("", "Once upon a time"),
        ("Counting: one, two, three,", " four, five, six"),
        ("A" * 300 + " and then", " it ended."),
    ]
    got = lm.loglikelihood(reqs)
    for (c, x), (lp, greedy) in zip(reqs, got, strict=True):
        ref_lp, ref_greedy = reference_logprob(smol, *lm.encode_pair(c, x))
        assert lp == pytest.approx(ref_lp, abs=2e-3), (c[:30], x)
        assert greedy == ref_greedy
    assert got[0][0] > got[1][0]  # sanity: the right answer is more likely
    assert got[4][1] is True  # "four, five, six" is what greedy decoding says


QUESTION = "Question: Which of these is a planet that orbits the Sun?\nAnswer:"
CHOICES = [" Mars", " the Moon", " a comet called Halley", " Sirius"]


@pytest.mark.parametrize("kv", [None, ("int8", "token"), ("int8", "channel"), ("int4", "token")])
def test_choices_of_one_question_share_its_prefix(smol, monkeypatch, kv) -> None:
    """The question runs once and each choice continues its cache; the scores are the whole inputs'."""
    model = smol
    if kv is not None:
        from tinytitan.loader import load

        model = load("smollm2-135m-instruct", kv_quant=kv[0], kv_axis=kv[1], reference=True)
    shared = []
    real = RuntimeLM._shared_hidden
    monkeypatch.setattr(
        RuntimeLM, "_shared_hidden", lambda self, p, s: shared.append(len(s)) or real(self, p, s)
    )
    lm = RuntimeLM(model)
    got = lm.loglikelihood([(QUESTION, c) for c in CHOICES])
    assert shared == [4]  # one prefix, four continuations, one call
    alone = RuntimeLM(model)
    lone = [alone.loglikelihood([(QUESTION, c)])[0] for c in CHOICES]  # one input: all of it in one row
    assert shared == [4]
    if kv is None:
        for (lp, greedy), (lp1, greedy1) in zip(got, lone, strict=True):
            assert lp == pytest.approx(lp1, abs=2e-3) and greedy == greedy1
    else:
        # An int8/int4 cache rounds each key and value to a grid: float rounding of the different matmul
        # shapes (prefix alone vs whole input) moves a few values across a grid step (seen: one step in
        # layer 4 of 30), and the scores move by about as much as the cache's quantization itself moves
        # them from the float model's (SmolLM2 int8 per token: up to 0.14 nats either way on a 21-nat
        # choice). Bounded by that: within 5%, and the same choice wins.
        for (lp, _), (lp1, _) in zip(got, lone, strict=True):
            assert lp == pytest.approx(lp1, rel=0.05)
        assert max(range(4), key=lambda i: got[i][0]) == max(range(4), key=lambda i: lone[i][0])
    assert max(got)[0] == got[0][0]  # Mars


def test_long_inputs_take_the_chunked_cache_path(smol, monkeypatch) -> None:
    monkeypatch.setattr(api, "LONG_INPUT", 64)
    lm = RuntimeLM(smol)
    text = "The quick brown fox jumps over the lazy dog. " * 30
    ((lp, _),) = lm.loglikelihood([(text, " The end.")])
    ref, _ = reference_logprob(smol, *lm.encode_pair(text, " The end."))
    assert lp == pytest.approx(ref, abs=2e-3)


def test_rolling_scores_every_token_once(smol) -> None:
    text = "Tiny models can run on a laptop. They are measured with care. " * 6
    lm = RuntimeLM(smol, max_length=32)  # several windows
    (rolled,) = lm.loglikelihood_rolling([text])
    toks = smol.tokenizer.encode(text, add_bos=False)
    windows = api.rolling_windows(toks, lm.prefix_token_id, 32)
    assert len(windows) > 2
    expected = sum(reference_logprob(smol, c, x)[0] for c, x in windows)
    assert rolled == pytest.approx(expected, abs=5e-3)


def test_generate_until_is_greedy_and_stops(smol) -> None:
    lm = RuntimeLM(smol)
    prompt = "Counting: one, two, three, four,"
    (out,) = lm.generate_until([GenerateRequest(prompt, stop=[","], max_tokens=8)])
    full = smol.complete(prompt, max_tokens=8, temperature=0.0).text
    assert full.startswith(out) and "," not in out
    with pytest.raises(ContextLengthError):
        lm.generate_until([GenerateRequest(list(range(10, 10 + smol.ctx)), [], 4)])
