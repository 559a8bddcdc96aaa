"""The mixed-policy rule (the paper's Stage 1), its settings and its sampling.

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

Randomness comes from one table of uniforms per sequence, indexed by response position
(`uniform_table`), so a trace depends on its own seed only, not on the batch it shares or on
how the positions are scheduled (`dail.rollout.token_loop`, `dail.rollout.engine`).
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
        engine: "draft" (`dail.rollout.engine`: draft and verify, continuous batching; the default,
            faster than the token-by-token loop on the 134M model at every batch size in
            `make bench`) or "reference" (the token-by-token loop, `dail.rollout.token_loop`).
            Both give the same traces for the same seeds, up to float noise between differently
            batched forwards.
        draft_length: Draft tokens per round for the "draft" engine; 0 adapts it to the
            observed acceptance rate and measured forward costs, and allows privileged rounds
            (the student skipped where no proposal could pass) and lookup rounds (guessed
            tokens checked in one forward; both in `dail.rollout.engine`).
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



def choose(
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

