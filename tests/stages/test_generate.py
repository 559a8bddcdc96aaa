"""Selection after rollout, and what the summary says when it keeps nothing."""

from __future__ import annotations

import json

import pytest

from dail.cli import main
from dail.stages.generate import _summary, select_traces, why_rejected


def trace(pid, sample, *, correct, finished=True, answer="x", gold="5"):
    return {"id": pid, "sample": sample, "acceptance_rate": 0.5, "finished": finished,
            "answer": answer, "gold": gold, "correct": correct}


RECORDS = [
    trace("a", 0, correct=False, finished=False, answer=None),  # hit the token budget
    trace("a", 1, correct=False, answer=None),                  # ended without an answer
    trace("a", 2, correct=False, answer="4"),                   # a wrong answer
    trace("a", 3, correct=True, answer="5"),
    trace("b", 0, correct=False, answer="7"),
    trace("b", 1, correct=False, finished=False, answer="7"),
    trace("proof", 0, correct=None, finished=False, answer=None, gold=None),
    trace("proof", 1, correct=None, answer=None, gold=None),
]


def test_selection_keeps_right_answers_and_finished_proofs():
    selected = select_traces(RECORDS, keep=2)
    assert [(r["id"], r["sample"]) for r in selected] == [("a", 3), ("proof", 1)]


def test_selection_keeps_no_unfinished_trace_unless_asked():
    cut_off = [trace("a", 0, correct=True, finished=False, answer="5"),  # right, but hit the budget
               trace("proof", 0, correct=None, finished=False, answer=None, gold=None)]
    assert select_traces(cut_off, keep=2) == []
    assert _summary([], [object()] * 2, [], cut_off, [])["traces_unfinished"] == 2
    kept = select_traces(cut_off, keep=2, unfinished=True)
    assert [(r["id"], r["sample"]) for r in kept] == [("a", 0), ("proof", 0)]
    assert _summary([], [object()] * 2, [], cut_off, kept)["traces_selected_unfinished"] == 2


def test_the_summary_counts_why_traces_were_not_kept():
    selected = select_traces(RECORDS)
    summary = _summary([], [object()] * 3, [], RECORDS, selected)
    assert (summary["traces_unfinished"], summary["traces_without_answer"], summary["traces_wrong"]) == (3, 1, 2)
    assert why_rejected(summary, 64) == (
        "selection kept 2 of 8 traces (2 of 3 problems); of the traces not kept, 3 hit the token budget of "
        "64 tokens, 1 ended without an answer and 2 gave a wrong one")
    nothing = _summary([], [object()], [], RECORDS[4:6], [])
    assert why_rejected(nothing, None).endswith(
        "1 hit the token budget, 0 ended without an answer and 1 gave a wrong one; more --samples, a larger "
        "--max-new-tokens or another --tau may find some")


@pytest.mark.slow
def test_when_selection_keeps_nothing_generate_says_why_and_train_names_the_cause(tiny_model_dir, tmp_path,
                                                                                 caplog, capsys):
    from tests.conftest import PROBLEMS

    data = tmp_path / "answers.jsonl"  # problems with answers only: a random model gets none right
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS if p["id"] != "proof"))
    gen = tmp_path / "gen"
    with caplog.at_level("INFO"):
        assert main([str(a) for a in ("generate", "--model", tiny_model_dir, "--data", data, "--out", gen,
                                      "--samples", 2, "--max-new-tokens", 3, "--tau", 0.5)]) == 0
    summary = json.loads((gen / "generate_summary.json").read_text())
    assert summary["traces_selected"] == 0
    counts = (summary["traces_unfinished"], summary["traces_without_answer"], summary["traces_wrong"])
    assert sum(counts) == 4 and summary["traces_unfinished"] > 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert why_rejected(summary, 3) in warned
    capsys.readouterr()
    code = main([str(a) for a in ("train", "--model", tiny_model_dir, "--traces", gen / "selected.jsonl",
                                  "--out", tmp_path / "train")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{gen / 'selected.jsonl'}: no traces to train on: {why_rejected(summary, 3)}" in err
    assert not (tmp_path / "train").exists()


@pytest.mark.parametrize("command", ["generate", "eval", "probe"])
def test_a_budget_the_context_cannot_hold_is_refused_before_any_output(command, tiny_model_dir, problems_file,
                                                                      tmp_path, capsys):
    context = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    out = tmp_path / "out"
    argv = [command, "--model", tiny_model_dir, "--data", problems_file, "--out", out, "--max-new-tokens", context]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--max-new-tokens {context}" in err and f"{context} tokens" in err and "below" in err
    assert not out.exists()


def test_problems_that_all_outgrow_the_prompt_limit_fail_generate(tiny_model_dir, problems_file, tmp_path, capsys):
    argv = ["generate", "--model", tiny_model_dir, "--data", problems_file, "--out", tmp_path / "out",
            "--max-prompt-tokens", 3, "--max-new-tokens", 4]
    assert main([str(a) for a in argv]) == 2
    assert "fits in 3 tokens (--max-prompt-tokens)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "traces.jsonl").exists()
