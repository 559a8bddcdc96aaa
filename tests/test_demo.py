"""`dail demo` end to end at miniature scale, on the committed world model."""

from __future__ import annotations

import json

import pytest

from dail.demo import ALL_METHODS, DemoSettings, run

TINY = DemoSettings(n_train=4, n_test=2, n_known=2, n_train_eval=2, samples=2, eval_n=4, train_eval_n=2,
                    known_n=2, max_new_tokens=48, epochs=1.0, batch_size=16, budgets=(24, 48))


@pytest.mark.slow
def test_demo_runs_every_method_and_writes_its_outputs(tmp_path):
    results = run(str(tmp_path / "demo"), settings=TINY)
    out = tmp_path / "demo"
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"].keys() == results["methods"].keys()
    assert {"validity", "methods"} <= saved.keys()
    assert "known_student_pass@1" in saved["validity"]
    # Every method is either evaluated or reported as not trained, with the reason.
    assert set(saved["methods"]) | set(saved["skipped"]) == set(ALL_METHODS)
    for name, m in saved["methods"].items():
        assert [k for k in m if k.startswith("pass@") and k != "pass@k_ci"] == ["pass@1", "pass@2", "pass@4"], name
        assert m["pass@1"] <= m["pass@2"] <= m["pass@4"]
        assert list(m["train_pass@k"]) == ["pass@1", "pass@2"], name  # train_eval_n samples
        assert 0.0 <= m["retention"] <= 1.0
        assert (m["trainable_share"] is None) if name == "base" else (0 < m["trainable_share"] < 1), name
        assert m["mean_tokens"] is None or 0 < m["mean_tokens"] <= TINY.max_new_tokens
        # Per type: both novel types, and they average to the overall figure (equal counts).
        assert set(m["by_type"]) == {"matmul", "poly"}, name
        assert sum(t["pass@1"] for t in m["by_type"].values()) / 2 == pytest.approx(m["pass@1"])
    for source, r in saved["rollouts"].items():
        if r["traces_selected"]:
            assert 0.0 <= r["copied_items"] <= 1.0 and r["student_nll"] > 0, source
    shared = saved["mixed_vs_direct"]
    kept = min(saved["rollouts"][s]["problems_selected"] for s in ("mixed", "direct"))
    assert 0 <= shared["identical"] <= shared["problems"] <= kept
    report = (out / "report.md").read_text()
    assert f"Mixed and direct traces are the same for {shared['identical']} of the {shared['problems']}" in report
    assert "Validity of the world" in report and "| base |" in report
    assert "| mean tokens | retention (known pass@1) | trainable share |" in report
    trained = next(name for name in saved["methods"] if name != "base")  # sft always trains
    share = saved["methods"][trained]["trainable_share"]
    assert any(line.startswith(f"| {trained} |") and line.endswith(f" | {100 * share:.2f}% |")
               for line in report.splitlines())
    assert "student NLL/token" in report
    assert "| method | train pass@1 | test pass@1 | train pass@2 | test pass@2 |" in report
    assert "| method | matmul pass@1 | matmul pass@4 | poly pass@1 | poly pass@4 |" in report
    assert (out / "pass_at_k.png").stat().st_size > 0
    assert (out / "accuracy_vs_budget.png").stat().st_size > 0
    # A second run reuses every cached stage and reproduces the results.
    again = run(str(out), settings=TINY)
    assert {k: v["pass@1"] for k, v in again["methods"].items()} == {
        k: v["pass@1"] for k, v in saved["methods"].items()}


@pytest.mark.slow
def test_quick_demo_trains_every_method_that_has_traces(tmp_path):
    """`dail demo --quick` reaches every stage: its budget fits whole novel-type solutions."""
    from dail.demo import QUICK

    results = run(str(tmp_path / "quick"), quick=True)
    assert results["settings"]["max_new_tokens"] == QUICK.max_new_tokens
    assert {"sft", "dail_nll", "dail", "direct_dail"} <= results["methods"].keys()
    assert set(results["skipped"]) <= {"star"}  # the base model never rationalizes from the answer
    assert results["rollouts"]["mixed"]["traces_selected"] > 0


def test_report_names_the_command_that_gives_its_settings():
    from dataclasses import asdict, replace

    from dail.demo import QUICK, command_of

    assert command_of(asdict(DemoSettings())) == "dail demo"
    assert command_of(asdict(QUICK)) == "dail demo --quick"
    assert command_of(asdict(replace(DemoSettings(), divergence="forward"))) == "dail demo --divergence forward"
    assert command_of(asdict(replace(DemoSettings(), divergence="jsd:0.50"))) == "dail demo --divergence jsd:0.5"
    assert command_of(asdict(replace(DemoSettings(), seed=1))) == "dail demo --seed 1"
    assert command_of(asdict(replace(DemoSettings(), gamma=0.0))) == "dail demo --gamma 0.0"
    # A setting without a flag is named through the Python API, never silently dropped.
    assert "'n_test': 8" in command_of(asdict(replace(DemoSettings(), n_test=8)))


def test_training_problems_evaluated_mix_the_types_like_the_test_set():
    import json as _json

    from dail.demo import by_type

    lines = [_json.dumps({"id": f"{t}-{i}", "type": t}) for t in ("matmul", "poly") for i in range(5)]
    picked = [_json.loads(line)["id"] for line in by_type(lines, 4)]
    assert picked == ["matmul-0", "poly-0", "matmul-1", "poly-1"]
    assert len(by_type(lines, 20)) == 10  # never more than there are


def test_shared_traces_counts_problems_with_the_same_traces(tmp_path):
    from dail.demo import shared_traces

    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows))
        return str(path)

    a = write("a.jsonl", [("p1", "x"), ("p1", "y"), ("p2", "z"), ("p3", "w")])
    b = write("b.jsonl", [("p1", "y"), ("p1", "x"), ("p2", "other"), ("p4", "w")])
    # p1: the same two traces in another order; p2: different; p3 and p4: kept by one only.
    assert shared_traces(a, b) == {"problems": 2, "identical": 1}


def test_trace_style_tells_copied_expert_lines_from_the_students_own_style(tmp_path):
    import random

    from dail.data import write_jsonl_atomic
    from dail.demo import trace_style
    from dail.prompts import PromptBuilder
    from dail.world import base_model_dir
    from dail.world import generator as gen
    from dail.world.tokenizer import load_tokenizer

    tokenizer, builder = load_tokenizer(str(base_model_dir())), PromptBuilder()
    specs = [gen.spec_of("vecsum", random.Random(i)) for i in range(4)]

    def records(copy_all: bool) -> list[dict]:
        out = []
        for i, spec in enumerate(specs):
            text = spec.detailed(range(len(spec.items)) if copy_all else ())
            prompt = builder.render(spec.to_problem(f"p{i}"), tokenizer)["student"]
            out.append({"text": text, "token_ids": tokenizer.encode(text, add_special_tokens=False),
                        "prompt_ids": {"student": tokenizer.encode(prompt, add_special_tokens=False)}})
        return out

    styles = {}
    for name, copy_all in (("own", False), ("copied", True)):
        write_jsonl_atomic(tmp_path / f"{name}.jsonl", records(copy_all))
        styles[name] = trace_style(base_model_dir(), tmp_path / f"{name}.jsonl")
    assert styles["own"]["copied_items"] == 0.0 and styles["copied"]["copied_items"] == 1.0
    # A known type in the base model's own style is what it would write; copied lines are not.
    assert styles["own"]["student_nll"] < 0.05 < styles["copied"]["student_nll"]
    write_jsonl_atomic(tmp_path / "none.jsonl", [])
    assert trace_style(base_model_dir(), tmp_path / "none.jsonl") == {"copied_items": None, "student_nll": None}
