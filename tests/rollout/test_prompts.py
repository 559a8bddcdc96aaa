"""Role prompts, waypoints, reasoning-model rendering and the long-solution rule."""

from __future__ import annotations

import pytest

from dail.config import ConfigError
from dail.data import Problem
from dail.rollout.prompts import (
    ANSWER_INSTRUCTION,
    PROOF_INSTRUCTION,
    PromptBuilder,
    PromptTemplates,
    extract_math_waypoints,
    fill,
    get_waypoint_extractor,
    render_chat,
    shorten_solution,
    uses_thinking,
)

PROBLEM = Problem(id="q", problem="Solve x^{2} - 5x + 6 = 0.", solution="Factor: (x-2)(x-3). Roots 2 and 3. "
                  "Their sum is \\boxed{5}.", answer="5")


def test_fill_leaves_latex_braces_alone():
    assert fill("a {problem} \\boxed{} {other}", problem="P") == "a P \\boxed{} {other}"


def test_math_waypoints_cover_the_release_patterns():
    text = "We get x^{2}+3x-4 and 2^10 = 1024; then 2x-3 = 7, x+1 = 5, 1.5e3 and 0.25; so \\boxed{42}."
    got = extract_math_waypoints(text, "42")
    for expected in ["x^{2}", "2^10", "3x-4", "2x-3", "x+1", "1024", "7", "5", "1.5e3", "0.25"]:
        assert expected in got
    assert "42" not in got  # the final answer is stated separately
    assert got == sorted(set(got))


def test_role_prompts_contain_what_each_role_may_see(tiny):
    _, tokenizer = tiny
    prompts = PromptBuilder().render(PROBLEM, tokenizer)
    assert PROBLEM.problem in prompts["student"] and "Factor" not in prompts["student"]
    assert PROBLEM.solution in prompts["privileged"]
    negative = prompts["negative"]
    assert "The final answer is 5." in negative and "Factor" not in negative
    assert "Intermediate results used in the solution might include:" in negative and "2, 3" in negative
    # One user turn, then the assistant turn opens: responses are identical across roles.
    for text in prompts.values():
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")


def test_problems_without_an_answer_are_not_asked_for_a_boxed_one(tiny, tmp_path):
    _, tokenizer = tiny
    proof = Problem(id="p", problem="Show that x^{2} >= 0.", solution="A square is never negative.")
    for role, text in PromptBuilder().render(proof, tokenizer).items():
        assert "\\boxed" not in text and PROOF_INSTRUCTION in text, role
    for role, text in PromptBuilder().render(PROBLEM, tokenizer).items():
        assert ANSWER_INSTRUCTION in text and PROOF_INSTRUCTION not in text, role
    (tmp_path / "s.txt").write_text("{problem} -- {instruction}")
    own = PromptBuilder(PromptTemplates.from_files(student=str(tmp_path / "s.txt")))
    assert f"x^{{2}} >= 0. -- {PROOF_INSTRUCTION}" in own.render(proof, tokenizer)["student"]


def test_templates_from_files(tmp_path, tiny):
    _, tokenizer = tiny
    (tmp_path / "s.txt").write_text("Q: {problem} (answer {answer})")
    builder = PromptBuilder(PromptTemplates.from_files(student=str(tmp_path / "s.txt")))
    assert "Q: Solve x^{2} - 5x + 6 = 0. (answer 5)" in builder.render(PROBLEM, tokenizer)["student"]


def test_reasoning_model_opens_with_think(thinking_model_dir, tiny):
    from transformers import AutoTokenizer

    thinking_tok = AutoTokenizer.from_pretrained(thinking_model_dir)
    assert uses_thinking(thinking_tok) and not uses_thinking(tiny[1])
    # A template that mentions <think> is not enough: the token must be in the vocabulary.
    from dail.world import base_model_dir
    from dail.world.tokenizer import load_tokenizer

    plain = load_tokenizer(base_model_dir())
    plain.chat_template = thinking_tok.chat_template
    assert not uses_thinking(plain)
    text = PromptBuilder().render(PROBLEM, thinking_tok)["privileged"]
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    # Thinking forced off: the template's empty think block, no open <think>.
    off = PromptBuilder(thinking=False).render(PROBLEM, thinking_tok)["student"]
    assert off.endswith("</think>\n\n")


def test_tokenizer_without_chat_template(tiny):
    _, tokenizer = tiny
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert render_chat(plain, "hello") == "User: hello\n\nAssistant:"


def test_extractor_registry(monkeypatch):
    assert get_waypoint_extractor("math") is extract_math_waypoints
    assert get_waypoint_extractor("none")("1 2 3", None) == []
    assert get_waypoint_extractor("dail.rollout.prompts:extract_math_waypoints") is extract_math_waypoints
    with pytest.raises(ConfigError, match="unknown waypoint extractor"):
        get_waypoint_extractor("chemistry")
    with pytest.raises(ConfigError, match="cannot be imported"):
        get_waypoint_extractor("no_such_module:f")


def test_shorten_solution_drops_trailing_solution_blocks():
    solution = "Solution 1: short.\nSolution 2: " + "long " * 50 + "\nSolution 3: " + "longer " * 80
    assert shorten_solution(solution, lambda s: True) == solution
    assert shorten_solution(solution, lambda s: len(s) < 100) == "Solution 1: short."
    assert shorten_solution(solution, lambda s: len(s) < 5) is None
    assert shorten_solution("one block only", lambda s: False) is None
