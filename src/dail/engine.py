"""Draft-and-verify engine for the mixed-policy rollout (the paper's Stage 1).

The algorithm is `dail.rollout`'s token-by-token decoder; this module only changes how the
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
expert's text) a token then costs one forward over half the rows; `_DraftLength` picks these
rounds from the measured costs and the observed share of positions that need the student. The
unmade proposals are not recorded (`Trace.proposal_ids` is None there, in both engines).

A lookup round guesses instead of drafting. Traces repeat themselves and the expert's solution
(numbers, expressions, a line's layout), so the tokens that followed the latest earlier
occurrence of a row's last few tokens, in its privileged prompt or its response, are often the
next ones ("prompt lookup decoding", `_lookup_guesses`). Guesses cost no forward: both roles
read the pending token and up to `GUESSES` guesses in one forward, every position is decided by
the rule from the distributions after the guesses before it, and the round keeps the positions
up to the first guess that is not the token decided before it. A right guess decides one more
token in the same forward; a wrong one costs the slots it took (they become holes).

Every random number comes from `uniform_table` indexed by (sequence, response position): column
r <= retries drives the r-th student proposal at a position, the last column the fallback. A
draft at position t uses table[t][0], exactly what the token-by-token loop uses, so both engines
produce the same traces for the same seeds (up to float noise between differently batched
forwards), whatever the batch size, draft length or batch composition.

Cache layout: one `DynamicCache` over 2n rows (its layers append in place, `_GrowingLayer`),
rows [0, n) the students and [n, 2n) the privileged contexts of the n active sequences. A forward
runs over all rows or over one role's block; both roles always advance by the same number of
slots. A slot a role did not use (the other role's block in a one-role forward, padding in the
verify call) or a discarded draft is a *hole*: its attention-mask entry is 0 and position ids
count valid slots only, so holes change nothing. Holes are squeezed out (`compact`) when they
grow, and whenever sequences finish: finished rows leave the batch and waiting rows are
prefilled and join it (continuous batching), so one long trace does not hold a batch of short
ones. Sliding-window layers (Mistral, Gemma 2 and 3, Qwen2 with a window) keep their whole cache
too, and their masks count the window in valid slots (`dail.engine_window`); a model whose layers
the engine cannot mask (convolution, linear or chunked attention) is decoded token by token.

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

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dail.engine_window import MaskLayout, mask_layout
from dail.rollout import (
    PRIVILEGED,
    STUDENT,
    RolloutSettings,
    Trace,
    accepts,
    left_pad,
    reference_rollout,
    sample_inverse_cdf,
    sampling_distribution,
    uniform_table,
)
from dail.shared_prompts import LayerKV, SharedPrompts

logger = logging.getLogger(__name__)

DRAFT_CANDIDATES = (1, 2, 3, 4, 6, 8)
GUESSES = 4  # tokens a lookup round guesses (see `_lookup_guesses`)
LOOKUP_ORDERS = (2, 4)  # the shortest and longest n-grams a guess is looked up by
# Lookup rounds run on batches of at most this many rows. A forward over GUESSES + 1 tokens of
# each row costs about what a one-token forward does only while the batch is small (on a CPU it
# soon costs several times as much, and a round decides a few tokens at best); it also bounds
# the logits of a lookup round, which are all held at once.
LOOKUP_ROWS = 4
PROBE_EVERY = 16  # rounds after which an unpromising lookup round is first tried again (then 2x, ... 8x)
LOOKUP = -1  # the draft length that stands for a lookup round


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


class _DraftLength:
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


class _GrowingLayer(DynamicLayer):
    """A KV cache layer that appends into spare capacity instead of concatenating.

    `DynamicLayer.update` copies the whole cache on every forward, which at large batch costs as
    much as attention itself. Here `keys`/`values` are views of the first slots of a buffer that
    grows by half when full, so appending q slots copies q slots (amortised), for at most half
    the cache again in spare slots. Assigning new `keys`/`values` (as `_Batch.admit` and
    `compact` do) is allowed: the next update sees they are no longer views of the buffer and
    starts a new one.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fed_rows: slice | None = None  # the rows the next update feeds, if not all (`_Batch.forward`)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        used, new = self.keys.shape[-2], key_states.shape[-2]
        buffers = self._buffers
        if (buffers is None or buffers[0].shape[-2] < used + new
                or self.keys.data_ptr() != buffers[0].data_ptr() or self.keys.shape[0] != buffers[0].shape[0]):
            capacity = used + new + max(64, (used + new) // 2)
            buffers = tuple(old.new_empty((*old.shape[:2], capacity, old.shape[3])) for old in (self.keys, self.values))
            buffers[0][:, :, :used] = self.keys
            buffers[1][:, :, :used] = self.values
            self._buffers = buffers
        fed = self.fed_rows
        if fed is None:
            buffers[0][:, :, used:used + new] = key_states
            buffers[1][:, :, used:used + new] = value_states
        else:
            # The rows not fed get holes: masked, but zeroed, since a masked NaN left in an
            # uninitialised buffer would still reach the attention output (0 * NaN).
            buffers[0][:, :, used:used + new] = 0
            buffers[1][:, :, used:used + new] = 0
            buffers[0][fed, :, used:used + new] = key_states
            buffers[1][fed, :, used:used + new] = value_states
        self.keys, self.values = buffers[0][:, :, :used + new], buffers[1][:, :, :used + new]
        return (self.keys, self.values) if fed is None else (self.keys[fed], self.values[fed])


def _grouped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """`transformers`' SDPA attention for a forward of a few tokens over a grouped-query model's
    KV cache, without copying the cache once per query head in every layer (`repeat_kv`, what
    `transformers` does for masked forwards of more than one token): each key/value head attends
    for its whole group of query heads, (B, H, q, d) -> (B, KVH, H / KVH * q, d), as `transformers`
    itself does for one token."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups == 1 or query.shape[2] == 1 or attention_mask is None or attention_mask.shape[1] != 1
            or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, q, dim = query.shape
    query = query.reshape(batch, heads // groups, groups * q, dim)  # head h = g * groups + r -> (g, r * q + i)
    mask = attention_mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(
        attention_mask.shape[0], 1, groups * q, attention_mask.shape[-1])
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, q, dim).transpose(1, 2).contiguous(), None


GROUPED_SDPA = "dail_grouped_sdpa"
AttentionInterface.register(GROUPED_SDPA, _grouped_sdpa)


class _Batch:
    """Active sequences: a joint KV cache over [students; privileged] with a hole-aware mask."""

    def __init__(self, model: torch.nn.Module, pad_id: int, prompts: Iterable[list[int]] = (),
                 layout: MaskLayout | None = None):
        self.model = model
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.layout = layout or MaskLayout({"full_attention": None})
        # With SDPA the model takes a ready 4D mask as is, which spares it building one from the
        # 2D mask every forward (a noticeable share of a small batch's round). Other attention
        # kernels (flash attention wants 2D masks) get the 2D mask, except where layers slide:
        # from a 2D mask the model would count their window in slots, holes included.
        self.sdpa = getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa"
        self.mask_4d = self.sdpa or self.layout.windowed
        self.cache = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (2n, L)
        self.rows = torch.zeros(0, dtype=torch.long, device=self.device)  # (n,) input index of each sequence
        # (2n,) the token each context has chosen but not yet read: [students; privileged]
        self.pending = torch.zeros(0, dtype=torch.long, device=self.device)
        self.forwards = 0
        self.prefill_seconds = 0.0
        # Every prompt the call's rows will read (minus the pending last token), counted so that
        # an encoding is kept exactly until the last row reading it has joined.
        self.prompts = SharedPrompts(self._encode, (p[:-1] for p in prompts))

    @property
    def size(self) -> int:
        return len(self.rows)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """Feed ids (m, q) whose slots are marked by `valid` (m, q) to `rows` of the joint cache (all
        2n by default, else `self.students` or `self.privileged`); returns logits (m, q, V).

        Rows not fed get q holes, and cost nothing: the model runs over the fed rows only.
        """
        valid = valid.long()
        if rows is None:
            positions = self.mask.sum(-1, keepdim=True) + valid.cumsum(-1) - 1
            self.mask = mask = torch.cat([self.mask, valid], dim=-1)
        else:
            positions = self.mask[rows].sum(-1, keepdim=True) + valid.cumsum(-1) - 1
            fed, valid = valid, self.mask.new_zeros((self.mask.shape[0], ids.shape[1]))
            valid[rows] = fed
            self.mask = torch.cat([self.mask, valid], dim=-1)
            mask = self.mask[rows]
            for layer in self.cache.layers:
                layer.fed_rows = rows
        attention = self.layout.masks(mask, ids.shape[1], self.dtype) if self.mask_4d else mask
        grouped = self.sdpa and ids.shape[1] > 1  # a ready 4D mask: no mask is built for the name
        if grouped:
            self.model.config._attn_implementation = GROUPED_SDPA
        try:
            out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions.clamp(min=0),
                             past_key_values=self.cache, use_cache=True)
        finally:
            if grouped:
                self.model.config._attn_implementation = "sdpa"
            if rows is not None:
                for layer in self.cache.layers:
                    layer.fed_rows = None
        self.cache = out.past_key_values
        self.forwards += 1
        return out.logits.float()

    @property
    def students(self) -> slice:
        return slice(0, self.size)

    @property
    def privileged(self) -> slice:
        return slice(self.size, 2 * self.size)

    # ------------------------------------------------------------------ membership

    def _encode(self, bodies: list[list[int]], prefix: tuple[LayerKV, torch.Tensor] | None = None
                ) -> tuple[LayerKV, torch.Tensor]:
        """Run the model over left-padded prompt bodies, after `prefix` (keys and values with their
        mask) if given; returns per-layer (keys, values) and the mask, the prefix's included."""
        width = max(1, max(len(b) for b in bodies))
        ids = torch.full((len(bodies), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, body in enumerate(bodies):
            if body:
                ids[i, width - len(body):] = torch.tensor(body, dtype=torch.long)
                mask[i, width - len(body):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = None
        if prefix is not None:
            cache = DynamicCache()
            cache.layers = [_GrowingLayer(keys, values) for keys, values in prefix[0]]
            mask = torch.cat([prefix[1], mask], dim=-1)
        positions = (mask.cumsum(-1)[:, -width:] - 1).clamp(min=0)
        attention = mask
        if self.layout.windowed:  # the model's own cache would drop the slots that left a window
            attention = self.layout.masks(mask, width, self.dtype)
            cache = cache if cache is not None else DynamicCache()
        tic = _clock(self.device)
        out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        self.prefill_seconds += _clock(self.device) - tic
        self.forwards += 1
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers], mask

    def admit(self, rows: list[int], student: list[list[int]], privileged: list[list[int]]) -> None:
        """Prefill `rows` and join them to the batch.

        Prompts minus their last token (it stays pending) are encoded; rows that read the same
        prompt share one encoding, and a student prompt continues its privileged prompt's opening
        (`SharedPrompts`).
        """
        n, m = self.size, len(rows)
        both, both_mask = self.prompts.rows([student[i][:-1] for i in rows] + [privileged[i][:-1] for i in rows])
        s_kv, p_kv = [(k[:m], v[:m]) for k, v in both], [(k[m:], v[m:]) for k, v in both]
        s_mask, p_mask = both_mask[:m], both_mask[m:]
        pending = torch.tensor([student[i][-1] for i in rows] + [privileged[i][-1] for i in rows],
                               dtype=torch.long, device=self.device)
        if self.cache is None:
            parts_kv, parts_mask = [s_kv, p_kv], [s_mask, p_mask]
            old_pending = [self.pending[:0], pending[:m], self.pending[:0], pending[m:]]
        else:
            old = [(layer.keys, layer.values) for layer in self.cache.layers]
            parts_kv = [[(k[:n], v[:n]) for k, v in old], s_kv, [(k[n:], v[n:]) for k, v in old], p_kv]
            parts_mask = [self.mask[:n], s_mask, self.mask[n:], p_mask]
            old_pending = [self.pending[:n], pending[:m], self.pending[n:], pending[m:]]
        width = max(mask.shape[1] for mask in parts_mask)
        cache = DynamicCache()
        cache.layers = [
            _GrowingLayer(torch.cat([F.pad(part[layer][0], (0, 0, width - part[layer][0].shape[2], 0))
                                     for part in parts_kv]),
                          torch.cat([F.pad(part[layer][1], (0, 0, width - part[layer][1].shape[2], 0))
                                     for part in parts_kv]))
            for layer in range(len(s_kv))]
        self.cache = cache
        self.mask = torch.cat([F.pad(mask, (width - mask.shape[1], 0)) for mask in parts_mask])
        self.rows = torch.cat([self.rows, torch.tensor(rows, dtype=torch.long, device=self.device)])
        self.pending = torch.cat(old_pending)  # (2n,): [students; privileged]

    def compact(self, keep: torch.Tensor | None = None) -> None:
        """Keep the sequences where `keep` (n,) is True and squeeze out every hole."""
        n = self.size
        keep_rows = torch.arange(n, device=self.device) if keep is None else torch.nonzero(keep).flatten()
        joint = torch.cat([keep_rows, keep_rows + n])
        mask = self.mask[joint]
        # A stable sort of the 0/1 mask moves holes to the left and keeps valid slots in order.
        order = torch.sort(mask, dim=-1, stable=True).indices
        width = max(1, int(mask.sum(-1).max())) if mask.numel() else 1
        order = order[:, -width:]
        self.mask = mask.gather(-1, order)
        for layer in self.cache.layers:
            heads, dim = layer.keys.shape[1], layer.keys.shape[3]
            index = order[:, None, :, None].expand(-1, heads, -1, dim)
            layer.keys = layer.keys[joint].gather(2, index)
            layer.values = layer.values[joint].gather(2, index)
        self.rows = self.rows[keep_rows]
        self.pending = self.pending[joint]
        if not self.size:
            self.cache = None
            self.mask = self.mask[:0, :0]

    @property
    def hole_fraction(self) -> float:
        if self.mask.numel() == 0:
            return 0.0
        return 1.0 - float(self.mask.sum(-1).max()) / self.mask.shape[1]


def _clock(device: torch.device) -> float:
    """Host seconds once the device's queued work is done: on a GPU, reading the clock without
    synchronising would time the kernels' launches, and the draft length would be chosen on them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


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
    """`dail.rollout.mixed_rollout` by draft and verify, with continuous batching.

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
    batch = _Batch(model, pad_id, prompts=student_prompts + privileged_prompts, layout=layout)
    device = batch.device
    uniforms = uniform_table(seeds, settings, device)  # (N, budget, retries + 2)
    eos = torch.tensor(settings.eos_ids or [-1], device=device)
    draft = _DraftLength(settings.draft_length, max_length=budget)
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
        began = _clock(device)
        n = batch.size
        rows = batch.rows
        t0 = length[rows]  # (n,) response position of the first token decided this round
        lookup = lag == 0 and n <= LOOKUP_ROWS
        k = draft.choose(budget, lookup=lookup)
        if k > 1:  # no draft runs past the budget of every row
            k = draft.choose(int((budget - t0).max()))
        if k == LOOKUP:  # guesses first: the round is as wide as the longest row's guesses
            guesses, exists = _lookup_guesses(text[rows], start + t0, GUESSES, pad_id)
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
            scores = _lookup_forwards(batch, guesses, exists)
            chosen, accepted, proposal, proposal_prob, first_ok, judged = _judge_guesses(
                scores, guesses, exists, table, settings)
        else:
            if k == 0:
                scores = _privileged_forwards(batch, feed, table, settings)
            else:
                scores = _draft_forwards(batch, k, feed, lagging, table, settings, pad_id)
            chosen, accepted, proposal, proposal_prob, first_ok, judged = _judge(scores, table, settings)
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
        # position iff a proposal is recorded there (`_judge`). A lookup round checks a row's
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
                      round_seconds=_clock(device) - began)

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


@dataclass
class _Scores:
    """What a round's forwards computed, for `_judge`."""

    privileged_logits: torch.Tensor  # (n, k, V): the privileged distributions at the round's positions
    log_z: torch.Tensor  # (n, k): their log normalisers
    # The verify forward, or a privileged round's privileged forward (0: a lookup round, timed whole).
    seconds: float
    student_logits: list[torch.Tensor] = field(default_factory=list)  # (n, V) per draft, or per lookup position
    drafts: list[torch.Tensor] = field(default_factory=list)  # (n,) per draft; none if the student did not run
    student_seconds: float | None = None  # one forward over the student rows, if one ran


def _privileged_forwards(batch: _Batch, student_feed: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                         table: torch.Tensor, settings: RolloutSettings) -> _Scores:
    """A privileged round (k = 0): the privileged rows read their pending token alone; the
    students run (reading all they have not read) only if some row has a token that can pass
    tau. Elsewhere a proposal could not be accepted, so none is made."""
    n, device = batch.size, batch.device
    tic = _clock(device)
    logits = batch.forward(batch.pending[n:, None], batch.mask.new_ones((n, 1), dtype=torch.bool),
                           batch.privileged)  # (n, 1, V)
    seconds = _clock(device) - tic
    log_z = torch.logsumexp(logits, dim=-1)
    scores = _Scores(logits, log_z, seconds)
    if _askable(logits, log_z, settings.tau).any():
        tic = _clock(device)
        student = batch.forward(*student_feed(), batch.students)[:, -1]
        scores.student_seconds = _clock(device) - tic
        scores.student_logits.append(student)
        scores.drafts.append(_propose(student, table[:, 0, 0], settings))
    return scores


def _draft_forwards(batch: _Batch, k: int, student_feed: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                    lagging: bool, table: torch.Tensor, settings: RolloutSettings, pad_id: int) -> _Scores:
    """Steps 1 and 2 of a round of k >= 1 drafts (see the module docstring)."""
    n, device = batch.size, batch.device
    student_logits, drafts = [], []
    # 1. Draft: the student proposes k - 1 tokens over its own rows; its first forward reads all
    # it has not read.
    tic = _clock(device)
    if k > 1 or lagging:
        ids, valid = student_feed()
    for j in range(k - 1):
        logits = batch.forward(ids, valid, batch.students)[:, -1]  # (n, V)
        student_logits.append(logits)
        drafts.append(_propose(logits, table[:, j, 0], settings))
        ids, valid = drafts[-1][:, None], batch.mask.new_ones((n, 1), dtype=torch.bool)
    student_seconds = (_clock(device) - tic) / (k - 1) if k > 1 else None

    # 2. Verify: privileged rows read [pending, d_0..d_{k-2}]; student rows read their last
    # input (d_{k-2}, or for k = 1 what they have not read), right-aligned.
    tic = _clock(device)
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
    drafts.append(_propose(logits[:n, -1], table[:, k - 1, 0], settings))
    seconds = _clock(device) - tic
    privileged_logits = logits[n:, -k:]  # (n, k, V): row j scores draft j
    log_z = torch.logsumexp(privileged_logits, dim=-1)
    return _Scores(privileged_logits, log_z, seconds, student_logits, drafts, student_seconds)


def _judge(scores: _Scores, table: torch.Tensor, settings: RolloutSettings) -> tuple[torch.Tensor, ...]:
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
    raw = _raw_probs(logits, log_z, drafted)
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
    chosen[at], accepted[at], proposal[at], proposal_prob[at] = _settle(
        student[at], logits[at], log_z[at], drafted[at], raw[at], table[at], settings)
    return chosen, accepted, proposal, proposal_prob, ok, judged


def _settle(student_logits: torch.Tensor, privileged_logits: torch.Tensor, log_z: torch.Tensor,
            first: torch.Tensor, first_prob: torch.Tensor, uniforms: torch.Tensor,
            settings: RolloutSettings) -> tuple[torch.Tensor, ...]:
    """Positions (r,) whose first proposal failed: `_decide`, and where no token could pass tau
    the proposal is not recorded, as where it was never computed. Returns (chosen, accepted,
    proposal, proposal_prob)."""
    chosen, proposal, prob, accepted = _decide(student_logits, privileged_logits, first, first_prob, uniforms,
                                               settings)
    unasked = ~_askable(privileged_logits, log_z, settings.tau)
    return chosen, accepted, proposal.masked_fill(unasked, -1), prob.masked_fill(unasked, float("nan"))


def _lookup_guesses(text: torch.Tensor, ends: torch.Tensor, count: int, pad_id: int,
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


def _lookup_forwards(batch: _Batch, guesses: torch.Tensor, exists: torch.Tensor) -> _Scores:
    """A lookup round (every student caught up): both roles read the pending token and the
    guesses in one forward, which gives both distributions at every guessed position."""
    n = batch.size
    ids = torch.cat([batch.pending[:n, None], guesses], dim=-1)  # (n, 1 + g); both roles' pending agree
    valid = torch.cat([exists.new_ones((n, 1)), exists], dim=-1)
    logits = batch.forward(ids.repeat(2, 1), valid.repeat(2, 1))  # (2n, 1 + g, V)
    privileged = logits[n:]
    # Timed as a whole round (`_DraftLength.round_cost`), with the search and the decisions.
    return _Scores(privileged, torch.logsumexp(privileged, dim=-1), 0.0, list(logits[:n].unbind(1)))


def _judge_guesses(scores: _Scores, guesses: torch.Tensor, exists: torch.Tensor, table: torch.Tensor,
                   settings: RolloutSettings) -> tuple[torch.Tensor, ...]:
    """A lookup round's decisions, as `_judge` returns them. Every position is decided by the
    rule (the student's proposal, retries, the fallback), each from the distributions after the
    guesses before it; position j + 1 counts only if the token decided at j is guess j, the
    token both roles read there."""
    logits, log_z = scores.privileged_logits, scores.log_z  # (n, q, V), (n, q)
    student = torch.stack(scores.student_logits, dim=1)  # (n, q, V)
    n, q = log_z.shape
    proposal = _propose(student.flatten(0, 1), table[..., 0].flatten(), settings).view(n, q)
    raw = _raw_probs(logits, log_z, proposal)
    ok = accepts(raw, settings.tau)
    chosen, accepted, proposal_prob = proposal.clone(), ok.clone(), raw.clone()
    at = torch.nonzero(~ok, as_tuple=True)
    if at[0].numel():
        chosen[at], accepted[at], proposal[at], proposal_prob[at] = _settle(
            student[at], logits[at], log_z[at], proposal[at], raw[at], table[at], settings)
    right = (chosen[:, :-1] == guesses) & exists  # (n, g)
    judged = 1 + right.long().cumprod(-1).sum(-1)
    return chosen, accepted, proposal, proposal_prob, ok, judged


def _raw_probs(privileged_logits: torch.Tensor, log_z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The raw (untempered) privileged probability of each id: (..., V), (...), (...) -> (...)."""
    return (privileged_logits.gather(-1, ids[..., None]).squeeze(-1) - log_z).exp()


def _askable(privileged_logits: torch.Tensor, log_z: torch.Tensor, tau: float) -> torch.Tensor:
    """Where some token has a raw privileged probability that passes tau: (..., V) -> (...) bool.
    Elsewhere every proposal is rejected, so the student need not make one."""
    return accepts((privileged_logits.amax(-1) - log_z).exp(), tau)


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
    # -1 marks a position whose proposal was not recorded (see `_judge`).
    ids = proposals[:length].tolist()
    trace.proposal_ids = [None if t < 0 else t for t in ids]
    trace.proposal_probs = [None if t < 0 else p for t, p in zip(ids, probs[:length].tolist(), strict=True)]
    trace.finished = finished


def _propose(student_logits: torch.Tensor, uniforms: torch.Tensor, settings: RolloutSettings) -> torch.Tensor:
    """The student's first proposal at a position: (n, V) logits, (n,) uniforms -> (n,) ids."""
    return sample_inverse_cdf(sampling_distribution(student_logits, settings), uniforms)


def _decide(
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
        (chosen, proposal, proposal_prob, accepted), each (r,), as `rollout._choose` records them.
    """
    proposal, proposal_prob = first, first_prob
    accepted = torch.zeros_like(first, dtype=torch.bool)
    if settings.retries:
        dist = sampling_distribution(student_logits, settings)
        log_z = torch.logsumexp(privileged_logits, dim=-1)
        for r in range(1, settings.retries + 1):
            candidate = sample_inverse_cdf(dist, uniforms[:, r])
            prob = _raw_probs(privileged_logits, log_z, candidate)
            undecided = ~accepted
            proposal = torch.where(undecided, candidate, proposal)
            proposal_prob = torch.where(undecided, prob, proposal_prob)
            accepted = accepted | accepts(prob, settings.tau)
    fallback = sample_inverse_cdf(sampling_distribution(privileged_logits, settings), uniforms[:, -1])
    return torch.where(accepted, proposal, fallback), proposal, proposal_prob, accepted


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens decided by a k-token round when each draft passes with probability `acceptance`."""
    if acceptance >= 1:
        return float(k)
    return (1 - acceptance**k) / (1 - acceptance)


__all__ = ["EngineStats", "draft_rollout", "expected_tokens"]
