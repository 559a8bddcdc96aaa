"""`draft_rollout`: the draft engine's loop over rounds, with continuous batching (see
`dail.rollout.engine` for the algorithm)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields
from functools import partial

import torch

from dail.rollout.engine.kv_cache import JointBatch, clock
from dail.rollout.engine.lookup import GUESSES, judge_guesses, lookup_forwards, lookup_guesses
from dail.rollout.engine.rounds import draft_forwards, judge, privileged_forwards
from dail.rollout.engine.scheduler import LOOKUP, DraftLength
from dail.rollout.engine.window import mask_layout
from dail.rollout.rule import PRIVILEGED, STUDENT, RolloutSettings, Trace, uniform_table
from dail.rollout.token_loop import left_pad, reference_rollout

logger = logging.getLogger(__name__)

# Lookup rounds run on batches of at most this many rows. A forward over GUESSES + 1 tokens of
# each row costs about what a one-token forward does only while the batch is small (on a CPU it
# soon costs several times as much, and a round decides a few tokens at best); it also bounds
# the logits of a lookup round, which are all held at once.
LOOKUP_ROWS = 4


@dataclass
class EngineStats:
    """What one call of `draft_rollout` did (for benchmarks and logs)."""

    rounds: int = 0
    forwards: int = 0
    drafted: int = 0
    verified: int = 0
    accepted: int = 0
    tokens: int = 0
    draft_length_sum: int = 0
    compactions: int = 0
    unasked: int = 0  # tokens decided by privileged rounds without a student forward
    guessed: int = 0  # lookup guesses checked (a row's missing guesses count as wrong)
    guessed_right: int = 0  # ... that were the token decided there: each decided one more token
    seconds: float = 0.0  # wall time of the call
    prefill_seconds: float = 0.0  # of which encoding prompts (both roles)
    prompt_rows: int = 0  # prompts the rows read (two per row)
    prompts_encoded: int = 0  # ... of which run through the model (the others shared an encoding)
    prompt_tokens_reused: int = 0  # tokens of encoded prompts copied from another prompt's opening

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafts that were judged (a draft after a rejection is not)."""
        return self.accepted / self.verified if self.verified else 0.0

    @property
    def guess_hit_rate(self) -> float:
        return self.guessed_right / self.guessed if self.guessed else 0.0

    @property
    def mean_draft_length(self) -> float:
        return self.draft_length_sum / self.rounds if self.rounds else 0.0

    @property
    def prefill_share(self) -> float:
        return self.prefill_seconds / self.seconds if self.seconds else 0.0


@torch.inference_mode()
def draft_rollout(
    model: torch.nn.Module,
    student_prompts: list[list[int]],
    privileged_prompts: list[list[int]],
    seeds: list[int],
    settings: RolloutSettings,
    *,
    pad_id: int,
    stats: EngineStats | None = None,
) -> list[Trace]:
    """`dail.rollout.mixed.mixed_rollout` by draft and verify, with continuous batching.

    Args:
        model: The frozen base model (both roles share its weights).
        student_prompts / privileged_prompts: Token ids of each row's two contexts (non-empty;
            the last prompt token is read by the first round, together with the first draft).
        seeds: One seed per row; the row's trace depends on nothing else.
        settings: As for `mixed_rollout`; `draft_length` (0 = adaptive) and `max_batch`
            (0 = all rows at once) schedule the work without changing any trace.
        pad_id: Token used for padding and holes (always masked).
        stats: This call's counters are added to it when given.

    Returns:
        One `Trace` per row, in input order.
    """
    if not (len(student_prompts) == len(privileged_prompts) == len(seeds)):
        raise ValueError("student_prompts, privileged_prompts and seeds must have equal lengths")
    if any(not p for p in student_prompts) or any(not p for p in privileged_prompts):
        raise ValueError("prompts must not be empty")
    layout = mask_layout(model)
    if isinstance(layout, str):
        logger.info("the draft engine cannot run this %s model (%s): decoding token by token",
                    model.config.model_type, layout)
        return reference_rollout(model, student_prompts, privileged_prompts, seeds, settings, pad_id=pad_id)
    given, stats = stats, EngineStats()
    started = time.perf_counter()
    total = len(seeds)
    traces = [Trace() for _ in range(total)]
    if total == 0:
        return traces
    budget = settings.max_new_tokens
    batch = JointBatch(model, pad_id, prompts=student_prompts + privileged_prompts, layout=layout)
    device = batch.device
    uniforms = uniform_table(seeds, settings, device)  # (N, budget, retries + 2)
    eos = torch.tensor(settings.eos_ids or [-1], device=device)
    draft = DraftLength(settings.draft_length, max_length=budget)
    # Per input row, filled by whole rounds; copied into `traces` when the row finishes. Spare
    # columns take what a round writes past the budget (see step 4).
    longest = max(draft.longest, GUESSES + 1)
    width = budget + longest
    # The text lookup guesses from: each row's privileged prompt, right-aligned (-1 before it,
    # which matches no token), then its response, written by the rounds through `tokens`.
    prompts, _ = left_pad(privileged_prompts, -1, device)
    start = prompts.shape[1]
    text = torch.cat([prompts, prompts.new_full((total, width), -1)], dim=-1)
    tokens = text[:, start:]
    from_student = torch.zeros((total, width), dtype=torch.bool, device=device)
    proposals = torch.zeros((total, width), dtype=torch.long, device=device)
    proposal_probs = torch.zeros((total, width), dtype=torch.float32, device=device)
    length = torch.zeros(total, dtype=torch.long, device=device)
    capacity = settings.max_batch if settings.max_batch > 0 else total
    waiting = list(range(total))
    batch.admit(waiting[:capacity], student_prompts, privileged_prompts)
    waiting = waiting[capacity:]

    steps = torch.arange(longest, device=device)
    lag = 0  # tokens the students have not read beyond their pending one (`_student_feed`)
    while batch.size:
        began = clock(device)
        n = batch.size
        rows = batch.rows
        t0 = length[rows]  # (n,) response position of the first token decided this round
        lookup = lag == 0 and n <= LOOKUP_ROWS
        k = draft.choose(budget, lookup=lookup)
        if k > 1:  # no draft runs past the budget of every row
            k = draft.choose(int((budget - t0).max()))
        if k == LOOKUP:  # guesses first: the round is as wide as the longest row's guesses
            guesses, exists = lookup_guesses(text[rows], start + t0, GUESSES, pad_id)
            g = int(exists.sum(-1).max())
            guesses, exists = guesses[:, :g], exists[:, :g]
            if g == 0:  # nothing to guess from: the usual round
                k = 1
        q = g + 1 if k == LOOKUP else max(k, 1)  # positions the round can decide
        idx = steps[:q]
        positions = (t0[:, None] + idx).clamp(max=budget - 1)  # (n, q)
        table = uniforms[rows[:, None], positions]  # (n, q, draws)
        lagging = lag > 0  # the students have more to read than their pending token
        feed = partial(_student_feed, batch.pending[:n], tokens, rows, t0, lag, pad_id)
        if k == LOOKUP:
            scores = lookup_forwards(batch, guesses, exists)
            chosen, accepted, proposal, proposal_prob, first_ok, judged = judge_guesses(
                scores, guesses, exists, table, settings)
        else:
            if k == 0:
                scores = privileged_forwards(batch, feed, table, settings)
            else:
                scores = draft_forwards(batch, k, feed, lagging, table, settings, pad_id)
            chosen, accepted, proposal, proposal_prob, first_ok, judged = judge(scores, table, settings)
        caught_up = bool(scores.student_logits)  # the students have read everything

        # 4. Emit the decided tokens; stop at eos or the budget.
        if q == 1:  # one token decided per row (a row at its budget has left the batch)
            span = judged
            has_eos = torch.isin(chosen[:, 0], eos)
        else:
            span = torch.minimum(judged, budget - t0)
            is_eos = torch.isin(chosen, eos) & (idx[None, :] < span[:, None])  # (n, q)
            has_eos = is_eos.any(-1)
            span = torch.where(has_eos, is_eos.long().argmax(-1) + 1, span)
        # The whole round is written: slots from t0 + span on hold tokens that were not emitted,
        # which the row's next round (it starts there) overwrites and a finished trace cuts off.
        dest = (rows[:, None], t0[:, None] + idx)
        tokens[dest] = chosen
        from_student[dest] = accepted
        proposals[dest] = proposal
        proposal_probs[dest] = proposal_prob.float()
        length[rows] = t0 + span
        finished = has_eos | (length[rows] >= budget)

        # The host's counters in one device-to-host copy. A row needed the student at its first
        # position iff a proposal is recorded there (`judge`). A lookup round checks a row's
        # guesses up to the first wrong one, and each right one decided one more token.
        decided = idx[None, :] < judged[:, None]  # (n, q)
        verified, accepted_drafts, emitted, n_finished, askable, checked = torch.stack(
            [judged.sum() * caught_up, (first_ok & decided).sum(), span.sum(), finished.sum(),
             (proposal[:, 0] >= 0).sum(), torch.clamp(judged, max=q - 1).sum()]).tolist()
        if k == LOOKUP:
            stats.guessed += checked
            stats.guessed_right += verified - n
        stats.rounds += 1
        stats.draft_length_sum += 1 if k == LOOKUP else k  # a lookup round runs the student once
        stats.drafted += n * len(scores.drafts)
        stats.verified += verified
        stats.accepted += accepted_drafts
        stats.tokens += emitted
        stats.unasked += 0 if caught_up else emitted
        draft.observe(k, accepted=accepted_drafts, verified=verified, consulted=askable > 0,
                      student_seconds=scores.student_seconds, seconds=scores.seconds, rows=n,
                      round_seconds=clock(device) - began)

        # 5. Roll the caches back: slots of tokens that were not decided become holes. Input i
        # of a round (0 = the pending token, i = draft or guess i) stays iff i < judged; a
        # one-token round (the usual one) read only the pending token and discards nothing.
        if q > 1:
            keep = decided.long()
            width = batch.mask.shape[1]
            privileged_slots = torch.arange(width - q, width, device=device)
            student_slots = privileged_slots if k == LOOKUP else torch.cat(
                [torch.arange(width - 2 * k + 1, width - k, device=device), torch.tensor([width - 1], device=device)])
            batch.mask[:n, student_slots] *= keep
            batch.mask[n:, privileged_slots] *= keep
        next_token = chosen.gather(-1, (judged - 1)[:, None]).squeeze(-1)  # the round's last decided token
        if caught_up:
            batch.pending = torch.cat([next_token, next_token])
            lag = 0
        else:
            batch.pending = torch.cat([batch.pending[:n], next_token])
            lag += 1

        # 6. Finished rows leave, waiting rows join; holes are squeezed out when they pile up.
        if n_finished:
            for local in torch.nonzero(finished).flatten().tolist():
                row = int(rows[local])
                _write_trace(traces[row], tokens[row], from_student[row], proposals[row],
                             proposal_probs[row], int(length[row]), finished=bool(has_eos[local]))
            if n_finished == n and not waiting:
                break
            batch.compact(~finished)
            stats.compactions += 1
            if waiting and batch.size < capacity:
                joining, waiting = waiting[:capacity - batch.size], waiting[capacity - batch.size:]
                batch.admit(joining, student_prompts, privileged_prompts)
        elif (k != 1 or lagging) and batch.hole_fraction > 0.5 and batch.mask.shape[1] > 64:
            batch.compact()  # only rounds that leave a role's rows unfed add holes
            stats.compactions += 1
    stats.forwards += batch.forwards
    stats.prefill_seconds += batch.prefill_seconds
    stats.prompt_rows += batch.prompts.requested
    stats.prompts_encoded += batch.prompts.encoded
    stats.prompt_tokens_reused += batch.prompts.reused_tokens
    stats.seconds += time.perf_counter() - started
    logger.debug("draft engine: %d rows, %d tokens in %.1f s; %d rounds of mean draft length %.2f, "
                 "acceptance %.3f, %d tokens decided without the student, %d of %d lookup guesses right",
                 total, stats.tokens, stats.seconds, stats.rounds, stats.mean_draft_length, stats.acceptance_rate,
                 stats.unasked, stats.guessed_right, stats.guessed)
    if given is not None:
        for counter in fields(EngineStats):
            setattr(given, counter.name, getattr(given, counter.name) + getattr(stats, counter.name))
    return traces



def _student_feed(pending: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, t0: torch.Tensor,
                  lag: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What each student has not read, right-aligned: ids and valid slots, (n, 1 + lag).

    Privileged rounds leave every student `lag` tokens behind, except rows that joined since:
    they have read nothing after their prompt. So a row's unread tokens are its last
    min(lag, t0) + 1, where response position -1 is the prompt's last token (its pending one).
    """
    if lag == 0:
        return pending[:, None], torch.ones((len(pending), 1), dtype=torch.bool, device=pending.device)
    at = t0[:, None] - (lag + 1) + torch.arange(lag + 1, device=pending.device)  # (n, 1 + lag)
    ids = torch.where(at == -1, pending[:, None], tokens[rows[:, None], at.clamp(min=0)])
    valid = at >= -1
    return ids.masked_fill(~valid, pad_id), valid


def _write_trace(trace: Trace, tokens: torch.Tensor, from_student: torch.Tensor, proposals: torch.Tensor,
                 probs: torch.Tensor, length: int, *, finished: bool) -> None:
    trace.token_ids = tokens[:length].tolist()
    trace.sources = [STUDENT if s else PRIVILEGED for s in from_student[:length].tolist()]
    # -1 marks a position whose proposal was not recorded (see `judge`).
    ids = proposals[:length].tolist()
    trace.proposal_ids = [None if t < 0 else t for t in ids]
    trace.proposal_probs = [None if t < 0 else p for t, p in zip(ids, probs[:length].tolist(), strict=True)]
    trace.finished = finished
