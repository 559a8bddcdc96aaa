"""How the draft engine schedules its rounds: k drafts, a privileged round (k = 0) or a lookup round.

`DraftLength` picks each round to maximise expected tokens per second from the observed acceptance
rate and the measured cost of each kind of round (see `dail.rollout.engine`).
"""

from __future__ import annotations

DRAFT_CANDIDATES = (1, 2, 3, 4, 6, 8)
PROBE_EVERY = 16  # rounds after which an unpromising lookup round is first tried again (then 2x, ... 8x)
LOOKUP = -1  # the draft length that stands for a lookup round


class DraftLength:
    """Chooses k per round: argmax of expected tokens per second (see module docstring).

    k = 0 is the privileged round: one forward over the privileged rows, and a student forward
    only when some row's privileged distribution has a token that can pass tau. k = LOOKUP is
    the lookup round: one forward of both roles over the pending token and `GUESSES` guessed
    ones.
    """

    def __init__(self, fixed: int, max_length: int):
        self.fixed = fixed
        self.candidates = [k for k in DRAFT_CANDIDATES if k <= max_length] or [1]
        self.longest = max(1, min(fixed, max_length)) if fixed > 0 else self.candidates[-1]
        self.accept = 0.0  # EMA of the per-draft acceptance rate
        # EMA of "some row needs the student at this position"; it starts undecided so that a
        # privileged round is tried once its cost can be guessed.
        self.consulted = 0.5
        self.student_cost: float | None = None  # EMA seconds of a forward over the student rows
        self.privileged_cost: float | None = None  # ... over the privileged rows
        self.verify_cost: dict[int, float] = {}  # EMA seconds of the verify forward, per k
        # EMA of the tokens a lookup round decides per row; the prior is high enough for one to
        # be tried once its cost can be guessed.
        self.lookup_tokens = 2.0
        self.since_lookup = 0  # rounds since the last lookup round
        self.probe_every = PROBE_EVERY  # doubles after each probe that finds lookup rounds still do not pay
        # EMA wall seconds of a whole round (decisions and bookkeeping included) of k = 1 and of
        # a lookup round, whose decisions cover every guessed position.
        self.round_cost: dict[int, float] = {}
        # The first round of each draft length runs new shapes (slow first calls), and a cost
        # measured there would keep the chooser away from it: those timings are dropped.
        self.warmed: set[int] = set()

    def choose(self, remaining: int, *, lookup: bool = False) -> int:
        """The next round's k, given the most positions a row has left; `lookup` says whether a
        lookup round can run now (it needs every student caught up)."""
        if self.fixed > 0:
            return max(1, min(self.fixed, remaining))
        base = self.verify_cost.get(1)
        if base is None:
            return 1
        if lookup and self.since_lookup >= self.probe_every:  # the text may have become repetitive
            self.probe_every = min(2 * self.probe_every, 8 * PROBE_EVERY)
            return LOOKUP
        # Untimed forwards over one role's rows: drafting is guessed to save nothing (so that it
        # is not tried on a guess), a privileged forward to cost half a joint one (so that it is
        # tried where few positions need the student).
        student = self.student_cost or base
        privileged = self.privileged_cost or base / 2
        best, best_rate = 0, 1 / (privileged + self.consulted * student)
        a = min(self.accept, 0.999)
        for k in self.candidates:
            if k > remaining:
                break
            tokens = expected_tokens(a, k)
            cost = (k - 1) * student + self.verify_cost.get(k, base)
            if tokens / cost > best_rate * (1 + 1e-9):
                best, best_rate = k, tokens / cost
        # A lookup round costs what its whole round costs against a whole one-token round, in
        # the units above; untimed, 1.5 of them (a small forward over a few more tokens costs
        # little more). It must beat the rest by a margin: a wrong choice costs more than a
        # missed one.
        relative = self.round_cost[LOOKUP] / self.round_cost[1] if LOOKUP in self.round_cost else 1.5
        if lookup and self.lookup_tokens / (relative * base) > 1.1 * best_rate:
            best = LOOKUP
            self.probe_every = PROBE_EVERY
        return best

    def observe(self, k: int, *, accepted: int, verified: int, consulted: bool, student_seconds: float | None,
                seconds: float, rows: int = 1, round_seconds: float | None = None) -> None:
        """One round over `rows` rows: `seconds` of its verify forward (k >= 1) or privileged
        forward (k = 0), `student_seconds` of one student-only forward if it ran one, and
        `round_seconds` of the whole round."""
        self.consulted = _ema(self.consulted, float(consulted))
        if k != 0 and verified:  # a privileged round judges only where a draft can pass: not counted
            self.accept = _ema(self.accept, accepted / verified)
        self.since_lookup = 0 if k == LOOKUP else self.since_lookup + 1
        if k == LOOKUP:  # it judged every token it decided
            self.lookup_tokens = _ema(self.lookup_tokens, verified / rows)
        if k not in self.warmed:
            self.warmed.add(k)
            return
        if k in (1, LOOKUP) and round_seconds is not None:
            self.round_cost[k] = _ema(self.round_cost.get(k), round_seconds)
        if student_seconds is not None:
            self.student_cost = _ema(self.student_cost, student_seconds)
        if k == 0:
            self.privileged_cost = _ema(self.privileged_cost, seconds)
        elif k > 0:  # a lookup round is timed whole (`round_cost`)
            self.verify_cost[k] = _ema(self.verify_cost.get(k), seconds)


def _ema(old: float | None, new: float) -> float:
    return new if old is None else 0.8 * old + 0.2 * new


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens decided by a k-token round when each draft passes with probability `acceptance`."""
    if acceptance >= 1:
        return float(k)
    return (1 - acceptance**k) / (1 - acceptance)

