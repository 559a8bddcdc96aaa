"""Crash safety: real processes killed with SIGKILL (or interrupted with SIGINT), then resumed.

Deterministic kill points come from a small driver that wraps one library call and kills its
own process with SIGKILL at that moment; the eval and Ctrl-C tests signal a running process from
outside. Every resumed run must end with outputs identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dail.cli import main
from tests.test_distributed import PROBLEMS

DRIVER = textwrap.dedent('''
    import os, signal, sys
    point, argv = sys.argv[1], sys.argv[2:]
    calls = {"n": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point in ("after_second_part", "before_first_rename", "while_merging"):
        import dail.data
        real_replace = os.replace

        def replace(src, dst):
            dst = str(dst)
            if point == "before_first_rename" and "/parts/" in dst:
                die()  # the part's temporary file is written, not yet renamed
            if point == "while_merging" and dst.endswith("selected.jsonl"):
                die()  # traces.jsonl written, selected.jsonl not
            real_replace(src, dst)
            if point == "after_second_part" and "/parts/" in dst:
                calls["n"] += 1
                if calls["n"] == 2:
                    die()
        dail.data.os.replace = replace
    elif point.startswith("train_"):
        from transformers import Trainer
        step = int(point.rsplit("_", 1)[1])
        if point.startswith("train_after_checkpoint"):
            real_save = Trainer._save_checkpoint

            def save(self, *a, **k):
                real_save(self, *a, **k)
                if self.state.global_step == step:
                    die()
            Trainer._save_checkpoint = save
        else:  # die while writing a checkpoint: weights and optimizer saved, no trainer state
            real_rng = Trainer._save_rng_state

            def rng(self, *a, **k):
                if self.state.global_step == step:
                    die()
                real_rng(self, *a, **k)
            Trainer._save_rng_state = rng

    from dail.cli import main
    sys.exit(main(argv))
''')


@pytest.fixture
def problems5(tmp_path) -> Path:
    path = tmp_path / "problems5.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS), encoding="utf-8")
    return path


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def killed_at(tmp_path: Path, point: str, *argv) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    result = subprocess.run([sys.executable, str(driver), point, *map(str, argv)], env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


def run(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


GEN = ["--samples", 2, "--max-new-tokens", 6, "--tau", 0.5, "--batch-size", 2]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before_first_rename", "after_second_part", "while_merging"])
def test_generate_killed_then_rerun_gives_identical_outputs(tiny_model_dir, problems5, tmp_path, point):
    args = ["generate", "--model", tiny_model_dir, "--data", problems5, *GEN]
    run(*args, "--out", tmp_path / "clean")
    out = tmp_path / "killed"
    killed_at(tmp_path, point, *args, "--out", out)
    parts = sorted(p.name for p in (out / "parts").glob("*.jsonl"))
    assert len(parts) == {"before_first_rename": 0, "after_second_part": 2, "while_merging": 5}[point]
    assert not (out / "generate_summary.json").exists()
    run(*args, "--out", out)
    for name in ("traces.jsonl", "selected.jsonl", "generate_summary.json"):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


@pytest.mark.slow
def test_train_killed_after_and_during_checkpoints_resumes_to_the_same_adapter(tiny_model_dir, problems5, tmp_path):
    import torch
    from safetensors.torch import load_file

    run("generate", "--model", tiny_model_dir, "--data", problems5, "--out", tmp_path / "gen", *GEN)
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"training": {"max_steps": 5, "lora_r": 4, "save_steps": 2,
                                               "gradient_accumulation_steps": 2,
                                               "save_total_limit": None}}))
    args = ["train", "--model", tiny_model_dir, "--traces", tmp_path / "gen" / "traces.jsonl",
            "--config", config, "--loss", "dail"]
    run(*args, "--out", tmp_path / "clean")
    out = tmp_path / "killed"
    killed_at(tmp_path, "train_after_checkpoint_2", *args, "--out", out)
    killed_at(tmp_path, "train_during_checkpoint_4", *args, "--out", out)
    assert not (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists()  # incomplete
    run(*args, "--out", out)
    clean = load_file(tmp_path / "clean" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert clean.keys() == resumed.keys()
    for key in clean:
        torch.testing.assert_close(resumed[key], clean[key], rtol=1e-5, atol=1e-6)
    losses = [[h["loss"] for h in json.loads((d / "train_summary.json").read_text())["log_history"]
               if "loss" in h] for d in (tmp_path / "clean", out)]
    assert losses[1] == pytest.approx(losses[0][-len(losses[1]):], rel=1e-5)  # same data order


def _interruptible() -> None:
    # A shell starts background jobs with SIGINT ignored and children inherit that; a user's
    # terminal does not, so give the child the default disposition (Python then raises
    # KeyboardInterrupt on SIGINT).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(argv: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dail", *map(str, argv)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_interruptible)


def _wait_for_part(proc: subprocess.Popen, parts: Path, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if parts.is_dir() and any(parts.glob("*.jsonl")):
            return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_eval_killed_from_outside_then_rerun_gives_identical_outputs(tiny_model_dir, problems5, tmp_path):
    args = ["eval", "--model", tiny_model_dir, "--data", problems5, "--n", 2, "--max-new-tokens", 12,
            "--batch-size", 1]
    run(*args, "--out", tmp_path / "clean")
    out = tmp_path / "killed"
    proc = _start([*args, "--out", out])
    caught = _wait_for_part(proc, out / "parts")
    proc.kill()
    proc.communicate(timeout=60)
    if caught:
        assert not (out / "summary.json").exists()
    run(*args, "--out", out)
    for name in ("samples.jsonl", "summary.json"):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tiny_model_dir, problems5, tmp_path):
    out = tmp_path / "gen"
    proc = _start(["generate", "--model", tiny_model_dir, "--data", problems5, "--out", out,
                   "--samples", 4, "--max-new-tokens", 24, "--batch-size", 1])
    if not _wait_for_part(proc, out / "parts"):
        proc.kill()
        pytest.skip("the run finished before it could be interrupted")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert not (out / "traces.jsonl").exists()
    assert not list((out / "parts").glob(".*"))  # no temporary file left behind
