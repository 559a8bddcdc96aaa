"""`dail run` settings: held-out problems are asked for before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dail.cli import main
from dail.config import ConfigError, load_yaml
from dail.stages.pipeline import stage_configs

BASE = {"model": "m", "data": "train.jsonl", "out": "runs/x"}


def test_run_without_eval_data_refuses_in_one_line_before_any_stage(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "out": str(tmp_path / "out")}))
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "'eval_data' (held-out problems) is missing; set it, or set eval_on_train: true" in err
    assert not (tmp_path / "out").exists()


def test_eval_on_train_must_be_explicit():
    assert stage_configs({**BASE, "eval_on_train": True})["eval_trained"].data == "train.jsonl"
    assert stage_configs({**BASE, "eval_data": "test.jsonl"})["eval_base"].data == "test.jsonl"
    with pytest.raises(ConfigError, match="eval_on_train must be true or false, not 'yes please'"):
        stage_configs({**BASE, "eval_on_train": "yes please"})
    with pytest.raises(ConfigError, match="'eval_data'"):
        stage_configs({**BASE, "eval_on_train": False})


@pytest.mark.parametrize("name", ["qwen2.5-7b-instruct.yaml", "qwen3-8b-proofs.yaml"])
def test_shipped_configs_evaluate_held_out_problems(name):
    config = load_yaml(Path(__file__).parents[2] / "configs" / name)
    assert config["eval_data"] != config["data"] and not config.get("eval_on_train")


# --------------------------------------------------------------------------- stage folders


def _folders(config, **inputs):
    return {name: Path(cfg.out).name for name, cfg in stage_configs(config, inputs=inputs).items()}


def _edit(config, section, **values):
    return {**config, section: {**config.get(section, {}), **values}}


RUN = {**BASE, "eval_data": "test.jsonl", "generate": {"tau": 0.8}, "train": {"training": {"lora_r": 8}}}


def test_each_stage_folder_is_keyed_by_the_settings_it_depends_on():
    inputs = {"data": "d1", "eval_data": "e1", "tokenizer": "t1"}
    before = _folders(RUN, **inputs)
    assert set(before) == {"generate", "train", "eval_base", "eval_trained"}
    assert all(folder.startswith(f"{name}-") for name, folder in before.items())

    def rebuilt(config, **changed):
        after = _folders(config, **{**inputs, **changed})
        return sorted(name for name in before if after[name] != before[name])

    assert rebuilt(_edit(RUN, "generate", tau=0.5)) == ["eval_trained", "generate", "train"]
    assert rebuilt(_edit(RUN, "train", training={"lora_r": 4})) == ["eval_trained", "train"]
    assert rebuilt(_edit(RUN, "eval", n=4)) == ["eval_base", "eval_trained"]
    assert rebuilt({**RUN, "sampling": {"max_new_tokens": 64}}) == sorted(before)
    # Settings that cannot change an output keep every folder.
    assert rebuilt({**RUN, "sampling": {"batch_size": 3}}) == []
    assert rebuilt(_edit(RUN, "train", training={"lora_r": 8, "report_to": "tensorboard"})) == []
    # Problems or a tokenizer changed in place (same paths, other fingerprints).
    assert rebuilt(RUN, data="d2") == ["eval_trained", "generate", "train"]
    assert rebuilt(RUN, eval_data="e2") == ["eval_base", "eval_trained"]
    assert rebuilt(RUN, tokenizer="t2") == sorted(before)
    # The sampling backend, resolved (auto is the built-in engine without a GPU), keys what samples.
    assert rebuilt({**RUN, "backend": "vllm"}) == ["eval_base", "eval_trained", "generate", "train"]
    assert rebuilt({**RUN, "backend": "builtin"}) == rebuilt({**RUN, "backend": "auto"}) == []
    vllm = stage_configs({**RUN, "backend": "vllm"})
    assert [vllm[name].backend for name in ("generate", "eval_base", "eval_trained")] == ["vllm"] * 3


def test_a_stage_folder_named_in_the_config_is_kept():
    stages = stage_configs(_edit(RUN, "train", out="runs/mine"))
    assert stages["train"].out == "runs/mine"
    assert stages["eval_trained"].adapter == "runs/mine/adapter"


@pytest.mark.slow
def test_a_changed_setting_rebuilds_exactly_the_stages_it_affects(tiny_model_dir, problems_file, tmp_path, caplog):
    import json

    out = tmp_path / "run"
    config = {"model": str(tiny_model_dir), "data": str(problems_file), "eval_on_train": True, "out": str(out),
              "sampling": {"max_new_tokens": 6, "batch_size": 8},
              "generate": {"samples": 2, "tau": 0.5, "keep_unfinished": True},  # a random model ends none
              "train": {"loss": "kl", "training": {"max_steps": 1, "lora_r": 4, "gradient_accumulation_steps": 1}},
              "eval": {"n": 2, "budgets": [6]}}
    path = tmp_path / "run.yaml"

    def run(config):
        path.write_text(yaml.safe_dump(config))
        caplog.clear()
        with caplog.at_level("INFO"):
            assert main(["run", "--config", str(path)]) == 0
        stages = json.loads((out / "stages.json").read_text())
        skipped = sorted(name for name, folder in stages.items()
                         if any(r.getMessage() == f"{name}: {folder} complete, skipped" for r in caplog.records))
        results = json.loads((out / "results.json").read_text())
        assert results["trained"] == json.loads((Path(stages["eval_trained"]) / "summary.json").read_text())
        return stages, skipped

    first, skipped = run(config)
    assert skipped == []
    assert run(config) == (first, sorted(first))  # the same settings: every stage skipped
    tau = {**config, "generate": {**config["generate"], "tau": 0.9}}
    second, skipped = run(tau)
    assert skipped == ["eval_base"]
    assert [n for n in first if first[n] == second[n]] == ["eval_base"]
    rank = {**tau, "train": {**tau["train"], "training": {**tau["train"]["training"], "lora_r": 2}}}
    third, skipped = run(rank)
    assert skipped == ["eval_base", "generate"]
    assert {n for n in first if second[n] != third[n]} == {"train", "eval_trained"}
    assert json.loads((Path(third["train"]) / "train_summary.json").read_text())["settings"]["training"]["lora_r"] == 2


def test_train_traces_by_file_name_are_read_from_the_generate_folder():
    stages = stage_configs(RUN)
    assert stages["train"].traces == f"{stages['generate'].out}/selected.jsonl"
    every = stage_configs(_edit(RUN, "train", traces="traces.jsonl"))
    assert every["train"].traces == f"{every['generate'].out}/traces.jsonl"
    assert stage_configs(_edit(RUN, "train", traces="elsewhere/t.jsonl"))["train"].traces == "elsewhere/t.jsonl"
    with pytest.raises(ConfigError, match="train: expected a mapping of settings, got 'kl'"):
        stage_configs({**RUN, "train": "kl"})


@pytest.mark.slow
def test_stages_json_names_only_the_stages_a_run_has(tiny_model_dir, problems_file, tmp_path):
    import json

    out = tmp_path / "run"
    config = {"model": str(tiny_model_dir), "data": str(problems_file), "eval_on_train": True, "out": str(out),
              "sampling": {"max_new_tokens": 2}, "train": {"loss": "sft", "training": {"max_steps": 1, "lora_r": 2}},
              "eval": {"n": 1}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path)]) == 0
    stages = json.loads((out / "stages.json").read_text())
    assert sorted(stages) == ["eval_base", "eval_trained", "train"]  # sft trains on the solutions: no generate
    assert all(Path(folder).is_dir() for folder in stages.values())
