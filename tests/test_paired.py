"""Paired comparisons on constructed items whose answer is known."""

from __future__ import annotations

import math

import pytest

from tinytitan.report.paired import from_stderr, mcnemar_exact, paired_binary, paired_continuous


def test_identical_predictions_are_not_distinguishable() -> None:
    ref = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1] * 10
    p = paired_binary(ref, list(ref))
    assert p.delta == 0.0 and (p.lo, p.hi) == (0.0, 0.0) and p.p_value == 1.0
    assert not p.distinguishable


def test_a_variant_wrong_on_30_percent_more_items_is_distinguishable() -> None:
    n = 100
    ref = [1] * 70 + [0] * 30
    var = [0] * 30 + [1] * 40 + [0] * 30  # the first 30 items the reference got right, the variant did not
    p = paired_binary(ref, var)
    assert p.delta == pytest.approx(-0.30)
    assert p.hi < 0 and p.distinguishable
    assert p.p_value == pytest.approx(2 * 0.5**30)  # McNemar: 30 discordant pairs, all one way
    assert p.n == n


def test_discordant_items_that_cancel_are_noise() -> None:
    # same accuracy, different items: 10 flips each way out of 60
    ref = [1] * 10 + [0] * 10 + [1] * 20 + [0] * 20
    var = [0] * 10 + [1] * 10 + [1] * 20 + [0] * 20
    p = paired_binary(ref, var)
    assert p.delta == 0.0 and p.lo < 0 < p.hi and not p.distinguishable
    assert p.p_value == pytest.approx(1.0)


def test_a_small_real_difference_on_few_items_is_noise() -> None:
    ref = [1] * 20 + [0] * 20
    var = [0] * 2 + [1] * 18 + [0] * 20  # 2 of 40 items worse: not enough evidence
    p = paired_binary(ref, var)
    assert p.delta == pytest.approx(-0.05) and not p.distinguishable


def test_mcnemar_exact_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    # b=1, c=9: 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11 / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)


def test_continuous_and_already_paired_intervals() -> None:
    ref = [2.0 + 0.01 * (i % 7) for i in range(50)]
    p = paired_continuous(ref, [x + 0.1 for x in ref], "nll")
    assert p.delta == pytest.approx(0.1) and p.lo == pytest.approx(0.1) and p.distinguishable
    noise = paired_continuous(ref, [x + (0.05 if i % 2 else -0.05) for i, x in enumerate(ref)], "nll")
    assert not noise.distinguishable
    k = from_stderr("kld_mean", 0.02, 0.004, 1530, "KLD")
    assert k.lo == pytest.approx(0.02 - 1.959964 * 0.004) and k.distinguishable
    assert not from_stderr("kld_mean", 0.002, 0.004, 1530, "KLD").distinguishable
    assert math.isclose(from_stderr("x", 0.0, None, 1, "x").hi, 0.0)


def test_the_bootstrap_is_seeded() -> None:
    ref = [1, 0] * 30
    var = [1, 1, 0, 0] * 15
    assert paired_binary(ref, var) == paired_binary(ref, var)
