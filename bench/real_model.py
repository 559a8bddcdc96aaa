"""Rows on a real instruction-tuned model: SmolLM2-135M-Instruct on CHAMP prompts.

The prompts are CHAMP's problems rendered in the paper's format through the model's own chat
template (its default system prompt included), the privileged one holding the human solution
(median 367 tokens, student prompts 91). Acceptance is what real text gives, unlike a random
model, which accepts nothing.

- shared_prompts_speedup: the default engine's time for 8 samples of one problem without
  prompt sharing (each row encodes both its prompts) / with it (one encoding per prompt),
  interleaved rounds, same traces.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

import torch

SAMPLES_OF_ONE = 8


def smollm2() -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M-Instruct as `--model smollm2` loads it (converted once, then cached)."""
    from dail.config import ModelConfig
    from dail.models import load

    model, tokenizer = load(ModelConfig(model="smollm2"))
    return model.eval(), tokenizer


def champ_prompts(tokenizer: Any, batch: int, *, one_problem: bool = False) -> tuple[list[list[int]], list[list[int]]]:
    """Student and privileged prompt ids of `batch` CHAMP problems in the dataset's order, or of
    `batch` samples of its first problem whose privileged prompt is of median length."""
    from dail.config import PromptConfig
    from dail.data import load_champ
    from dail.stages.generate import prepare_problems

    prepared, _ = prepare_problems(load_champ(), tokenizer, PromptConfig(), max_prompt_tokens=4096)
    if one_problem:
        median = statistics.median_low(len(p.prompt_ids["privileged"]) for p in prepared)
        prepared = [next(p for p in prepared if len(p.prompt_ids["privileged"]) == median)] * batch
    rows = [prepared[i % len(prepared)] for i in range(batch)]
    return [p.prompt_ids["student"] for p in rows], [p.prompt_ids["privileged"] for p in rows]


@contextlib.contextmanager
def without_prompt_sharing():
    """Every row encodes its own prompts, as before samples shared them."""
    from dail.rollout.engine.shared_prompts import SharedPrompts

    shared = SharedPrompts.rows

    def each_row(self, prompts):
        self.requested += len(prompts)
        self.encoded += len(prompts)
        return self._encode([list(p) for p in prompts])

    SharedPrompts.rows = each_row
    try:
        yield
    finally:
        SharedPrompts.rows = shared


def bench_shared_prompts(model: torch.nn.Module, tokenizer: Any, budget: int, rounds: int,
                         samples: int = SAMPLES_OF_ONE) -> dict[str, Any]:
    """Time of `samples` samples of one problem without prompt sharing / with it: the median of
    interleaved rounds' ratios (the first round warms up), and each side's prefill share."""
    from dail.rollout.engine import EngineStats, draft_rollout
    from dail.rollout.rule import RolloutSettings, sequence_seed

    student, privileged = champ_prompts(tokenizer, samples, one_problem=True)
    settings = RolloutSettings(tau=0.8, temperature=0.6, top_p=0.95, max_new_tokens=budget)
    seeds = [sequence_seed(0, str(i)) for i in range(samples)]
    contexts = {"unshared": without_prompt_sharing, "shared": contextlib.nullcontext}
    times: dict[str, list[float]] = {name: [] for name in contexts}
    stats: dict[str, EngineStats] = {}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(rounds + 1):
        for name, context in contexts.items():
            stats[name] = EngineStats()
            with context():
                tic = time.perf_counter()
                traces = draft_rollout(model, student, privileged, seeds, settings, pad_id=0, stats=stats[name])
                times[name].append(time.perf_counter() - tic)
            tokens[name] = [t.token_ids for t in traces]
    ratios = [u / s for u, s in zip(times["unshared"][1:], times["shared"][1:], strict=True)]
    return {"speedup": round(statistics.median(ratios), 3), "spread": round(max(ratios) / min(ratios), 3),
            "same_traces": tokens["unshared"] == tokens["shared"], "samples": samples, "budget": budget,
            "rounds": rounds, "student_prompt_tokens": len(student[0]), "privileged_prompt_tokens": len(privileged[0]),
            "prefill_share": {name: round(s.prefill_share, 3) for name, s in stats.items()},
            "prompts_encoded": {name: s.prompts_encoded for name, s in stats.items()}}
