"""Draft-and-verify engine for the mixed-policy rollout (the paper's Stage 1).

The algorithm is `dail.rollout.token_loop`'s decoder; this package only changes how the
forward passes are scheduled. Each round, with draft length k:

1. The student drafts k tokens d_0..d_{k-1} one forward at a time (its KV cache grows); the
   first k - 1 forwards run over the student rows alone.
2. One forward pass feeds the privileged context the pending token and d_0..d_{k-2}, which yields
   its raw distributions at all k draft positions; the same call feeds the student its last
   draft input, so for k = 1 a round is exactly one batched forward over both contexts.
3. Drafts are accepted left to right while the privileged raw probability is >= tau. At the first
   rejection the `retries` extra proposals are tried at that position, then the privileged model
   samples it; later drafts are discarded (their cache slots are masked out, see below).

A privileged round (k = 0) turns the order around: one forward over the privileged rows alone
decides the position wherever no token has a raw privileged probability >= tau, since there every
proposal would be rejected and the token is the fallback draw whatever the student says. Only if
some row has a token that could pass does the student run, reading in one forward all the tokens
it missed. Where the privileged model is rarely that sure (high tau, or a model far from the
expert's text) a token then costs one forward over half the rows; `DraftLength` picks these
rounds from the measured costs and the observed share of positions that need the student. The
unmade proposals are not recorded (`Trace.proposal_ids` is None there, in both engines).

A lookup round guesses instead of drafting. Traces repeat themselves and the expert's solution
(numbers, expressions, a line's layout), so the tokens that followed the latest earlier
occurrence of a row's last few tokens, in its privileged prompt or its response, are often the
next ones ("prompt lookup decoding", `lookup_guesses`). Guesses cost no forward: both roles
read the pending token and up to `GUESSES` guesses in one forward, every position is decided by
the rule from the distributions after the guesses before it, and the round keeps the positions
up to the first guess that is not the token decided before it. A right guess decides one more
token in the same forward; a wrong one costs the slots it took (they become holes).

Every random number comes from `uniform_table` indexed by (sequence, response position): column
r <= retries drives the r-th student proposal at a position, the last column the fallback. A
draft at position t uses table[t][0], exactly what the token-by-token loop uses, so both engines
produce the same traces for the same seeds (up to float noise between differently batched
forwards), whatever the batch size, draft length or batch composition.

Cache layout: one `DynamicCache` over 2n rows (its layers append in place, `GrowingLayer`),
rows [0, n) the students and [n, 2n) the privileged contexts of the n active sequences. A forward
runs over all rows or over one role's block; both roles always advance by the same number of
slots. A slot a role did not use (the other role's block in a one-role forward, padding in the
verify call) or a discarded draft is a *hole*: its attention-mask entry is 0 and position ids
count valid slots only, so holes change nothing. Holes are squeezed out (`compact`) when they
grow, and whenever sequences finish: finished rows leave the batch and waiting rows are
prefilled and join it (continuous batching), so one long trace does not hold a batch of short
ones. Sliding-window layers (Mistral, Gemma 2 and 3, Qwen2 with a window) keep their whole cache
too, and their masks count the window in valid slots (`dail.rollout.engine.window`); a model
whose layers the engine cannot mask (convolution, linear or chunked attention) is decoded token
by token.

Why the draft length is usually 1 here (lookup rounds aside): the draft model *is* the target
model (same weights, other context) and both contexts already share one forward per token at
k = 1. Drafting cannot cut the number of sequential student forwards (one per student token), so
it only pays where a k-token verify call is cheaper than k single-token privileged passes riding
along the student's.
The adaptive rule therefore maximises expected tokens per second: expected tokens per round
(1 - a^k) / (1 - a) from the observed acceptance rate a, over the measured cost of a round; for
lookup rounds, the tokens they have been deciding per row over their measured cost.
"""

from __future__ import annotations

from dail.rollout.engine.loop import EngineStats, draft_rollout
from dail.rollout.engine.scheduler import expected_tokens

__all__ = ["EngineStats", "draft_rollout", "expected_tokens"]
