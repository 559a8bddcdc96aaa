"""The mixed-policy decoder (the paper's Stage 1).

At every step the student (problem-only context) proposes a token y from its sampling
distribution; if the privileged student (problem + expert solution) gives y a raw probability
>= tau, y is accepted, otherwise the privileged student samples the token itself. Both contexts
then receive the chosen token.

Faithful details:
- The acceptance test uses the privileged model's untempered, unfiltered probability over the
  full vocabulary (the release reads raw log-probabilities; we do not truncate to a top-k).
- Proposals and fallbacks use the sampling settings (temperature, top-p, top-k).
- tau = 0 accepts every proposal (pure student); tau = 1 never accepts (pure privileged
  sampling, the "direct sampling" ablation). Both are special-cased as in the release.
- `retries` extra proposals are tried before falling back (the release's optional 5).

Engineering: one set of weights serves both roles; both contexts run in one batched forward
call per token (rows [0, B) student, [B, 2B) privileged) with KV caches, so no context is ever
re-encoded. Randomness comes from one generator per sequence, so a trace depends on its own seed
only, not on the batch it shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STUDENT, PRIVILEGED = "S", "P"


@dataclass(frozen=True)
class RolloutSettings:
    """Settings of one mixed rollout.

    Attributes:
        tau: Acceptance threshold in [0, 1].
        retries: Extra student proposals before falling back.
        temperature / top_p / top_k: Sampling settings for proposals and fallbacks
            (temperature 0 = greedy).
        max_new_tokens: Token budget per trace.
        eos_ids: Tokens that end a trace (kept as its last token).
        suppress_ids: Tokens never sampled (e.g. </think> for reasoning models).
        engine: "draft" (`dail.engine`: draft and verify, continuous batching; the default,
            faster than the token-by-token loop on the 134M model at every batch size in
            `make bench`) or "reference" (the token-by-token loop below). Both give the same
            traces for the same seeds, up to float noise between differently batched forwards.
        draft_length: Draft tokens per round for the "draft" engine; 0 adapts it to the
            observed acceptance rate and measured forward costs, and allows privileged rounds
            (the student skipped where no proposal could pass) and lookup rounds (guessed
            tokens checked in one forward; both in `dail.engine`).
        max_batch: Sequences decoded at once by the "draft" engine (0 = all); the others wait
            and join as sequences finish.
    """

    tau: float = 0.8
    retries: int = 0
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 2048
    eos_ids: tuple[int, ...] = ()
    suppress_ids: tuple[int, ...] = ()
    engine: str = "draft"
    draft_length: int = 0
    max_batch: int = 0

    def __post_init__(self) -> None:
        if self.engine not in ("draft", "reference"):
            raise ValueError(f"engine must be 'draft' or 'reference', not {self.engine!r}")
        if self.draft_length < 0 or self.max_batch < 0:
            raise ValueError("draft_length and max_batch must be >= 0 (0 = adaptive / all rows)")


@dataclass
class Trace:
    """One generated response with per-token provenance.

    `proposal_ids[t]` is the student's proposal at position t (the accepted one, or the last
    rejected one) and `proposal_probs[t]` its raw privileged probability. Both are None where
    no token had a raw privileged probability >= tau: no proposal could pass there, so the draft
    engine does not compute one. Both lists are empty at tau 1 (the student never runs).
    """

    token_ids: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    proposal_ids: list[int | None] = field(default_factory=list)
    proposal_probs: list[float | None] = field(default_factory=list)
    finished: bool = False

    @property
    def acceptance_rate(self) -> float:
        return self.sources.count(STUDENT) / len(self.sources) if self.sources else 0.0


# --------------------------------------------------------------------------- sampling helpers


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Sampling distribution after temperature, top-k and top-p. (N, V) float -> (N, V)."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        probs = probs.masked_fill(~nucleus(probs, top_p), 0.0)
    return probs


def nucleus(probs: torch.Tensor, top_p: float, *, first: int = 64) -> torch.Tensor:
    """Mask (N, V) of the top-p nucleus: a token stays unless the mass before it reaches top_p.

    Sorting the whole vocabulary every step is the costliest part of sampling, and the nucleus
    of a language model is usually small: rows whose `first` most likely tokens already hold
    top_p are decided from a top-k, and only the others are sorted in full.
    """
    k = min(first, probs.shape[-1])
    top, order = torch.topk(probs, k, dim=-1)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, (top.cumsum(-1) - top) < top_p)
    wide = torch.nonzero(top.sum(-1) < top_p).flatten()
    if len(wide):
        sorted_probs, full_order = torch.sort(probs[wide], dim=-1, descending=True)
        stays = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
        keep[wide] = torch.zeros_like(stays).scatter(-1, full_order, stays)
    return keep


def sampling_distribution(logits: torch.Tensor, settings: RolloutSettings) -> torch.Tensor:
    """A role's sampling distribution: suppressed tokens removed, then temperature, top-k, top-p."""
    if settings.suppress_ids:
        logits = logits.clone()
        logits[:, list(settings.suppress_ids)] = float("-inf")
    return sampling_probs(logits, settings.temperature, settings.top_p, settings.top_k)


def accepts(prob: torch.Tensor, tau: float) -> torch.Tensor:
    """The acceptance test, with the release's special cases: tau 0 always, tau 1 never."""
    if tau <= 0:
        return torch.ones_like(prob, dtype=torch.bool)
    if tau >= 1:
        return torch.zeros_like(prob, dtype=torch.bool)
    return prob >= tau


def sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from (unnormalised) `probs` (N, V) with uniforms (N,) in [0, 1)."""
    cdf = probs.cumsum(-1)
    targets = uniforms.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    # right=True: the first index whose cdf exceeds the target, so zero-probability tokens are
    # never drawn.
    idx = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def sequence_seed(seed: int, key: str) -> int:
    """A stable 63-bit seed for one sequence, independent of batching and sharding."""
    import hashlib

    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def uniform_table(seeds: list[int], settings: RolloutSettings, device: torch.device) -> torch.Tensor:
    """Every random number a sequence may use, indexed by position: (N, max_new_tokens, draws).

    Column r < retries + 1 drives the r-th student proposal at a position, the last column the
    privileged fallback. Tying draws to positions (not to calls) makes a trace a function of its
    seed alone, whatever the batch it shares or the order in which positions are decided.
    """
    draws = settings.retries + 2
    rows = [torch.rand((settings.max_new_tokens, draws), generator=torch.Generator().manual_seed(s))
            for s in seeds]
    return torch.stack(rows).to(device)


# --------------------------------------------------------------------------- batched decoding


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids (N, L) and attention mask (N, L)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[i, length - len(seq):] = 1
    return ids.to(device), mask.to(device)


def distinct_prompts(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct prompts in first-seen order, and for each row the index of its own among them."""
    first: dict[tuple[int, ...], int] = {}
    index = [first.setdefault(tuple(p), len(first)) for p in prompts]
    return [list(p) for p in first], index


class _Decoder:
    """A batch of contexts advanced one token per step over a shared KV cache."""

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], pad_id: int):
        self.model = model
        device = next(model.parameters()).device
        # Samples of one problem share their prompt: encode each distinct prompt once and give
        # every row a copy of its keys and values.
        distinct, index = distinct_prompts(prompts)
        ids, mask = left_pad(distinct, pad_id, device)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        if len(distinct) < len(prompts):
            index = torch.tensor(index, device=device)
            self.cache.reorder_cache(index)
            mask, positions, logits = mask[index], positions[index], logits[index]
        self.mask, self.logits = mask, logits  # (N, L), (N, V)
        self.positions = positions[:, -1:]

    def step(self, tokens: torch.Tensor) -> None:
        """Append `tokens` (N,) to every context and compute the next logits."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
        self.positions = self.positions + 1
        out = self.model(input_ids=tokens.unsqueeze(-1), attention_mask=self.mask,
                         position_ids=self.positions, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.logits = out.logits[:, -1, :].float()


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
        (`dail.engine.draft_rollout` or `reference_rollout`), never what is sampled.
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
        from dail.engine import draft_rollout

        return draft_rollout(model, student_prompts, privileged_prompts, seeds, settings, pad_id=pad_id)
    return reference_rollout(model, student_prompts, privileged_prompts, seeds, settings, pad_id=pad_id)


@torch.inference_mode()
def reference_rollout(
    model: torch.nn.Module,
    student_prompts: list[list[int]],
    privileged_prompts: list[list[int]],
    seeds: list[int],
    settings: RolloutSettings,
    *,
    pad_id: int,
) -> list[Trace]:
    """The token-by-token loop: one forward over both contexts per token (`engine="reference"`)."""
    batch = len(seeds)
    decoder = _Decoder(model, student_prompts + privileged_prompts, pad_id)
    device = decoder.logits.device
    uniforms_at = uniform_table(seeds, settings, device)  # (B, max_new_tokens, draws)
    eos = torch.tensor(settings.eos_ids or [-1], device=device)
    traces = [Trace() for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)

    for step in range(settings.max_new_tokens):
        student_logits, privileged_logits = decoder.logits[:batch], decoder.logits[batch:]
        # The acceptance test reads the raw distribution: no temperature, no filtering.
        privileged_raw = torch.softmax(privileged_logits, dim=-1)  # (B, V)
        chosen, proposal, proposal_prob, accepted = _choose(
            sampling_distribution(student_logits, settings), sampling_distribution(privileged_logits, settings),
            privileged_raw, uniforms_at[:, step], settings)
        # Where no token can pass tau the student's proposal does not matter: not recorded.
        asked = accepts(privileged_raw.amax(-1), settings.tau).tolist()

        # One device-to-host copy per field and step, not one per row and field.
        tokens, oks, proposed, probs = chosen.tolist(), accepted.tolist(), proposal.tolist(), proposal_prob.tolist()
        for i in torch.nonzero(~done).flatten().tolist():
            trace = traces[i]
            trace.token_ids.append(tokens[i])
            trace.sources.append(STUDENT if oks[i] else PRIVILEGED)
            trace.proposal_ids.append(proposed[i] if asked[i] else None)
            trace.proposal_probs.append(probs[i] if asked[i] else None)
        done = _mark_finished(traces, chosen, eos, done)
        if bool(done.all()):
            break
        decoder.step(torch.cat([chosen, chosen]))
    return traces


def _mark_finished(traces: list[Trace], chosen: torch.Tensor, eos: torch.Tensor,
                   done: torch.Tensor) -> torch.Tensor:
    """Flag the traces whose chosen token ends them; returns the updated (B,) done mask."""
    finished_now = torch.isin(chosen, eos) & ~done
    for i in torch.nonzero(finished_now).flatten().tolist():
        traces[i].finished = True
    return done | finished_now


def _choose(
    student_dist: torch.Tensor,
    privileged_dist: torch.Tensor,
    privileged_raw: torch.Tensor,
    uniforms: torch.Tensor,
    settings: RolloutSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One mixed-policy step for a batch. Returns (chosen, proposal, proposal_prob, accepted)."""
    batch = student_dist.shape[0]
    accepted = torch.zeros(batch, dtype=torch.bool, device=student_dist.device)
    proposal = torch.zeros(batch, dtype=torch.long, device=student_dist.device)
    proposal_prob = torch.zeros(batch, dtype=privileged_raw.dtype, device=student_dist.device)
    for r in range(settings.retries + 1):
        candidate = sample_inverse_cdf(student_dist, uniforms[:, r])
        prob = privileged_raw.gather(-1, candidate.unsqueeze(-1)).squeeze(-1)
        ok = accepts(prob, settings.tau)
        # Rows still undecided take this proposal (kept as the record if every try fails).
        undecided = ~accepted
        proposal = torch.where(undecided, candidate, proposal)
        proposal_prob = torch.where(undecided, prob, proposal_prob)
        accepted = accepted | ok
    fallback = sample_inverse_cdf(privileged_dist, uniforms[:, -1])
    chosen = torch.where(accepted, proposal, fallback)
    return chosen, proposal, proposal_prob, accepted


@torch.inference_mode()
def sample_responses(
    model: torch.nn.Module,
    prompts: list[list[int]],
    seeds: list[int],
    settings: RolloutSettings,
    *,
    pad_id: int,
    draw: int = 0,
    source: str = STUDENT,
) -> list[Trace]:
    """Plain sampling from one context per row (evaluation, direct sampling).

    Uses the same per-sequence random numbers as `mixed_rollout`, so results do not depend on
    batching: `draw` 0 is the first student proposal's column (tau 0 there gives these samples),
    -1 the privileged fallback's (tau 1). `settings.tau` and `settings.retries` are ignored.
    """
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have equal lengths")
    decoder = _Decoder(model, prompts, pad_id)
    device = decoder.logits.device
    uniforms_at = uniform_table(seeds, settings, device)
    eos = torch.tensor(settings.eos_ids or [-1], device=device)
    traces = [Trace() for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(settings.max_new_tokens):
        dist = sampling_distribution(decoder.logits, settings)
        chosen = sample_inverse_cdf(dist, uniforms_at[:, step, draw])
        tokens = chosen.tolist()
        for i in torch.nonzero(~done).flatten().tolist():
            traces[i].token_ids.append(tokens[i])
            traces[i].sources.append(source)
        done = _mark_finished(traces, chosen, eos, done)
        if bool(done.all()):
            break
        decoder.step(chosen)
    return traces
