"""DAIL's token-level losses, in pure torch (no transformers import).

The contrastive objective (METHOD.md, Stage 2; the paper's training loss):

    L = mean_t [ KL(M_theta(.|x, r<t) || M_PS(.|x, s, r<t)) - gamma * KL(M_theta(.|x, r<t) || M_NR(.|x, s~, r<t)) ]

over the response tokens t of a synthetic trace r, where M_theta is the student, M_PS the
privileged student and M_NR the negative reference. All three distributions are over the full
vocabulary and are taken at the same response positions. "reverse" KL puts the student first
(the release's default); "forward" puts the teacher first.

Logits are (B, T, V): position t holds the distribution of response token t (the caller aligns
the three contexts, whose prompts differ in length). `mask` is (B, T), 1 for real response
tokens and 0 for padding.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Direction = Literal["reverse", "forward"]


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
             direction: Direction = "reverse") -> torch.Tensor:
    """Per-position KL between the student's and a teacher's distributions.

    Args:
        student_logits: (..., V) logits of the trained model.
        teacher_logits: (..., V) logits of a frozen reference.
        direction: "reverse" = KL(student || teacher), "forward" = KL(teacher || student).

    Returns:
        (...) KL divergence in nats, computed in float32.
    """
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    if direction == "reverse":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    if direction == "forward":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    raise ValueError(f"direction must be 'reverse' or 'forward', not {direction!r}")


def contrastive_kl_terms(
    student_logits: torch.Tensor,
    privileged_logits: torch.Tensor,
    negative_logits: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    direction: Direction = "reverse",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (not averaged) positive and negative KL over masked tokens.

    Returns:
        (positive_sum, negative_sum): scalars; negative_sum is 0 when `negative_logits` is None.
    """
    weights = mask.to(torch.float32)
    positive = (token_kl(student_logits, privileged_logits, direction=direction) * weights).sum()
    if negative_logits is None:
        return positive, positive.new_zeros(())
    negative = (token_kl(student_logits, negative_logits, direction=direction) * weights).sum()
    return positive, negative


def contrastive_kl(
    student_logits: torch.Tensor,
    privileged_logits: torch.Tensor,
    negative_logits: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    gamma: float = 0.1,
    direction: Direction = "reverse",
    num_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The DAIL loss: mean over masked tokens of KL(student||privileged) - gamma * KL(student||negative).

    Args:
        student_logits: (B, T, V) student logits at the response positions (with gradients).
        privileged_logits: (B, T, V) privileged-student logits at the same positions.
        negative_logits: (B, T, V) negative-reference logits, or None when gamma is 0.
        mask: (B, T) 1 for response tokens, 0 for padding.
        gamma: Weight of the negative (shortcut-repelling) term; 0 gives plain KL distillation.
        direction: "reverse" (student first, default) or "forward".
        num_tokens: Divide by this instead of `mask.sum()`, e.g. the number of response tokens
            in a whole gradient-accumulation batch.

    Returns:
        Scalar loss. Zero when all three distributions agree. Zero (not NaN) when mask is empty.
    """
    if gamma != 0 and negative_logits is None:
        raise ValueError("negative_logits is required when gamma != 0")
    positive, negative = contrastive_kl_terms(
        student_logits, privileged_logits, negative_logits if gamma != 0 else None, mask,
        direction=direction)
    denominator = mask.sum() if num_tokens is None else num_tokens
    return (positive - gamma * negative) / torch.clamp(torch.as_tensor(denominator, dtype=torch.float32,
                                                                         device=positive.device), min=1.0)


def nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
        num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over masked positions.

    Args:
        logits: (B, T, V) logits at the positions that predict `targets`.
        targets: (B, T) target token ids (any value where mask is 0).
        mask: (B, T) 1 where the target is trained.
        num_tokens: Denominator override (see `contrastive_kl`).
    """
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten().clamp(min=0),
                             reduction="none").view_as(targets)
    total = (losses * mask.to(losses.dtype)).sum()
    denominator = mask.sum() if num_tokens is None else num_tokens
    return total / torch.clamp(torch.as_tensor(denominator, dtype=torch.float32, device=total.device),
                               min=1.0)
