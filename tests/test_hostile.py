"""Hostile and broken input: either a valid result or the project's own clear error, quickly.

Property-based over the data loader, answer extraction, waypoint extraction, prompt rendering
and grading; plus size bounds (megabyte inputs in well under a second) and model refusals.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dail.cli import main
from dail.data import DataError, Problem, last_boxed, load_problems
from dail.evaluation.grading import grade_exact
from dail.rollout.prompts import PromptBuilder, extract_math_waypoints

FAST = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text biased towards the characters that matter to LaTeX parsing, plus control characters.
LATEX = st.lists(st.sampled_from(list("{}\\ $^_x2.+-e9\n\t\x00\x1b\u202e")
                                 + ["\\boxed", "\\fbox", "\\frac"]), max_size=40).map("".join)
ANY_TEXT = st.one_of(st.text(max_size=200), LATEX)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ANY_TEXT,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
                           max_leaves=8)


def reference_last_boxed(text: str) -> str | None:
    """A direct (quadratic) statement of the rule, for comparison on small inputs."""
    best = None
    for start in range(len(text)):
        for cmd in ("\\boxed", "\\fbox"):
            if not text.startswith(cmd, start):
                continue
            pos = start + len(cmd)
            while pos < len(text) and text[pos] == " ":
                pos += 1
            if pos >= len(text):
                continue
            if text[pos] != "{":
                end = pos
                while end < len(text) and not text[end].isspace() and text[end] not in "$}":
                    end += 1
                if end > pos:
                    best = text[pos:end].strip()
                continue
            depth = 0
            for i in range(pos, len(text)):
                if text[i] in "{}" and i > 0 and text[i - 1] == "\\":
                    continue
                depth += 1 if text[i] == "{" else -1 if text[i] == "}" else 0
                if depth == 0:
                    best = text[pos + 1:i].strip()
                    break
    return best


@FAST
@given(LATEX)
def test_last_boxed_agrees_with_the_plain_rule(text):
    assert last_boxed(text) == reference_last_boxed(text)


@FAST
@given(ANY_TEXT, st.one_of(st.none(), ANY_TEXT))
def test_waypoints_are_sorted_unique_strings_without_the_answer(text, answer):
    found = extract_math_waypoints(text, answer)
    assert found == sorted(set(found)) and all(isinstance(w, str) and w for w in found)
    if answer is not None:
        assert "".join(answer.split()) not in found


@FAST
@given(st.binary(max_size=300))
def test_loader_on_arbitrary_bytes_returns_problems_or_data_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "p.jsonl"
    path.write_bytes(data)
    try:
        problems = load_problems(path)
    except DataError as e:
        assert str(e).startswith(str(path))
    else:
        assert problems and all(isinstance(p, Problem) for p in problems)


@FAST
@given(st.lists(JSON_VALUES, max_size=4), st.sampled_from(["jsonl", "json"]))
def test_loader_on_arbitrary_json_returns_problems_or_data_error(tmp_path_factory, rows, kind):
    path = tmp_path_factory.mktemp("json") / f"p.{kind}"
    text = json.dumps(rows) if kind == "json" else "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    try:
        problems = load_problems(path)
    except DataError as e:
        assert str(path) in str(e)
    else:
        for p in problems:
            assert p.id.strip() and p.problem.strip() and p.solution.strip()


@pytest.fixture(scope="module")
def tokenizer():
    from dail.testing import build_tokenizer

    return build_tokenizer()


@FAST
@given(problem=ANY_TEXT.filter(str.strip), solution=ANY_TEXT.filter(str.strip),
       answer=st.one_of(st.none(), ANY_TEXT.filter(str.strip)))
def test_prompts_hold_the_text_verbatim_and_never_expand_placeholders_in_it(tokenizer, problem, solution, answer):
    p = Problem(id="x", problem=problem, solution=solution, answer=answer)
    messages = PromptBuilder().user_messages(p)
    assert all(problem in m for m in messages.values())
    assert solution in messages["privileged"]
    rendered = PromptBuilder().render(p, tokenizer)
    assert set(rendered) == {"student", "privileged", "negative"}
    # A problem that mentions {solution} does not leak the expert solution to the student.
    leaky = Problem(id="y", problem="see {solution} and {answer}", solution="SECRET 42", answer="42")
    assert "SECRET" not in PromptBuilder().user_messages(leaky)["student"]


@FAST
@given(ANY_TEXT, ANY_TEXT.filter(str.strip))
def test_exact_grader_returns_a_bool(response, gold):
    assert grade_exact(response, gold) in (True, False)


@pytest.mark.parametrize("response", ["\\boxed{" * 2000, "\\boxed{\\frac{" + "{" * 5000 + "}",
                                      "\\boxed{\x00\x1b}", "\\boxed{1/0}", "\\boxed{" + "9" * 3000 + "}"])
def test_math_grader_on_hostile_answers_is_a_quick_bool(response):
    from dail.evaluation.grading import grade_math

    start = time.perf_counter()
    assert grade_math(response, "5") in (True, False)
    assert time.perf_counter() - start < 15  # math-verify itself is bounded by the grader


MEGABYTE = 1 << 20


def _best_time(fn, arg, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.parametrize("name, build", [
    ("nested braces", lambda n: "\\boxed{" + "{" * (n // 2) + "}" * (n // 2) + "}"),
    ("unclosed boxes", lambda n: "\\boxed{" * (n // 7)),
    ("nested boxes", lambda n: "\\fbox{\\boxed{" * (n // 13)),
    ("digits", lambda n: "1" * n),
    ("powers", lambda n: "x^" * (n // 2)),
    ("spaces", lambda n: "x" + " " * n + "+"),
])
def test_megabyte_solutions_are_processed_in_linear_time(name, build):
    """A megabyte takes about 8x an eighth of it (quadratic code would take 64x), and < 5 s."""
    for step in (last_boxed, lambda text: extract_math_waypoints(text, None),
                 lambda text: PromptBuilder().user_messages(Problem(id="big", problem="p", solution=text))):
        small, big = build(MEGABYTE // 8), build(MEGABYTE)
        t_small, t_big = _best_time(step, small), _best_time(step, big)
        assert t_big < 5.0, name
        assert t_big < 20 * t_small + 0.05, (name, t_small, t_big)


# --------------------------------------------------------------------------- models


def test_models_that_are_not_safetensors_or_ship_code_are_refused(tiny_model_dir, tmp_path, capsys):
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    for f in pickled.glob("*.safetensors"):
        f.rename(f.with_name("pytorch_model.bin"))
    remote = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"id": "a", "problem": "p", "solution": "s"}) + "\n")
    for model, message in ((pickled, "safetensors only"), (remote, "--trust-remote-code"),
                           (tmp_path / "missing", "not a model directory")):
        code = main(["generate", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err
