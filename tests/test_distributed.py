"""Several processes, one result: real 2-process launches (gloo on the CPU) and array shards.

Each multi-process test compares the launched run's outputs byte for byte with a one-process
run made in this process (cheaper than a second subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dail.cli import main
from dail.config import ConfigError, parse_shard
from dail.distributed import check_training_strategy, current_shard

PROBLEMS = [
    {"id": f"p{i}", "problem": f"What is {i} + {i + 1}?",
     "solution": f"We add {i} and {i + 1} to get {2 * i + 1}. \\boxed{{{2 * i + 1}}}"}
    for i in range(4)
] + [{"id": "proof", "problem": "Show that x^{2} >= 0.", "solution": "A square is never negative."}]


@pytest.fixture
def problems5(tmp_path) -> Path:
    path = tmp_path / "problems5.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS), encoding="utf-8")
    return path


def launch(*argv, processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` with `processes` CPU processes (torchrun underneath, gloo backend)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29500 + os.getpid() % 1000), "-m", "dail", *map(str, argv)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def same_files(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


GEN = ["--samples", 2, "--max-new-tokens", 6, "--tau", 0.5]


@pytest.mark.slow
def test_generate_under_two_processes_equals_one_process(tiny_model_dir, problems5, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([str(a) for a in ["generate", "--model", tiny_model_dir, "--data", problems5,
                                  "--out", one, *GEN]]) == 0
    result = launch("generate", "--model", tiny_model_dir, "--data", problems5, "--out", two, *GEN,
                    "--batch-size", 3)
    same_files(one, two, ["traces.jsonl", "selected.jsonl", "generate_summary.json"])
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_eval_under_two_processes_equals_one_process(tiny_model_dir, problems5, tmp_path):
    args = ["--model", tiny_model_dir, "--data", problems5, "--n", 3, "--max-new-tokens", 6]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([str(a) for a in ["eval", *args, "--out", one]]) == 0
    launch("eval", *args, "--out", two, "--batch-size", 2)
    same_files(one, two, ["samples.jsonl", "summary.json", "summary.md"])


def test_array_shards_merge_when_the_last_one_finishes(tiny_model_dir, problems5, tmp_path):
    one, arr = tmp_path / "one", tmp_path / "arr"
    base = ["generate", "--model", tiny_model_dir, "--data", problems5, *GEN]
    assert main([str(a) for a in [*base, "--out", one]]) == 0
    assert main([str(a) for a in [*base, "--out", arr, "--shard", "1/2"]]) == 0
    assert len(list((arr / "parts").glob("*.jsonl"))) == 2  # problems 1 and 3
    assert not (arr / "traces.jsonl").exists()  # the other shard has not finished
    assert main([str(a) for a in [*base, "--out", arr, "--shard", "0/2", "--batch-size", 1]]) == 0
    same_files(one, arr, ["traces.jsonl", "selected.jsonl", "generate_summary.json"])
    # Rerunning a finished shard only re-merges, identically.
    assert main([str(a) for a in [*base, "--out", arr, "--shard", "1/2"]]) == 0
    same_files(one, arr, ["traces.jsonl", "selected.jsonl"])


def train_on_two_processes(tiny_model_dir, problems5, tmp_path, training: dict) -> dict:
    """Generate 10 traces in this process, train on them with the dail loss under 2 processes;
    returns the run's train_summary.json."""
    gen = tmp_path / "gen"
    assert main([str(a) for a in ["generate", "--model", tiny_model_dir, "--data", problems5,
                                  "--out", gen, *GEN]]) == 0
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"training": {"lora_r": 4, "gradient_accumulation_steps": 1, **training}}))
    launch("train", "--model", tiny_model_dir, "--traces", gen / "traces.jsonl", "--out", tmp_path / "train",
           "--config", config, "--loss", "dail")
    return json.loads((tmp_path / "train" / "train_summary.json").read_text())


@pytest.mark.slow
def test_train_runs_data_parallel_on_two_processes(tiny_model_dir, problems5, tmp_path):
    summary = train_on_two_processes(tiny_model_dir, problems5, tmp_path, {"max_steps": 2, "save_steps": 1})
    out = tmp_path / "train"
    steps = [h for h in summary["log_history"] if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2]
    # 10 traces, one per process per step: each step covers 2 examples, i.e. 0.2 epochs.
    assert steps[1]["epoch"] == pytest.approx(0.4)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}
    assert (out / "adapter" / "adapter_model.safetensors").exists()


# --------------------------------------------------------------------------- unit level


def test_shards_partition_the_problems():
    assert parse_shard(None) == (0, 1) and parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/2", "a/b", "1", "1/2/3"):
        with pytest.raises(ConfigError, match="shard"):
            parse_shard(bad)
    # An array task of a multi-process launch: global shard i * w + r of n * w.
    shards = [current_shard(f"{i}/2", {"RANK": str(r), "WORLD_SIZE": "3"}) for i in range(2) for r in range(3)]
    assert sorted(s.index for s in shards) == list(range(6)) and {s.count for s in shards} == {6}
    owners = [[s.index for s in shards if s.owns(k)] for k in range(20)]
    assert all(len(o) == 1 for o in owners)
    assert current_shard(None, {}).launched is False


@pytest.mark.parametrize("training, env, loss, refused", [
    ({}, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "dail", "ZeRO-3"),
    ({"deepspeed": {"zero_optimization": {"stage": 3}}}, {}, "kl", "ZeRO-3"),
    ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "dail", "FSDP version 1"),
    ({"fsdp": "full_shard"}, {}, "kl", "FSDP version 1"),
    ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "dail", None),
    ({"fsdp": "full_shard", "fsdp_config": {"version": 2}}, {}, "dail", None),
    ({}, {}, "dail", None),
])
def test_breaking_strategies_are_refused_with_the_alternative(training, env, loss, refused, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "deepspeed" else real(name, *a))
    if refused:
        with pytest.raises(ConfigError, match=refused) as e:
            check_training_strategy(training, loss=loss, env=env)
        assert "Use " in str(e.value)
    else:
        check_training_strategy(training, loss=loss, env=env)
    # Losses without a teacher pass are never refused for these reasons.
    check_training_strategy(training, loss="nll", env=env)


def test_zero3_refusal_reaches_the_cli_before_any_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    (tmp_path / "t.jsonl").write_text("")  # the traces exist: the strategy is what is refused
    code = main(["train", "--model", str(tmp_path / "no-model"), "--traces", str(tmp_path / "t.jsonl"),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "DeepSpeed" in err and "Traceback" not in err


@pytest.mark.slow
def test_teacher_cache_serves_later_epochs_under_two_processes(tiny_model_dir, problems5, tmp_path):
    # 10 traces, one per process per step: 5 steps an epoch, and steps 6-7 begin the second.
    summary = train_on_two_processes(tiny_model_dir, problems5, tmp_path,
                                     {"max_steps": 7, "save_strategy": "no", "teacher_cache_gb": 0.01})
    steps = [h for h in summary["log_history"] if "loss" in h]
    rates = [h["teacher_cache_hit_rate"] for h in steps]
    # The sampler deals rows out afresh each epoch; every process holds every row computed anywhere.
    assert len(rates) == 7 and rates[0] == 0.0 and rates[5:] == [1.0, 1.0]
    assert steps[5]["epoch"] > 1.0
