"""The command line end to end, and clean refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dail.cli import main


def run_cli(*argv):
    return main([str(a) for a in argv])


@pytest.mark.slow
def test_dail_run_end_to_end(tiny_model_dir, problems_file, tmp_path, capsys):
    out = tmp_path / "run"
    config = {
        "model": str(tiny_model_dir),
        "data": str(problems_file),
        "eval_data": str(problems_file),
        "out": str(out),
        "sampling": {"max_new_tokens": 8, "batch_size": 8},
        # A random model ends no trace within the budget: selection takes unfinished ones.
        "generate": {"samples": 2, "tau": 0.5, "keep_unfinished": True},
        "train": {"loss": "kl", "training": {"max_steps": 2, "lora_r": 4, "gradient_accumulation_steps": 1}},
        "eval": {"n": 2, "budgets": [4, 8]},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run_cli("run", "--config", path) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"base", "trained"}
    # The base-versus-trained table is printed and written with the plots.
    printed = capsys.readouterr().out
    assert "| | base | trained | trained - base |" in printed
    base, trained = results["base"]["pass@1"], results["trained"]["pass@1"]
    assert f"| pass@1 | {base:.4f} | {trained:.4f} | {trained - base:+.4f} |" in printed
    assert "| accuracy within 8 tokens |" in printed
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert table == [line for line in (out / "results.md").read_text().splitlines() if line.startswith("|")]
    assert {p.name for p in (out / "plots").iterdir()} == {"pass_at_k.png", "accuracy_vs_budget.png"}
    for summary in results.values():
        assert {"pass@1", "pass@2", "mean_tokens"} <= set(summary)
    stages = json.loads((out / "stages.json").read_text())
    traces = [json.loads(line) for line in (Path(stages["generate"]) / "traces.jsonl").read_text().splitlines()]
    assert len(traces) == 6
    record = traces[0]
    for key in ("id", "sample", "prompts", "prompt_ids", "text", "token_ids", "sources", "proposal_ids",
                "proposal_probs", "acceptance_rate", "answer", "correct"):
        assert key in record
    assert set(record["prompts"]) == set(record["prompt_ids"]) == {"student", "privileged", "negative"}
    assert len(record["sources"]) == len(record["token_ids"]) == len(record["proposal_probs"])
    # Rerunning skips every completed stage and leaves the results unchanged.
    before = (out / "results.json").read_text()
    assert run_cli("run", "--config", path) == 0
    assert (out / "results.json").read_text() == before


@pytest.mark.slow
def test_generate_resumes_and_refuses_changed_settings(tiny_model_dir, problems_file, tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["generate", "--model", tiny_model_dir, "--data", problems_file, "--out", out,
            "--samples", 2, "--max-new-tokens", 6, "--tau", 0.5]
    assert run_cli(*args) == 0
    first = (out / "traces.jsonl").read_text()
    # Lose one problem's part, as if the run had been killed before it finished.
    parts = sorted((out / "parts").iterdir())
    parts[1].unlink()
    (out / "traces.jsonl").unlink()
    assert run_cli(*args, "--batch-size", 1) == 0
    assert (out / "traces.jsonl").read_text() == first
    assert run_cli(*args[:-1], 0.9) == 2
    assert "other settings (tau)" in capsys.readouterr().err


def test_eval_scores_samples_from_elsewhere_without_a_model(problems_file, tmp_path):
    samples = tmp_path / "samples.jsonl"
    rows = [{"id": "add", "text": "so \\boxed{5}", "num_tokens": 3},
            {"id": "add", "text": "so \\boxed{6}", "num_tokens": 5},
            {"id": "div", "text": "\\boxed{\\frac{16}{2}}", "num_tokens": 4},
            {"id": "div", "text": "no idea", "num_tokens": 9}]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_cli("eval", "--data", problems_file, "--samples", samples, "--out", tmp_path / "ev") == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["pass@1"] == pytest.approx(0.5)
    assert summary["pass@2"] == pytest.approx(1.0)
    assert summary["mean_tokens"] == pytest.approx(21 / 4)
    assert (summary["model"], summary["samples_file"]) == (None, str(samples))
    problems = len(problems_file.read_text().splitlines())
    assert summary["problems_without_samples"] == problems - 2  # the file holds two of them
    assert summary["samples_per_problem"] == {"min": 2, "max": 2}
    assert f"Evaluation of the samples in {samples}" in (tmp_path / "ev" / "summary.md").read_text()


def test_eval_counts_uneven_samples_per_problem_and_prints_rounded_figures(problems_file, tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    rows = [{"id": "add", "text": "so \\boxed{5}", "num_tokens": 3}] * 3 + [{"id": "div", "text": "?", "num_tokens": 4}]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_cli("eval", "--data", problems_file, "--samples", samples, "--out", tmp_path / "ev") == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["samples_per_problem"] == {"min": 1, "max": 3} and summary["n"] == 1
    printed = capsys.readouterr().out
    assert "mean_tokens=3.2" in printed and "3.25" not in printed  # 13 / 4, for people


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "problem": "p", "solution": "s"}\n{"id": "b", "problem": "p"\n', ":2: malformed JSON"),
    ('{"id": "a", "problem": "p"}\n', ":1: missing field 'solution'"),
    ('{"id": "a", "problem": "p", "solution": "s"}\n{"id": "a", "problem": "p", "solution": "s"}\n',
     ":2: field 'id': duplicate id"),
])
def test_bad_data_exits_2_and_writes_nothing(tiny_model_dir, tmp_path, capsys, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    code = run_cli("generate", "--model", tiny_model_dir, "--data", data, "--out", out)
    assert code == 2
    assert f"{data}{message}" in capsys.readouterr().err
    assert not out.exists()


def test_bad_config_is_refused(tmp_path, capsys, problems_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tau: 0.8\nsamplez: 3\n")
    assert run_cli("generate", "--config", cfg, "--model", "m", "--data", problems_file, "--out", tmp_path / "o") == 2
    assert "unknown key(s) 'samplez' (did you mean 'samples'?)" in capsys.readouterr().err
    assert run_cli("generate", "--model", "m", "--data", problems_file, "--out", tmp_path / "o", "--tau", 1.5) == 2
    assert "--tau 1.5: out of range; allowed: [0, 1]" in capsys.readouterr().err
    assert run_cli("eval", "--data", problems_file, "--out", tmp_path / "o") == 2
    assert "--model is required" in capsys.readouterr().err


def test_traces_file_validation(tiny_model_dir, problems_file, tmp_path, capsys):
    # A problems file is not a traces file: the error says which line and field.
    assert run_cli("train", "--model", tiny_model_dir, "--traces", problems_file, "--out", tmp_path / "t") == 2
    assert f"{problems_file}:1: field 'prompt_ids'" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_tokenizer_model_mismatch_is_explained(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dail.models import ModelMismatchError, check_compatible

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(100)])
    with pytest.raises(ModelMismatchError, match="embedding has"):
        check_compatible(model, tokenizer)


def test_inspect_shows_prompts_waypoints_and_alignment(tiny_model_dir, problems_file, capsys):
    assert run_cli("inspect", "--model", tiny_model_dir, "--data", problems_file, "--id", "div",
                   "--max-new-tokens", 4) == 0
    out = capsys.readouterr().out
    assert "## privileged prompt" in out and "## Waypoints: ['12', '4', '48', '6']" in out
    assert "| t | token | source |" in out
    assert "no proposal was made" in out  # the tiny model never reaches tau 0.8


@pytest.mark.parametrize("name", ["qwen2.5-7b-instruct.yaml", "qwen3-8b-proofs.yaml", "champ-smoke.yaml"])
def test_shipped_configs_are_valid(name):
    from dail.config import load_yaml
    from dail.stages.pipeline import stage_configs

    path = Path(__file__).parent.parent / "configs" / name
    stages = stage_configs(load_yaml(path), where=str(path))
    assert stages["generate"].tau == pytest.approx(0.8 if "qwen" in name else 0.05)
    assert stages["eval_trained"].adapter == f"{stages['train'].out}/adapter"
    from dail.training.trainer import DAILConfig

    DAILConfig(output_dir="unused", loss=stages["train"].loss, **stages["train"].training)


@pytest.mark.slow
def test_merged_model_evaluates_like_base_plus_adapter(tiny_model_dir, problems_file, tmp_path, monkeypatch):
    from dail.rollout.vllm_backend import engine

    class Engine:  # a vLLM engine left running by a stage that sampled in this process
        shut = False

        class llm_engine:  # noqa: N801 (vLLM's attribute names)
            class engine_core:  # noqa: N801
                @staticmethod
                def shutdown():
                    Engine.shut = True

    monkeypatch.setattr(engine, "_ENGINE", (engine.EngineSpec(model="m"), Engine))

    gen = tmp_path / "gen"
    assert run_cli("generate", "--model", tiny_model_dir, "--data", problems_file, "--out", gen,
                   "--samples", 2, "--max-new-tokens", 6, "--tau", 0.5) == 0
    train = tmp_path / "train"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"training": {"max_steps": 3, "lora_r": 4, "learning_rate": 0.05,
                                                "gradient_accumulation_steps": 1, "merge": True}}))
    assert run_cli("train", "--config", cfg, "--model", tiny_model_dir, "--traces", gen / "traces.jsonl",
                   "--out", train, "--loss", "nll") == 0
    assert (train / "merged" / "config.json").exists()
    assert Engine.shut and engine.started_spec() is None  # its memory went back before training
    common = ["--data", problems_file, "--n", 3, "--max-new-tokens", 8, "--temperature", 1.0]
    assert run_cli("eval", "--model", tiny_model_dir, "--adapter", train / "adapter", "--out", tmp_path / "a",
                   *common) == 0
    assert run_cli("eval", "--model", train / "merged", "--out", tmp_path / "m", *common) == 0
    assert run_cli("eval", "--model", tiny_model_dir, "--out", tmp_path / "b", *common) == 0
    texts = {name: [json.loads(line)["text"] for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
             for name in "amb"}
    assert texts["a"] == texts["m"]
    assert texts["a"] != texts["b"], "training changed nothing"


def test_reasoning_model_rollout_suppresses_end_of_thinking(thinking_model_dir, problems_file, tmp_path):
    from dail.config import GenerateConfig, ModelConfig
    from dail.models import load_tokenizer
    from dail.stages.generate import suppressed_tokens

    tokenizer = load_tokenizer(ModelConfig(model=str(thinking_model_dir)))
    cfg = GenerateConfig(model=ModelConfig(model=str(thinking_model_dir)))
    assert suppressed_tokens(tokenizer, cfg) == (tokenizer.convert_tokens_to_ids("</think>"),)
    assert suppressed_tokens(tokenizer, GenerateConfig(suppress_end_of_thinking=False)) == ()
    out = tmp_path / "gen"
    assert run_cli("generate", "--model", thinking_model_dir, "--data", problems_file, "--out", out,
                   "--samples", 2, "--max-new-tokens", 12, "--tau", 0.5) == 0
    record = json.loads((out / "traces.jsonl").read_text().splitlines()[0])
    assert all(p.endswith("<|im_start|>assistant\n<think>\n") for p in record["prompts"].values())
    end_think = tokenizer.convert_tokens_to_ids("</think>")
    for line in (out / "traces.jsonl").read_text().splitlines():
        assert end_think not in json.loads(line)["token_ids"]


def test_demo_checks_the_world_shows_the_gap():
    from dail.stages.demo.comparison import gap_is_real

    good = {"known_student_pass@1": {"dot": 0.9, "expr": 0.8},
            "novel": {"matmul": {"student_pass@1": 0.0, "privileged_pass@1": 0.9},
                      "poly": {"student_pass@1": 0.05, "privileged_pass@1": 0.7}}}
    assert gap_is_real(good) == (True, "ok")
    weak = {**good, "known_student_pass@1": {"dot": 0.1, "expr": 0.0}}
    ok, why = gap_is_real(weak)
    assert not ok and "known-type student pass@1 0.05" in why
    assert gap_is_real({})[0] is False


def test_demo_flags_reach_the_settings(monkeypatch):
    from dataclasses import replace

    from dail.stages import demo

    seen = {}
    monkeypatch.setattr(demo, "run", lambda **kw: seen.update(kw))
    assert main(["demo", "--seed", "1", "--divergence", "jsd:0.25", "--gamma", "0", "--out", "x"]) in (0, None)
    assert seen["settings"] == demo.DemoSettings(seed=1, divergence="jsd:0.25", gamma=0.0) and seen["out"] == "x"
    main(["demo", "--kl-direction", "forward"])  # the older name
    assert seen["settings"] == demo.DemoSettings(divergence="forward")
    main(["demo", "--quick", "--seeds", "3"])
    assert seen["settings"] == replace(demo.QUICK, seeds=3)
    main(["demo", "--quick"])
    assert seen["settings"] == demo.QUICK and seen["quick"]
    main(["demo", "--lora-r", "2", "--lora-target-modules", "q_proj", "v_proj"])
    assert seen["settings"] == demo.DemoSettings(lora_r=2, lora_target_modules=("q_proj", "v_proj"))
    main(["demo", "--lora-target-modules", "all-linear"])
    assert seen["settings"] == demo.DemoSettings()


def test_demo_refuses_a_bad_adapter_before_any_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--lora-r", "0", "--out", str(out)]) == 2
    assert "--lora-r 0: out of range; allowed: >= 1" in capsys.readouterr().err
    assert main(["demo", "--lora-target-modules", "q_proj", "qproj", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "qproj is no linear layer of this model" in err[0] and "q_proj" in err[0]
    assert not out.exists()  # refused before validity, problems or traces


def test_train_flags_land_in_the_training_arguments_over_the_config(tmp_path):
    from dail.cli import build_parser, stage_config
    from dail.config import TrainConfig

    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump({"training": {"teacher_cache_gb": 1.0, "lora_r": 4, "learning_rate": 0.1}}))
    traces = tmp_path / "t.jsonl"
    traces.write_text("")
    args = build_parser().parse_args(["train", "--model", "m", "--traces", str(traces), "--out", "o", "--config",
                                      str(cfg_file), "--teacher-cache-gb", "2.5", "--epochs", "3"])
    cfg = stage_config(TrainConfig, args, ("data", "traces", "out", "loss", "gamma"))
    assert cfg.training == {"teacher_cache_gb": 2.5, "lora_r": 4, "learning_rate": 0.1, "num_train_epochs": 3.0}


@pytest.mark.parametrize("command, cls", [("generate", "GenerateConfig"), ("train", "TrainConfig"),
                                          ("eval", "EvalConfig")])
def test_shipped_stage_configs_load_with_a_model_name(command, cls):
    """One example file per stage; `model: NAME` works there as in a pipeline file, and a model
    flag adds to it instead of replacing it."""
    from pathlib import Path

    from dail import cli, config

    path = Path(__file__).parent.parent / "configs" / f"{command}.yaml"
    assert f"#   dail {command} --config configs/{command}.yaml" in path.read_text()  # the header's command
    args = cli.build_parser().parse_args([command, "--config", str(path), "--dtype", "bfloat16"])
    top = {"generate": ("data", "out", "tau", "samples", "keep", "grader"),
           "train": ("data", "traces", "out", "loss", "gamma"),
           "eval": ("data", "out", "adapter", "n", "grader")}[command]
    cfg = cli.stage_config(getattr(config, cls), args, top)
    assert cfg.model.model == "Qwen/Qwen2.5-7B-Instruct" and cfg.model.dtype == "bfloat16"
    if command == "train":
        from dail.training.trainer import DAILConfig

        DAILConfig(output_dir="unused", loss=cfg.loss, **cfg.training)


@pytest.mark.parametrize("argv, line", [
    (["generate", "--tau", "1.5"], "--tau 1.5: out of range; allowed: [0, 1]"),
    (["generate", "--samples", "-3"], "--samples -3: out of range; allowed: >= 1"),
    (["generate", "--top-p", "0"], "--top-p 0: out of range; allowed: (0, 1]"),
    (["generate", "--temperature", "-1"], "--temperature -1: out of range; allowed: >= 0"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens 0: out of range; allowed: >= 1"),
    (["train", "--gamma", "-1"], "--gamma -1: out of range; allowed: >= 0"),
    (["train", "--learning-rate", "0"], "--learning-rate 0: out of range; allowed: > 0"),
    (["train", "--epochs", "-2"], "--epochs -2: out of range; allowed: > 0"),
    (["eval", "--n", "0"], "--n 0: out of range; allowed: >= 1"),
])
def test_a_number_out_of_range_is_one_line_naming_flag_value_and_range(tmp_path, capsys, argv, line):
    data = tmp_path / "p.jsonl"
    data.write_text('{"id": "a", "problem": "p", "solution": "s"}\n')
    command, *flags = argv
    where = ["--traces", data] if command == "train" else ["--data", data]
    code = run_cli(command, "--model", "m", *where, "--out", tmp_path / "o", *flags)
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"dail {command}: error: {line}"
    assert not (tmp_path / "o").exists()


def test_demo_refuses_a_bad_number_of_seeds_in_one_line(tmp_path, capsys):
    assert run_cli("demo", "--quick", "--seeds", "0", "--out", tmp_path / "o") == 2
    assert capsys.readouterr().err.strip() == "dail demo: error: --seeds 0: out of range; allowed: >= 1"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["train", "demo"])
@pytest.mark.parametrize("flags, line", [
    (["--divergence", "jsd:1.5"], "--divergence 'jsd:1.5': not a divergence; allowed: reverse, forward, or "
                                  "jsd:BETA with BETA in [0, 1]"),
    (["--divergence", "foo"], "--divergence 'foo': not a divergence; allowed: reverse, forward, or "
                              "jsd:BETA with BETA in [0, 1]"),
    (["--divergence", "jsd:0.5", "--kl-direction", "forward"],
     "--kl-direction 'forward' (the older name of --divergence) contradicts --divergence 'jsd:0.5'; "
     "give --divergence alone"),
])
def test_a_bad_divergence_is_one_line_before_any_work(tmp_path, capsys, command, flags, line):
    data = tmp_path / "p.jsonl"
    data.write_text('{"id": "a", "problem": "p", "solution": "s"}\n')
    where = ["--model", "m", "--traces", data] if command == "train" else []
    code = run_cli(command, *where, "--out", tmp_path / "o", *flags)
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"dail {command}: error: {line}"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("section, value, message", [
    ("train", {"training": {"lora_rank": 8}}, "unknown key(s) 'lora_rank' (did you mean 'lora_r'?)"),
    ("train", {"training": {"learning_rate": "fast"}}, "training: learning_rate: 'fast' is not a number"),
    ("train", {"training": {"lora_r": 0}}, "lora_r 0: out of range; allowed: >= 1"),
    ("train", {"training": {"lora_target_modules": ["q_proj", "wq"]}}, "lora_target_modules: wq is no linear layer"),
    ("train", {"training": {"divergence": "jsd:2"}}, "--divergence 'jsd:2': not a divergence"),
    ("train", {"training": {"lr_scheduler_type": "cosine_decay"}}, "training: cosine_decay is not a valid"),
    ("generate", {"tau": "high"}, "generate: tau: 'high' is not a number"),
    ("generate", {"grader": "maths"}, "--grader: unknown grader 'maths'"),
    ("eval", {"budgets": [512, 0]}, "budgets 0: out of range; allowed: >= 1"),
    ("eval", {"grader": "mymodule_that_is_missing:grade"}, "cannot import module"),
    ("prompts", {"student_template": "no/such/template.txt"}, "--student-template no/such/template.txt: no such"),
    ("trian", {"loss": "nll"}, "unknown key(s) 'trian' (did you mean 'train'?)"),
])
def test_dail_run_checks_every_stage_before_any_work(tiny_model_dir, problems_file, tmp_path, capsys,
                                                     section, value, message):
    """A mistake in any stage's settings stops `dail run` before the first stage starts."""
    out = tmp_path / "run"
    config = {"model": str(tiny_model_dir), "data": str(problems_file), "eval_data": str(problems_file),
              "out": str(out), "sampling": {"max_new_tokens": 4}, "generate": {"samples": 1},
              "train": {"loss": "kl", "training": {"max_steps": 1}}}
    config[section] = value if section in ("prompts", "trian") else {**config.get(section, {}), **value}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run_cli("run", "--config", path) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_eval_budgets_follow_the_token_budget_unless_given(tmp_path):
    from dail.cli import build_parser, stage_config
    from dail.config import ConfigError, EvalConfig, SamplingConfig

    assert EvalConfig(sampling=SamplingConfig(max_new_tokens=2048)).budgets == [256, 512, 1024, 2048]
    assert EvalConfig(sampling=SamplingConfig(max_new_tokens=100)).budgets == [12, 25, 50, 100]
    with pytest.raises(ConfigError, match="--budgets 4096: above --max-new-tokens 2048"):
        EvalConfig(budgets=[512, 4096])
    args = build_parser().parse_args(["eval", "--model", "m", "--data", "d", "--out", str(tmp_path / "o"),
                                      "--max-new-tokens", "300", "--budgets", "100", "300"])
    assert stage_config(EvalConfig, args, ("data", "out", "budgets")).budgets == [100, 300]
