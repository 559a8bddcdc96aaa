"""Tests for dail.evaluation.report: scoring samples, summaries on hand-computed data, Markdown."""

import json

import pytest

from dail.evaluation.report import DEFAULT_BUDGETS, score_samples, summarize, to_markdown


def _samples():
    # p1: 4 samples, 2 correct; p2: 4 samples, 0 correct; p3: unverifiable (gold None).
    rows = [
        ("p1", True, 100), ("p1", True, 300), ("p1", False, 50), ("p1", False, 900),
        ("p2", False, 200), ("p2", False, 200), ("p2", False, 200), ("p2", False, 200),
        ("p3", None, 1000), ("p3", None, 1000), ("p3", None, 1000), ("p3", None, 1000),
        ("p3", None, 1000),
    ]
    return [{"id": pid, "sample": i, "text": "", "correct": ok, "num_tokens": t}
            for i, (pid, ok, t) in enumerate(rows)]


def test_summary_hand_computed():
    s = summarize(_samples(), budgets=[128, 512])
    assert s["num_problems"] == 3
    assert s["num_verifiable"] == 2
    assert s["n"] == 4
    assert s["pass@1"] == pytest.approx((2 / 4 + 0) / 2)
    # p1: 1 - C(2,2)/C(4,2) = 5/6
    assert s["pass@2"] == pytest.approx((5 / 6 + 0) / 2)
    assert s["pass@4"] == pytest.approx(0.5)
    assert "pass@8" not in s
    assert s["mean_tokens"] == pytest.approx((100 + 300 + 50 + 900 + 800 + 5000) / 13)
    assert s["mean_tokens_correct"] == pytest.approx(200)
    assert s["accuracy_under_budget"] == {"128": pytest.approx(1 / 8), "512": pytest.approx(1 / 4)}
    for k in ("1", "2", "4"):
        lo, hi = s["pass@k_ci"][k]
        assert lo <= s[f"pass@{k}"] <= hi
    json.dumps(s)  # JSON-ready


def test_summary_defaults_and_missing_tokens():
    samples = _samples()
    s = summarize(samples)
    assert list(s["accuracy_under_budget"]) == [str(b) for b in DEFAULT_BUDGETS]
    for sample in samples:
        del sample["num_tokens"]
    s = summarize(samples, ks=[1, 3])
    assert s["mean_tokens"] is None and s["mean_tokens_correct"] is None
    assert s["accuracy_under_budget"] is None
    assert set(s["pass@k_ci"]) == {"1", "3"}
    assert s["pass@3"] == pytest.approx(0.5)


def test_summary_without_verifiable_problems_and_errors():
    only_p3 = [x for x in _samples() if x["id"] == "p3"]
    s = summarize(only_p3)
    assert s["num_verifiable"] == 0 and not any(k.startswith("pass@") and k[5:].isdigit() for k in s)
    mixed = _samples()
    mixed[0]["correct"] = None
    with pytest.raises(ValueError, match="mixes"):
        summarize(mixed)
    with pytest.raises(ValueError):
        summarize([])


def test_score_samples_fills_answer_and_correct():
    samples = [
        {"id": "a", "sample": 0, "text": r"so \boxed{\frac{1}{2}}"},
        {"id": "a", "sample": 1, "text": r"\boxed{\frac{1}{3}}"},
        {"id": "a", "sample": 2, "text": "no box"},
        {"id": 7, "sample": 0, "text": r"\boxed{239}"},
        {"id": "proof", "sample": 0, "text": r"\boxed{QED}"},
    ]
    gold = {"a": "0.5", "7": "239", "proof": None}
    scored = score_samples(samples, gold)
    assert [s["correct"] for s in scored] == [True, False, False, True, None]
    assert [s["answer"] for s in scored] == [r"\frac{1}{2}", r"\frac{1}{3}", None, "239", "QED"]
    assert "correct" not in samples[0]  # inputs untouched
    exact = score_samples(samples[:1], gold, grader="exact")
    assert exact[0]["correct"] is False  # 1/2 vs 0.5 needs maths
    with pytest.raises(ValueError, match="no gold entry"):
        score_samples([{"id": "zzz", "text": ""}], gold)
    with pytest.raises(ValueError, match="unknown grader"):
        score_samples(samples, gold, grader="nope")


def test_markdown_contains_table_rows():
    s = summarize(_samples(), budgets=[512])
    md = to_markdown(s, "Base model")
    assert md.startswith("## Base model")
    assert "| 1 | 0.2500 |" in md
    assert "| 4 | 0.5000 |" in md
    assert "| 512 | 0.2500 |" in md
    assert "verifiable: 2" in md
    assert md.endswith("\n")


def test_problems_without_answers_report_lengths_and_say_why_there_is_no_pass_at_k():
    from dail.evaluation.report import comparison_table

    proofs = [{**x, "finished": x["sample"] % 2 == 0} for x in _samples() if x["id"] == "p3"]
    s = summarize(proofs, budgets=[128, 2048])
    assert s["note"] == ("pass@k and accuracy need gold answers, which none of these problems has "
                         "(proofs?): only response lengths and endings are reported")
    assert s["accuracy_under_budget"] is None and s["mean_tokens"] == 1000
    assert s["finished_share"] == pytest.approx(3 / 5)
    md = to_markdown(s, title="proofs")
    assert "| k | pass@k |" not in md and "| token budget |" not in md
    assert "Responses that ended within the token budget: 0.6000" in md and f"Note: {s['note']}." in md
    table = comparison_table({"base": s, "trained": {**s, "mean_tokens": 900.0}})
    assert table.splitlines()[2:] == ["| mean tokens | 1000.0 | 900.0 | -100.0 |",
                                      "| responses that ended | 0.6000 | 0.6000 | +0.0000 |"]
