"""Lookup rounds: guess a row's next tokens from its own text ("prompt lookup decoding") and
check every guess in one forward of both roles."""

from __future__ import annotations

import torch

from dail.rollout.engine.kv_cache import JointBatch
from dail.rollout.engine.rounds import Scores, propose, raw_probs, settle
from dail.rollout.rule import RolloutSettings, accepts

GUESSES = 4  # tokens a lookup round guesses (see `lookup_guesses`)
LOOKUP_ORDERS = (2, 4)  # the shortest and longest n-grams a guess is looked up by


def lookup_guesses(text: torch.Tensor, ends: torch.Tensor, count: int, pad_id: int,
                   orders: tuple[int, int] = LOOKUP_ORDERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Guess each row's next `count` tokens by n-gram lookup ("prompt lookup decoding").

    The guess is what followed the latest earlier occurrence of the row's last n tokens, for the
    longest n in `orders` (shortest, longest) that occurred before, in the row's text: its
    privileged prompt, which holds the expert's solution (traces reuse its expressions), and its
    response so far. A single token repeats too often to predict what follows it.

    Args:
        text: (n, W) token ids, -1 where there is no text; a row's text ends at `ends` (n,).
    Returns:
        guesses (n, count), padded with `pad_id`, and which of them exist (n, count) bool.
    """
    n, width = text.shape
    cols = torch.arange(width, device=text.device)
    follows = torch.full((n,), -1, dtype=torch.long, device=text.device)  # where the guess starts
    for order in range(orders[0], min(orders[1], width - 1) + 1):  # a longer match overrides a shorter one
        suffix = text.gather(1, (ends[:, None] - order + cols[:order]).clamp(min=0))  # (n, order)
        windows = text.unfold(1, order, 1)  # (n, width - order + 1, order): the n-gram at each start
        after = cols[order:]  # where each window's continuation starts
        found = (windows[:, :len(after)] == suffix[:, None, :]).all(-1) & (after[None, :] < ends[:, None])
        latest = torch.where(found, after[None, :], -1).amax(-1)
        usable = (latest >= 0) & (suffix >= 0).all(-1)
        follows = torch.where(usable, latest, follows)
    at = follows[:, None] + cols[:count]
    exists = (follows[:, None] >= 0) & (at < ends[:, None])
    guesses = text.gather(1, at.clamp(0, width - 1)).masked_fill(~exists, pad_id)
    return guesses, exists


def lookup_forwards(batch: JointBatch, guesses: torch.Tensor, exists: torch.Tensor) -> Scores:
    """A lookup round (every student caught up): both roles read the pending token and the
    guesses in one forward, which gives both distributions at every guessed position."""
    n = batch.size
    ids = torch.cat([batch.pending[:n, None], guesses], dim=-1)  # (n, 1 + g); both roles' pending agree
    valid = torch.cat([exists.new_ones((n, 1)), exists], dim=-1)
    logits = batch.forward(ids.repeat(2, 1), valid.repeat(2, 1))  # (2n, 1 + g, V)
    privileged = logits[n:]
    # Timed as a whole round (`DraftLength.round_cost`), with the search and the decisions.
    return Scores(privileged, torch.logsumexp(privileged, dim=-1), 0.0, list(logits[:n].unbind(1)))


def judge_guesses(scores: Scores, guesses: torch.Tensor, exists: torch.Tensor, table: torch.Tensor,
                  settings: RolloutSettings) -> tuple[torch.Tensor, ...]:
    """A lookup round's decisions, as `judge` returns them. Every position is decided by the
    rule (the student's proposal, retries, the fallback), each from the distributions after the
    guesses before it; position j + 1 counts only if the token decided at j is guess j, the
    token both roles read there."""
    logits, log_z = scores.privileged_logits, scores.log_z  # (n, q, V), (n, q)
    student = torch.stack(scores.student_logits, dim=1)  # (n, q, V)
    n, q = log_z.shape
    proposal = propose(student.flatten(0, 1), table[..., 0].flatten(), settings).view(n, q)
    raw = raw_probs(logits, log_z, proposal)
    ok = accepts(raw, settings.tau)
    chosen, accepted, proposal_prob = proposal.clone(), ok.clone(), raw.clone()
    at = torch.nonzero(~ok, as_tuple=True)
    if at[0].numel():
        chosen[at], accepted[at], proposal[at], proposal_prob[at] = settle(
            student[at], logits[at], log_z[at], proposal[at], raw[at], table[at], settings)
    right = (chosen[:, :-1] == guesses) & exists  # (n, g)
    judged = 1 + right.long().cumprod(-1).sum(-1)
    return chosen, accepted, proposal, proposal_prob, ok, judged
