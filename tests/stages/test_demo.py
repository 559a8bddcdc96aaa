"""`dail demo` end to end at miniature scale, on the committed world model."""

from __future__ import annotations

import json

import pytest

from dail.config import ConfigError
from dail.stages.demo import ALL_METHODS, DemoSettings, run

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
            assert r["habit_lines"] == 0.0, source  # the committed model has no habits
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
def test_quick_demo_with_two_seeds_gives_means_spreads_and_each_seed(tmp_path, capsys):
    """`dail demo --quick --seeds 2` reaches every stage (its budget fits whole novel-type
    solutions) and trains every method that has traces twice, from the same traces."""
    from dail.cli import main
    from dail.stages.demo import QUICK

    out = tmp_path / "seeds"
    assert main(["demo", "--quick", "--seeds", "2", "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["seeds"] == 2 and saved["settings"]["max_new_tokens"] == QUICK.max_new_tokens
    assert {"sft", "dail_nll", "dail", "direct_dail"} <= saved["methods"].keys()
    assert set(saved["skipped"]) <= {"star"}  # the base model never rationalizes from the answer
    assert saved["rollouts"]["mixed"]["traces_selected"] > 0
    adapters = {a for m in saved["methods"].values() for a in m["adapters"]}
    assert len(list(out.glob("train-*"))) == len(adapters)  # base is not trained
    shared = saved["mixed_vs_direct"]["same_training_data"]
    assert (saved["methods"]["direct_dail"]["adapters"] == saved["methods"]["dail"]["adapters"]) == shared
    assert len(adapters) == 2 * (len(saved["methods"]) - 1 - shared)
    for name, m in saved["methods"].items():
        if name == "base":
            assert (m["seeds"], m["per_seed"], m["spread"], m["trainable_share"]) == ([], [], {}, None)
            continue
        assert m["seeds"] == [0, 1] and len(m["per_seed"]) == len(set(m["adapters"])) == 2, name
        assert 0 < m["trainable_share"] < 1
        assert m["divergence"] == ("forward" if name in ("dail", "direct_dail") else None)
        for key in ("pass@1", "pass@4", "retention"):
            values = [run[key] for run in m["per_seed"]]
            assert m[key] == pytest.approx(sum(values) / 2), (name, key)
            assert (m["spread"][key]["min"], m["spread"][key]["max"]) == (min(values), max(values))
            assert m["spread"][key]["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
        by_type = [run["by_type"]["poly"]["pass@1"] for run in m["per_seed"]]
        assert m["by_type"]["poly"]["pass@1"] == pytest.approx(sum(by_type) / 2)
        assert m["spread"]["by_type"]["poly"]["pass@1"]["max"] == max(by_type)
        for k, interval in m["pass@k_ci"].items():  # one seed's bootstrap interval is no interval of the mean
            assert interval is None or interval == m["per_seed"][0]["pass@k_ci"][k] == m["per_seed"][1]["pass@k_ci"][k]
    report = (out / "report.md").read_text()
    assert "Each trained method: the mean over 2 training seeds (0, 1; the same traces)" in report
    assert "Command: `dail demo --quick --seeds 2`" in report
    sft = saved["methods"]["sft"]
    row = next(line for line in report.splitlines() if line.startswith("| sft |"))
    assert f"| {sft['pass@1']:.3f} [{sft['spread']['pass@1']['min']:.2f}, {sft['spread']['pass@1']['max']:.2f}] |" in row
    # One seed is the first of the two: every stage comes from the cache, with the same figures.
    stages = sorted(p.name for p in out.iterdir())
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == stages
    again = json.loads((out / "results.json").read_text())
    for name, m in again["methods"].items():
        if name != "base":
            assert m["pass@1"] == saved["methods"][name]["per_seed"][0]["pass@1"], name
            assert m["adapters"] == saved["methods"][name]["adapters"][:1]


def test_mean_and_spread_walk_nested_figures():
    from dail.stages.demo.comparison import mean_and_spread

    runs = [{"pass@1": 0.25, "by_type": {"poly": {"pass@1": 0.5}}, "pass@k_ci": {"1": [0.1, 0.4]},
             "mean_tokens": None, "budgets": [64], "acc": {"64": None}},
            {"pass@1": 0.75, "by_type": {"poly": {"pass@1": 1.0}}, "pass@k_ci": {"1": [0.5, 0.9]},
             "mean_tokens": 12.0, "budgets": [64], "acc": {"64": None}},
            {"pass@1": 0.5, "by_type": {"poly": {"pass@1": 0.0}}, "pass@k_ci": {"1": [0.2, 0.7]},
             "mean_tokens": 10.0, "budgets": [64], "acc": {"64": None}}]
    means, spread = mean_and_spread(runs)
    assert means == {"pass@1": 0.5, "by_type": {"poly": {"pass@1": 0.5}}, "pass@k_ci": {"1": None}, "mean_tokens": None,
                     "budgets": [64], "acc": {"64": None}}
    assert spread["pass@1"] == {"min": 0.25, "max": 0.75, "std": pytest.approx(0.25)}
    assert spread["by_type"]["poly"]["pass@1"] == {"min": 0.0, "max": 1.0, "std": pytest.approx(0.5)}
    assert set(spread) == {"pass@1", "by_type"}  # no spread where there is no mean
    one, one_spread = mean_and_spread(runs[:1])
    assert one == runs[0] and one_spread["pass@1"] == {"min": 0.25, "max": 0.25, "std": None}


def test_seeds_setting():
    from dail.config import ConfigError

    assert DemoSettings(seed=3, seeds=3).training_seeds == [3, 4, 5]
    assert DemoSettings().training_seeds == [0]  # the run the demo always made
    with pytest.raises(ConfigError, match="--seeds 0: out of range; allowed: >= 1"):
        DemoSettings(seeds=0)


def test_report_names_the_command_that_gives_its_settings():
    from dataclasses import asdict, replace

    from dail.stages.demo import QUICK
    from dail.stages.demo.report import command_of

    assert command_of(asdict(DemoSettings())) == "dail demo"
    assert command_of(asdict(QUICK)) == "dail demo --quick"
    assert DemoSettings().divergence == "forward"  # the paper's reverse KL taught nothing in the world
    assert command_of(asdict(replace(DemoSettings(), divergence="reverse"))) == "dail demo --divergence reverse"
    assert command_of(asdict(replace(DemoSettings(), divergence="jsd:0.50"))) == "dail demo --divergence jsd:0.5"
    assert command_of(asdict(replace(DemoSettings(), seed=1))) == "dail demo --seed 1"
    assert command_of(asdict(replace(QUICK, seeds=2))) == "dail demo --quick --seeds 2"
    assert command_of(asdict(replace(DemoSettings(), gamma=0.0))) == "dail demo --gamma 0.0"
    sized = replace(DemoSettings(), lora_r=1, lora_target_modules=("q_proj", "v_proj"))
    assert command_of(asdict(sized)) == "dail demo --lora-r 1 --lora-target-modules q_proj v_proj"
    # A setting without a flag is named through the Python API, never silently dropped.
    assert "'n_test': 8" in command_of(asdict(replace(DemoSettings(), n_test=8)))


def test_training_problems_evaluated_mix_the_types_like_the_test_set():
    import json as _json

    from dail.stages.demo.comparison import by_type

    lines = [_json.dumps({"id": f"{t}-{i}", "type": t}) for t in ("matmul", "poly") for i in range(5)]
    picked = [_json.loads(line)["id"] for line in by_type(lines, 4)]
    assert picked == ["matmul-0", "poly-0", "matmul-1", "poly-1"]
    assert len(by_type(lines, 20)) == 10  # never more than there are


def test_shared_traces_counts_problems_with_the_same_traces(tmp_path):
    from dail.stages.demo.comparison import shared_traces

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
    from dail.rollout.prompts import PromptBuilder
    from dail.stages.demo.comparison import trace_style
    from dail.world import base_model_dir
    from dail.world import generator as gen
    from dail.world.tokenizer import load_tokenizer

    tokenizer, builder = load_tokenizer(str(base_model_dir())), PromptBuilder()
    specs = [gen.spec_of("vecsum", random.Random(i)) for i in range(4)]

    def compact(line: str) -> str:
        return gen.privileged_habits(line, swap=False, compact=True)

    def records(copy_all: bool, habits: bool = False) -> list[dict]:
        out = []
        for i, spec in enumerate(specs):
            text = spec.detailed(range(len(spec.items)) if copy_all else (), compact if habits else None)
            prompt = builder.render(spec.to_problem(f"p{i}"), tokenizer)["student"]
            out.append({"text": text, "token_ids": tokenizer.encode(text, add_special_tokens=False),
                        "prompt_ids": {"student": tokenizer.encode(prompt, add_special_tokens=False)}})
        return out

    styles = {}
    for name, copy_all, habits in (("own", False, False), ("copied", True, False), ("habits", False, True)):
        write_jsonl_atomic(tmp_path / f"{name}.jsonl", records(copy_all, habits))
        styles[name] = trace_style(base_model_dir(), tmp_path / f"{name}.jsonl")
    assert styles["own"]["copied_items"] == 0.0 and styles["copied"]["copied_items"] == 1.0
    assert styles["own"]["habit_lines"] == 0.0 and styles["habits"]["habit_lines"] == 1.0
    assert styles["habits"]["copied_items"] == 0.0
    # A known type in the base model's own style is what it would write; copied lines and
    # lines in another notation are not.
    assert styles["own"]["student_nll"] < 0.05 < min(styles["copied"]["student_nll"], styles["habits"]["student_nll"])
    write_jsonl_atomic(tmp_path / "none.jsonl", [])
    assert trace_style(base_model_dir(), tmp_path / "none.jsonl") == {
        "copied_items": None, "habit_lines": None, "student_nll": None}


def test_adapter_settings_reach_every_trained_method(tmp_path, monkeypatch):
    """--lora-r and --lora-target-modules shape every method's adapter; the default targets stay
    out of the training settings, so adapters cached before these flags existed are found again."""
    from dataclasses import replace

    from dail.stages import train
    from dail.stages.demo import comparison

    seen = []
    monkeypatch.setattr(train, "run", lambda cfg: seen.append(cfg))
    traces = tmp_path / "traces.jsonl"
    traces.write_text("")
    for settings in (DemoSettings(), replace(DemoSettings(), lora_r=2, lora_target_modules=("q_proj", "k_proj"))):
        for loss in ("sft", "nll", "dail"):
            comparison.train_method(tmp_path, tmp_path, str(traces), str(traces), loss, settings, seed=0)
    default, sized = seen[:3], seen[3:]
    assert all("lora_target_modules" not in cfg.training and cfg.training["lora_r"] == 32 for cfg in default)
    for cfg in sized:
        assert cfg.training["lora_target_modules"] == ["q_proj", "k_proj"]
        assert cfg.training["lora_r"] == cfg.training["lora_alpha"] == 2
    assert len({cfg.out for cfg in seen}) == 6  # each its own cached stage


def test_a_source_with_the_same_training_data_trains_on_the_earlier_file(tmp_path):
    """Direct traces equal to the mixed ones (rollout statistics aside) reuse the mixed file, so
    direct_dail shares dail's cached adapters; one differing token keeps them apart."""
    from dail.stages.demo.comparison import same_training_data, training_traces

    def write(name, rows, acceptance):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"id": pid, "prompt_ids": {"student": [1, 2]}, "token_ids": ids,
                                            "acceptance_rate": acceptance}) + "\n" for pid, ids in rows))
        return str(path)

    rows = [("p1", [5, 6, 7]), ("p2", [8, 9])]
    mixed = write("mixed.jsonl", rows, 0.9)
    direct = write("direct.jsonl", rows, 0.0)
    other = write("other.jsonl", [("p1", [5, 6, 7]), ("p2", [8, 4])], 0.0)
    reordered = write("reordered.jsonl", rows[::-1], 0.0)
    assert same_training_data(mixed, direct)
    assert not same_training_data(mixed, other) and not same_training_data(mixed, reordered)
    assert training_traces(direct, {"mixed": mixed, "direct": direct}) == mixed
    assert training_traces(other, {"mixed": mixed, "direct": other}) == other
    assert training_traces(mixed, {"mixed": mixed}) == mixed


def test_seeded_plot_bands_span_the_seeds_and_shared_runs_are_drawn_once(tmp_path, monkeypatch):
    from dail.evaluation import plots
    from dail.stages.demo.report import plot

    def trained(adapters, low, high, divergence=None):
        return {"pass@1": (low + high) / 2, "adapters": adapters, "divergence": divergence,
                "pass@k_ci": {"1": None}, "spread": {"pass@1": {"min": low, "max": high, "std": 0.1}}}

    results = {"settings": {"seeds": 2}, "methods": {
        "base": {"pass@1": 0.0, "adapters": [], "pass@k_ci": {"1": [0.0, 0.0]}, "spread": {}},
        "dail": trained(["a0", "a1"], 0.2, 0.4, "forward"),
        "direct_dail": trained(["a0", "a1"], 0.2, 0.4, "forward")}}
    drawn = {}
    monkeypatch.setattr(plots, "plot_summaries", lambda s, root, title: drawn.update(s, title=title))
    plot(results, tmp_path)
    assert set(drawn) == {"base", "dail (forward)", "title"}
    assert drawn["dail (forward)"]["pass@k_ci"] == {"1": [0.2, 0.4]}
    assert "2 seeds" in drawn["title"]
    results["methods"]["direct_dail"]["adapters"] = ["b0", "b1"]  # trained on data of its own
    results["settings"]["seeds"] = 1
    drawn.clear()
    plot(results, tmp_path)
    assert {"dail (forward)", "direct_dail (forward)"} <= set(drawn)
    assert drawn["dail (forward)"]["pass@k_ci"] == {"1": None}  # one seed: the bootstrap interval


def test_demo_samples_on_the_backend_it_is_given(tmp_path, monkeypatch, capsys):
    from dail.cli import main
    from dail.rollout.vllm_backend import engine
    from dail.stages import generate

    monkeypatch.setattr(engine, "vllm_installed", lambda: False)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--backend", "vllm"]) == 2  # checked before any stage
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'dail[vllm]'" in err and not out.exists()
    with pytest.raises(ConfigError, match="'bogus': not one of auto, builtin, vllm"):
        DemoSettings(backend="bogus")

    seen = []

    def first_rollout(cfg):
        seen.append(cfg.backend)
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "run", first_rollout)
    assert main(["demo", "--quick", "--out", str(out), "--backend", "builtin"]) == 130
    assert seen == ["builtin"]
