"""The mixed-policy rule inside vLLM's sampler.

vLLM calls `DailLogitsProcessor.apply` once per engine step with the logits of every request
that samples in that step, one row each (float32, the model's raw output). Requests that carry
`extra_args["dail"]` get their token decided here and forced (every other logit set to -inf, and
the request sampled greedily), so vLLM's own sampler never draws: the randomness is the
built-in engine's per-position table (`rule.uniform_table`), and a trace depends on its seed
alone.

A mixed trace is two requests of one `pair` key, the student's context ("S") and the privileged
one ("P"). Both must sample in the same engine step at the same position, which the driver
arranges (`rollout.mixed_rollout`: one batch admitted at once, no chunked prefill, room in the
KV cache for all of it); a pair found out of step is an error, never a silently wrong trace.
The per-token record of a pair (sources, proposals and their privileged probabilities) is kept
in this module until the driver takes it (`take_records`, through `collective_rpc`, so it works
whichever process runs the sampler).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from dail.rollout.rule import (
    PRIVILEGED,
    STUDENT,
    RolloutSettings,
    accepts,
    choose,
    sample_inverse_cdf,
    sampling_distribution,
    uniform_table,
)

EXTRA_ARGS_KEY = "dail"
SAMPLE = "sample"


class PairOutOfStepError(RuntimeError):
    """The two contexts of a mixed trace did not sample together."""


@dataclass
class PairRecord:
    """What a mixed trace's tokens cannot tell: who wrote each one and what the student proposed."""

    sources: list[str] = field(default_factory=list)
    proposal_ids: list[int | None] = field(default_factory=list)
    proposal_probs: list[float | None] = field(default_factory=list)


# Records of finished and running pairs by key, in the process that runs the sampler.
_RECORDS: dict[str, PairRecord] = {}
# Seconds spent deciding tokens in this process (`bench/vllm_backend.py` reads it).
DECIDING_SECONDS = [0.0]


def take_records(_worker: Any, keys: list[str]) -> dict[str, dict[str, list]]:
    """The records of these pairs, removed from this process (run on each worker by
    `collective_rpc`; workers that do not sample return nothing)."""
    return {k: vars(_RECORDS.pop(k)) for k in keys if k in _RECORDS}


def request_args(*, role: str, key: str, seed: int, settings: RolloutSettings, draw: int = 0) -> dict[str, Any]:
    """The `SamplingParams.extra_args` that hand a request to the processor."""
    fields = {name: list(value) if isinstance(value, tuple) else value
              for name, value in vars(settings).items()}
    return {EXTRA_ARGS_KEY: {"role": role, "key": key, "seed": seed, "draw": draw, "settings": fields}}


@dataclass
class _Row:
    role: str  # SAMPLE, STUDENT or PRIVILEGED
    key: str
    draw: int
    settings: RolloutSettings
    uniforms: torch.Tensor  # (max_new_tokens, draws), on the CPU
    output: list[int]  # vLLM's running list of the request's output tokens

    @property
    def position(self) -> int:
        return len(self.output)


def _row(spec: dict[str, Any], output: list[int]) -> _Row:
    values = dict(spec["settings"])
    for name in ("eos_ids", "suppress_ids"):
        values[name] = tuple(values[name])
    settings = RolloutSettings(**values)
    uniforms = uniform_table([spec["seed"]], settings, torch.device("cpu"))[0]
    return _Row(spec["role"], spec["key"], spec["draw"], settings, uniforms, output)


class DailLogitsProcessor(LogitsProcessor):
    """Decides the token of every request handed to it (see the module's docstring)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        self.rows: dict[int, _Row] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it picks the token: greedy requests must see it too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output in batch_update.added:
            spec = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
            if spec is None:
                self.rows.pop(index, None)
                continue
            self.rows[index] = _row(spec, output)
            if spec["role"] != SAMPLE:
                _RECORDS.setdefault(spec["key"], PairRecord())
        for a, b, direction in batch_update.moved:
            first, second = self.rows.pop(a, None), self.rows.pop(b, None)
            if first is not None:
                self.rows[b] = first
            if direction == MoveDirectionality.SWAP and second is not None:
                self.rows[a] = second

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        started = time.perf_counter()
        logits = self._decide(logits)
        DECIDING_SECONDS[0] += time.perf_counter() - started
        return logits

    def _decide(self, logits: torch.Tensor) -> torch.Tensor:
        samples: dict[tuple, list[int]] = defaultdict(list)
        pairs: dict[str, dict[str, int]] = defaultdict(dict)
        for index, row in self.rows.items():
            if row.role == SAMPLE:
                samples[(row.settings, row.draw)].append(index)
            else:
                pairs[row.key][row.role] = index
        indices, tokens = [], []
        for (settings, draw), rows in samples.items():
            uniforms = self._uniforms(rows, draw)
            dist = sampling_distribution(logits[rows], settings)
            indices += rows
            tokens.append(sample_inverse_cdf(dist, uniforms))
        for settings, group in self._pair_groups(pairs).items():
            students, privileged = [s for s, _ in group], [p for _, p in group]
            indices += students + privileged
            chosen = self._decide_pairs(logits, students, privileged, settings)
            tokens += [chosen, chosen]
        if indices:
            rows = torch.tensor(indices, device=logits.device)
            forced = torch.cat(tokens).to(logits.device)
            logits[rows] = float("-inf")
            logits[rows, forced] = 0.0
        return logits

    def _uniforms(self, rows: list[int], draw: int) -> torch.Tensor:
        return torch.stack([self.rows[i].uniforms[self.rows[i].position, draw] for i in rows])

    def _pair_groups(self, pairs: dict[str, dict[str, int]]) -> dict[RolloutSettings, list[tuple[int, int]]]:
        """(student row, privileged row) of every pair by settings; a pair must be in step."""
        groups: dict[RolloutSettings, list[tuple[int, int]]] = defaultdict(list)
        for key, roles in pairs.items():
            student, privileged = roles.get(STUDENT), roles.get(PRIVILEGED)
            if student is None or privileged is None:
                raise PairOutOfStepError(
                    f"mixed trace {key}: only its {'student' if privileged is None else 'privileged'} "
                    f"context samples in this engine step (the batch was not admitted at once)")
            s, p = self.rows[student], self.rows[privileged]
            if s.position != p.position:
                raise PairOutOfStepError(f"mixed trace {key}: its contexts are at positions {s.position} "
                                         f"and {p.position}")
            groups[s.settings].append((student, privileged))
        return groups

    def _decide_pairs(self, logits: torch.Tensor, students: list[int], privileged: list[int],
                      settings: RolloutSettings) -> torch.Tensor:
        """The rule for a group of pairs (as `token_loop.reference_rollout`), recorded per pair."""
        uniforms = torch.stack([self.rows[i].uniforms[self.rows[i].position] for i in students])
        student_logits, privileged_logits = logits[students], logits[privileged]
        # The acceptance test reads the raw distribution: no temperature, no filtering.
        privileged_raw = torch.softmax(privileged_logits, dim=-1)
        chosen, proposal, proposal_prob, accepted = choose(
            sampling_distribution(student_logits, settings), sampling_distribution(privileged_logits, settings),
            privileged_raw, uniforms.to(logits.device), settings)
        asked = accepts(privileged_raw.amax(-1), settings.tau).tolist()
        oks, proposed, probs = accepted.tolist(), proposal.tolist(), proposal_prob.tolist()
        for i, row in enumerate(students):
            record = _RECORDS[self.rows[row].key]
            record.sources.append(STUDENT if oks[i] else PRIVILEGED)
            record.proposal_ids.append(proposed[i] if asked[i] else None)
            record.proposal_probs.append(probs[i] if asked[i] else None)
        return chosen
