"""Outputs always match their settings: each stage's settings record, the refusal to mix, the
fingerprints of inputs and tokenizers, and the settings every summary records."""

from __future__ import annotations

import json
import re

import pytest

from dail.cli import main
from dail.config import ConfigError
from dail.provenance import (
    TRAIN_NEUTRAL_KEYS,
    check_resumable,
    differing_keys,
    tokenizer_fingerprint,
    without_neutral,
)


def run_cli(*argv):
    return main([str(a) for a in argv])


def test_differing_keys_are_named_by_their_path_and_neutral_ones_ignored():
    old = {"tau": 0.8, "out": "a", "sampling": {"seed": 0, "batch_size": 8}, "training": {"lora_r": 4}}
    new = {"tau": 0.5, "out": "b", "sampling": {"seed": 0, "batch_size": 1}, "training": {"lora_r": 8},
           "tokenizer": "abc"}
    assert differing_keys(old, new) == ["tau", "tokenizer", "training.lora_r"]
    assert differing_keys({"training": {"report_to": "none"}}, {"training": {"report_to": "tensorboard"}},
                          neutral=TRAIN_NEUTRAL_KEYS) == []


def test_check_resumable_records_then_refuses_other_settings(tmp_path):
    path = tmp_path / "out" / "stage_config.json"
    path.parent.mkdir()
    check_resumable(path, {"tau": 0.8, "batch_size": 4})
    check_resumable(path, {"tau": 0.8, "batch_size": 1})  # a neutral change resumes
    with pytest.raises(ConfigError, match=r"out holds outputs made with other settings \(tau\)"):
        check_resumable(path, {"tau": 0.5, "batch_size": 1})
    assert json.loads(path.read_text())["tau"] == 0.8


def test_tokenizer_fingerprint_tells_tokenizers_apart(tiny_model_dir):
    from dail.config import ModelConfig
    from dail.models import load_tokenizer
    from dail.testing import build_tokenizer

    saved = load_tokenizer(ModelConfig(model=str(tiny_model_dir)))
    assert tokenizer_fingerprint(saved) == tokenizer_fingerprint(build_tokenizer())
    assert tokenizer_fingerprint(saved) != tokenizer_fingerprint(build_tokenizer(vocab_size=400))


# --------------------------------------------------------------------------- the stages


@pytest.fixture(scope="module")
def traces(tiny_model_dir, tmp_path_factory):
    """A finished generate folder of the tiny model on the test problems."""
    from tests.conftest import PROBLEMS

    root = tmp_path_factory.mktemp("prov")
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    assert run_cli("generate", "--model", tiny_model_dir, "--data", data, "--out", root / "gen",
                   "--samples", 2, "--max-new-tokens", 6, "--tau", 0.5) == 0
    return root / "gen"


def _train(tiny_model_dir, traces_file, out, *extra):
    return run_cli("train", "--model", tiny_model_dir, "--traces", traces_file, "--out", out,
                   "--loss", "kl", *extra)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, traces, tmp_path_factory):
    """A finished training run on the traces, and the YAML of its settings."""
    root = tmp_path_factory.mktemp("trained")
    config = root / "train.yaml"
    config.write_text(json.dumps({"training": {"max_steps": 2, "lora_r": 4, "lora_alpha": 8,
                                               "gradient_accumulation_steps": 2}}))
    assert _train(tiny_model_dir, traces / "traces.jsonl", root / "run", "--config", config) == 0
    return root / "run", config


@pytest.mark.slow
@pytest.mark.parametrize("change, named", [
    (["--learning-rate", "1e-3"], "training.learning_rate"),
    (["--loss", "nll"], "loss"),
    (["--epochs", "2"], "training.num_train_epochs"),
])
def test_train_refuses_a_folder_made_with_other_settings(tiny_model_dir, traces, trained, capsys, change, named):
    run, config = trained
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    summary = (run / "train_summary.json").read_text()
    capsys.readouterr()
    assert _train(tiny_model_dir, traces / "traces.jsonl", run, "--config", config, *change) == 2
    err = capsys.readouterr().err
    assert f"{run} holds outputs made with other settings ({named})" in err
    assert err.count("\n") == 1
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (run / "train_summary.json").read_text() == summary


@pytest.mark.slow
def test_train_records_the_divergence_whatever_its_name(tiny_model_dir, traces, trained, capsys, caplog):
    run, config = trained  # trained with the default divergence, reverse
    with caplog.at_level("INFO"):
        assert _train(tiny_model_dir, traces / "traces.jsonl", run, "--config", config, "--divergence", "reverse") == 0
    assert any("is complete with these settings, skipped" in r.message for r in caplog.records)
    capsys.readouterr()
    # The older name asks for the forward KL: another run.
    assert _train(tiny_model_dir, traces / "traces.jsonl", run, "--config", config, "--kl-direction", "forward") == 2
    assert "other settings (training.divergence)" in capsys.readouterr().err


@pytest.mark.slow
def test_train_refuses_other_traces_and_skips_a_finished_run(tiny_model_dir, traces, trained, tmp_path,
                                                             capsys, caplog):
    run, config = trained
    # The same file name, other contents: the traces' fingerprint differs.
    other = tmp_path / "traces.jsonl"
    other.write_text("".join((traces / "traces.jsonl").read_text().splitlines(keepends=True)[:-1]))
    capsys.readouterr()
    assert _train(tiny_model_dir, other, run, "--config", config) == 2
    assert "other settings (traces, traces_sha256)" in capsys.readouterr().err
    # Identical settings (a neutral one changed): complete, skipped, nothing rewritten.
    summary = (run / "train_summary.json").read_text()
    with caplog.at_level("INFO"):
        assert _train(tiny_model_dir, traces / "traces.jsonl", run, "--config", config,
                      "--report-to", "none") == 0
    assert any("is complete with these settings, skipped" in r.message for r in caplog.records)
    assert (run / "train_summary.json").read_text() == summary


@pytest.mark.slow
def test_train_summary_records_the_effective_settings(trained, traces):
    from dail.provenance import file_fingerprint

    run, _ = trained
    summary = json.loads((run / "train_summary.json").read_text())
    settings = summary["settings"]
    assert settings["loss"] == "kl" and settings["world_size"] == 1
    training = settings["training"]
    assert (training["learning_rate"], training["lora_r"], training["lora_alpha"]) == (2e-4, 4, 8)
    assert (training["per_device_train_batch_size"], training["gradient_accumulation_steps"]) == (1, 2)
    assert summary["effective_batch_size"] == 2
    assert settings["traces_sha256"] == file_fingerprint(traces / "traces.jsonl")
    assert settings == without_neutral(json.loads((run / "train_config.json").read_text()),
                                       TRAIN_NEUTRAL_KEYS)


@pytest.mark.slow
def test_train_refuses_a_run_without_a_settings_record(tiny_model_dir, traces, trained, tmp_path, capsys):
    import shutil

    run, config = trained
    copy = tmp_path / "old"
    shutil.copytree(run, copy)
    (copy / "train_config.json").unlink()
    assert _train(tiny_model_dir, traces / "traces.jsonl", copy, "--config", config) == 2
    assert "holds a training run without a record of its settings" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_and_eval_refuse_changed_inputs_and_record_settings(tiny_model_dir, traces, trained,
                                                                     tmp_path, capsys):
    from tests.conftest import PROBLEMS

    summary = json.loads((traces / "generate_summary.json").read_text())
    assert summary["settings"]["tau"] == 0.5 and summary["settings"]["samples"] == 2
    recorded = json.loads((traces / "generate_config.json").read_text())
    assert summary["settings"] == without_neutral(recorded)
    # The same problems file, edited: generate refuses to mix its traces with the old ones.
    data = traces.parent / "problems.jsonl"
    original = data.read_text()
    edited = [{**PROBLEMS[0], "problem": "What is 2+4?"}, *PROBLEMS[1:]]
    try:
        data.write_text("".join(json.dumps(p) + "\n" for p in edited))
        capsys.readouterr()
        assert run_cli("generate", "--model", tiny_model_dir, "--data", data, "--out", traces,
                       "--samples", 2, "--max-new-tokens", 6, "--tau", 0.5) == 2
        assert "other settings (problems_sha256)" in capsys.readouterr().err
    finally:
        data.write_text(original)

    # An adapter retrained in place: eval refuses to mix samples of the two.
    run, _ = trained
    out = tmp_path / "eval"
    args = ["eval", "--model", tiny_model_dir, "--adapter", run / "adapter", "--data", data, "--out", out,
            "--n", 2, "--max-new-tokens", 4]
    assert run_cli(*args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["n"] == 2 and summary["settings"]["adapter_sha256"]
    weights = run / "adapter" / "adapter_model.safetensors"
    original_weights = weights.read_bytes()
    try:
        weights.write_bytes(original_weights + b" ")
        assert run_cli(*args) == 2
        assert "other settings (adapter_sha256)" in capsys.readouterr().err
    finally:
        weights.write_bytes(original_weights)


# --------------------------------------------------------------------------- other base models


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory):
    """A tiny model like the default one but with a tokenizer of another vocabulary."""
    from dail.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("other_tok") / "model", vocab_size=400)


@pytest.fixture(scope="module")
def narrower_model(tmp_path_factory):
    """A tiny model with the default tokenizer but narrower layers."""
    from dail.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("narrow") / "model", hidden_size=32)


@pytest.mark.slow
def test_train_refuses_traces_of_another_tokenizer_before_training(tiny_model_dir, other_tokenizer_model,
                                                                   traces, tmp_path, capsys):
    record = json.loads((traces / "traces.jsonl").read_text().splitlines()[0])
    assert record["model"] == str(tiny_model_dir) and len(record["tokenizer"]) == 16
    out = tmp_path / "run"
    assert _train(other_tokenizer_model, traces / "traces.jsonl", out) == 2
    err = capsys.readouterr().err
    assert f"{traces / 'traces.jsonl'}:1: these traces were written with the tokenizer of '{tiny_model_dir}', " \
           f"not that of --model {other_tokenizer_model}" in err
    assert err.count("\n") == 1 and not out.exists()


@pytest.mark.slow
def test_view_and_inspect_refuse_traces_of_another_tokenizer(traces, tiny_model_dir, other_tokenizer_model,
                                                             tmp_path, capsys):
    from tests.conftest import PROBLEMS

    page = tmp_path / "page.html"
    assert run_cli("view", traces / "traces.jsonl", "--model", other_tokenizer_model, "--out", page) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{traces / 'traces.jsonl'}:1: these traces were written with the tokenizer " \
        f"of '{tiny_model_dir}', not that of --model {other_tokenizer_model}" in err
    assert not page.exists()
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    problem = PROBLEMS[0]["id"]
    assert run_cli("inspect", "--model", other_tokenizer_model, "--data", data, "--id", problem,
                   "--traces", traces / "traces.jsonl") == 2
    assert "these traces were written with the tokenizer of" in capsys.readouterr().err
    assert run_cli("view", traces / "traces.jsonl", "--out", page) == 0  # the model beside them


def test_traces_without_a_fingerprint_are_checked_against_the_vocabulary(tmp_path, tiny):
    from dail.data import DataError
    from dail.stages.train import _trace_examples

    _, tokenizer = tiny
    path = tmp_path / "old.jsonl"
    row = {"prompt_ids": {"student": [1, 2], "privileged": [1, 2], "negative": [1]}, "token_ids": [3, 4]}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "token_ids": [3, 10_000]}) + "\n")
    with pytest.raises(DataError, match=rf"old.jsonl:2: token id 10000 is outside the vocabulary of "
                                        rf"--model m \({len(tokenizer)} tokens\)"):
        _trace_examples(str(path), tokenizer, model="m")


@pytest.mark.slow
def test_eval_refuses_an_adapter_made_for_another_base_model(trained, other_tokenizer_model, narrower_model,
                                                             problems_file, tmp_path, capsys):
    import shutil

    run, _ = trained
    base = json.loads((run / "adapter" / "dail_adapter.json").read_text())
    assert base["base_model"] and base["architecture"]["hidden_size"] == 64

    def evaluate(model, adapter):
        out = tmp_path / f"eval-{model.parent.name}-{adapter.parent.name}"
        code = run_cli("eval", "--model", model, "--adapter", adapter, "--data", problems_file,
                       "--out", out, "--n", 1, "--max-new-tokens", 2)
        err = capsys.readouterr().err
        assert code == 2 and err.count("dail eval: error:") == 1 and "Traceback" not in err, err
        assert not list(out.glob("parts/*.jsonl"))  # refused before sampling
        return err

    adapter = run / "adapter"
    err = evaluate(other_tokenizer_model, adapter)
    assert (f"{adapter}: this adapter was trained on {base['base_model']}, whose tokenizer differs from "
            f"that of --model {other_tokenizer_model}") in err
    err = evaluate(narrower_model, adapter)
    assert "whose architecture differs from that of --model" in err and "hidden_size 64 vs 32" in err
    # An adapter without dail's record (made elsewhere): its weights' shapes are checked.
    bare = tmp_path / "bare" / "adapter"
    shutil.copytree(adapter, bare)
    (bare / "dail_adapter.json").unlink()
    err = evaluate(narrower_model, bare)
    assert re.search(rf"{bare}: \S+\.lora_[AB]\.weight fits a layer of (in|out)_features (64|128), but \S+ of "
                     rf"--model {narrower_model} has (32|64); the adapter was made for another base model", err), err


@pytest.fixture(scope="module")
def retrained_model(tmp_path_factory):
    """A tiny model with the default tokenizer and architecture but other weights (as an
    instruct model stands to its base model)."""
    from dail.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("retrained") / "model", seed=1)


@pytest.mark.slow
def test_eval_refuses_an_adapter_on_other_weights_unless_told(trained, tiny_model_dir, retrained_model,
                                                            problems_file, tmp_path, monkeypatch, capsys):
    run, _ = trained
    adapter = run / "adapter"
    assert len(json.loads((adapter / "dail_adapter.json").read_text())["weights"]) == 16

    def evaluate(model, *flags):
        out = tmp_path / f"eval-{len(list(tmp_path.iterdir()))}"
        code = run_cli("eval", "--model", model, "--adapter", adapter, "--data", problems_file, "--out", out,
                       "--n", 1, "--max-new-tokens", 2, *flags)
        return code, capsys.readouterr().err

    code, err = evaluate(retrained_model)
    assert code == 2 and err.count("dail eval: error:") == 1 and "Traceback" not in err, err
    assert (f"{adapter}: this adapter was trained on {tiny_model_dir}, whose weights differ from those of "
            f"--model {retrained_model}; evaluate it with --model {tiny_model_dir}, or pass --allow-other-base") in err
    assert evaluate(retrained_model, "--allow-other-base")[0] == 0
    # The base model under another spelling of its path is the same model.
    monkeypatch.chdir(tiny_model_dir.parent)
    assert evaluate(f"{tiny_model_dir.name}/")[0] == 0


def test_scoring_other_samples_into_an_evaluation_folder_is_refused(problems_file, tmp_path, capsys):
    def samples(path, text):
        path.write_text(json.dumps({"id": "add", "text": text, "num_tokens": 3}) + "\n")
        return path

    first, second = samples(tmp_path / "a.jsonl", "\\boxed{5}"), samples(tmp_path / "b.jsonl", "\\boxed{6}")
    out = tmp_path / "ev"
    assert run_cli("eval", "--data", problems_file, "--samples", first, "--out", out) == 0
    summary = (out / "summary.json").read_text()
    assert json.loads(summary)["settings"]["samples_file"] == str(first)
    assert run_cli("eval", "--data", problems_file, "--samples", first, "--out", out) == 0  # the same: fine
    capsys.readouterr()
    assert run_cli("eval", "--data", problems_file, "--samples", second, "--out", out) == 2
    assert f"{out} holds outputs made with other settings (samples_file, samples_sha256)" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == summary
