"""The benchmark's building blocks run and measure what they claim, at toy size."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

bench = pytest.importorskip("bench.__main__")
ROOT = Path(__file__).resolve().parents[1]


def test_rollout_rows_compare_engines_on_the_same_traces():
    model = bench.random_qwen2(32, 1, 64)
    rows = bench.bench_rollout(model, "toy", [2], budget=6, taus=[0.8, 0.0], repeats=2)
    assert [(r["batch"], r["tau"]) for r in rows] == [(2, 0.8), (2, 0.0)]
    for row in rows:
        assert row["identical_traces"] == 1.0  # the engines agree token for token
        rounds = row["round_tok_s"]  # batch 2 gets 2 * repeats + 1 rounds
        assert len(rounds["two_pass"]) == len(rounds[row["default_engine"]]) == row["repeats"] == 5
        per_round = sorted(a / b for a, b in zip(rounds[row["default_engine"]], rounds["two_pass"], strict=True))
        assert row["vs_reference"] == pytest.approx(per_round[2], rel=1e-2)  # the median round's ratio
        assert row["spread"] >= 1.0
        assert row["double_rows_cost"] > 0
    assert rows[1]["acceptance"] == 1.0  # tau 0 accepts every proposal
    assert rows[1]["unasked_share"] == 0.0  # ... so the student is asked everywhere


def test_quick_rows_run_more_rounds_until_their_time_is_up():
    model = bench.random_qwen2(32, 1, 64)
    row = bench.bench_rollout(model, "toy", [1], budget=4, taus=[0.8], repeats=1, min_seconds=1.0)[0]
    assert row["repeats"] > 3 and all(len(v) == row["repeats"] for v in row["round_tok_s"].values())


def test_loss_memory_child_reports_equal_losses_for_both_modes():
    results = {}
    for mode in ("chunked", "plain"):
        out = subprocess.run([sys.executable, "-m", "bench", "--loss-memory-child", mode, "40", "300", "16", "8"],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    assert results["chunked"]["loss"] == pytest.approx(results["plain"]["loss"], rel=1e-5)
    assert results["chunked"]["grad_norm"] == pytest.approx(results["plain"]["grad_norm"], rel=1e-5)
    assert results["plain"]["peak_growth"] > 0


def test_world_model_rows_use_the_demos_prompts_and_accept_most_proposals():
    model, name = bench.demo_model()
    student, privileged = bench.world_prompts(2)
    from dail.world import base_model_dir
    from dail.world.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(base_model_dir()))
    for s, p in zip(student, privileged, strict=True):
        assert "Expert solution" in tokenizer.decode(p) and "Expert solution" not in tokenizer.decode(s)
    rows = bench.bench_rollout(model, name, [2], budget=64, taus=[0.8], repeats=1, make_prompts=bench.world_prompts)
    # On its own task the privileged model agrees with the student on most tokens (about 0.6 on
    # random prompts).
    assert rows[0]["identical_traces"] == 1.0 and rows[0]["acceptance"] > 0.7


def test_teacher_memory_row_compares_the_same_hidden_states():
    row = bench.bench_teacher_memory(64, hidden=64, layers=3, vocab=300)
    assert row["same_hidden_states"] is True
    assert row["hook_mib"] > 0 and row["all_layers_mib"] > 0


@pytest.mark.slow
def test_train_step_row_times_plain_cached_and_checkpointed_steps():
    row = bench.bench_train_step(1, bench.random_qwen2(64, 2, 300), "toy", response=16)
    for mode in (row, row["with_checkpointing"]):
        assert {"ratio", "floor", "cached_ratio", "dail_s", "nll_s", "teacher_forwards_s"} <= mode.keys()
        assert all(mode[k] > 0 for k in ("ratio", "floor", "cached_ratio"))
    assert row["model"] == "toy, LoRA r=32" and "2 x 16" in row["batch"]


@pytest.mark.slow
def test_memory_rows_are_steady_across_runs():
    # With the fixed mmap threshold the children's peaks repeat to 0.3%; with glibc's default
    # the all-layers peak of this forward varied by a quarter over four runs (once below the hook's).
    first, second = (bench.bench_teacher_memory(1024, hidden=256, layers=6, vocab=300) for _ in range(2))
    assert first["hook_mib"] == pytest.approx(second["hook_mib"], rel=0.01)
    assert first["all_layers_mib"] == pytest.approx(second["all_layers_mib"], rel=0.01)
    assert first["hook_mib"] < first["all_layers_mib"]


def test_inference_mode_row_times_both_modes_on_the_same_traces():
    model = bench.random_qwen2(32, 1, 64)
    row = bench.bench_inference_mode(model, [1, 2], budget=4, rounds=2)
    assert set(row["speedup"]) == {"1", "2"} and all(r > 0 for r in row["speedup"].values())
    assert row["same_traces"] is True


def test_lookup_row_times_the_engine_with_and_without_lookup_on_the_same_traces():
    from dail.rollout.engine import loop

    model = bench.random_qwen2(32, 1, 64)
    # A repetitive prompt, so that the lookup finds guesses.
    make = lambda batch: ([[5, 6, 7, 8] * 3] * batch, [[5, 6, 7, 8] * 6] * batch)  # noqa: E731
    row = bench.bench_lookup(model, [1, 2], budget=8, rounds=2, make_prompts=make)
    assert set(row["speedup"]) == {"1", "2"} and all(r > 0 for r in row["speedup"].values())
    assert row["same_traces"] is True and 0 <= row["guessed_share"]["1"] <= 1
    assert loop.LOOKUP_ROWS > 0  # restored


def test_shared_prompts_row_times_both_ways_on_the_same_traces(tiny):
    from bench.real_model import bench_shared_prompts

    model, tokenizer = tiny
    row = bench_shared_prompts(model, tokenizer, budget=4, rounds=1, samples=3)
    assert row["same_traces"] is True
    assert row["prompts_encoded"] == {"unshared": 6, "shared": 2}  # two prompts per row, or per problem
    assert row["speedup"] > 0 and row["spread"] >= 1.0
    assert row["privileged_prompt_tokens"] > row["student_prompt_tokens"]


@pytest.mark.slow
def test_real_model_prompts_hold_champ_problems_and_their_solutions(smollm2_dir):
    from bench.real_model import champ_prompts, smollm2

    _, tokenizer = smollm2()
    student, privileged = champ_prompts(tokenizer, 3)
    assert len({tuple(s) for s in student}) == 3  # three different problems
    for s, p in zip(student, privileged, strict=True):
        text = tokenizer.decode(p)
        assert "You are a helpful AI assistant named SmolLM" in text and len(p) > len(s)
    same, _ = champ_prompts(tokenizer, 2, one_problem=True)
    assert same[0] == same[1]


def test_real_model_rows_alone_replace_only_their_section(tmp_path, monkeypatch, capsys):
    """`python -m bench --only real_model` keeps the world rows of the last full run and replaces
    the SmolLM2 ones, recording its own command."""
    world = {"model": "world base model 2.0M", "batch": 1, "tau": 0.8}
    old, new = ({"model": "SmolLM2-135M-Instruct 134.5M", "batch": b, "tau": 0.8} for b in (1, 8))
    (tmp_path / "results.json").write_text(json.dumps(
        {"rollout_details": [world, old], "real_model": {"budget": 32}, "lookup": {"speedup": 1.4}}))
    monkeypatch.setattr(bench, "HERE", tmp_path)
    monkeypatch.setattr(bench, "bench_real_model", lambda quick, repeats: (
        [new], {"budget": 128, "train_step_detail": {"ratio": 1.9}, "shared_prompts": {}}))
    bench.update_real_model(quick=False)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["rollout_details"] == [world, new]
    assert results["lookup"] == {"speedup": 1.4} and results["train_step"] == {"ratio": 1.9}
    assert results["real_model"]["budget"] == 128
    assert results["real_model"]["command"] == "python -m bench --only real_model"


def test_divergence_push_matches_the_closed_forms_at_one_position():
    from bench.divergence_push import STUDENT_TAIL, TEACHER_TOP, one_position, push

    for p in (0.5, 0.01, 0.001):
        student, teacher = (x.exp()[0] for x in one_position(p, TEACHER_TOP, STUDENT_TAIL))
        # forward KL(teacher || student): d/dz_b = s_b - t_b, so the push is t_b - s_b
        assert push(p, "forward") == pytest.approx(TEACHER_TOP - p, rel=1e-5)
        # reverse KL(student || teacher): d/dz_b = s_b (log(s_b / t_b) - KL), which vanishes with s_b
        kl = (student * (student / teacher).log()).sum().item()
        assert push(p, "reverse") == pytest.approx(p * (kl - math.log(p / TEACHER_TOP)), rel=1e-4)
    assert push(0.001, "jsd:0.5") < 0.05 * push(0.5, "jsd:0.5")
    assert push(0.001, "jsd:1") == pytest.approx(push(0.001, "reverse"))
