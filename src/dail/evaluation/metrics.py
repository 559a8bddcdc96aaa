"""Evaluation metrics: unbiased pass@k, bootstrap intervals, accuracy under a token budget.

Pure Python and numpy; no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate `1 - C(n-c, k) / C(n, k)` for one problem.

    Computed as `1 - prod_{i=n-c+1}^{n} (1 - k/i)`, which never forms a binomial coefficient, so
    n = 128 or 10,000 is as stable as n = 4.

    Args:
        n: Samples drawn for the problem.
        c: How many of them are correct.
        k: Budget of attempts.

    Returns:
        The probability that at least one of k samples drawn without replacement is correct.

    Raises:
        ValueError: unless 0 <= c <= n and 1 <= k <= n.
    """
    if n < 1:
        raise ValueError(f"pass@k needs at least one sample, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"correct count c={c} must be between 0 and n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of samples n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def default_ks(n: int) -> list[int]:
    """The powers of two up to `n`: 1, 2, 4, ..., as in the paper's protocol.

    `n` itself is not added when it is not a power of two, so runs with different sample
    counts report the same keys.

    Raises:
        ValueError: if n < 1.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks


def _check_counts(counts: Sequence[tuple[int, int]]) -> int:
    """Validate (n, c) pairs; return the smallest n."""
    if not counts:
        raise ValueError("no problems to score (counts is empty)")
    for n, c in counts:
        if n < 1 or not 0 <= c <= n:
            raise ValueError(f"bad (n, c) pair ({n}, {c}): need n >= 1 and 0 <= c <= n")
    return min(n for n, _ in counts)


def _check_ks(ks: Iterable[int], n_min: int) -> list[int]:
    ks = sorted(set(ks))
    bad = [k for k in ks if not 1 <= k <= n_min]
    if bad:
        raise ValueError(f"k values {bad} out of range: k must be between 1 and the smallest "
                         f"per-problem sample count ({n_min})")
    return ks


def pass_at_k_table(counts: Sequence[tuple[int, int]],
                    ks: Iterable[int] | None = None) -> dict[str, float]:
    """Mean pass@k over problems.

    Args:
        counts: One `(n, c)` pair per problem (samples, correct samples); n may differ.
        ks: Which k to report; default `default_ks(min n)`.

    Returns:
        `{"pass@1": ..., "pass@2": ..., ...}`, each the mean over problems, in increasing k.

    Raises:
        ValueError: on empty counts, an invalid pair, or a k above the smallest n.
    """
    n_min = _check_counts(counts)
    ks = _check_ks(default_ks(n_min) if ks is None else ks, n_min)
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in counts])) for k in ks}


def bootstrap_ci(counts: Sequence[tuple[int, int]], k: int, *, resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean pass@k, resampling problems with replacement.

    Samples within a problem are not resampled: the unbiased estimator already averages over
    them, and problems are the unit that varies between benchmarks.

    Args:
        counts: One `(n, c)` pair per problem.
        k: Attempts budget (at most the smallest n).
        resamples: Bootstrap replicates.
        seed: Seed of the resampling generator (same seed, same interval).
        level: Coverage, strictly between 0 and 1.

    Returns:
        `(low, high)`.

    Raises:
        ValueError: on invalid counts or k, `resamples < 1`, or `level` outside (0, 1).
    """
    n_min = _check_counts(counts)
    _check_ks([k], n_min)
    return bootstrap_mean_ci([pass_at_k(n, c, k) for n, c in counts], resamples=resamples, seed=seed,
                             level=level)


def bootstrap_mean_ci(values: Sequence[float], *, resamples: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one per problem), resampling them
    with replacement.

    Args:
        values: One number per unit that varies (a problem).
        resamples: Bootstrap replicates.
        seed: Seed of the resampling generator (same seed, same interval).
        level: Coverage, strictly between 0 and 1.

    Returns:
        `(low, high)`.

    Raises:
        ValueError: on no values, `resamples < 1`, or `level` outside (0, 1).
    """
    if len(values) == 0:
        raise ValueError("no values to resample")
    _check_bootstrap(resamples, level)
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    return _percentile_interval(values[idx].mean(axis=1), level)


def bootstrap_ratio_difference_ci(first: Sequence[tuple[float, float]], second: Sequence[tuple[float, float]], *,
                                  resamples: int = 1000, seed: int = 0,
                                  level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ratio(first) - ratio(second), where ratio is the sum of
    numerators over the sum of denominators (a rate pooled over units: accepted proposals over
    proposals, per trace), each sample's units resampled with replacement on their own.

    Args:
        first / second: One `(numerator, denominator)` pair per unit (a trace) of each sample.
        resamples: Bootstrap replicates.
        seed: Seed of the resampling generator (same seed, same interval).
        level: Coverage, strictly between 0 and 1.

    Returns:
        `(low, high)`.

    Raises:
        ValueError: on an empty sample, `resamples < 1`, or `level` outside (0, 1).
    """
    if not first or not second:
        raise ValueError("no units to resample")
    _check_bootstrap(resamples, level)
    rng = np.random.default_rng(seed)

    def ratios(pairs: Sequence[tuple[float, float]]) -> np.ndarray:
        values = np.asarray(pairs, dtype=float)
        idx = rng.integers(0, len(values), size=(resamples, len(values)))
        return values[idx, 0].sum(axis=1) / values[idx, 1].sum(axis=1)

    return _percentile_interval(ratios(first) - ratios(second), level)


def _check_bootstrap(resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be strictly between 0 and 1, got {level}")


def _percentile_interval(statistics: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` interval of bootstrap replicates' statistics."""
    alpha = (1 - level) / 2
    low, high = np.quantile(statistics, [alpha, 1 - alpha])
    return float(low), float(high)


def accuracy_under_budget(samples: Sequence[Mapping[str, Any]],
                          budgets: Iterable[int]) -> dict[str, float]:
    """Accuracy when a response only counts if it fits in a token budget.

    A sample is correct under budget B when `correct` is true and `num_tokens <= B`. Accuracy is
    averaged within each problem (`id`) first, then over problems, so it equals pass@1 when the
    budget is unbounded even if problems have different sample counts. Samples whose `correct`
    is None (unverifiable) are skipped.

    Args:
        samples: Dicts with `correct` (bool or None), `num_tokens` (int) and optionally `id`
            (samples without an id are grouped together).
        budgets: Token budgets, positive integers.

    Returns:
        `{str(B): accuracy}` in increasing budget order; empty when no sample is verifiable.

    Raises:
        ValueError: on a non-positive budget, or a verifiable sample without `num_tokens`.
    """
    budgets = sorted(set(budgets))
    if any(b < 1 for b in budgets):
        raise ValueError(f"token budgets must be positive, got {budgets}")
    by_problem: dict[Any, list[tuple[bool, int]]] = {}
    for i, s in enumerate(samples):
        if s.get("correct") is None:
            continue
        if s.get("num_tokens") is None:
            raise ValueError(f"sample {i} (id {s.get('id')!r}) has no 'num_tokens'; "
                             "budget accuracy needs the response length")
        by_problem.setdefault(s.get("id"), []).append((bool(s["correct"]), int(s["num_tokens"])))
    if not by_problem:
        return {}
    return {
        str(b): float(np.mean([np.mean([ok and t <= b for ok, t in group])
                               for group in by_problem.values()]))
        for b in budgets
    }
