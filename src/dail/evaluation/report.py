"""Score evaluation samples and summarise them: pass@k, bootstrap intervals, token budgets.

A sample is a dict `{"id", "sample", "text", "correct", "num_tokens"?}`; `correct` is None for
problems without a gold answer. `score_samples` fills `answer` and `correct` from gold answers,
so samples produced elsewhere (vLLM, an API) can be scored without loading a model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from dail.data import group_by_problem
from dail.evaluation.grading import extract_answer, get_grader
from dail.evaluation.metrics import accuracy_under_budget, bootstrap_ci, pass_at_k_table

logger = logging.getLogger(__name__)

#: Token budgets reported by default (the paper uses 512 to 4096 for reasoning models). All are
#: kept even above the longest response seen, so summaries of different runs share keys; such a
#: budget simply equals plain accuracy.
DEFAULT_BUDGETS = (256, 512, 1024, 2048, 4096)


def score_samples(samples: Sequence[Mapping[str, Any]], gold: Mapping[str, str | None], *,
                  grader: str = "math") -> list[dict[str, Any]]:
    """Fill `answer` (last boxed) and `correct` for each sample.

    Identical (text, gold) pairs are graded once.

    Args:
        samples: Dicts with `id` and `text`.
        gold: Gold answer per problem id; None marks an unverifiable problem (`correct` None).
        grader: Grader name or `module:function` (see `dail.evaluation.grading.get_grader`).

    Returns:
        New sample dicts (inputs untouched) with `answer` and `correct` set.

    Raises:
        ValueError: when a sample lacks `id`/`text`, its id has no gold entry, or the grader is
            unknown.
    """
    grade = get_grader(grader)
    cache: dict[tuple[str, str], bool] = {}
    scored = []
    for i, sample in enumerate(samples):
        if "id" not in sample or not isinstance(sample.get("text"), str):
            raise ValueError(f"sample {i} needs an 'id' and a string 'text'")
        pid = str(sample["id"])
        if pid not in gold:
            raise ValueError(f"sample {i}: problem id {pid!r} has no gold entry "
                             "(use None for unverifiable problems)")
        answer_gold = gold[pid]
        correct = None
        if answer_gold is not None:
            key = (sample["text"], answer_gold)
            if key not in cache:
                cache[key] = bool(grade(sample["text"], answer_gold))
            correct = cache[key]
        scored.append({**sample, "answer": extract_answer(sample["text"]), "correct": correct})
    return scored


def summarize(samples: Sequence[Mapping[str, Any]], *, budgets: Iterable[int] | None = None,
              ks: Iterable[int] | None = None) -> dict[str, Any]:
    """Summary of scored samples, ready for `json.dump`.

    Args:
        samples: Scored sample dicts (`id`, `correct`, optional `num_tokens`).
        budgets: Token budgets for `accuracy_under_budget`; default `DEFAULT_BUDGETS`.
        ks: pass@k values; default powers of two up to the smallest per-problem sample count
            among verifiable problems.

    Returns:
        A dict with:
          - `"pass@k"` for each k: mean unbiased pass@k over verifiable problems (absent when
            none is verifiable);
          - `"pass@k_ci"`: `{"k": [low, high]}` 95% bootstrap intervals over problems;
          - `"mean_tokens"`: mean `num_tokens` over all samples (None if any sample lacks it);
          - `"mean_tokens_correct"`: the same over correct samples (None if none or missing);
          - `"accuracy_under_budget"`: `{"B": accuracy}` over verifiable samples (None without
            `num_tokens` or without verifiable problems);
          - `"finished_share"`: share of samples that ended (EOS) within the token budget (None
            when samples do not say);
          - `"note"`: without verifiable problems, why pass@k is missing;
          - `"num_problems"`, `"num_verifiable"`, and `"n"`: smallest samples per problem.

    Raises:
        ValueError: on no samples, or a problem whose samples mix graded and ungraded ones.
    """
    if not samples:
        raise ValueError("no samples to summarise")
    groups = group_by_problem(samples)
    counts: list[tuple[int, int]] = []
    for pid, group in groups.items():
        graded = [s.get("correct") is not None for s in group]
        if any(graded) and not all(graded):
            raise ValueError(f"problem {pid!r} mixes graded and ungraded samples; "
                             "re-score them with one gold answer")
        if all(graded):
            counts.append((len(group), sum(bool(s["correct"]) for s in group)))

    summary: dict[str, Any] = {}
    if counts:
        table = pass_at_k_table(counts, ks)
        summary.update(table)
        summary["pass@k_ci"] = {
            key.removeprefix("pass@"): list(bootstrap_ci(counts, int(key.removeprefix("pass@"))))
            for key in table
        }
    else:
        summary["pass@k_ci"] = {}
        summary["note"] = ("pass@k and accuracy need gold answers, which none of these problems has "
                           "(proofs?): only response lengths and endings are reported")
        logger.warning(summary["note"])

    tokens = [s.get("num_tokens") for s in samples]
    has_tokens = all(t is not None for t in tokens)
    correct_tokens = [s["num_tokens"] for s in samples if s.get("correct")] if has_tokens else []
    summary["mean_tokens"] = float(np.mean(tokens)) if has_tokens else None
    summary["mean_tokens_correct"] = float(np.mean(correct_tokens)) if correct_tokens else None
    summary["accuracy_under_budget"] = (
        accuracy_under_budget(samples, DEFAULT_BUDGETS if budgets is None else budgets)
        if has_tokens and counts else None
    )
    ended = [s.get("finished") for s in samples]
    summary["finished_share"] = (sum(map(bool, ended)) / len(ended)
                                 if all(isinstance(e, bool) for e in ended) else None)
    summary["num_problems"] = len(groups)
    summary["num_verifiable"] = len(counts)
    summary["n"] = min(len(g) for g in groups.values())
    return summary


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def to_markdown(summary: Mapping[str, Any], title: str) -> str:
    """Render a `summarize` result as Markdown: a pass@k table, a budget table, and counts.

    Args:
        summary: Output of `summarize`.
        title: Heading text.

    Returns:
        Markdown text ending in a newline.
    """
    lines = [f"## {title}", ""]
    lines += [f"Problems: {summary.get('num_problems')} "
              f"(verifiable: {summary.get('num_verifiable')}), "
              f"samples per problem: {summary.get('n')}", ""]
    pass_keys = sorted((k for k in summary if k.startswith("pass@") and k != "pass@k_ci"),
                       key=lambda k: int(k.removeprefix("pass@")))
    if pass_keys:
        ci = summary.get("pass@k_ci", {})
        lines += ["| k | pass@k | 95% CI |", "|---:|---:|:---:|"]
        for key in pass_keys:
            k = key.removeprefix("pass@")
            interval = ci.get(k)
            shown = f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "n/a"
            lines.append(f"| {k} | {_fmt(summary[key])} | {shown} |")
        lines.append("")
    budgets = summary.get("accuracy_under_budget")
    if budgets:
        lines += ["| token budget | accuracy |", "|---:|---:|"]
        lines += [f"| {b} | {_fmt(acc)} |" for b, acc in budgets.items()]
        lines.append("")
    lines.append(f"Mean response tokens: {_fmt(summary.get('mean_tokens'), 1)} "
                 f"(correct responses: {_fmt(summary.get('mean_tokens_correct'), 1)})")
    if summary.get("finished_share") is not None:
        lines += ["", f"Responses that ended within the token budget: {_fmt(summary['finished_share'])}"]
    if summary.get("note"):
        lines += ["", f"Note: {summary['note']}."]
    return "\n".join(lines) + "\n"


def pass_at_k_keys(summary: Mapping[str, Any]) -> list[str]:
    """The summary's "pass@k" keys in increasing k."""
    keys = [k for k in summary if k.startswith("pass@") and k[5:].isdigit()]
    return sorted(keys, key=lambda k: int(k[5:]))


def comparison_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of several runs' summaries side by side: pass@k, mean tokens, accuracy
    under each token budget up to the runs' `max_new_tokens`; with two runs, also their
    difference (second minus first).

    Args:
        summaries: Run name -> summary, in column order (e.g. base, trained).
    """
    names = list(summaries)
    runs = list(summaries.values())
    ks = sorted({int(k[5:]) for s in runs for k in pass_at_k_keys(s)})
    limit = max((s.get("max_new_tokens") or 0 for s in runs), default=0) or None
    budgets = sorted({int(b) for s in runs for b in (s.get("accuracy_under_budget") or {})
                      if limit is None or int(b) <= limit})
    rows = [(f"pass@{k}", [s.get(f"pass@{k}") for s in runs]) for k in ks]
    rows.append(("mean tokens", [s.get("mean_tokens") for s in runs]))
    if any(s.get("finished_share") is not None for s in runs):
        rows.append(("responses that ended", [s.get("finished_share") for s in runs]))
    rows += [(f"accuracy within {b} tokens", [(s.get("accuracy_under_budget") or {}).get(str(b)) for s in runs])
             for b in budgets]
    delta = len(runs) == 2
    header = "| | " + " | ".join(names) + (f" | {names[1]} - {names[0]} |" if delta else " |")
    lines = [header, "|---|" + "---:|" * (len(names) + delta)]
    for label, values in rows:
        digits = 1 if label == "mean tokens" else 4  # tokens are counted, shares are read to 4 places
        cells = [_fmt(v, digits) for v in values]
        if delta:
            a, b = values
            cells.append(f"{b - a:+.{digits}f}" if isinstance(a, int | float) and isinstance(b, int | float)
                         else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
