"""The three roles' prompts, and waypoint extraction for the negative reference.

Roles (as in the paper): the student sees the problem only; the privileged student sees the problem and
the expert solution with instructions to use its method silently and show every step; the
negative reference sees the problem, the final answer and coarse waypoints of the solution.
All three are rendered through the tokenizer's chat template as one user turn followed by the
opening of the assistant turn, so the response tokens that follow are identical for all roles.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dail.config import ConfigError
from dail.data import Problem

logger = logging.getLogger(__name__)

ROLES = ("student", "privileged", "negative")

# Our own wording of the instructions the paper describes. Placeholders: {problem}, {solution},
# {answer}, {waypoints}, {hints}, {instruction}; other braces are left alone, so LaTeX needs no
# escaping. {instruction} asks for a boxed final answer, or, for a problem without an answer
# (a proof), for a complete argument.
ANSWER_INSTRUCTION = "Solve the problem step by step and put your final answer in \\boxed{}."
PROOF_INSTRUCTION = "Solve the problem step by step, giving a complete and rigorous argument."

STUDENT_TEMPLATE = """\
{problem}

{instruction}"""

PRIVILEGED_TEMPLATE = """\
{problem}

{instruction}

Below is a correct solution written by an expert. Work out the problem yourself along the lines \
of its method, but never mention, quote or allude to this solution, and do not take any \
intermediate result or the final answer from it as given: derive every step from scratch and \
write out each calculation in full, with no shortcuts.

Expert solution (hidden from the reader):
{solution}"""

NEGATIVE_TEMPLATE = """\
{problem}

{instruction}

{hints}"""


@dataclass(frozen=True)
class PromptTemplates:
    """User-message templates for the three roles."""

    student: str = STUDENT_TEMPLATE
    privileged: str = PRIVILEGED_TEMPLATE
    negative: str = NEGATIVE_TEMPLATE

    @classmethod
    def from_files(cls, student: str | None = None, privileged: str | None = None,
                   negative: str | None = None) -> PromptTemplates:
        """Defaults, with any role replaced by the text of the given file."""
        texts = {}
        for role, path in (("student", student), ("privileged", privileged), ("negative", negative)):
            if path:
                texts[role] = Path(path).read_text(encoding="utf-8")
        return cls(**texts)


def fill(template: str, **values: str) -> str:
    """Replace `{key}` for the given keys only (LaTeX braces elsewhere survive)."""
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], template)


# --------------------------------------------------------------------------- waypoints

_NUMBER = r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?"
_WAYPOINT_PATTERNS = [
    re.compile(r"(?<![\w^])(?:[A-Za-z]|\d+)\^(?:\{[^{}]{1,20}\}|\d+|[A-Za-z])"),  # x^{2}, 2^10
    re.compile(r"(?<![\w.^])\d+[A-Za-z](?![A-Za-z])(?:\s*[+-]\s*\d+(?![\d.]))?"),  # 3x, 2x-3
    re.compile(r"(?<![\w.^])[A-Za-z]\s*[+-]\s*\d+(?![\d.])"),  # x+1
    re.compile(rf"(?<![\w.^{{]){_NUMBER}(?![\w.])"),  # 12, 3.5, 1e-3
]


def extract_math_waypoints(solution: str, answer: str | None) -> list[str]:
    """Coarse intermediate results of a math solution (the release's default extractor).

    Collects numbers (integers, decimals, scientific notation), powers (`x^{2}`, `2^10`),
    coefficient terms (`3x`) and simple linear terms (`x+1`, `2x-3`); removes spaces,
    de-duplicates, sorts, and drops the final answer (stated separately in the prompt).
    """
    found: set[str] = set()
    for pattern in _WAYPOINT_PATTERNS:
        found.update(re.sub(r"\s+", "", m.group(0)) for m in pattern.finditer(solution))
    if answer is not None:
        found.discard(re.sub(r"\s+", "", answer))
    return sorted(found)


def no_waypoints(solution: str, answer: str | None) -> list[str]:
    """For an answer-only negative reference."""
    return []


WAYPOINT_EXTRACTORS: dict[str, Callable[[str, str | None], list[str]]] = {
    "math": extract_math_waypoints,
    "none": no_waypoints,
}


def get_waypoint_extractor(name: str) -> Callable[[str, str | None], list[str]]:
    """A registered extractor by name, or any `module:function` with the same signature."""
    if name in WAYPOINT_EXTRACTORS:
        return WAYPOINT_EXTRACTORS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"waypoint extractor {name!r} cannot be imported: {e}") from None
        if not callable(fn):
            raise ConfigError(f"waypoint extractor {name!r} is not callable")
        return fn
    raise ConfigError(f"unknown waypoint extractor {name!r}; choose one of "
                     f"{sorted(WAYPOINT_EXTRACTORS)} or give 'module:function'")


def negative_hints(answer: str | None, waypoints: list[str]) -> str:
    parts = []
    if answer is not None:
        parts.append(f"The final answer is {answer}.")
    if waypoints:
        parts.append("Intermediate results used in the solution might include: "
                     + ", ".join(waypoints) + ".")
    return " ".join(parts)


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class PromptBuilder:
    """Renders the three roles' prompts for a tokenizer.

    Attributes:
        templates: User-message templates.
        waypoints: Name of the waypoint extractor, or `module:function`.
        thinking: Open the assistant turn with `<think>` (reasoning models). None = detect from
            the tokenizer (a `<think>` token and a chat template that mentions it).
        system_prompt: Optional system message shared by all roles.
    """

    templates: PromptTemplates = PromptTemplates()
    waypoints: str = "math"
    thinking: bool | None = None
    system_prompt: str | None = None

    def user_messages(self, problem: Problem, solution: str | None = None) -> dict[str, str]:
        """The user message of each role; `solution` overrides the problem's (shortening)."""
        solution = problem.solution if solution is None else solution
        waypoints = get_waypoint_extractor(self.waypoints)(problem.solution, problem.answer)
        answer = problem.answer if problem.answer is not None else ""
        values = {"problem": problem.problem, "solution": solution, "answer": answer,
                  "waypoints": ", ".join(waypoints),
                  "hints": negative_hints(problem.answer, waypoints),
                  "instruction": ANSWER_INSTRUCTION if problem.verifiable else PROOF_INSTRUCTION}
        return {role: fill(getattr(self.templates, role), **values) for role in ROLES}

    def render(self, problem: Problem, tokenizer: Any, solution: str | None = None) -> dict[str, str]:
        """Full prompt text of each role, ending where the assistant's response begins."""
        thinking = uses_thinking(tokenizer) if self.thinking is None else self.thinking
        return {role: render_chat(tokenizer, msg, thinking=thinking, system=self.system_prompt)
                for role, msg in self.user_messages(problem, solution).items()}


def uses_thinking(tokenizer: Any) -> bool:
    """A reasoning model: has a `<think>` token and a chat template that uses it."""
    if "<think>" not in (getattr(tokenizer, "chat_template", None) or ""):
        return False
    # One lookup, not `get_vocab()`: that builds the whole vocabulary (35 ms at 49k tokens) per call.
    token_id = tokenizer.convert_tokens_to_ids("<think>")
    return token_id is not None and token_id != tokenizer.unk_token_id


def render_chat(tokenizer: Any, user: str, *, thinking: bool = False, system: str | None = None) -> str:
    """One user turn, then the opening of the assistant turn (with `<think>\\n` if thinking)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=thinking)
    else:
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
    if thinking and not text.rstrip().endswith("<think>"):
        text += "<think>\n"
    return text


# --------------------------------------------------------------------------- long solutions

_SOLUTION_BLOCK = re.compile(r"(?im)^[ \t]*(?:\*\*|#+[ \t]*)?solution[ \t]*\d+[ \t]*(?:\*\*)?[ \t]*[:.]")


def shorten_solution(solution: str, fits: Callable[[str], bool]) -> str | None:
    """Drop trailing "Solution k:" blocks until `fits(solution)`; None if it never fits.

    The release's rule for expert solutions that hold several alternative solutions.
    """
    starts = [m.start() for m in _SOLUTION_BLOCK.finditer(solution)]
    # Cut points: the start of each later block (dropping it and everything after it).
    cuts = [s for s in starts if solution[:s].strip()]
    candidate = solution
    while not fits(candidate):
        if not cuts:
            return None
        candidate = solution[: cuts.pop()].rstrip()
    return candidate


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt (a chat template already wrote any special tokens)."""
    return tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None)).input_ids
