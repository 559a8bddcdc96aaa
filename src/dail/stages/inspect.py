"""`dail inspect`: what each role sees for one problem, and how a trace lines up across roles."""

from __future__ import annotations

from typing import Any

from dail.config import GenerateConfig
from dail.data import DataError, iter_jsonl, resolve_problems


def run(cfg: GenerateConfig, *, problem_id: str, traces: str | None = None, sample: int | None = None,
        max_rows: int = 24) -> str:
    """A printable report: compatibility checks, the three prompts, waypoints, token alignment.

    The alignment table shows, for the first `max_rows` response tokens (0: all), the position of
    each token in every role's sequence and the position whose logits predict it (one to the
    left): the loss compares the three roles' distributions at exactly these positions.

    Args:
        cfg: Model, data, prompts; `tau` and sampling settings of a fresh trace.
        problem_id: The problem shown.
        traces: A traces file whose trace of the problem is shown (default: a fresh trace of
            `max_rows` tokens, or `sampling.max_new_tokens` when `max_rows` is 0).
        sample: Which of the problem's traces in `traces` (default: its first).
        max_rows: Response tokens in the table (0: all).

    Raises:
        DataError: an unknown problem, or no such trace (checked before the model loads).
    """
    from dail import models
    from dail.rollout.mixed import mixed_rollout
    from dail.rollout.prompts import get_waypoint_extractor
    from dail.rollout.rule import RolloutSettings, sequence_seed
    from dail.stages.generate import prepare_problems, prompt_builder

    problems = {p.id: p for p in resolve_problems(cfg.data)}
    if problem_id not in problems:
        raise DataError(f"{cfg.data}: no problem with id {problem_id!r}")
    problem = problems[problem_id]
    if sample is not None and not traces:
        raise DataError("--sample picks a trace from --traces FILE; give the file too")
    trace = _find_trace(traces, problem_id, sample) if traces else None
    model, tokenizer = models.load(cfg.model)
    if trace is not None:
        from dail.provenance import TraceTokenizerCheck

        TraceTokenizerCheck(tokenizer, cfg.model.model, "inspect them with the model that wrote them")(
            f"{traces} (problem {problem_id})", trace, [trace.get("token_ids") or []])
    lines = [f"# Problem {problem.id}", "", "## Model and tokenizer"]
    warnings = models.check_compatible(model, tokenizer, name=cfg.model.model)
    lines += [f"- {w}" for w in warnings] or ["- tokenizer and model agree (vocabulary, EOS, chat template)"]
    lines += [f"- EOS ids: {models.eos_token_ids(model, tokenizer)}; pad id: {tokenizer.pad_token_id}"]

    prepared, skipped = prepare_problems([problem], tokenizer, cfg.prompts,
                                         max_prompt_tokens=cfg.prompts.max_prompt_tokens or 10**9)
    if skipped:
        return "\n".join(lines + ["", "skipped: the privileged prompt does not fit max_prompt_tokens"])
    p = prepared[0]
    waypoints = get_waypoint_extractor(prompt_builder(cfg.prompts).waypoints)(problem.solution, problem.answer)
    lines += ["", f"## Gold answer: {problem.answer!r}", f"## Waypoints: {waypoints}"]
    for role, text in p.prompts.items():
        lines += ["", f"## {role} prompt ({len(p.prompt_ids[role])} tokens)", "```", text, "```"]

    if trace is None:
        length = min(max_rows or cfg.sampling.max_new_tokens, cfg.sampling.max_new_tokens)
        settings = RolloutSettings(tau=cfg.tau, max_new_tokens=length,
                                   temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                                   eos_ids=tuple(models.eos_token_ids(model, tokenizer)))
        t = mixed_rollout(model, [p.prompt_ids["student"]], [p.prompt_ids["privileged"]],
                          [sequence_seed(cfg.sampling.seed, problem_id)], settings,
                          pad_id=tokenizer.pad_token_id)[0]
        trace = {"token_ids": t.token_ids, "sources": "".join(t.sources), "proposal_ids": t.proposal_ids,
                 "proposal_probs": t.proposal_probs}
        lines += ["", f"## Alignment of a fresh {len(t.token_ids)}-token trace (tau={cfg.tau})"]
    else:
        lines += ["", f"## Alignment of trace sample {trace.get('sample')} from {traces}"]
    lines.append(alignment_table(tokenizer, p.prompt_ids, trace, max_rows=max_rows))
    return "\n".join(lines)


def alignment_table(tokenizer: Any, prompt_ids: dict[str, list[int]], trace: dict[str, Any],
                    *, max_rows: int = 24) -> str:
    """The first `max_rows` response tokens (0: all) with their source, the student's proposal
    and its privileged probability, and their positions in every role's sequence."""
    roles = list(prompt_ids)
    header = "| t | token | source | proposal | p_priv(proposal) | " + " | ".join(
        f"{r} pos (pred from)" for r in roles) + " |"
    rows = [header, "|" + "---|" * (5 + len(roles))]
    probs = trace["proposal_probs"]  # empty at tau 1, null where the student was not asked
    proposals = trace.get("proposal_ids") or []
    shown = trace["token_ids"][:max_rows or None]
    for j, token in enumerate(shown):
        proposal = proposals[j] if j < len(proposals) else None
        cells = [str(j), repr(tokenizer.decode([token])), trace["sources"][j],
                 "-" if proposal is None else repr(tokenizer.decode([proposal])),
                 "-" if j >= len(probs) or probs[j] is None else f"{probs[j]:.3f}"]
        cells += [f"{len(prompt_ids[r]) + j} ({len(prompt_ids[r]) + j - 1})" for r in roles]
        rows.append("| " + " | ".join(cells) + " |")
    if len(trace["token_ids"]) > len(shown):
        rows.append(f"... {len(trace['token_ids']) - len(shown)} more tokens (--tokens 0 shows all)")
    if None in probs[:len(shown)]:
        rows.append("(-: no token had a privileged probability >= tau there, so no proposal was made)")
    return "\n".join(rows)


def _find_trace(path: str, problem_id: str, sample: int | None = None) -> dict[str, Any]:
    """The problem's first trace in `path`, or the one with this `sample` number."""
    seen = []
    for _, row in iter_jsonl(path):
        if isinstance(row, dict) and str(row.get("id")) == problem_id:
            if sample is None or row.get("sample") == sample:
                return row
            seen.append(row.get("sample"))
    if seen:
        raise DataError(f"{path}: problem {problem_id!r} has no trace with sample {sample} "
                        f"(its samples: {', '.join(map(str, seen))})")
    raise DataError(f"{path}: no trace of problem {problem_id!r}")
