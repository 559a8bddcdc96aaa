"""Answer checking and pass@k for the world (no torch import: cheap for the core's grader)."""

from __future__ import annotations

import math
import re

from dail.data import last_boxed


def grade(response: str, answer: str) -> bool:
    """Exact match of the last `\\boxed{}` content with `answer`, ignoring all whitespace."""
    got = last_boxed(response)
    return got is not None and re.sub(r"\s+", "", got) == re.sub(r"\s+", "", answer)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    Raises:
        ValueError: if k > n or c is outside [0, n].
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
