"""One round of the draft engine: its forwards (drafts and verify, or a privileged round) and
its decisions by the rollout rule (acceptance, retries, the privileged fallback)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dail.rollout.engine.kv_cache import JointBatch, clock
from dail.rollout.rule import RolloutSettings, accepts, sample_inverse_cdf, sampling_distribution


@dataclass
class Scores:
    """What a round's forwards computed, for `judge`."""

    privileged_logits: torch.Tensor  # (n, k, V): the privileged distributions at the round's positions
    log_z: torch.Tensor  # (n, k): their log normalisers
    # The verify forward, or a privileged round's privileged forward (0: a lookup round, timed whole).
    seconds: float
    student_logits: list[torch.Tensor] = field(default_factory=list)  # (n, V) per draft, or per lookup position
    drafts: list[torch.Tensor] = field(default_factory=list)  # (n,) per draft; none if the student did not run
    student_seconds: float | None = None  # one forward over the student rows, if one ran


def privileged_forwards(batch: JointBatch, student_feed: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                        table: torch.Tensor, settings: RolloutSettings) -> Scores:
    """A privileged round (k = 0): the privileged rows read their pending token alone; the
    students run (reading all they have not read) only if some row has a token that can pass
    tau. Elsewhere a proposal could not be accepted, so none is made."""
    n, device = batch.size, batch.device
    tic = clock(device)
    logits = batch.forward(batch.pending[n:, None], batch.mask.new_ones((n, 1), dtype=torch.bool),
                           batch.privileged)  # (n, 1, V)
    seconds = clock(device) - tic
    log_z = torch.logsumexp(logits, dim=-1)
    scores = Scores(logits, log_z, seconds)
    if askable(logits, log_z, settings.tau).any():
        tic = clock(device)
        student = batch.forward(*student_feed(), batch.students)[:, -1]
        scores.student_seconds = clock(device) - tic
        scores.student_logits.append(student)
        scores.drafts.append(propose(student, table[:, 0, 0], settings))
    return scores


def draft_forwards(batch: JointBatch, k: int, student_feed: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                   lagging: bool, table: torch.Tensor, settings: RolloutSettings, pad_id: int) -> Scores:
    """Steps 1 and 2 of a round of k >= 1 drafts (see the module docstring)."""
    n, device = batch.size, batch.device
    student_logits, drafts = [], []
    # 1. Draft: the student proposes k - 1 tokens over its own rows; its first forward reads all
    # it has not read.
    tic = clock(device)
    if k > 1 or lagging:
        ids, valid = student_feed()
    for j in range(k - 1):
        logits = batch.forward(ids, valid, batch.students)[:, -1]  # (n, V)
        student_logits.append(logits)
        drafts.append(propose(logits, table[:, j, 0], settings))
        ids, valid = drafts[-1][:, None], batch.mask.new_ones((n, 1), dtype=torch.bool)
    student_seconds = (clock(device) - tic) / (k - 1) if k > 1 else None

    # 2. Verify: privileged rows read [pending, d_0..d_{k-2}]; student rows read their last
    # input (d_{k-2}, or for k = 1 what they have not read), right-aligned.
    tic = clock(device)
    if k == 1 and not lagging:  # the usual round: every row reads its pending token
        ids, valid = batch.pending[:, None], torch.ones((2 * n, 1), dtype=torch.bool, device=device)
    else:
        privileged_ids = torch.stack([batch.pending[n:]] + drafts, dim=-1)  # (n, k)
        q = max(k, ids.shape[1])
        ids = torch.cat([F.pad(ids, (q - ids.shape[1], 0), value=pad_id),
                         F.pad(privileged_ids, (q - k, 0), value=pad_id)])
        valid = torch.cat([F.pad(valid, (q - valid.shape[1], 0)),
                           F.pad(torch.ones_like(privileged_ids, dtype=torch.bool), (q - k, 0))])
    logits = batch.forward(ids, valid)
    student_logits.append(logits[:n, -1])
    drafts.append(propose(logits[:n, -1], table[:, k - 1, 0], settings))
    seconds = clock(device) - tic
    privileged_logits = logits[n:, -k:]  # (n, k, V): row j scores draft j
    log_z = torch.logsumexp(privileged_logits, dim=-1)
    return Scores(privileged_logits, log_z, seconds, student_logits, drafts, student_seconds)


def judge(scores: Scores, table: torch.Tensor, settings: RolloutSettings) -> tuple[torch.Tensor, ...]:
    """Step 3: the round's decisions, (n, k) each: chosen tokens, whether each is the student's,
    the proposals and their raw privileged probabilities (-1 / NaN: not made, or could not pass),
    whether each first proposal passed; and (n,) how many positions were decided (up to and
    including the first rejection)."""
    logits, log_z = scores.privileged_logits, scores.log_z
    if not scores.drafts:  # a privileged round nobody needed the student in: the fallback everywhere
        chosen = sample_inverse_cdf(sampling_distribution(logits[:, 0], settings), table[:, 0, -1])[:, None]
        never = torch.zeros_like(chosen, dtype=torch.bool)
        unmade = torch.full(chosen.shape, float("nan"), device=chosen.device)
        return chosen, never, torch.full_like(chosen, -1), unmade, never, torch.ones_like(chosen[:, 0])
    drafted = torch.stack(scores.drafts, dim=-1)  # (n, k)
    k = drafted.shape[1]
    raw = raw_probs(logits, log_z, drafted)
    ok = accepts(raw, settings.tau)
    rejected_at = ok.long().cumprod(-1).sum(-1)  # k if none
    judged = torch.clamp(rejected_at + 1, max=k)
    reject_rows = torch.nonzero(rejected_at < k).flatten()
    if not reject_rows.numel():
        return drafted, ok, drafted, raw, ok, judged
    # The rejected position: retries, then the privileged fallback.
    chosen, accepted, proposal, proposal_prob = drafted.clone(), ok.clone(), drafted.clone(), raw.clone()
    at = (reject_rows, rejected_at[reject_rows])
    student = torch.stack(scores.student_logits, dim=1)  # (n, k, V)
    chosen[at], accepted[at], proposal[at], proposal_prob[at] = settle(
        student[at], logits[at], log_z[at], drafted[at], raw[at], table[at], settings)
    return chosen, accepted, proposal, proposal_prob, ok, judged


def settle(student_logits: torch.Tensor, privileged_logits: torch.Tensor, log_z: torch.Tensor,
           first: torch.Tensor, first_prob: torch.Tensor, uniforms: torch.Tensor,
           settings: RolloutSettings) -> tuple[torch.Tensor, ...]:
    """Positions (r,) whose first proposal failed: `decide`, and where no token could pass tau
    the proposal is not recorded, as where it was never computed. Returns (chosen, accepted,
    proposal, proposal_prob)."""
    chosen, proposal, prob, accepted = decide(student_logits, privileged_logits, first, first_prob, uniforms,
                                              settings)
    unasked = ~askable(privileged_logits, log_z, settings.tau)
    return chosen, accepted, proposal.masked_fill(unasked, -1), prob.masked_fill(unasked, float("nan"))


def raw_probs(privileged_logits: torch.Tensor, log_z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The raw (untempered) privileged probability of each id: (..., V), (...), (...) -> (...)."""
    return (privileged_logits.gather(-1, ids[..., None]).squeeze(-1) - log_z).exp()


def askable(privileged_logits: torch.Tensor, log_z: torch.Tensor, tau: float) -> torch.Tensor:
    """Where some token has a raw privileged probability that passes tau: (..., V) -> (...) bool.
    Elsewhere every proposal is rejected, so the student need not make one."""
    return accepts((privileged_logits.amax(-1) - log_z).exp(), tau)


def propose(student_logits: torch.Tensor, uniforms: torch.Tensor, settings: RolloutSettings) -> torch.Tensor:
    """The student's first proposal at a position: (n, V) logits, (n,) uniforms -> (n,) ids."""
    return sample_inverse_cdf(sampling_distribution(student_logits, settings), uniforms)


def decide(
    student_logits: torch.Tensor,
    privileged_logits: torch.Tensor,
    first: torch.Tensor,
    first_prob: torch.Tensor,
    uniforms: torch.Tensor,
    settings: RolloutSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A position whose first proposal failed: retries, then the fallback.

    Args:
        student_logits / privileged_logits: (r, V) logits at the rejected positions.
        first / first_prob: (r,) the rejected draft and its raw privileged probability.
        uniforms: (r, retries + 2) the position's row of the uniform table.

    Returns:
        (chosen, proposal, proposal_prob, accepted), each (r,), as `dail.rollout.rule.choose` records them.
    """
    proposal, proposal_prob = first, first_prob
    accepted = torch.zeros_like(first, dtype=torch.bool)
    if settings.retries:
        dist = sampling_distribution(student_logits, settings)
        log_z = torch.logsumexp(privileged_logits, dim=-1)
        for r in range(1, settings.retries + 1):
            candidate = sample_inverse_cdf(dist, uniforms[:, r])
            prob = raw_probs(privileged_logits, log_z, candidate)
            undecided = ~accepted
            proposal = torch.where(undecided, candidate, proposal)
            proposal_prob = torch.where(undecided, prob, proposal_prob)
            accepted = accepted | accepts(prob, settings.tau)
    fallback = sample_inverse_cdf(sampling_distribution(privileged_logits, settings), uniforms[:, -1])
    return torch.where(accepted, proposal, fallback), proposal, proposal_prob, accepted
