"""`mixed_rollout` and `sample_responses` on vLLM, with the built-in functions' signatures and
results (`dail.rollout.mixed`, `dail.rollout.token_loop`): the same rule, the same random
numbers, the same `Trace` records, up to float noise between the two engines' kernels."""

from __future__ import annotations

import itertools
import math
from typing import Any

from dail.rollout.rule import PRIVILEGED, STUDENT, RolloutSettings, Trace
from dail.rollout.vllm_backend.processor import (
    SAMPLE,
    PairOutOfStepError,
    request_args,
    take_records,
)

_calls = itertools.count()


def mixed_rollout(llm: Any, student_prompts: list[list[int]], privileged_prompts: list[list[int]],
                  seeds: list[int], settings: RolloutSettings, *, lora: Any = None) -> list[Trace]:
    """One trace per (student prompt, privileged prompt, seed), each two vLLM requests decided
    together by the logits processor; see `dail.rollout.mixed.mixed_rollout`."""
    if not (len(student_prompts) == len(privileged_prompts) == len(seeds)):
        raise ValueError("student_prompts, privileged_prompts and seeds must have equal lengths")
    if settings.tau >= 1:  # never accepted: the privileged context alone, with the fallback's draws
        return sample_responses(llm, privileged_prompts, seeds, settings, draw=-1, source=PRIVILEGED, lora=lora)
    rows = list(zip(student_prompts, privileged_prompts, seeds, strict=True))
    traces: list[Trace] = []
    for group in _admissible_groups(llm, rows, settings):
        traces += _mixed_group(llm, group, settings, lora)
    return traces


def _mixed_group(llm: Any, rows: list[tuple[list[int], list[int], int]], settings: RolloutSettings,
                 lora: Any) -> list[Trace]:
    call = next(_calls)
    keys = [f"{call}:{i}" for i in range(len(rows))]
    prompts, params = [], []
    for key, (student, privileged, seed) in zip(keys, rows, strict=True):
        for role, prompt in ((STUDENT, student), (PRIVILEGED, privileged)):
            prompts.append(_tokens_prompt(prompt))
            params.append(_params(settings, request_args(role=role, key=key, seed=seed, settings=settings)))
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
    records: dict[str, dict[str, list]] = {}
    for found in llm.collective_rpc(take_records, args=(keys,)):
        records.update(found or {})
    traces = []
    for i, key in enumerate(keys):
        student, privileged = outputs[2 * i].outputs[0], outputs[2 * i + 1].outputs[0]
        tokens = list(student.token_ids)
        if tokens != list(privileged.token_ids):
            raise PairOutOfStepError(f"mixed trace {key}: its two contexts wrote different tokens")
        if key not in records:
            raise PairOutOfStepError(f"mixed trace {key}: the logits processor recorded nothing for it")
        record = records[key]
        traces.append(Trace(token_ids=tokens, sources=record["sources"][:len(tokens)],
                            proposal_ids=record["proposal_ids"][:len(tokens)],
                            proposal_probs=record["proposal_probs"][:len(tokens)],
                            finished=_ended(tokens, settings)))
    return traces


def sample_responses(llm: Any, prompts: list[list[int]], seeds: list[int], settings: RolloutSettings, *,
                     draw: int = 0, source: str = STUDENT, lora: Any = None) -> list[Trace]:
    """Plain sampling from one context per row; see `dail.rollout.token_loop.sample_responses`."""
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have equal lengths")
    call = next(_calls)
    params = [_params(settings, request_args(role=SAMPLE, key=f"{call}:{i}", seed=seed, settings=settings,
                                             draw=draw))
              for i, seed in enumerate(seeds)]
    outputs = llm.generate([_tokens_prompt(p) for p in prompts], params, use_tqdm=False, lora_request=lora)
    traces = []
    for out in outputs:
        tokens = list(out.outputs[0].token_ids)
        traces.append(Trace(token_ids=tokens, sources=[source] * len(tokens), finished=_ended(tokens, settings)))
    return traces


def _tokens_prompt(ids: list[int]) -> Any:
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(ids))


def _params(settings: RolloutSettings, extra_args: dict[str, Any]) -> Any:
    """The processor forces every token, so vLLM samples greedily among one finite logit; it
    stops at the trace's own end-of-sequence tokens only, and keeps them, as the built-in one."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=settings.max_new_tokens, ignore_eos=True,
                          stop_token_ids=list(settings.eos_ids), detokenize=False, extra_args=extra_args)


def _ended(tokens: list[int], settings: RolloutSettings) -> bool:
    return bool(tokens) and tokens[-1] in settings.eos_ids


def _admissible_groups(llm: Any, rows: list[tuple[list[int], list[int], int]],
                       settings: RolloutSettings) -> list[list[tuple[list[int], list[int], int]]]:
    """Consecutive rows in groups the engine admits in one step and decodes without preempting
    any: every prompt within its batched-token budget, every sequence within its KV cache."""
    from dail.rollout.vllm_backend.engine import kv_capacity_tokens

    scheduler = llm.llm_engine.vllm_config.scheduler_config
    block = int(llm.llm_engine.vllm_config.cache_config.block_size)
    capacity = kv_capacity_tokens(llm)
    groups: list[list[Any]] = [[]]
    prompt_tokens = cache_tokens = 0
    for row in rows:
        prompts = len(row[0]) + len(row[1])
        cache = sum(math.ceil((len(p) + settings.max_new_tokens) / block) * block for p in row[:2])
        if cache > capacity:
            raise PairOutOfStepError(
                f"a mixed trace needs {cache} tokens of KV cache (prompts {len(row[0])} and {len(row[1])}, "
                f"budget {settings.max_new_tokens}) but the engine holds {capacity}; give vLLM more "
                f"(VLLM_CPU_KVCACHE_SPACE on a CPU, --gpu-memory-utilization on a GPU) or lower --max-new-tokens")
        group = groups[-1]
        if group and (prompt_tokens + prompts > scheduler.max_num_batched_tokens
                      or 2 * (len(group) + 1) > scheduler.max_num_seqs or cache_tokens + cache > capacity):
            groups.append([])
            prompt_tokens = cache_tokens = 0
        groups[-1].append(row)
        prompt_tokens += prompts
        cache_tokens += cache
    return [g for g in groups if g]
