"""Answer checking and pass@k for the world (no torch import: cheap for the core's grader)."""

from __future__ import annotations

import re

from dail.data import last_boxed
from dail.evaluation.metrics import pass_at_k

__all__ = ["grade", "pass_at_k"]


def grade(response: str, answer: str) -> bool:
    """Exact match of the last `\\boxed{}` content with `answer`, ignoring all whitespace."""
    got = last_boxed(response)
    return got is not None and re.sub(r"\s+", "", got) == re.sub(r"\s+", "", answer)
