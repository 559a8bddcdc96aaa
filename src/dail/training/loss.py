"""DAIL's token-level losses, in pure torch (no transformers import).

The contrastive objective (the paper's Stage 2 training loss):

    L = mean_t [ D(M_theta(.|x, r<t), M_PS(.|x, s, r<t)) - gamma * D(M_theta(.|x, r<t), M_NR(.|x, s~, r<t)) ]

over the response tokens t of a synthetic trace r, where M_theta is the student, M_PS the
privileged student and M_NR the negative reference. All three distributions are over the full
vocabulary and are taken at the same response positions. The paper's D is the reverse KL,
KL(student || teacher); `divergence` also offers the forward KL, KL(teacher || student), and
the generalized Jensen-Shannon divergence between the two (see `divergence_beta`).

Logits are (B, T, V): position t holds the distribution of response token t (the caller aligns
the three contexts, whose prompts differ in length). `mask` is (B, T), 1 for real response
tokens and 0 for padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

DIVERGENCES = "reverse, forward, or jsd:BETA with BETA in [0, 1]"


def divergence_beta(divergence: str) -> float:
    """The generalized-JSD weight BETA that a divergence name stands for.

    With S the student's and T a teacher's distribution, and for 0 < BETA < 1 the mixture
    M = (1 - BETA) S + BETA T, the generalized Jensen-Shannon divergence (Agarwal et al. 2024,
    GKD, eq. 1; TRL's `beta` in its GKD and self-distillation trainers) is

        JSD_BETA(S, T) = BETA KL(T || M) + (1 - BETA) KL(S || M),

    and its endpoints are defined as the two KLs: BETA = 0 is the forward KL(T || S) and BETA = 1
    the reverse KL(S || T). Near the endpoints the mixture formula itself shrinks to zero
    (JSD_BETA ~ BETA KL(T || S) as BETA -> 0, ~ (1 - BETA) KL(S || T) as BETA -> 1), so an interior
    BETA also scales the loss down; 0.5 is the symmetric JSD, at most log 2 per position.

    Args:
        divergence: "reverse" (the paper's), "forward", or "jsd:BETA".

    Returns:
        BETA: 1.0 for "reverse", 0.0 for "forward", else the given BETA.

    Raises:
        ValueError: an unknown name, or BETA not a number in [0, 1].
    """
    if divergence == "reverse":
        return 1.0
    if divergence == "forward":
        return 0.0
    name, _, value = str(divergence).partition(":")
    try:
        beta = float(value) if name == "jsd" else math.nan
    except ValueError:
        beta = math.nan
    if not 0.0 <= beta <= 1.0:  # also false for NaN
        raise ValueError(f"{divergence!r}: not a divergence; allowed: {DIVERGENCES}")
    return beta


def canonical_divergence(divergence: str) -> str:
    """The divergence's name in one spelling ("jsd:0.50" -> "jsd:0.5"); ValueError if unknown."""
    beta = divergence_beta(divergence)
    return divergence if divergence in ("reverse", "forward") else f"jsd:{beta:g}"


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                     divergence: str = "reverse") -> torch.Tensor:
    """Per-position divergence between the student's and a teacher's distributions.

    Args:
        student_logits: (..., V) logits of the trained model.
        teacher_logits: (..., V) logits of a frozen reference.
        divergence: "reverse" = KL(student || teacher), "forward" = KL(teacher || student), or
            "jsd:BETA", the generalized Jensen-Shannon divergence (`divergence_beta`).

    Returns:
        (...) divergence in nats, computed in float32.
    """
    beta = divergence_beta(divergence)
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    if beta == 1.0:
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    if beta == 0.0:
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
    return (beta * (log_t.exp() * (log_t - log_m)).sum(-1)
            + (1.0 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1))


def contrastive_kl_terms(
    student_logits: torch.Tensor,
    privileged_logits: torch.Tensor,
    negative_logits: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    divergence: str = "reverse",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (not averaged) positive and negative divergence over masked tokens.

    Returns:
        (positive_sum, negative_sum): scalars; negative_sum is 0 when `negative_logits` is None.
    """
    weights = mask.to(torch.float32)
    positive = (token_divergence(student_logits, privileged_logits, divergence=divergence) * weights).sum()
    if negative_logits is None:
        return positive, positive.new_zeros(())
    negative = (token_divergence(student_logits, negative_logits, divergence=divergence) * weights).sum()
    return positive, negative


def contrastive_kl(
    student_logits: torch.Tensor,
    privileged_logits: torch.Tensor,
    negative_logits: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    gamma: float = 0.1,
    divergence: str = "reverse",
    num_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The DAIL loss: mean over masked tokens of D(student, privileged) - gamma * D(student, negative).

    Args:
        student_logits: (B, T, V) student logits at the response positions (with gradients).
        privileged_logits: (B, T, V) privileged-student logits at the same positions.
        negative_logits: (B, T, V) negative-reference logits, or None when gamma is 0.
        mask: (B, T) 1 for response tokens, 0 for padding.
        gamma: Weight of the negative (shortcut-repelling) term; 0 gives plain distillation.
        divergence: D: "reverse" = KL(student || teacher) (the paper's, default), "forward" =
            KL(teacher || student), or "jsd:BETA" (`divergence_beta`).
        num_tokens: Divide by this instead of `mask.sum()`, e.g. the number of response tokens
            in a whole gradient-accumulation batch.

    Returns:
        Scalar loss. Zero when all three distributions agree. Zero (not NaN) when mask is empty.
    """
    if gamma != 0 and negative_logits is None:
        raise ValueError("negative_logits is required when gamma != 0")
    positive, negative = contrastive_kl_terms(
        student_logits, privileged_logits, negative_logits if gamma != 0 else None, mask,
        divergence=divergence)
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


# --------------------------------------------------------------------------- memory-bounded losses
#
# The plain functions above take (B, T, V) logits for every role. At a 150k vocabulary and a few
# thousand response tokens that is gigabytes per role, held at once (a weakness of the authors'
# release). The functions below take hidden states instead and apply the output projection
# chunk by chunk over positions: each chunk's logits, log-softmaxes and both KL terms live only
# while the chunk is processed, and the chunk's gradient (with respect to the student's hidden
# states and the head's trainable parameters, e.g. a LoRA adapter on lm_head) is computed right
# there, in the forward pass, so nothing has to be recomputed or kept for backward. The gradient
# with respect to the chunk's logits is written in closed form (as fused distillation kernels do)
# rather than traced through the softmaxes, which saves several vocabulary-wide passes per chunk;
# autograd only runs through the head.

# (student logits (c, V), start, end) -> (loss summed over the chunk, (2,) extra sums to report,
# d loss / d logits (c, V)); all three without autograd history.
ChunkLoss = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum_chunks loss_fn(head(hidden[chunk])), with gradients accumulated chunk by chunk.

    Returns (total, aux): the differentiable scalar and a non-differentiable vector of extra sums.
    """

    @staticmethod
    def forward(ctx: Any, loss_fn: ChunkLoss, head: Callable[[torch.Tensor], torch.Tensor], chunk_size: int,
                hidden: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[3] else None
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[4:], strict=True) if need]
        grad_params = [torch.zeros_like(p) for p in wanted]
        total = hidden.new_zeros((), dtype=torch.float32)
        aux = None
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            with torch.enable_grad():
                h = hidden[start:end].detach().requires_grad_(grad_hidden is not None)
                logits = head(h)  # (chunk, V): lives only here
            value, extra, grad_logits = loss_fn(logits.detach(), start, end)
            inputs = ([h] if grad_hidden is not None else []) + wanted
            grads = torch.autograd.grad(logits, inputs, grad_outputs=grad_logits.to(logits.dtype),
                                        allow_unused=True) if inputs and logits.requires_grad \
                else [None] * len(inputs)
            if grad_hidden is not None:
                if grads[0] is not None:
                    grad_hidden[start:end] = grads[0]
                grads = grads[1:]
            for acc, g in zip(grad_params, grads, strict=True):
                if g is not None:
                    acc.add_(g)
            total = total + value.float()
            aux = extra.float() if aux is None else aux + extra.float()
        if aux is None:
            aux = hidden.new_zeros((2,), dtype=torch.float32)
        ctx.save_for_backward(*([grad_hidden] if grad_hidden is not None else []), *grad_params)
        ctx.has_hidden = grad_hidden is not None
        ctx.param_needs = list(ctx.needs_input_grad[4:])
        ctx.mark_non_differentiable(aux)
        return total, aux

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, grad_aux: torch.Tensor) -> tuple[Any, ...]:
        saved = list(ctx.saved_tensors)
        grad_hidden = saved.pop(0) * grad_total if ctx.has_hidden else None
        grads: list[torch.Tensor | None] = []
        for need in ctx.param_needs:
            grads.append(saved.pop(0) * grad_total if need else None)
        return (None, None, None, grad_hidden, *grads)


def chunked_head_loss(loss_fn: ChunkLoss, head: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
                      hidden: torch.Tensor, *, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `head` and `loss_fn` to `hidden` (N, H) in chunks of rows, holding one chunk's logits.

    Args:
        loss_fn: (logits (c, V), start, end) -> (chunk's loss, (2,) extra sums to report,
            gradient of the chunk's loss with respect to the logits).
        head: The output projection; its trainable parameters (a LoRA adapter, or the whole
            matrix when it is trained) receive gradients.
        hidden: (N, H) final hidden states (after the last norm) of the positions to score.
        chunk_size: Rows per chunk.

    Returns:
        (total, extra): the differentiable sum over chunks and the summed extras (no gradient).
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    params = [p for p in head.parameters() if p.requires_grad] if isinstance(head, torch.nn.Module) else []
    return _ChunkedHeadLoss.apply(loss_fn, head, chunk_size, hidden, *params)


@torch.no_grad()
def contrastive_kl_with_grad(
    student_logits: torch.Tensor,
    privileged_logits: torch.Tensor,
    negative_logits: torch.Tensor | None,
    *,
    gamma: float,
    divergence: str = "reverse",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed divergence terms of (c, V) logits and the gradient of positive - gamma * negative.

    With s, t the student's and a teacher's log-probabilities, p = exp(s), q = exp(t):
    reverse, f = sum p (s - t): df/dz = p * (d - sum p d) where d = s - t (per position);
    forward, f = sum q (t - s): df/dz = p - q;
    jsd:BETA, with m = log((1 - BETA) p + BETA q), f = BETA sum q (t - m) + (1 - BETA) sum p (s - m):
    df/dz = (1 - BETA) p * (d - sum p d) where d = s - m (the mixture's own dependence on p
    cancels), which is the reverse form with m for t. The combination is linear in the two
    terms, so its gradient is the same combination of theirs.

    Returns:
        (positive_sum, negative_sum, grad (c, V) float32); negative_sum is 0 without negatives.
    """
    beta = divergence_beta(divergence)
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    p_s = log_s.exp()
    teachers = [(1.0, privileged_logits)] + ([(-gamma, negative_logits)] if negative_logits is not None else [])
    log_s_mixed = log_s + math.log1p(-beta) if 0.0 < beta < 1.0 else None
    # Vocabulary-wide passes dominate the cost, so the teachers' terms are summed into one
    # (c, V) buffer and the shared factor is applied once: reverse and jsd, grad = scale * p *
    # (sum_i w_i d_i - sum_i w_i sum p d_i); forward, grad = (sum_i w_i) p - sum_i w_i q_i.
    sums, grad, offset = [], None, 0.0
    for weight, teacher in teachers:
        log_t = F.log_softmax(teacher.float(), dim=-1)
        if beta == 0.0:
            term = log_t.exp()  # q
            value = torch.linalg.vecdot(term, log_t) - torch.linalg.vecdot(term, log_s)
        else:
            if beta == 1.0:
                term = torch.sub(log_s, log_t, out=log_t)  # d = s - t
                value = student_part = torch.linalg.vecdot(p_s, term)
            else:
                log_m = torch.logaddexp(log_s_mixed, log_t + math.log(beta))
                teacher_part = torch.linalg.vecdot(log_t.exp(), torch.sub(log_t, log_m, out=log_t))
                term = torch.sub(log_s, log_m, out=log_m)  # d = s - m
                student_part = torch.linalg.vecdot(p_s, term)
                value = beta * teacher_part + (1.0 - beta) * student_part
            offset = offset + weight * student_part
        grad = (term if weight == 1.0 else term.mul_(weight)) if grad is None else grad.add_(term, alpha=weight)
        sums.append(value.sum())
    if beta == 0.0:
        grad.neg_().add_(p_s, alpha=sum(weight for weight, _ in teachers))
    else:
        grad.sub_(offset[:, None]).mul_(p_s)
        if beta < 1.0:
            grad.mul_(1.0 - beta)
    negative_sum = sums[1] if len(sums) > 1 else sums[0].new_zeros(())
    return sums[0], negative_sum, grad


def chunked_contrastive_kl_terms(
    student_hidden: torch.Tensor,
    privileged_hidden: torch.Tensor,
    negative_hidden: torch.Tensor | None,
    head: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    *,
    gamma: float,
    divergence: str = "reverse",
    chunk_size: int = 256,
    teacher_head: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`contrastive_kl_terms` from hidden states, never holding more than one chunk of logits.

    Only the positions to score are passed (the caller drops padding), so every row counts.

    Args:
        student_hidden: (N, H) student hidden states (with gradients).
        privileged_hidden / negative_hidden: (N, H) teacher hidden states (no gradients);
            negative_hidden may be None (then the negative term is 0).
        head: The student's output projection (maybe LoRA-wrapped).
        gamma: Weight of the negative term in the differentiated combination.
        divergence: "reverse" (the paper's), "forward" or "jsd:BETA" (`divergence_beta`).
        chunk_size: Positions per chunk.
        teacher_head: The teachers' output projection (the adapter-free head); defaults to `head`.

    Returns:
        (combined, positive_sum, negative_sum): combined = positive_sum - gamma * negative_sum is
        differentiable; the two sums are detached, for logging.
    """
    divergence_beta(divergence)  # an unknown name fails here, before any forward
    teacher_head = head if teacher_head is None else teacher_head

    def loss_fn(student_logits: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            privileged = teacher_head(privileged_hidden[start:end])
            negative = teacher_head(negative_hidden[start:end]) if negative_hidden is not None else None
        positive, neg, grad = contrastive_kl_with_grad(student_logits, privileged, negative, gamma=gamma,
                                                       divergence=divergence)
        return positive - gamma * neg, torch.stack([positive, neg]), grad

    combined, extra = chunked_head_loss(loss_fn, head, student_hidden, chunk_size=chunk_size)
    return combined, extra[0], extra[1]


def chunked_nll_sum(hidden: torch.Tensor, targets: torch.Tensor,
                    head: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor], *,
                    chunk_size: int = 256) -> torch.Tensor:
    """Summed next-token cross-entropy of `targets` (N,) from hidden states (N, H), chunk-wise."""

    @torch.no_grad()
    def loss_fn(logits: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, ...]:
        # d/dz of -log softmax(z)[y] is softmax(z) - onehot(y).
        log_p = F.log_softmax(logits.float(), dim=-1)
        target = targets[start:end, None]
        value = -log_p.gather(-1, target).sum()
        grad = log_p.exp_().scatter_add_(-1, target, torch.full_like(target, -1, dtype=log_p.dtype))
        return value, torch.stack([value, value.new_zeros(())]), grad

    return chunked_head_loss(loss_fn, head, hidden, chunk_size=chunk_size)[0]
