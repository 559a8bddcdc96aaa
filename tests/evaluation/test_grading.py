"""Tests for dail.evaluation.grading: extraction, equivalent forms, thread safety, bounded time."""

import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest

import dail.evaluation.grading as grading
from dail.evaluation.grading import (
    GRADERS,
    PLUGIN_GRADERS,
    extract_answer,
    get_grader,
    grade,
    math_verify_equal,
    normalize_answer,
)

# Finite but astronomically large: sympy cannot decide 9^(9^(9^9)) == 2 in any useful time.
PATHOLOGICAL = r"The answer is \boxed{9^{9^{9^{9}}}}"

EQUIVALENT = [
    (r"so $\boxed{\frac{1}{2}}$.", "0.5"),
    (r"\boxed{\dfrac12}", r"\frac{1}{2}"),
    (r"\boxed{239}", "239"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}"),
    (r"\boxed{\left( 1, 2 \right)}", "(1,2)"),
    (r"\boxed{90^\circ}", "90"),
    (r"\boxed{\text{(B)}}", "B"),
    (r"\boxed{1,000}", "1000"),
    (r"\boxed{\{1, 2\}}", r"\{2,1\}"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2"),
    (r"first \boxed{7}, finally \boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}"),
    (r"\boxed{5}", r"\boxed{5}"),  # a boxed gold is accepted too
]

WRONG = [
    (r"\boxed{240}", "239"),
    (r"\boxed{\frac{1}{3}}", "0.5"),
    (r"first \boxed{7}, finally \boxed{\frac{\sqrt{3}}{2}}", "7"),  # only the last box counts
    (r"\boxed{(2, 1)}", "(1,2)"),
    (r"\boxed{B}", "A"),
    (r"\boxed{}", "0"),
    (r"\boxed{x+1}", "x+2"),
]


@pytest.mark.parametrize("response,gold", EQUIVALENT)
def test_math_grader_accepts_equivalent_forms(response, gold):
    assert grade(response, gold) is True


@pytest.mark.parametrize("response,gold", WRONG)
def test_math_grader_rejects_wrong_answers(response, gold):
    assert grade(response, gold) is False


@pytest.mark.parametrize("grader", ["math", "exact"])
def test_no_box_is_wrong(grader):
    assert grade("The answer is 239.", "239", grader=grader) is False
    assert grade(r"unfinished \boxed{23", "23", grader=grader) is False


def test_extract_answer_nested_braces():
    assert extract_answer(r"x \boxed{\frac{1}{\sqrt{2}}} y") == r"\frac{1}{\sqrt{2}}"
    assert extract_answer(r"\boxed{1} then \boxed{\{a, b\}}") == r"\{a, b\}"
    assert extract_answer("nothing here") is None
    assert grade(r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}") is True


def test_exact_grader_normalises_but_does_not_do_maths():
    assert grade(r"\boxed{ \dfrac{1}{2} .}", r"$\frac{1}{2}$", grader="exact") is True
    assert grade(r"\boxed{\text{yes}}", "yes", grader="exact") is True
    assert grade(r"\boxed{0.5}", r"\frac{1}{2}", grader="exact") is False


def test_normalize_answer():
    assert normalize_answer(r" \left( 1,\! 2 \right). ") == "(1,2)"
    assert normalize_answer(r"45^{\circ}") == "45"
    assert normalize_answer(r"\text{\textbf{A}}") == "A"
    assert normalize_answer("1{,}234{,}567") == "1234567"
    assert normalize_answer("1,2") == "1,2"  # a tuple, not a thousands separator
    assert normalize_answer("x") != normalize_answer("X")


def test_unparseable_and_text_answers():
    assert math_verify_equal("", "1") is None  # nothing to parse: the string match decides
    assert grade(r"\boxed{\mathrm{no\ solution}}", "no solution") is True
    assert grade(r"\boxed{\text{no solution}}", r"\text{none}") is False


def _in_thread(fn, *args):
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("value", fn(*args)))
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    return result["value"]


def test_grade_from_worker_threads():
    assert _in_thread(grade, r"\boxed{\frac{1}{2}}", "0.5") is True
    assert _in_thread(grade, r"\boxed{\frac{1}{3}}", "0.5") is False
    cases = EQUIVALENT + WRONG
    expected = [True] * len(EQUIVALENT) + [False] * len(WRONG)
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = list(pool.map(lambda rg: grade(*rg), cases))
    assert got == expected


def test_pathological_input_is_bounded_in_main_thread():
    assert threading.current_thread() is threading.main_thread()
    start = time.monotonic()
    assert math_verify_equal(r"9^{9^{9^{9}}}", "2", timeout=1.0) is False
    assert time.monotonic() - start < 5
    # The timer is disarmed and later comparisons still work.
    assert grade(r"\boxed{\frac{1}{2}}", "0.5") is True


def test_pathological_input_is_bounded_in_worker_thread():
    _in_thread(grade, r"\boxed{1}", "1.0")  # start a helper outside the timed part
    start = time.monotonic()
    assert _in_thread(grade, PATHOLOGICAL, "2") is False
    limit = grading.MATH_TIMEOUT_SECONDS + grading._KILL_GRACE_SECONDS + 3
    assert time.monotonic() - start < limit
    assert _in_thread(grade, r"\boxed{\frac{1}{2}}", "0.5") is True


def test_stuck_helper_is_killed_and_replaced(monkeypatch):
    # Leave the caller almost no grace: the helper is still working when the wait ends, as it
    # would be if stuck in C code where its own timer cannot interrupt it.
    monkeypatch.setattr(grading, "_KILL_GRACE_SECONDS", -0.8)
    _in_thread(grade, r"\boxed{1}", "1.0")
    start = time.monotonic()
    assert _in_thread(lambda: math_verify_equal(r"9^{9^{9^{9}}}", "2", timeout=1.0)) is False
    assert time.monotonic() - start < 2
    monkeypatch.undo()
    assert all(h.proc.poll() is None for h in grading._idle_helpers)  # the stuck one is gone
    assert _in_thread(grade, r"\boxed{\dfrac12}", r"\frac{1}{2}") is True


def test_own_timer_is_respected_by_falling_back_to_helper():
    import signal

    previous = signal.signal(signal.SIGALRM, lambda *a: None)
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        assert grade(r"\boxed{\frac{1}{2}}", "0.5") is True
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < remaining <= 30  # our caller's timer survived
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_registry_and_get_grader(monkeypatch):
    assert set(GRADERS) >= {"math", "exact"} and "world" in PLUGIN_GRADERS
    assert get_grader("math") is GRADERS["math"]
    with pytest.raises(ValueError, match="exact.*math.*world"):
        get_grader("nope")
    with pytest.raises(ValueError, match="cannot import"):
        get_grader("no_such_module_xyz:grade")
    with pytest.raises(ValueError, match="no callable"):
        get_grader("dail.evaluation.grading:NOT_THERE")
    assert get_grader("dail.evaluation.grading:grade_exact")(r"\boxed{3}", "3") is True


def test_world_grader_is_resolved_lazily(monkeypatch):
    fake = types.ModuleType("dail.world.scoring")
    fake.grade = lambda response, answer: response == answer
    monkeypatch.setitem(sys.modules, "dail.world.scoring", fake)
    assert grade("abc", "abc", grader="world") is True
    assert grade("abc", "abd", grader="world") is False


def test_world_grader_is_the_worlds_own_and_grading_does_not_import_the_world():
    import subprocess

    from dail.world import scoring

    assert get_grader("world") is scoring.grade
    assert grade(r"so \boxed{3 4}", "34", grader="world") is True
    code = "import sys, dail.evaluation.grading; print(any(m.startswith('dail.world') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
