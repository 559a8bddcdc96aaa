"""Tests for dail.evaluation.metrics: pass@k against enumeration, intervals, budget accuracy."""

from fractions import Fraction
from itertools import combinations
from math import comb

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dail.evaluation.metrics import (
    accuracy_under_budget,
    bootstrap_ci,
    bootstrap_ratio_difference_ci,
    default_ks,
    pass_at_k,
    pass_at_k_table,
)


def enumerate_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_pass_at_k_equals_enumeration(data):
    n = data.draw(st.integers(1, 10))
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    assert pass_at_k(n, c, k) == pytest.approx(enumerate_pass_at_k(n, c, k), abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_pass_at_k_monotone_in_k_and_c(data):
    n = data.draw(st.integers(1, 64))
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    p = pass_at_k(n, c, k)
    if k < n:
        assert pass_at_k(n, c, k + 1) >= p - 1e-12
    if c < n:
        assert pass_at_k(n, c + 1, k) >= p - 1e-12
    assert 0.0 <= p <= 1.0


def test_edges():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 8) == 1.0  # only 7 wrong samples: any 8 include a correct one


def test_stable_against_exact_fraction():
    n, c, k = 128, 1, 64
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert exact == Fraction(1, 2)
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    n, c, k = 1000, 3, 17
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize("n,c,k", [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_invalid_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert default_ks(100) == [1, 2, 4, 8, 16, 32, 64]
    with pytest.raises(ValueError):
        default_ks(0)


def test_table_mean_over_problems_and_mixed_n():
    # Problem A: 4 samples, 2 correct; problem B: 8 samples, 0 correct.
    table = pass_at_k_table([(4, 2), (8, 0)])
    assert list(table) == ["pass@1", "pass@2", "pass@4"]  # k only up to min n = 4
    assert table["pass@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert table["pass@2"] == pytest.approx((1 - 1 / 6 + 0.0) / 2)
    assert table["pass@4"] == pytest.approx(0.5)
    assert pass_at_k_table([(4, 2)], ks=[3]) == {"pass@3": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="smallest"):
        pass_at_k_table([(4, 2), (8, 0)], ks=[8])
    with pytest.raises(ValueError):
        pass_at_k_table([])


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    counts = [(16, c) for c in (0, 0, 1, 3, 8, 12, 16, 2, 5, 0)]
    for k in (1, 4, 16):
        est = pass_at_k_table(counts, [k])[f"pass@{k}"]
        lo, hi = bootstrap_ci(counts, k)
        assert lo <= est <= hi
        assert lo < hi
        assert bootstrap_ci(counts, k) == (lo, hi)
    narrow = bootstrap_ci(counts, 1, level=0.5)
    wide = bootstrap_ci(counts, 1, level=0.99)
    assert wide[0] <= narrow[0] <= narrow[1] <= wide[1]
    assert bootstrap_ci([(4, 4)] * 5, 2) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci(counts, 1, level=1.0)
    with pytest.raises(ValueError):
        bootstrap_ci(counts, 32)


def test_accuracy_under_budget():
    samples = [
        {"id": "a", "correct": True, "num_tokens": 100},
        {"id": "a", "correct": True, "num_tokens": 600},
        {"id": "a", "correct": False, "num_tokens": 50},
        {"id": "a", "correct": False, "num_tokens": 5000},
        {"id": "b", "correct": True, "num_tokens": 512},
        {"id": "b", "correct": False, "num_tokens": 512},
        {"id": "c", "correct": None, "num_tokens": 10},  # unverifiable: skipped
    ]
    acc = accuracy_under_budget(samples, [1024, 100, 512])
    assert list(acc) == ["100", "512", "1024"]
    assert acc["100"] == pytest.approx((1 / 4 + 0) / 2)  # exactly at the budget counts
    assert acc["512"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert acc["1024"] == pytest.approx((2 / 4 + 1 / 2) / 2)
    assert accuracy_under_budget(samples[-1:], [10]) == {}
    with pytest.raises(ValueError, match="num_tokens"):
        accuracy_under_budget([{"id": "a", "correct": True}], [10])
    with pytest.raises(ValueError):
        accuracy_under_budget(samples, [0])


def test_metrics_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, dail.evaluation.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ratio_difference_interval_pools_units_and_separates_only_real_differences():
    half = [(1, 2), (3, 4), (0, 4), (4, 6)] * 10  # pooled rate 8/16 = 0.5
    low, high = bootstrap_ratio_difference_ci(half, half, resamples=2000)
    assert low < 0 < high and high - low < 0.3
    # Pooled, not a mean of per-unit rates: (9 + 1) / (10 + 90) = 0.1, where the rates' mean is 0.455.
    skewed = [(9, 10), (1, 90)] * 20
    low, high = bootstrap_ratio_difference_ci(skewed, [(1, 10)] * 40, resamples=2000)
    assert low <= 0 <= high
    low, high = bootstrap_ratio_difference_ci(half, [(1, 10)] * 40, resamples=2000)
    assert 0.2 < low < 0.4 < high < 0.6  # around 0.5 - 0.1
    assert bootstrap_ratio_difference_ci(half, half, seed=3) == bootstrap_ratio_difference_ci(half, half, seed=3)
    for bad in ({"resamples": 0}, {"level": 1.0}):
        with pytest.raises(ValueError):
            bootstrap_ratio_difference_ci(half, half, **bad)
    with pytest.raises(ValueError, match="no units"):
        bootstrap_ratio_difference_ci([], half)
