"""The token-by-token loop: one forward over both contexts per token (`engine="reference"`),
and plain sampling from one context (evaluation, direct sampling).

One set of weights serves both roles; both contexts run in one batched forward
call per token (rows [0, B) student, [B, 2B) privileged) with KV caches, so no context is ever
re-encoded. Randomness comes from one generator per sequence, so a trace depends on its own seed
only, not on the batch it shares.
"""

from __future__ import annotations

import torch

from dail.models import returned_cache, with_cache
from dail.rollout.rule import (
    PRIVILEGED,
    STUDENT,
    RolloutSettings,
    Trace,
    accepts,
    choose,
    sample_inverse_cdf,
    sampling_distribution,
    uniform_table,
)


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
        self.cache = returned_cache(out)
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
                         position_ids=self.positions, **with_cache(self.model, self.cache), use_cache=True)
        self.cache = returned_cache(out)
        self.logits = out.logits[:, -1, :].float()



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
        chosen, proposal, proposal_prob, accepted = choose(
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
