"""`dail demo`: the paper's comparison, run end to end in the didactic world on a CPU.

Reads top to bottom: validity of the world (is the gap real?) -> problems (novel-type training
problems with didactic expert solutions; held-out novel and known test problems) -> traces for
each data source (mixed rollout, direct sampling, STaR rationalization) -> one LoRA adapter per
method -> evaluation of every method on test, known-type (retention) and training problems ->
results.json, report.md and plots.

Every stage lives in a folder named after a hash of its settings, so a rerun reuses finished
work and a changed setting rebuilds only what depends on it.
"""

from dail.stages.demo.comparison import run, smoke
from dail.stages.demo.settings import ALL_METHODS, METHODS, QUICK, SOURCES, DemoSettings

__all__ = ["ALL_METHODS", "METHODS", "QUICK", "SOURCES", "DemoSettings", "run", "smoke"]
