"""`dail probe`: does Stage 1 work for this model and these problems?

The paper's Stage 1 rests on three claims that can be measured on a sample of problems before
any training: expert solutions are out of distribution for the model (high NLL under its own
problem-only prompt); mixed rollout turns them into traces that are in distribution (NLL near
the student's own samples); direct sampling from the privileged prompt sits between and tends
to cite the reference.

Reads top to bottom: read and validate the problems, draw at most `problems` of them -> load
the model and render the three prompts -> for each source, K traces per problem at tau 0
(`student`: the student alone), at `tau` (`mixed`) and at tau 1 (`direct`: the privileged
prompt alone), each scored at once under the student's prompt (teacher-forced, the output head
applied chunk by chunk) and written per problem to `<out>/parts/<source>/` (a rerun skips
finished problems); the expert solutions are scored the same way -> `<out>/traces/<source>.jsonl`
(trace records, readable by `dail view`), `<out>/probe.md`, and `<out>/probe.json` last.

Every sample uses the seed `dail generate` gives it, so the mixed traces are the ones
`dail generate` writes with the same settings. The sources share these random numbers (the
student's proposals and the privileged fallbacks read the same columns of `uniform_table`), so
they are paired: mixed and direct traces coincide until an accepted student proposal differs
from the token the privileged model's own draw gives.
"""

from __future__ import annotations

import logging
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dail.config import ProbeConfig, to_dict
from dail.data import (
    DataError,
    Problem,
    group_by_problem,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

#: The sources compared, in the order tables show them.
SOURCES = ("expert", "direct", "mixed", "student")

#: What counts as citing the reference (case-insensitive regular expressions, any one matches):
#: naming the expert or a reference/provided/given/official solution, saying a step follows it,
#: or repeating the privileged prompt's own heading.
CITATION_PATTERNS: tuple[str, ...] = (
    r"\bexperts?(?:'s|')?\s+(?:solution|answer|proof|method|approach|reasoning|work)",
    r"\bthe\s+expert\b",
    r"\breference\s+(?:solution|answer|proof)",
    r"\b(?:provided|given|official|hidden|sample)\s+(?:solution|proof)",
    r"\bthe\s+(?:solution|proof)\s+(?:provided|given)\b(?!\s+by\b)",
    r"\b(?:according\s+to|as\s+(?:shown|stated|given|described|outlined|done)\s+in|following|based\s+on)"
    r"\s+the\s+(?:solution|proof)\b",
    r"\bhidden\s+from\s+the\s+reader",
)
_CITATION = re.compile("|".join(f"(?:{p})" for p in CITATION_PATTERNS), re.IGNORECASE)

#: Padded tokens per teacher-forced forward when scoring (rows are added while they fit).
SCORE_TOKENS = 8192
#: Response positions whose logits exist at once when scoring.
SCORE_CHUNK = 256
#: Response tokens of each example trace shown in probe.md.
EXAMPLE_TOKENS = 200
#: Below this many nats a position counts as (nearly) certain; the paper's figure for entropy.
LOW_ENTROPY = 0.01
#: The student's probability below which a fallback token is one it would (almost) never write.
LOW_PROB = 0.01


def cites_reference(text: str) -> bool:
    """Whether `text` mentions the reference or expert solution (`CITATION_PATTERNS`)."""
    return _CITATION.search(text) is not None


def run(cfg: ProbeConfig) -> dict[str, Any]:
    """Roll out, score and summarise; returns the summary also written to `<out>/probe.json`."""
    from dail import models, provenance
    from dail.rollout.backend import open_sampler, require, resolve_backend
    from dail.stages import preflight
    from dail.stages.generate import prepare_problems, prompt_token_limit

    started = time.perf_counter()
    chosen = choose_problems(preflight.check_probe(cfg), cfg.problems, seed=cfg.sampling.seed)
    require(cfg.backend)
    out = Path(cfg.out)
    tokenizer = models.load_tokenizer(cfg.model)
    settings = {**to_dict(cfg), "backend": resolve_backend(cfg.backend),
                "problems_sha256": provenance.problems_fingerprint(chosen),
                "tokenizer": provenance.tokenizer_fingerprint(tokenizer)}
    out.mkdir(parents=True, exist_ok=True)
    provenance.check_resumable(out / "probe_config.json", settings)
    model = models.load_model(cfg.model)  # scores every text, whichever backend samples
    models.check_compatible(model, tokenizer, name=cfg.model.model)
    sampler = open_sampler(cfg.backend, cfg.model, tokenizer, model=model,
                           tensor_parallel_size=cfg.tensor_parallel_size)
    prepared, skipped = prepare_problems(chosen, tokenizer, cfg.prompts,
                                         max_prompt_tokens=prompt_token_limit(cfg, model))
    if not prepared:
        raise DataError(f"{cfg.data}: no privileged prompt of the {len(chosen)} problems drawn fits "
                        f"the model's context with --max-new-tokens {cfg.sampling.max_new_tokens}")

    records = collect_records(cfg, model, sampler, tokenizer, prepared, out)
    # Each record carries its share of the time its batch took, so a resumed probe still
    # reports the whole rollout's cost.
    seconds = {"rollout_and_scoring": round(sum(r["seconds"] for rs in records.values() for r in rs), 1),
               "this_run": round(time.perf_counter() - started, 1)}
    summary = summarize(records, cfg=cfg, problem_ids=[p.problem.id for p in prepared], skipped=skipped,
                        seconds=seconds, settings=provenance.for_summary(settings))
    for source in SOURCES[1:]:
        write_jsonl_atomic(out / "traces" / f"{source}.jsonl", records[source])
    examples = {source: example_text(tokenizer, records[source][0]) for source in SOURCES}
    write_text_atomic(out / "probe.md", to_markdown(summary, examples))
    write_json_atomic(out / "probe.json", summary)  # last: its presence marks the probe complete
    logger.info("wrote %s and %s", out / "probe.json", out / "probe.md")
    return summary


def choose_problems(problems: list[Problem], n: int, *, seed: int) -> list[Problem]:
    """At most `n` problems: all of them, or a sample drawn with `seed`, in file order."""
    if len(problems) <= n:
        return list(problems)
    picked = random.Random(f"probe\x00{seed}").sample(range(len(problems)), n)
    return [problems[i] for i in sorted(picked)]


# --------------------------------------------------------------------------- rollout and scoring


def collect_records(cfg: ProbeConfig, model: Any, sampler: Any, tokenizer: Any, prepared: list[Any],
                    out: Path) -> dict[str, list[dict[str, Any]]]:
    """Every source's scored records, one part file per problem and source (resumable): rolled
    out by `sampler` (`dail.rollout.backend.Sampler`), scored by `model`.

    Returns:
        {source: records in problem order}; the expert has one record per problem, the others
        `cfg.samples`.
    """
    from dail import models
    from dail.batching import run_per_problem
    from dail.rollout.rule import RolloutSettings
    from dail.stages.generate import suppressed_tokens, trace_record
    from dail.stages.train import solution_ids

    eos_ids = tuple(models.eos_token_ids(model, tokenizer))
    context = getattr(model.config, "max_position_embeddings", None) or 32768
    taus = {"student": 0.0, "mixed": cfg.tau, "direct": 1.0}

    def rolled_out(source: str) -> Any:
        settings = RolloutSettings(
            tau=taus[source], temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
            top_k=cfg.sampling.top_k, max_new_tokens=cfg.sampling.max_new_tokens, eos_ids=eos_ids,
            suppress_ids=suppressed_tokens(tokenizer, cfg), engine=cfg.engine)

        def generate(rows: list[tuple[Any, int]]) -> list[dict[str, Any]]:
            start = time.perf_counter()
            traces = roll_out(sampler, rows, settings, seed=cfg.sampling.seed)
            scores = student_scores(model, [p.prompt_ids["student"] for p, _ in rows],
                                    [t.token_ids for t in traces], pad_id=tokenizer.pad_token_id,
                                    entropy=source == "mixed")
            seconds = (time.perf_counter() - start) / len(rows)
            return [{**trace_record(p, s, t, tokenizer, cfg.grader), "source": source, **score, "seconds": seconds}
                    for (p, s), t, score in zip(rows, traces, scores, strict=True)]

        return generate

    def expert(rows: list[tuple[Any, int]]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        prompts = [p.prompt_ids["student"] for p, _ in rows]
        # The whole solution, as the sft loss trains on it, cut only where the context ends.
        responses = [solution_ids(tokenizer, p.problem.solution)[:max(1, context - len(prompt))]
                     for (p, _), prompt in zip(rows, prompts, strict=True)]
        scores = student_scores(model, prompts, responses, pad_id=tokenizer.pad_token_id)
        seconds = (time.perf_counter() - start) / len(rows)
        return [{"id": p.problem.id, "sample": s, "source": "expert", "text": p.problem.solution,
                 "token_ids": ids, "sources": "", "gold": p.problem.answer, **score, "seconds": seconds}
                for (p, s), ids, score in zip(rows, responses, scores, strict=True)]

    records = {}
    for source in SOURCES:
        records[source] = run_per_problem(
            prepared, 1 if source == "expert" else cfg.samples, key=lambda p: p.problem.id,
            parts=out / "parts" / source, batch_size=cfg.sampling.batch_size,
            generate=expert if source == "expert" else rolled_out(source), desc=f"probe {source}")
    return records


def roll_out(sampler: Any, rows: list[tuple[Any, int]], settings: Any, *, seed: int) -> list[Any]:
    """Traces of (prepared problem, sample) rows at `settings.tau`, seeded as `dail generate` does.

    At tau 0 every proposal is accepted, so the traces are the student's own samples: they are
    drawn from the student's context alone with the first proposal's random numbers, which gives
    the tokens `mixed_rollout` gives at tau 0 at half the forward work (tau 1 is special-cased
    the same way inside `mixed_rollout`).
    """
    from dail.rollout.rule import STUDENT, sequence_seed

    seeds = [sequence_seed(seed, f"{p.problem.id}\x00{s}") for p, s in rows]
    student = [p.prompt_ids["student"] for p, _ in rows]
    if settings.tau <= 0:
        return sampler.sample(student, seeds, settings, draw=0, source=STUDENT)
    return sampler.mixed_rollout(student, [p.prompt_ids["privileged"] for p, _ in rows], seeds, settings)


@torch.inference_mode()
def student_scores(model: Any, prompts: list[list[int]], responses: list[list[int]], *, pad_id: int,
                   entropy: bool = False, max_tokens: int = SCORE_TOKENS,
                   chunk_size: int = SCORE_CHUNK) -> list[dict[str, list[float]]]:
    """Teacher-forced log-probabilities of each response under its (student) prompt.

    Rows are padded into forwards of at most `max_tokens` tokens (one row alone if longer); only
    the final hidden states of the response positions are kept, and the output head is applied
    `chunk_size` positions at a time, so no (T, V) logits of a whole response ever exist.

    Args:
        model: The base model (raw distributions: no temperature, no filtering).
        prompts / responses: Token ids of each row's prompt and response (non-empty).
        pad_id: Padding token (masked).
        entropy: Also return the entropy of the distribution at each response position.

    Returns:
        Per row `{"student_logprob": [log p(token_t | prompt, tokens<t)] (nats)}`, plus
        `"student_entropy"` (nats) per position when asked; values rounded to 6 decimals.
    """
    from dail.training.logits import check_model_head, model_head
    from dail.training.trainer import DAILCollator, response_states

    collate = DAILCollator(pad_id, roles=("student",))
    head = model_head(model)  # the output head and the model's own logit transform
    device = next(model.parameters()).device
    scores: list[dict[str, list[float]]] = [{} for _ in prompts]
    for rows in _token_batches([len(p) + len(r) for p, r in zip(prompts, responses, strict=True)], max_tokens):
        batch = collate([{"prompt_ids": {"student": prompts[i]}, "response_ids": responses[i]} for i in rows])
        batch = {k: v.to(device) for k, v in batch.items()}
        keep = batch["response_mask"].bool()  # (B, T): response tokens, not padding
        hidden, last_hidden, last_logits = response_states(model, batch, "student")
        check_model_head(head, last_hidden, last_logits, model_type=model.config.model_type)
        hidden = hidden[keep]  # (N, H), row by row
        logprob, entropies = _head_scores(head, hidden, batch["labels"][keep], entropy=entropy,
                                          chunk_size=chunk_size)
        offsets = np.cumsum([0] + [len(responses[i]) for i in rows]).tolist()
        for j, i in enumerate(rows):
            piece = slice(offsets[j], offsets[j + 1])
            scores[i]["student_logprob"] = [round(x, 6) for x in logprob[piece].tolist()]
            if entropies is not None:
                scores[i]["student_entropy"] = [round(x, 6) for x in entropies[piece].tolist()]
    return scores


def _head_scores(head: Any, hidden: torch.Tensor, targets: torch.Tensor, *, entropy: bool,
                 chunk_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each target (N,) and, if asked, each entropy (N,), from hidden (N, H)."""
    logprobs, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        log_p = torch.log_softmax(head(hidden[start:start + chunk_size]).float(), dim=-1)  # (c, V)
        logprobs.append(log_p.gather(-1, targets[start:start + chunk_size, None]).squeeze(-1))
        if entropy:
            entropies.append(-(log_p.exp() * log_p).sum(-1))
    return torch.cat(logprobs).cpu(), torch.cat(entropies).cpu() if entropy else None


def _token_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive rows grouped so that rows x longest row stays within `max_tokens`."""
    batches: list[list[int]] = []
    longest = 0
    for i, length in enumerate(lengths):
        if batches and (len(batches[-1]) + 1) * max(longest, length) <= max_tokens:
            batches[-1].append(i)
            longest = max(longest, length)
        else:
            batches.append([i])
            longest = length
    return batches


# --------------------------------------------------------------------------- summary


def summarize(records: dict[str, list[dict[str, Any]]], *, cfg: ProbeConfig, problem_ids: list[str],
              skipped: list[str], seconds: dict[str, float] | None = None,
              settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """probe.json: every source's figures, the mixed rollout's diagnostics, timings and settings."""
    mixed = records["mixed"]
    return {
        "model": cfg.model.model,
        "data": cfg.data,
        "problems": len(problem_ids),
        "problem_ids": problem_ids,
        "problems_skipped": skipped,
        "samples": cfg.samples,
        "tau": cfg.tau,
        "max_new_tokens": cfg.sampling.max_new_tokens,
        "seed": cfg.sampling.seed,
        "sources": {source: source_figures(records[source], graded=source != "expert", seed=cfg.sampling.seed)
                    for source in SOURCES},
        "direct_minus_mixed": direct_minus_mixed(records["direct"], mixed, seed=cfg.sampling.seed),
        "acceptance": float(np.mean([r["acceptance_rate"] for r in mixed])),
        "fallback_student_prob": fallback_student_prob(mixed),
        "student_entropy": student_entropy(mixed),
        "citation_patterns": list(CITATION_PATTERNS),
        "seconds": seconds,
        "settings": to_dict(cfg) if settings is None else settings,
    }


def nll_per_problem(records: list[dict[str, Any]]) -> dict[str, float]:
    """Each problem's NLL per token under the student, its traces' tokens pooled."""
    return {pid: -sum(sum(r["student_logprob"]) for r in group) / sum(len(r["student_logprob"]) for r in group)
            for pid, group in group_by_problem(records).items()}


def direct_minus_mixed(direct: list[dict[str, Any]], mixed: list[dict[str, Any]], *, seed: int = 0) -> dict[str, Any]:
    """How much less likely under the student direct sampling's traces are than mixed rollout's.

    The two sources roll out the same problems with the same random numbers, so they are
    compared problem by problem: `nll_per_token` is the mean over problems of the direct traces'
    NLL per token minus the mixed traces', `ci` its 95% bootstrap interval over problems, and
    `identical` the share of (problem, sample) pairs whose two traces are the same tokens.
    """
    from dail.evaluation.metrics import bootstrap_mean_ci

    a, b = nll_per_problem(direct), nll_per_problem(mixed)
    gaps = [a[pid] - b[pid] for pid in a if pid in b]
    pairs = {(r["id"], r["sample"]): r["token_ids"] for r in mixed}
    same = [pairs.get((r["id"], r["sample"])) == r["token_ids"] for r in direct]
    return {"nll_per_token": float(np.mean(gaps)), "ci": list(bootstrap_mean_ci(gaps, seed=seed)),
            "identical": float(np.mean(same)), "problems": len(gaps)}


def source_figures(records: list[dict[str, Any]], *, graded: bool, seed: int = 0) -> dict[str, Any]:
    """One source's figures.

    `nll_per_token` is the mean over problems of each problem's NLL per token (its traces'
    tokens pooled), so every problem weighs the same; `nll_per_token_ci` is the 95% bootstrap
    interval of that mean over problems. `answer_match` counts traces of problems with a gold
    answer (None for ungraded sources or when no problem has one).
    """
    from dail.evaluation.metrics import bootstrap_mean_ci

    per_problem = list(nll_per_problem(records).values())
    verifiable = [r for r in records if r.get("gold") is not None and r.get("correct") is not None]
    return {
        "nll_per_token": float(np.mean(per_problem)),
        "nll_per_token_ci": list(bootstrap_mean_ci(per_problem, seed=seed)),
        "cites_reference": float(np.mean([cites_reference(r["text"]) for r in records])),
        "answer_match": float(np.mean([bool(r["correct"]) for r in verifiable])) if graded and verifiable else None,
        "mean_tokens": float(np.mean([len(r["token_ids"]) for r in records])),
        "texts": len(records),
    }


def fallback_student_prob(mixed: list[dict[str, Any]]) -> dict[str, Any]:
    """The student's probability of the token the privileged model chose, at every position
    where it overrode the student (source P): 10th percentile, median, share below `LOW_PROB`."""
    probs = np.exp([lp for r in mixed for lp, src in zip(r["student_logprob"], r["sources"], strict=True)
                    if src == "P"])
    if not len(probs):
        return {"p10": None, "median": None, f"share_below_{LOW_PROB}": None, "positions": 0}
    return {"p10": float(np.quantile(probs, 0.1)), "median": float(np.median(probs)),
            f"share_below_{LOW_PROB}": float(np.mean(probs < LOW_PROB)), "positions": len(probs)}


def student_entropy(mixed: list[dict[str, Any]]) -> dict[str, Any]:
    """Entropy of the student's distribution (its prompt, the trace so far) over every position
    of the mixed traces: share below `LOW_ENTROPY` nats and 80th percentile."""
    values = np.array([h for r in mixed for h in r["student_entropy"]])
    return {f"share_below_{LOW_ENTROPY}": float(np.mean(values < LOW_ENTROPY)),
            "p80": float(np.quantile(values, 0.8)), "positions": len(values)}


# --------------------------------------------------------------------------- probe.md


def example_text(tokenizer: Any, record: dict[str, Any], *, max_tokens: int = EXAMPLE_TOKENS) -> str:
    """A record's first `max_tokens` response tokens as text, the privileged model's tokens inside
    ⟦ ⟧ (the student's accepted proposals, and the expert's text, unmarked)."""
    from dail.evaluation.view import token_pieces

    ids, sources = record["token_ids"][:max_tokens], record["sources"] or "S" * len(record["token_ids"])
    runs: list[tuple[str, str]] = []
    for piece, source in zip(token_pieces(tokenizer, ids), sources, strict=False):
        if runs and runs[-1][0] == source:
            runs[-1] = (source, runs[-1][1] + piece)
        else:
            runs.append((source, piece))
    text = "".join(f"⟦{piece}⟧" if source == "P" else piece for source, piece in runs)
    more = len(record["token_ids"]) - len(ids)
    return text + (f"\n[... {more} more tokens]" if more > 0 else "")


def summary_table(summary: dict[str, Any]) -> str:
    """The sources side by side, then the mixed rollout's diagnostics, as Markdown."""
    rows = ["| source | NLL/token under the student's prompt (nats) [95% CI] | cites reference | "
            "answer match | mean tokens |", "|---|---|---|---|---|"]
    for source, f in summary["sources"].items():
        low, high = f["nll_per_token_ci"]
        match = "-" if f["answer_match"] is None else f"{f['answer_match']:.2f}"
        rows.append(f"| {source} | {f['nll_per_token']:.3f} [{low:.3f}, {high:.3f}] | {f['cites_reference']:.2f} | "
                    f"{match} | {f['mean_tokens']:.0f} |")
    fallback, entropy = summary["fallback_student_prob"], summary["student_entropy"]
    gap = summary["direct_minus_mixed"]
    rows += ["", f"- direct minus mixed, NLL/token paired by problem: {gap['nll_per_token']:+.3f} "
                 f"[{gap['ci'][0]:+.3f}, {gap['ci'][1]:+.3f}]; the same tokens in {_percent(gap['identical'])} "
                 "of the pairs of traces",
             f"- mixed rollout (tau {summary['tau']}): acceptance {summary['acceptance']:.3f}"]
    if fallback["positions"]:
        rows.append(f"- student's probability of the privileged token where it overrode the student "
                    f"({fallback['positions']} positions): p10 {fallback['p10']:.3g}, median "
                    f"{fallback['median']:.3g}, {_percent(fallback[f'share_below_{LOW_PROB}'])} below {LOW_PROB}")
    else:
        rows.append("- the privileged model never overrode the student")
    rows.append(f"- student's entropy over the mixed traces ({entropy['positions']} positions): "
                f"{_percent(entropy[f'share_below_{LOW_ENTROPY}'])} below {LOW_ENTROPY} nats, "
                f"80th percentile {entropy['p80']:.3g} nats")
    return "\n".join(rows)


def _percent(share: float) -> str:
    return f"{100 * share:.0f}%"


def to_markdown(summary: dict[str, Any], examples: dict[str, str]) -> str:
    """probe.md: settings, the table, how to read it, one example per source."""
    seconds = (summary.get("seconds") or {}).get("rollout_and_scoring")
    lines = [f"# dail probe: {summary['model']} on {summary['data']}", "",
             f"{summary['problems']} problems x {summary['samples']} samples per source, tau {summary['tau']}, "
             f"max_new_tokens {summary['max_new_tokens']}, seed {summary['seed']}"
             + (f"; {seconds:.0f} s of rollout and scoring" if seconds is not None else "") + ".",
             "", summary_table(summary), "",
             "Stage 1 does what the method needs when the expert's NLL stands well above the student's own "
             "samples', the mixed traces' sits near the student's, and direct sampling cites the reference "
             "more often than mixed rollout. The sources share their random numbers, so mixed and direct "
             "traces coincide until an accepted student proposal differs from the privileged model's own draw. "
             "Citations are matched by the patterns in probe.json (`citation_patterns`); answer match uses "
             "the grader in `settings`."]
    if summary["problems_skipped"]:
        lines += ["", f"Skipped (privileged prompt too long): {', '.join(summary['problems_skipped'])}."]
    first = summary["problem_ids"][0]
    lines += ["", f"## One example per source (problem {first}, sample 0)", "",
              "Tokens the privileged model chose are inside ⟦ ⟧; the rest are the student's accepted "
              "proposals (the expert's text is unmarked)."]
    for source in SOURCES:
        fence = "`" * max(3, _longest_backtick_run(examples[source]) + 1)
        lines += ["", f"### {source}", "", fence, examples[source], fence]
    return "\n".join(lines) + "\n"


def _longest_backtick_run(text: str) -> int:
    return max((len(m) for m in re.findall(r"`+", text)), default=0)

