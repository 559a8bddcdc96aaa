"""The didactic world: a controlled testbed where the gap DAIL closes is real.

Digit arithmetic modulo 10; KNOWN problem types (vector sums, dot products, axpy, expression
evaluation) are in the base model's pretraining, NOVEL ones (2x2 matrix products, polynomial
evaluation at four points) are not. Expert solutions are didactic (fused lines); the model's own
style is detailed (one primitive per line). See `generator` for the design, `pretrain` for the
base model and `validity` for the measurements.
"""

from __future__ import annotations

import os
from pathlib import Path

from dail.data import write_jsonl_atomic
from dail.world.generator import ALL_TYPES, KNOWN_TYPES, NOVEL_TYPES, generate
from dail.world.scoring import grade, pass_at_k

__all__ = ["ALL_TYPES", "KNOWN_TYPES", "NOVEL_TYPES", "base_model_dir", "export_problems",
           "generate", "grade", "habits_model_dir", "pass_at_k", "problems"]


def base_model_dir() -> Path:
    """Directory of the committed pretrained base model (loadable with `from_pretrained`)."""
    return Path(__file__).parent / "assets" / "base"


def habits_model_dir() -> Path:
    """Directory of the committed model whose privileged role has habits of its own: the base
    model continued with `dail world pretrain --habit-rate`, so that direct sampling's traces
    differ from mixed rollout's (docs/world.md)."""
    return Path(__file__).parent / "assets" / "habits"


def problems(kind: str = "novel", *, split: str = "train", n: int = 64, seed: int = 0) -> list:
    """`n` problems of `kind` ("novel", "known" or a type name), split evenly over its types.

    Raises:
        ValueError: for an unknown kind or split.
    """
    kinds = {"novel": NOVEL_TYPES, "known": KNOWN_TYPES}.get(kind, (kind,))
    out = []
    for i, k in enumerate(kinds):
        share = n // len(kinds) + (1 if i < n % len(kinds) else 0)
        if share:
            out += generate(k, share, split=split, seed=seed)
    return out


def export_problems(path: str | os.PathLike[str], split: str = "train", kind: str = "novel",
                    n: int = 64, seed: int = 0) -> int:
    """Write problems as JSONL (id, problem, solution, answer, type); returns the count."""
    records = [p.to_dict() for p in problems(kind, split=split, n=n, seed=seed)]
    write_jsonl_atomic(path, records)
    return len(records)
