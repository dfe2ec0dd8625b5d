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
