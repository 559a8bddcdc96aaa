"""Training curves: `--report-to` refused early when its package is missing, TensorBoard logs."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from dail.cli import main


def run_cli(*argv):
    return main([str(a) for a in argv])


@pytest.fixture
def without(monkeypatch):
    """Make the named modules look uninstalled to the `report_to` check."""
    def hide(*modules):
        real = importlib.util.find_spec
        monkeypatch.setattr("dail.training.report_to.importlib.util.find_spec",
                            lambda name, *a: None if name in modules else real(name, *a))
    return hide


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")
    monkeypatch.setattr("dail.models.load_tokenizer", refuse)
    monkeypatch.setattr("dail.models.load_model", refuse)


def test_train_refuses_a_missing_tensorboard_before_loading_the_model(
        without, no_model_loading, tiny_model_dir, problems_file, tmp_path, capsys):
    without("tensorboard", "tensorboardX")
    out = tmp_path / "t"
    assert run_cli("train", "--model", tiny_model_dir, "--data", problems_file, "--loss", "sft",
                   "--out", out, "--report-to", "tensorboard") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "report_to: tensorboard is not installed; pip install 'dail[tensorboard]'" in err
    assert not out.exists()


def test_unknown_report_to_names_the_choices(no_model_loading, tiny_model_dir, problems_file, tmp_path, capsys):
    assert run_cli("train", "--model", tiny_model_dir, "--data", problems_file, "--loss", "sft",
                   "--out", tmp_path / "t", "--report-to", "tensorbored") == 2
    assert "'tensorbored' is not one of tensorboard, wandb, none" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["yaml", "flag"])
def test_run_refuses_a_missing_package_before_generating(
        without, no_model_loading, tiny_model_dir, problems_file, tmp_path, capsys, where):
    without("wandb")
    config = {"model": str(tiny_model_dir), "data": str(problems_file), "eval_data": str(problems_file),
              "out": str(tmp_path / "run"), "train": {"training": {"max_steps": 1}}}
    if where == "yaml":
        config["train"]["training"]["report_to"] = "wandb"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    extra = ["--report-to", "wandb"] if where == "flag" else []
    assert run_cli("run", "--config", path, *extra) == 2
    err = capsys.readouterr().err
    assert "train.training.report_to: wandb is not installed; pip install wandb" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_training_curves_reach_tensorboard_and_dail_plot(tiny_model_dir, problems_file, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "t"
    assert run_cli("train", "--model", tiny_model_dir, "--data", problems_file, "--loss", "sft",
                   "--out", out, "--report-to", "tensorboard", "--epochs", 1, "--max-length", 96) == 0
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/nll"} <= tags
    assert len(events.Scalars("train/loss")) >= 1
    # The same curves, from train_summary.json, drawn by `dail plot`.
    assert run_cli("plot", out, "--out", tmp_path / "figs") == 0
    assert (tmp_path / "figs" / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
