"""`dail run` settings: held-out problems are asked for before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dail.cli import main
from dail.config import ConfigError, load_yaml
from dail.pipeline import stage_configs

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
    config = load_yaml(Path(__file__).parent.parent / "configs" / name)
    assert config["eval_data"] != config["data"] and not config.get("eval_on_train")
