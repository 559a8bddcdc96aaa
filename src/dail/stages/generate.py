"""Stage 1: `dail generate` -- mixed-policy rollout over a problem set, then selection.

Reads top to bottom: load and validate problems (nothing is written if they are rejected) ->
load the model -> render and tokenize the three prompts of every problem -> roll out the
problems x samples in batches, writing each finished problem's traces atomically to
`<out>/parts/` (a rerun skips finished problems) -> merge into `<out>/traces.jsonl` -> select
into `<out>/selected.jsonl`. Under `accelerate launch` or `--shard i/n` each process rolls out
its share of the problems and the merge waits for every part (see `dail.distributed`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dail.batching import run_per_problem
from dail.config import GenerateConfig, ProbeConfig, PromptConfig, to_dict
from dail.data import (
    DataError,
    Problem,
    group_by_problem,
    write_json_atomic,
    write_jsonl_atomic,
)
from dail.rollout.prompts import ROLES, PromptBuilder, PromptTemplates, shorten_solution

logger = logging.getLogger(__name__)


@dataclass
class PreparedProblem:
    """A problem with its rendered prompts and their token ids."""

    index: int
    problem: Problem
    prompts: dict[str, str]
    prompt_ids: dict[str, list[int]]


def run(cfg: GenerateConfig) -> dict[str, Any]:
    """Generate traces and select from them; returns the summary also written to disk."""
    from dail import distributed, models, provenance
    from dail.rollout.backend import open_sampler, require
    from dail.rollout.rule import RolloutSettings, sequence_seed
    from dail.stages import preflight

    problems = preflight.check_generate(cfg)
    require(cfg.backend)
    out = Path(cfg.out)
    tokenizer = models.load_tokenizer(cfg.model)
    settings_record = generate_settings(cfg, problems, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    provenance.check_resumable(out / "generate_config.json", settings_record)
    sampler = open_sampler(cfg.backend, cfg.model, tokenizer, tensor_parallel_size=cfg.tensor_parallel_size,
                           check=lambda m: models.check_compatible(m, tokenizer, name=cfg.model.model))
    model = sampler.model
    budget = cfg.sampling.max_new_tokens
    limit = prompt_token_limit(cfg, model)
    prepared, skipped = prepare_problems(problems, tokenizer, cfg.prompts, max_prompt_tokens=limit)
    if not prepared:
        where = "--max-prompt-tokens" if cfg.prompts.max_prompt_tokens is not None else "the context minus the budget"
        raise DataError(f"{cfg.data}: none of the {len(problems)} problems' privileged prompts fits in {limit} "
                        f"tokens ({where})")

    settings = RolloutSettings(
        tau=cfg.tau, retries=cfg.retries, temperature=cfg.sampling.temperature,
        top_p=cfg.sampling.top_p, top_k=cfg.sampling.top_k, max_new_tokens=budget,
        eos_ids=tuple(models.eos_token_ids(model, tokenizer)),
        suppress_ids=suppressed_tokens(tokenizer, cfg), engine=cfg.engine, draft_length=cfg.draft_length)

    # Each record names what wrote its token ids, so it cannot be trained with another tokenizer.
    made_by = {"model": cfg.model.model, "tokenizer": settings_record["tokenizer"]}

    def generate(rows: list[tuple[PreparedProblem, int]]) -> list[dict[str, Any]]:
        traces = sampler.mixed_rollout(
            [p.prompt_ids["student"] for p, _ in rows],
            [p.prompt_ids["privileged"] for p, _ in rows],
            [sequence_seed(cfg.sampling.seed, f"{p.problem.id}\x00{s}") for p, s in rows],
            settings)
        return [{**trace_record(p, s, t, tokenizer, cfg.grader), **made_by}
                for (p, s), t in zip(rows, traces, strict=True)]

    shard = distributed.current_shard(cfg.shard)
    records = run_per_problem(prepared, cfg.samples, key=lambda p: p.problem.id, parts=out / "parts",
                              batch_size=cfg.sampling.batch_size, generate=generate, desc="rollout",
                              shard=shard)
    if records is None:  # an array-job shard whose siblings are still running
        return {"shard": shard.describe(), "complete": False}
    selected = select_traces(records, keep=cfg.keep, seed=cfg.sampling.seed, unfinished=cfg.keep_unfinished)
    summary = {**_summary(problems, prepared, skipped, records, selected), "settings": provenance.for_summary(settings_record)}
    if shard.writes_merged:  # the summary last: its presence marks the stage complete
        write_jsonl_atomic(out / "traces.jsonl", records)
        write_jsonl_atomic(out / "selected.jsonl", selected)
        write_json_atomic(out / "generate_summary.json", summary)
    distributed.barrier(shard)
    logger.info("%d of %d problems survive selection (%d skipped as too long); mean acceptance %.3f",
                summary["problems_selected"], summary["problems"], len(skipped),
                summary["mean_acceptance_rate"])
    if summary["problems_selected"] < summary["problems_rolled_out"]:
        logger.log(logging.INFO if selected else logging.WARNING, "%s", why_rejected(summary, budget))
    return summary


def why_rejected(summary: dict[str, Any], budget: int | None) -> str:
    """Why traces were not kept, from a generate summary: how many hit the token budget, ended
    without an answer, or gave a wrong one (traces of verifiable problems need a right answer)."""
    kept = summary["traces_selected"]
    text = (f"selection kept {kept} of {summary['traces']} traces ({summary['problems_selected']} of "
            f"{summary['problems_rolled_out']} problems); of the traces not kept, "
            f"{summary['traces_unfinished']} hit the token budget"
            f"{f' of {budget} tokens' if budget else ''}, {summary['traces_without_answer']} ended without "
            f"an answer and {summary['traces_wrong']} gave a wrong one")
    if not kept:
        text += "; more --samples, a larger --max-new-tokens or another --tau may find some"
    return text


def generate_settings(cfg: GenerateConfig, problems: list[Problem], tokenizer: Any) -> dict[str, Any]:
    """The stage's config, the problems' contents and the tokenizer that writes the token ids."""
    from dail import provenance
    from dail.rollout.backend import resolve_backend

    # The backend that samples, resolved: `auto` may stand for another on another machine.
    return {**to_dict(cfg), "backend": resolve_backend(cfg.backend),
            "problems_sha256": provenance.problems_fingerprint(problems),
            "tokenizer": provenance.tokenizer_fingerprint(tokenizer)}


def prompt_token_limit(cfg: GenerateConfig | ProbeConfig, model: Any) -> int:
    """The longest privileged prompt: the setting, else the model's context minus the budget."""
    if cfg.prompts.max_prompt_tokens is not None:
        return cfg.prompts.max_prompt_tokens
    context = getattr(model.config, "max_position_embeddings", None) or 32768
    return max(1, context - cfg.sampling.max_new_tokens)


def suppressed_tokens(tokenizer: Any, cfg: GenerateConfig | ProbeConfig) -> tuple[int, ...]:
    """The end-of-thinking token of a reasoning model, which the rollout never emits."""
    from dail.rollout.prompts import uses_thinking

    thinking = uses_thinking(tokenizer) if cfg.prompts.thinking is None else cfg.prompts.thinking
    if not (thinking and cfg.suppress_end_of_thinking):
        return ()
    token_id = tokenizer.convert_tokens_to_ids("</think>")
    return (token_id,) if token_id is not None and token_id != tokenizer.unk_token_id else ()


def prompt_builder(cfg: PromptConfig) -> PromptBuilder:
    templates = PromptTemplates.from_files(cfg.student_template, cfg.privileged_template,
                                           cfg.negative_template)
    return PromptBuilder(templates, waypoints=cfg.waypoints, thinking=cfg.thinking,
                         system_prompt=cfg.system_prompt)


def prepare_problems(problems: list[Problem], tokenizer: Any, cfg: PromptConfig, *,
                     max_prompt_tokens: int) -> tuple[list[PreparedProblem], list[str]]:
    """Render and tokenize every role's prompt; shorten or skip over-long expert solutions.

    Returns:
        (prepared problems, ids of skipped problems).
    """
    from dail.rollout.prompts import encode_prompt

    builder = prompt_builder(cfg)

    def privileged_fits(solution: str, problem: Problem) -> bool:
        text = builder.render(problem, tokenizer, solution=solution)["privileged"]
        return len(encode_prompt(tokenizer, text)) <= max_prompt_tokens

    prepared, skipped = [], []
    for index, problem in enumerate(problems):
        solution = shorten_solution(problem.solution, lambda s, p=problem: privileged_fits(s, p))
        if solution is None:
            logger.warning("skipping problem %r: its privileged prompt exceeds %d tokens even "
                           "after dropping trailing 'Solution k:' blocks", problem.id, max_prompt_tokens)
            skipped.append(problem.id)
            continue
        if solution != problem.solution:
            logger.info("problem %r: expert solution shortened to fit %d tokens", problem.id,
                        max_prompt_tokens)
        prompts = builder.render(problem, tokenizer, solution=solution)
        prompt_ids = {role: encode_prompt(tokenizer, prompts[role]) for role in ROLES}
        prepared.append(PreparedProblem(index, problem, prompts, prompt_ids))
    return prepared, skipped


def trace_record(p: PreparedProblem, sample: int, trace: Any, tokenizer: Any, grader: str) -> dict[str, Any]:
    """The JSON record of one trace (see docs/usage.md, "The trace record")."""
    from dail.evaluation.grading import extract_answer, grade

    text = tokenizer.decode(trace.token_ids, skip_special_tokens=True)
    gold = p.problem.answer
    return {
        "id": p.problem.id,
        "sample": sample,
        "prompts": p.prompts,
        "prompt_ids": p.prompt_ids,
        "text": text,
        "token_ids": trace.token_ids,
        "sources": "".join(trace.sources),
        "proposal_ids": trace.proposal_ids,
        "proposal_probs": [None if x is None else round(x, 6) for x in trace.proposal_probs],
        "acceptance_rate": trace.acceptance_rate,
        "finished": trace.finished,
        "answer": extract_answer(text),
        "gold": gold,
        "correct": grade(text, gold, grader=grader) if gold is not None else None,
    }


def select_traces(records: list[dict[str, Any]], *, keep: int = 1, seed: int = 0,
                  unfinished: bool = False) -> list[dict[str, Any]]:
    """Keep up to `keep` traces per problem, chosen at random (seeded per problem) among its
    finished ones (or all, with `unfinished`) that are correct, where the problem has an answer.
    """
    selected = []
    for pid, group in group_by_problem(records).items():
        rng = random.Random(f"{seed}\x00{pid}")
        pool = [r for r in group if unfinished or r.get("finished")]
        if group[0].get("gold") is not None:
            pool = [r for r in pool if r.get("correct")]
        selected.extend(sorted(rng.sample(pool, min(keep, len(pool))), key=lambda r: r["sample"]))
    return selected


def _summary(problems: list[Problem], prepared: list[PreparedProblem], skipped: list[str],
             records: list[dict[str, Any]], selected: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["acceptance_rate"] for r in records]
    verifiable = [r for r in records if r.get("correct") is not None]
    kept = {(r["id"], r["sample"]) for r in selected}
    rejected = [r for r in records if (r["id"], r["sample"]) not in kept]
    # Each trace not kept is counted once, by the first of these that applies.
    unfinished = [r for r in rejected if not r.get("finished")]
    finished = [r for r in rejected if r.get("finished") and r.get("correct") is not None]
    return {
        "problems": len(problems),
        "problems_rolled_out": len(prepared),
        "problems_skipped": skipped,
        "traces": len(records),
        "problems_selected": len({r["id"] for r in selected}),
        "traces_selected": len(selected),
        "traces_selected_unfinished": sum(not r.get("finished") for r in selected),
        "mean_acceptance_rate": sum(rates) / len(rates) if rates else 0.0,
        "trace_accuracy": (sum(bool(r["correct"]) for r in verifiable) / len(verifiable)
                           if verifiable else None),
        "traces_unfinished": len(unfinished),
        "traces_without_answer": sum(r.get("answer") is None for r in finished),
        "traces_wrong": sum(r.get("answer") is not None and not r.get("correct") for r in finished),
    }
