"""`mixed_rollout`: Stage 1's entry point, which picks how the rollout is scheduled (the draft
engine or the token-by-token loop), never what is sampled."""

from __future__ import annotations

import torch

from dail.rollout.engine import draft_rollout
from dail.rollout.rule import PRIVILEGED, RolloutSettings, Trace
from dail.rollout.token_loop import reference_rollout, sample_responses


@torch.inference_mode()
def mixed_rollout(
    model: torch.nn.Module,
    student_prompts: list[list[int]],
    privileged_prompts: list[list[int]],
    seeds: list[int],
    settings: RolloutSettings,
    *,
    pad_id: int,
) -> list[Trace]:
    """Generate one trace per (student prompt, privileged prompt, seed) triple.

    Args:
        model: The frozen base model (both roles share its weights).
        student_prompts / privileged_prompts: Token ids of each row's two contexts.
        seeds: One seed per row; the row's trace depends on nothing else.
        settings: Threshold, sampling settings and token budget.
        pad_id: Token used for left padding (always masked).

    Returns:
        One `Trace` per row, in input order. `settings.engine` picks how the work is scheduled
        (`dail.rollout.engine.draft_rollout` or `reference_rollout`), never what is sampled.
    """
    if not (len(student_prompts) == len(privileged_prompts) == len(seeds)):
        raise ValueError("student_prompts, privileged_prompts and seeds must have equal lengths")
    if settings.tau >= 1:
        # Nothing is ever accepted, so every token is the fallback draw: sample the privileged
        # context alone with the fallback's random numbers (same tokens, half the forward work).
        # The student's unused proposals are not recorded.
        return sample_responses(model, privileged_prompts, seeds, settings, pad_id=pad_id,
                                draw=-1, source=PRIVILEGED)
    if settings.engine == "draft":
        return draft_rollout(model, student_prompts, privileged_prompts, seeds, settings, pad_id=pad_id)
    return reference_rollout(model, student_prompts, privileged_prompts, seeds, settings, pad_id=pad_id)

