"""Scoring arithmetic against hand-computed cases: acc / acc_norm, stderr, perplexity, KLD statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tinytitan.eval import kld
from tinytitan.eval.api import rolling_windows
from tinytitan.eval.multiple_choice import aggregate, item_scores, mean_stderr
from tinytitan.eval.perplexity import NLLStats, from_stats, mean_and_uncertainty, windows
from tinytitan.eval.registry import get_task


def rec(ll, gold, lens):
    return {"ll": ll, "greedy": [False] * len(ll), "gold": gold, "len": lens}


def test_acc_and_acc_norm_hand_computed() -> None:
    # ll = [-5, -6, -9], lengths [10, 20, 30]: acc picks 0; per character [-0.5, -0.3, -0.3] -> acc_norm
    # picks 1 (the first of the tie, as numpy.argmax does in lm-eval)
    assert item_scores(rec([-5.0, -6.0, -9.0], 1, [10, 20, 30])) == {"acc": 0.0, "acc_norm": 1.0}
    assert item_scores(rec([-5.0, -6.0, -9.0], 0, [10, 20, 30])) == {"acc": 1.0, "acc_norm": 0.0}
    # an exact tie in ll: the first choice wins
    assert item_scores(rec([-2.0, -2.0], 1, [3, 3])) == {"acc": 0.0, "acc_norm": 0.0}
    # longer right answer: unnormalized loses, normalized wins
    assert item_scores(rec([-12.0, -4.0], 0, [40, 5])) == {"acc": 0.0, "acc_norm": 1.0}


def test_aggregate_mean_and_sample_stderr() -> None:
    spec = get_task("arc_easy")
    records = [
        rec([-1.0, -2.0], 0, [5, 5]),  # acc 1, norm 1
        rec([-1.0, -2.0], 1, [5, 50]),  # acc 0, norm: [-0.2, -0.04] -> 1
        rec([-3.0, -2.0], 1, [5, 5]),  # acc 1, norm 1
        rec([-3.0, -2.0], 1, [1, 100]),  # acc 1, norm: [-3, -0.02] -> 1
    ]
    out = {m: (v, se, n) for m, v, se, n in aggregate(spec, records)}
    # acc = [1, 0, 1, 1]: mean 0.75; sample sd = sqrt((3 * 0.25^2 + 0.75^2) / 3) = 0.5; stderr = 0.5 / 2
    assert out["acc"] == pytest.approx((0.75, 0.25, 4))
    assert out["acc_norm"] == pytest.approx((1.0, 0.0, 4))
    assert mean_stderr([1.0]) == 0.0


def test_loglikelihood_task_metrics() -> None:
    spec = get_task("lambada_openai")
    recs = [
        {"ll": [-1.0], "greedy": [True], "gold": -1, "len": []},
        {"ll": [-3.0], "greedy": [False], "gold": -1, "len": []},
    ]
    out = {m: (v, se, n) for m, v, se, n in aggregate(spec, recs)}
    assert out["acc"][0] == 0.5
    assert out["perplexity"][0] == pytest.approx(math.exp(2.0))  # exp(-mean ll)


def test_ppl_uncertainty_is_llama_cpp_formula() -> None:
    x = torch.tensor([1.0, 2.0, 4.0, 3.0], dtype=torch.float64)
    s = NLLStats.of(x)
    mean, unc = mean_and_uncertainty(s)
    # llama.cpp: sqrt((E[x^2] - E[x]^2) / (n - 1))
    assert mean == pytest.approx(2.5)
    assert unc == pytest.approx(math.sqrt((7.5 - 6.25) / 3))
    r = from_stats(NLLStats.merge([NLLStats.of(x[:2]), NLLStats.of(x[2:])]), 2, 4)
    assert r.ppl == pytest.approx(math.exp(2.5)) and r.ppl_stderr == pytest.approx(math.exp(2.5) * unc)


def test_perplexity_windows() -> None:
    toks = list(range(100, 100 + 1300))
    ws = windows(toks, n_ctx=512, bos_id=7)
    assert len(ws) == 2 and ws[1].targets[0] == 612 and ws[1].ids[0] == 7 and ws[1].targets[1] == 613
    assert ws[0].first == 256  # scored: offsets 257..511 (255 tokens per window)
    st = windows(toks, n_ctx=512, stride=256)
    # llama.cpp --ppl-stride: floor((N - n_ctx + stride - 1) / stride) windows, last `stride` scored
    assert len(st) == (1300 - 512 + 255) // 256 and [w.targets[0] for w in st[:2]] == [100, 356]
    assert st[0].first == 512 - 256 - 1
    with pytest.raises(Exception, match="at least 512 tokens"):
        windows(toks[:100], 512)


def test_rolling_windows_predict_every_token_once() -> None:
    toks = list(range(1, 24))
    ws = rolling_windows(toks, prefix_token=0, max_length=8)
    assert [t for _, cont in ws for t in cont] == toks
    assert ws[0][0] == [0]
    for ctx, cont in ws:
        assert len(ctx) + len(cont) - 1 <= 8  # the model input fits the window
    assert ws[1] == ([8], list(range(9, 17)))


def _window(kl_tokens: list[float], dp: list[float], same: int, nll, nll_base) -> kld.KLDWindow:
    return kld.KLDWindow(
        NLLStats.of(torch.tensor(nll, dtype=torch.float64)),
        NLLStats.of(torch.tensor(nll_base, dtype=torch.float64)),
        float(np.dot(nll, nll_base)),
        kl_tokens,
        dp,
        same,
    )


def test_kld_statistics_hand_computed() -> None:
    vals = [float(i) for i in range(11)]  # 0..10 over two windows
    w1 = _window(vals[:5], [0.1] * 5, 5, [1.0] * 5, [1.0] * 5)
    w2 = _window(vals[5:], [-0.1] * 6, 3, [2.0] * 6, [1.0] * 6)
    s = kld.summarize([w1, w2])
    assert s["kld_mean"][0] == pytest.approx(5.0)
    assert s["kld_mean"][1] == pytest.approx(math.sqrt((385 / 11 - 25) / 10))  # n = 11 > 10
    assert s["kld_median"][0] == 5.0 and s["kld_max"][0] == 10.0
    assert s["kld_p90"][0] == pytest.approx(9.0) and s["kld_p99"][0] == pytest.approx(9.9)
    assert s["same_top_p"][0] == pytest.approx(100 * 8 / 11)
    assert s["delta_p_mean"][0] == pytest.approx(100 * (0.5 - 0.6) / 11)
    assert s["delta_p_rms"][0] == pytest.approx(10.0)
    assert s["ppl"][0] == pytest.approx(math.exp((5 + 12) / 11)) and s["ppl_ref"][0] == pytest.approx(math.e)


def test_kld_caches_full_topk_and_hidden_modes(tmp_path) -> None:
    """hidden: the reference head's inputs rebuild its distribution exactly; topk with k = 0 keeps the full
    vocabulary (exact); topk with k > 0 equals the KL of the distributions coarsened to top-k + rest, never
    more than the full KL."""
    from types import SimpleNamespace

    from tinytitan.eval.perplexity import Window

    torch.manual_seed(0)
    V, D, n = 50, 8, 6
    head = torch.nn.Linear(D, V, bias=False)
    h_ref, h_q = torch.randn(n, D) * 2, torch.randn(n, D) * 2

    class Fake:  # stands for a RuntimeLM: scored_log_probs -> lm._score(...)[0][:-1]
        def __init__(self, h):
            self.h = torch.cat([h, h[-1:]])  # one position more: the window's last (unscored)
            self.model = SimpleNamespace(module=SimpleNamespace(lm_head=head), device=torch.device("cpu"))

        def _score(self, rows, n_last):
            self.last_hidden = [self.h]
            with torch.no_grad():
                return [torch.log_softmax(head(self.h), -1)]

    with torch.no_grad():
        p = torch.log_softmax(head(h_ref).double(), -1)
        q = torch.log_softmax(head(h_q).double(), -1)
    full = (p.exp() * (p - q)).sum(-1)
    targets = [3] * (n + 2)
    w = Window(0, targets, targets, 1)  # scored positions 1..n (n tokens)
    ref, ev = Fake(h_ref), Fake(h_q)
    for mode, k in (("hidden", 0), ("topk", 0), ("topk", 5)):
        d = tmp_path / f"{mode}{k}"
        kld.cache_window(ref, w, d, mode, k)
        got = torch.tensor(kld.kld_window(ev, w, d, ref.model).kld, dtype=torch.float64)
        if k == 0:
            assert torch.allclose(got, full, atol=1e-5), mode
        else:
            idx = torch.topk(p, k, -1).indices
            pk, qk = p.gather(-1, idx).exp(), q.gather(-1, idx).exp()
            pt, qt = 1 - pk.sum(-1), 1 - qk.sum(-1)
            coarse = (pk * (pk.log() - qk.log())).sum(-1) + pt * (pt.log() - qt.log())
            assert torch.allclose(got, coarse, atol=1e-5)
            assert bool((got <= full + 1e-6).all())
    assert sorted(load_file_keys(tmp_path / "hidden0" / "w000000.safetensors")) == [
        "hidden",
        "target_logp",
        "top",
    ]


def load_file_keys(path):
    from safetensors.torch import load_file

    return load_file(str(path)).keys()
