"""Evaluation: how good the responses are, and how to look at them.

- `grading`: answer checking (`grade`; graders picked by name: math-verify, exact, plug-ins).
- `metrics`: unbiased pass@k, bootstrap intervals, accuracy under a token budget.
- `report`: scored samples summarised (summary.json, summary.md, comparison tables).
- `plots`: pass@k, budget and training-curve figures.
- `view`: one HTML page showing which role wrote every token of the traces.

The stage that samples and scores is `dail.stages.evaluate`.
"""

from dail.evaluation.grading import grade
from dail.evaluation.metrics import pass_at_k

__all__ = ["grade", "pass_at_k"]
