"""Does the world show the gap DAIL addresses? Measured on the base model.

* base pass@1 on KNOWN types (student prompt) -- should be high;
* base pass@1 and pass@64 on NOVEL types (student prompt) -- should be low;
* privileged-student pass@1 on NOVEL types (the didactic reference in the prompt) -- high;
* forced didactic lines: with the student prompt and the expert's solution as the response
  prefix up to `label = <fused expression> =`, how often the base model's most likely next
  token is not the right value -- high; the same measure on the model's own primitive lines
  (`a op b =`) is the control -- low.

Sampling uses the paper's settings (temperature 0.6, top-p 0.95); pass@k is the unbiased
estimator 1 - C(n-c, k) / C(n, k), averaged over problems.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dail.data import Problem
from dail.rollout.prompts import PromptBuilder
from dail.world import generator as gen
from dail.world.scoring import grade, pass_at_k

logger = logging.getLogger(__name__)

TEMPERATURE, TOP_P = 0.6, 0.95


def _prompts(problems: Sequence[Problem], tokenizer: Any, role: str) -> list[str]:
    builder = PromptBuilder()
    return [builder.render(p, tokenizer)[role] for p in problems]


@torch.no_grad()
def sample(model: Any, tokenizer: Any, prompts: Sequence[str], *, n: int = 1,
           greedy: bool = False, max_new_tokens: int = 320, batch_size: int = 64) -> list[list[str]]:
    """`n` completions per prompt with `model.generate` (left padding, batched)."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    flat = [p for p in prompts for _ in range(n)]
    texts: list[str] = []
    try:
        # A bar on a terminal only: validity runs for minutes, its callers' logs stay clean.
        for i in tqdm(range(0, len(flat), batch_size), desc="sampling", unit="batch", disable=None, leave=False):
            enc = tokenizer(flat[i:i + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False)
            kwargs: dict[str, Any] = ({"do_sample": False} if greedy else
                                      {"do_sample": True, "temperature": TEMPERATURE,
                                       "top_p": TOP_P, "top_k": 0})
            out = model.generate(**enc, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **kwargs)
            new = out[:, enc["input_ids"].shape[1]:]
            texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
    return [texts[j * n:(j + 1) * n] for j in range(len(prompts))]


def greedy_accuracy(model: Any, tokenizer: Any, problems: Sequence[Problem], role: str) -> float:
    """Fraction of problems solved by greedy decoding with the given role's prompt."""
    outs = sample(model, tokenizer, _prompts(problems, tokenizer, role), greedy=True)
    return sum(grade(o[0], p.answer or "") for o, p in zip(outs, problems, strict=True)) / len(problems)


def pass_rates(model: Any, tokenizer: Any, problems: Sequence[Problem], role: str, *,
               n: int, ks: Sequence[int] = (1,)) -> dict[str, float]:
    """Mean unbiased pass@k over problems from `n` samples each."""
    return _rates(sample(model, tokenizer, _prompts(problems, tokenizer, role), n=n), problems, ks)


def _rates(outs: list[list[str]], problems: Sequence[Problem], ks: Sequence[int]) -> dict[str, float]:
    counts = [sum(grade(o, p.answer or "") for o in os_) for os_, p in zip(outs, problems, strict=True)]
    return {f"pass@{k}": sum(pass_at_k(len(os_), c, k) for c, os_ in zip(counts, outs, strict=True))
            / len(counts) for k in ks}


def copied_share(texts: Sequence[str]) -> float:
    """Share of items written as the expert's fused line alone (see `generator.copied_items`)."""
    counts = [gen.copied_items(t) for t in texts]
    items = sum(n for _, n in counts)
    return sum(c for c, _ in counts) / items if items else 0.0


def habit_share(outs: Sequence[Sequence[str]], problems: Sequence[Problem] | None = None) -> float:
    """Share of primitive lines written in the privileged role's habits (`gen.habit_lines`).

    `outs` holds each problem's responses; a line's canonical form comes from the problem's
    solution, or, without `problems`, from the fused lines the response itself closes its items with.
    """
    counts = [gen.habit_lines(o, detailed_of(p) if p else _detailed_from_didactic(o))
              for os_, p in zip(outs, problems or [None] * len(outs), strict=True) for o in os_]
    lines = sum(n for _, n in counts)
    return sum(h for h, _ in counts) / lines if lines else 0.0


@torch.no_grad()
def forced_line_error(model: Any, tokenizer: Any, problems: Sequence[Problem], *,
                      style: str) -> dict[str, float]:
    """Teacher-force a solution after the student prompt and score each line's result token.

    Args:
        style: "didactic" forces the expert's fused lines (`r1 = 2*1+9*7 =`); "detailed"
            forces the model's own primitive lines (`2 * 1 =`).

    Returns:
        error rate of the argmax next token, and mean probability of the right value.
    """
    errors, probs, total = 0, 0.0, 0
    for problem in problems:
        text = problem.solution if style == "didactic" else detailed_of(problem)
        prompt = _prompts([problem], tokenizer, "student")[0]
        p_ids = tokenizer.encode(prompt, add_special_tokens=False)
        targets = _result_positions(text, style)
        for prefix, value in targets:
            prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
            full = tokenizer.encode(prefix + " " + value, add_special_tokens=False)
            assert full[:len(prefix_ids)] == prefix_ids and len(full) == len(prefix_ids) + 1
            want = full[-1]
            logits = model(torch.tensor([p_ids + prefix_ids])).logits[0, -1]
            p = torch.softmax(logits.float(), -1)
            errors += int(p.argmax().item() != want)
            probs += p[want].item()
            total += 1
    return {"error_rate": errors / max(total, 1), "p_correct": probs / max(total, 1),
            "lines": total}


def detailed_of(problem: Problem) -> str:
    """The detailed trace of a world problem, rebuilt from its didactic solution."""
    return _detailed_from_didactic(problem.solution)


def _detailed_from_didactic(solution: str) -> str:
    """Rebuild the detailed trace from the fused lines of a didactic solution."""
    lines = []
    for line in solution.split("\n"):
        m = re.fullmatch(r"(\S+) = ([0-9*+\-]+) = ([0-9])", line)
        if m:
            expr = _parse(m.group(2))
            steps, value = gen.detailed_steps(expr)
            lines += [f"{m.group(1)} = {m.group(2)}", *steps, line]
    lines.append(solution.strip().split("\n")[-1])
    return "\n".join(lines)


def _parse(text: str) -> gen.Expr:
    terms = re.findall(r"([+-]?)([0-9](?:\*[0-9])*)", text)
    return tuple((sign or "+", tuple(int(f) for f in body.split("*"))) for sign, body in terms)


def _result_positions(text: str, style: str) -> list[tuple[str, str]]:
    """(prefix ending with ' =', correct value) for each computed line of `text`."""
    out = []
    pattern = (r"^(\S+ = [0-9*+\-]+ =) ([0-9])$" if style == "didactic"
               else r"^([0-9] [*+\-] [0-9] =) ([0-9])$")
    offset = 0
    for line in text.split("\n"):
        m = re.match(pattern, line)
        if m:
            out.append((text[:offset + len(m.group(1))], m.group(2)))
        offset += len(line) + 1
    return out


# --------------------------------------------------------------------------- the privileged role's habits


@torch.no_grad()
def habit_chances(model: Any, tokenizer: Any, problems: Sequence[Problem], *, tau: float = 0.8) -> dict[str, Any]:
    """How often each way of rolling out writes a privileged habit, at its choice points.

    The canonical detailed trace is teacher-forced after the privileged and the student prompt.
    Choice points are the first operand of each sum or product line with two different operands
    (`swap`) and the operator of each primitive line (`compact`); see `gen.privileged_habits`.
    At each, with the student proposing its own (canonical) token:

    * `direct`: the chance that sampling from the privileged role (temperature 0.6, top-p 0.95)
      writes the habit;
    * `mixed`: the same chance where the privileged role gives the canonical token less than
      `tau` (the proposal is refused and it samples), and 0 where it accepts it.

    Returns:
        Per choice kind: mean raw probability of the habit for each role, the mean `direct` and
        `mixed` chances, and the number of choice points.
    """
    from dail.rollout.rule import sampling_probs

    points: dict[str, list[tuple[float, float, float, float]]] = {"swap": [], "compact": []}
    builder = PromptBuilder()
    for problem in problems:
        prompts = builder.render(problem, tokenizer)
        response = tokenizer.encode(detailed_of(problem), add_special_tokens=False)
        roles = {role: response_logits(model, tokenizer.encode(prompts[role], add_special_tokens=False), response)
                 for role in ("privileged", "student")}
        raw = {role: torch.softmax(logits.float(), -1) for role, logits in roles.items()}
        sampled = sampling_probs(roles["privileged"].float(), TEMPERATURE, TOP_P, 0)
        sampled = sampled / sampled.sum(-1, keepdim=True)
        for kind, at, canonical, habit in _habit_points(tokenizer, response):
            refused = raw["privileged"][at, canonical].item() < tau
            chance = sampled[at, habit].item()
            points[kind].append((raw["privileged"][at, habit].item(), raw["student"][at, habit].item(),
                                 chance, chance if refused else 0.0))
    return {kind: {"privileged_p": _mean(v, 0), "student_p": _mean(v, 1), "direct": _mean(v, 2),
                   "mixed": _mean(v, 3), "points": len(v)} for kind, v in points.items()}


def _mean(rows: list[tuple[float, ...]], column: int) -> float:
    return sum(r[column] for r in rows) / len(rows) if rows else 0.0


def _habit_points(tokenizer: Any, response: list[int]) -> list[tuple[str, int, int, int]]:
    """(choice kind, response position, canonical token, habit token) of each choice point."""
    pieces = [tokenizer.decode([t]) for t in response]
    out = []
    for i in range(len(pieces) - 2):  # a primitive line's first three tokens: operand, operator, operand
        line_start = i == 0 or pieces[i - 1] == "\n"
        if not (line_start and re.fullmatch(r"[0-9] [*+\-] [0-9]", "".join(pieces[i:i + 3]))):
            continue
        a, op, b = pieces[i], pieces[i + 1].strip(), pieces[i + 2].strip()
        if op != "-" and a != b:
            out.append(("swap", i, response[i], _single_token(tokenizer, b)))
        out.append(("compact", i + 1, response[i + 1], _single_token(tokenizer, op)))
    return out


def _single_token(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


# --------------------------------------------------------------------------- diagnosis

CATEGORIES = ("label", "expression", "step operand", "step result", "item value", "answer")


def token_category(line_so_far: str, token: str) -> str:
    """What a response token of a detailed trace is, from the text of its line before it.

    `label` opens an item line (`r1`), `expression` is the rest of an item's opening line (or of
    its closing line up to the second `=`), `step operand`/`step result` belong to a primitive
    line (`3 * 2 = 6`), `item value` ends the closing line, `answer` is the boxed list and EOS.
    """
    if line_so_far.startswith("\\") or token.startswith("\\") or token.startswith("<|"):
        return "answer"
    if not line_so_far:
        return "label" if token[:1].isalpha() else "step operand"
    if line_so_far[:1].isalpha():
        return "item value" if line_so_far.count("=") == 2 else "expression"
    return "step result" if line_so_far.rstrip().endswith("=") else "step operand"


@torch.no_grad()
def response_logits(model: Any, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Teacher-forced next-token logits, one row per response token (the row predicting it)."""
    return model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]


def token_errors(model: Any, tokenizer: Any, problems: Sequence[Problem], role: str) -> dict[str, Any]:
    """Teacher-forced next-token error rate of the detailed trace, by token category.

    The response is the detailed trace after `role`'s prompt; a token is an error when the
    model's most likely next token differs. It shows which skill a model lacks (copying labels,
    expressions, computing primitives) long before whole solutions come out right.
    """
    errors = dict.fromkeys(CATEGORIES, 0)
    totals = dict.fromkeys(CATEGORIES, 0)
    nll = dict.fromkeys(CATEGORIES, 0.0)
    builder = PromptBuilder()
    for problem in problems:
        prompt = tokenizer.encode(builder.render(problem, tokenizer)[role], add_special_tokens=False)
        response = tokenizer.encode(detailed_of(problem), add_special_tokens=False) + [tokenizer.eos_token_id]
        logits = response_logits(model, prompt, response)
        predicted = logits.argmax(-1).tolist()
        token_nll = (-logits.float().log_softmax(-1)[torch.arange(len(response)), response]).tolist()
        line = ""  # the current line of the response before this token
        for want, got, loss in zip(response, predicted, token_nll, strict=True):
            token = tokenizer.decode([want])
            category = token_category(line, token)
            totals[category] += 1
            errors[category] += int(got != want)
            nll[category] += loss
            line = (line + token).rsplit("\n", 1)[-1]
    return {c: {"error_rate": errors[c] / totals[c], "nll": nll[c] / totals[c], "tokens": totals[c]}
            for c in CATEGORIES if totals[c]}


def diagnose(model: Any, tokenizer: Any, *, n_problems: int = 8, seed: int = 0,
             split: str = "test") -> dict[str, Any]:
    """`token_errors` for the student and the privileged student on every type.

    On novel types the student's rows show where a model lacks the method (the expressions);
    after training an adapter on novel problems they show what it learnt.
    """
    out: dict[str, Any] = {}
    for kind in gen.ALL_TYPES:
        probs = gen.generate(kind, n_problems, split=split, seed=seed)
        for role in ("student", "privileged"):
            out[f"{kind}/{role}"] = token_errors(model, tokenizer, probs, role)
    return out


MIN_SAMPLES = 64  # validity reports pass@64


def too_few_samples(n_samples: int, name: str = "n_samples") -> str | None:
    """Why `n_samples` samples per problem cannot give the validity numbers, or None if they can."""
    if n_samples >= MIN_SAMPLES:
        return None
    return f"{name} must be at least {MIN_SAMPLES} (validity reports pass@64), not {n_samples}"


def validity(model: Any, tokenizer: Any, *, n_problems: int = 32, n_samples: int = 64,
             seed: int = 0) -> dict[str, Any]:
    """All validity numbers on test problems (see the module docstring).

    Raises:
        ValueError: if `n_samples` < 64 (pass@64 is one of the numbers).
    """
    if problem := too_few_samples(n_samples):
        raise ValueError(problem)
    result: dict[str, Any] = {"settings": {"n_problems": n_problems, "n_samples": n_samples,
                                           "seed": seed, "temperature": TEMPERATURE,
                                           "top_p": TOP_P, "split": "test"}}
    known: dict[str, float] = {}
    for kind in gen.KNOWN_TYPES:
        probs = gen.generate(kind, n_problems, split="test", seed=seed)
        known[kind] = pass_rates(model, tokenizer, probs, "student", n=4)["pass@1"]
        logger.info("known %s student pass@1 %.3f", kind, known[kind])
    result["known_student_pass@1"] = known
    novel: dict[str, Any] = {}
    for kind in gen.NOVEL_TYPES:
        probs = gen.generate(kind, n_problems, split="test", seed=seed)
        student_outs = sample(model, tokenizer, _prompts(probs, tokenizer, "student"), n=n_samples)
        student = _rates(student_outs, probs, (1, 64))
        privileged_outs = sample(model, tokenizer, _prompts(probs, tokenizer, "privileged"), n=4)
        privileged = _rates(privileged_outs, probs, (1,))["pass@1"]
        fused = forced_line_error(model, tokenizer, probs[:16], style="didactic")
        own = forced_line_error(model, tokenizer, probs[:16], style="detailed")
        novel[kind] = {"student_pass@1": student["pass@1"], "student_pass@64": student["pass@64"],
                       "privileged_pass@1": privileged,
                       # The privileged role's own style: items it copies instead of working out.
                       "privileged_copied_items": copied_share([o for os_ in privileged_outs for o in os_]),
                       "forced_didactic_error_rate": fused["error_rate"],
                       "forced_didactic_p_correct": fused["p_correct"],
                       "forced_detailed_error_rate": own["error_rate"],
                       "forced_detailed_p_correct": own["p_correct"],
                       # ... and the lines it writes its own way, where the student would not.
                       "privileged_habit_lines": habit_share(privileged_outs, probs),
                       "student_habit_lines": habit_share(student_outs, probs),
                       "habit_chances": habit_chances(model, tokenizer, probs[:16])}
        logger.info("novel %s: %s", kind, novel[kind])
    result["novel"] = novel
    return result


def load(model_dir: str) -> tuple[Any, Any]:
    """The model (float32, eval mode) and tokenizer saved in `model_dir`.

    Raises:
        DataError: the folder holds no saved model.
    """
    from transformers import AutoModelForCausalLM

    from dail.data import DataError
    from dail.world.tokenizer import load_tokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise DataError(f"{model_dir}: no saved model here (config.json missing; see `dail world pretrain`)")
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer
