"""`dail probe`: the sources' traces, their teacher-forced scores, the summary and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dail.cli import main
from dail.data import Problem, load_problems
from dail.stages.probe import (
    SOURCES,
    choose_problems,
    cites_reference,
    example_text,
    student_scores,
)
from tests.conftest import PROBLEMS

SAMPLES, BUDGET, TAU = 2, 10, 0.05


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("probe_data") / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS), encoding="utf-8")
    return path


def probe_args(model_dir, data, out, *extra) -> list:
    return ["probe", "--model", model_dir, "--data", data, "--out", out, "--samples", SAMPLES,
            "--max-new-tokens", BUDGET, "--tau", TAU, "--temperature", 1.0, "--top-p", 1.0, *extra]


@pytest.fixture(scope="module")
def probed(tiny_model_dir, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "out"
    assert run_cli(*probe_args(tiny_model_dir, data_file, out)) == 0
    return out


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def teacher_forced(model, prompt: list[int], response: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of `response` and entropies from one unpadded forward with full logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    log_p = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return log_p.gather(-1, torch.tensor(response)[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def student_prompt(tokenizer, problem: Problem) -> list[int]:
    from dail.rollout.prompts import PromptBuilder, encode_prompt

    return encode_prompt(tokenizer, PromptBuilder().render(problem, tokenizer)["student"])


def test_probe_json_has_every_figure_with_its_type(probed):
    summary = read_json(probed / "probe.json")
    assert list(summary["sources"]) == list(SOURCES) == ["expert", "direct", "mixed", "student"]
    for source, figures in summary["sources"].items():
        assert isinstance(figures["nll_per_token"], float) and figures["nll_per_token"] > 0
        low, high = figures["nll_per_token_ci"]
        assert low <= figures["nll_per_token"] <= high
        assert 0 <= figures["cites_reference"] <= 1
        if source == "expert":
            assert figures["answer_match"] is None
        else:
            assert 0 <= figures["answer_match"] <= 1
            assert 1 <= figures["mean_tokens"] <= BUDGET
        assert figures["texts"] == len(PROBLEMS) * (1 if source == "expert" else SAMPLES)
    assert 0 <= summary["acceptance"] <= 1
    assert set(summary["fallback_student_prob"]) == {"p10", "median", "share_below_0.01", "positions"}
    assert set(summary["student_entropy"]) == {"share_below_0.01", "p80", "positions"}
    assert summary["problems"] == len(PROBLEMS) and summary["problem_ids"] == [p["id"] for p in PROBLEMS]
    assert summary["samples"] == SAMPLES and summary["tau"] == TAU and summary["max_new_tokens"] == BUDGET
    assert summary["settings"]["sampling"]["seed"] == 0 and summary["model"]
    assert summary["seconds"]["rollout_and_scoring"] >= 0 and summary["seconds"]["this_run"] > 0
    assert summary["citation_patterns"]


def test_nll_per_token_equals_a_direct_teacher_forced_computation(probed, tiny, data_file):
    from dail.stages.train import solution_ids

    model, tokenizer = tiny
    summary = read_json(probed / "probe.json")
    problems = {p.id: p for p in load_problems(data_file)}
    # The expert solutions, from scratch: tokens plus EOS after the student's prompt.
    expert = [-teacher_forced(model, student_prompt(tokenizer, p), solution_ids(tokenizer, p.solution))[0].mean()
              for p in problems.values()]
    assert summary["sources"]["expert"]["nll_per_token"] == pytest.approx(float(np.mean(expert)), abs=1e-5)
    # The rolled-out traces: each problem's tokens pooled, then the mean over problems.
    for source in ("direct", "mixed", "student"):
        pooled: dict[str, list[float]] = {}
        for record in read_records(probed / "traces" / f"{source}.jsonl"):
            logprob, entropy = teacher_forced(model, student_prompt(tokenizer, problems[record["id"]]),
                                              record["token_ids"])
            pooled.setdefault(record["id"], []).extend(logprob.tolist())
            assert record["student_logprob"] == pytest.approx(logprob.tolist(), abs=1e-5)
            if source == "mixed":
                assert record["student_entropy"] == pytest.approx(entropy.tolist(), abs=1e-4)
        direct = np.mean([-np.mean(v) for v in pooled.values()])
        assert summary["sources"][source]["nll_per_token"] == pytest.approx(direct, abs=1e-5)


def test_mixed_figures_come_from_the_privileged_positions_and_every_position(probed):
    summary = read_json(probed / "probe.json")
    mixed = read_records(probed / "traces" / "mixed.jsonl")
    at_fallback = np.exp([lp for r in mixed for lp, s in zip(r["student_logprob"], r["sources"], strict=True)
                          if s == "P"])
    fallback = summary["fallback_student_prob"]
    assert fallback["positions"] == len(at_fallback) > 0
    assert fallback["median"] == pytest.approx(np.median(at_fallback))
    assert fallback["p10"] == pytest.approx(np.quantile(at_fallback, 0.1))
    entropies = [h for r in mixed for h in r["student_entropy"]]
    assert summary["student_entropy"]["positions"] == len(entropies) == sum(len(r["token_ids"]) for r in mixed)
    assert summary["student_entropy"]["p80"] == pytest.approx(np.quantile(entropies, 0.8))
    assert summary["acceptance"] == pytest.approx(np.mean([r["sources"].count("S") / len(r["sources"])
                                                           for r in mixed]))


def test_direct_minus_mixed_is_paired_by_problem(probed):
    summary = read_json(probed / "probe.json")
    direct, mixed = (read_records(probed / "traces" / f"{s}.jsonl") for s in ("direct", "mixed"))

    def per_problem(records):
        pooled: dict[str, list[float]] = {}
        for r in records:
            pooled.setdefault(r["id"], []).extend(r["student_logprob"])
        return {pid: -np.mean(v) for pid, v in pooled.items()}

    a, b = per_problem(direct), per_problem(mixed)
    gaps = [a[pid] - b[pid] for pid in a]
    gap = summary["direct_minus_mixed"]
    assert gap["nll_per_token"] == pytest.approx(np.mean(gaps), abs=1e-6)
    # A paired interval: on these few problems it brackets the mean and is no wider than the
    # spread of the per-problem gaps.
    assert min(gaps) <= gap["ci"][0] <= gap["nll_per_token"] <= gap["ci"][1] <= max(gaps)
    assert gap["problems"] == len(PROBLEMS)
    same = [d["token_ids"] == m["token_ids"] for d, m in zip(direct, mixed, strict=True)]
    assert gap["identical"] == pytest.approx(np.mean(same))
    assert "direct minus mixed" in (probed / "probe.md").read_text(encoding="utf-8")


def rollout_settings(model, tokenizer, tau: float, engine: str = "reference"):
    from dail.models import eos_token_ids
    from dail.rollout.rule import RolloutSettings

    return RolloutSettings(tau=tau, temperature=1.0, top_p=1.0, max_new_tokens=BUDGET,
                           eos_ids=tuple(eos_token_ids(model, tokenizer)), engine=engine)


def test_tau_0_traces_are_the_students_own_samples_and_tau_1_only_privileged_tokens(probed, tiny, data_file):
    from dail.rollout.mixed import mixed_rollout
    from dail.rollout.prompts import PromptBuilder, encode_prompt
    from dail.rollout.rule import sequence_seed
    from dail.rollout.token_loop import sample_responses

    model, tokenizer = tiny
    problems = {p.id: p for p in load_problems(data_file)}
    for source, tau in (("student", 0.0), ("direct", 1.0)):
        records = read_records(probed / "traces" / f"{source}.jsonl")
        assert len(records) == len(PROBLEMS) * SAMPLES
        prompts = [PromptBuilder().render(problems[r["id"]], tokenizer) for r in records]
        student = [encode_prompt(tokenizer, p["student"]) for p in prompts]
        privileged = [encode_prompt(tokenizer, p["privileged"]) for p in prompts]
        seeds = [sequence_seed(0, f"{r['id']}\x00{r['sample']}") for r in records]
        settings = rollout_settings(model, tokenizer, tau)
        if source == "student":
            # The token-by-token mixed loop at tau 0, and plain sampling from the student's prompt.
            expected = mixed_rollout(model, student, privileged, seeds, settings, pad_id=tokenizer.pad_token_id)
            plain = sample_responses(model, student, seeds, settings, pad_id=tokenizer.pad_token_id)
            assert [t.token_ids for t in plain] == [t.token_ids for t in expected]
            assert all(set(r["sources"]) == {"S"} for r in records)
        else:
            expected = sample_responses(model, privileged, seeds, settings, pad_id=tokenizer.pad_token_id, draw=-1)
            assert all(set(r["sources"]) == {"P"} for r in records)
        assert [r["token_ids"] for r in records] == [t.token_ids for t in expected]


def test_mixed_traces_are_the_ones_dail_generate_writes(probed, tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "gen"
    assert run_cli("generate", "--model", tiny_model_dir, "--data", data_file, "--out", out,
                   "--samples", SAMPLES, "--max-new-tokens", BUDGET, "--tau", TAU, "--temperature", 1.0,
                   "--top-p", 1.0) == 0
    generated = read_records(out / "traces.jsonl")
    mixed = read_records(probed / "traces" / "mixed.jsonl")
    assert [(r["id"], r["sample"], r["token_ids"], r["sources"]) for r in mixed] == \
        [(r["id"], r["sample"], r["token_ids"], r["sources"]) for r in generated]
    assert 0 < sum(r["sources"].count("S") for r in mixed) < sum(len(r["sources"]) for r in mixed)


def test_scores_do_not_depend_on_batching_or_chunking(tiny):
    model, tokenizer = tiny
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [[20, 21, 22, 23, 24], [30], [40, 41, 42]]
    tight = student_scores(model, prompts, responses, pad_id=tokenizer.pad_token_id, entropy=True,
                           max_tokens=8, chunk_size=2)  # one row a forward, two positions a chunk
    whole = student_scores(model, prompts, responses, pad_id=tokenizer.pad_token_id, entropy=True)
    for prompt, response, a, b in zip(prompts, responses, tight, whole, strict=True):
        logprob, entropy = teacher_forced(model, prompt, response)
        for scores in (a, b):
            assert scores["student_logprob"] == pytest.approx(logprob.tolist(), abs=1e-5)
            assert scores["student_entropy"] == pytest.approx(entropy.tolist(), abs=1e-4)


def test_forwards_stay_within_their_token_budget():
    from dail.stages.probe import _token_batches

    lengths = [3, 5, 2, 9, 1, 1, 12]
    batches = _token_batches(lengths, 10)
    assert batches == [[0, 1], [2], [3], [4, 5], [6]]
    assert [i for b in batches for i in b] == list(range(len(lengths)))
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 10 for b in batches)


def test_source_figures_weigh_problems_equally_and_pool_tokens_within_one():
    from dail.stages.probe import source_figures

    def record(pid, logprobs, text="2 + 3 = 5", correct=None, gold="5"):
        return {"id": pid, "student_logprob": logprobs, "token_ids": list(range(len(logprobs))), "text": text,
                "correct": correct, "gold": gold}

    records = [record("a", [-1.0], correct=True), record("a", [-2.0, -2.0, -3.0], "the expert's work", False),
               record("b", [-0.5, -0.5], correct=False, gold=None)]
    figures = source_figures(records, graded=True)
    assert figures["nll_per_token"] == pytest.approx((8 / 4 + 0.5) / 2)  # a's four tokens pooled
    assert figures["cites_reference"] == pytest.approx(1 / 3)
    assert figures["answer_match"] == pytest.approx(1 / 2)  # b has no gold answer
    assert figures["mean_tokens"] == pytest.approx(2) and figures["texts"] == 3
    assert source_figures(records, graded=False)["answer_match"] is None


@pytest.mark.parametrize("text", [
    "Expert solution: we factor the quadratic.",
    "As the reference solution shows, x = 3.",
    "Following the solution provided, we add the roots.",
    "The solution given above uses induction.",
    "According to the solution, the answer is 5.",
    "I will use the expert's method.",
    "The official solution is short.",
    "Let me restate it (hidden from the reader).",
])
def test_citations_of_the_reference_are_found(text):
    assert cites_reference(text)
    assert cites_reference(text.upper())


@pytest.mark.parametrize("text", [
    "The solution to the equation is x = 3.",
    "The given equation has two roots, so the solution set is {2, 3}.",
    "The solution given by the quadratic formula is x = 2.",
    "We solve it step by step: 2 + 3 = 5, so \\boxed{5}.",
    "Expertly done, the sum is 5.",
])
def test_ordinary_math_text_is_not_a_citation(text):
    assert not cites_reference(text)


def test_the_problems_are_a_seeded_sample_in_file_order():
    problems = [Problem(id=str(i), problem="p", solution="s") for i in range(30)]
    picked = choose_problems(problems, 5, seed=0)
    assert len(picked) == 5 and picked == sorted(picked, key=lambda p: int(p.id))
    assert choose_problems(problems, 5, seed=0) == picked != choose_problems(problems, 5, seed=1)
    assert choose_problems(problems, 30, seed=0) == problems == choose_problems(problems, 99, seed=3)


def test_the_example_marks_the_privileged_tokens(tiny):
    _, tokenizer = tiny
    ids = tokenizer("We add 2 and 3 to get 5.", add_special_tokens=False).input_ids
    assert len(ids) >= 4
    sources = "SS" + "P" * (len(ids) - 3) + "S"
    text = example_text(tokenizer, {"token_ids": ids, "sources": sources})
    first, middle, last = (tokenizer.decode(part) for part in (ids[:2], ids[2:-1], ids[-1:]))
    assert text == f"{first}⟦{middle}⟧{last}"
    assert example_text(tokenizer, {"token_ids": ids, "sources": ""}) == tokenizer.decode(ids)
    assert example_text(tokenizer, {"token_ids": ids, "sources": "P" * len(ids)}, max_tokens=2) == \
        f"⟦{tokenizer.decode(ids[:2])}⟧\n[... {len(ids) - 2} more tokens]"


def test_probe_md_holds_the_table_and_an_example_per_source(probed):
    text = (probed / "probe.md").read_text(encoding="utf-8")
    summary = read_json(probed / "probe.json")
    for source in SOURCES:
        assert f"| {source} | {summary['sources'][source]['nll_per_token']:.3f} [" in text
        assert f"### {source}" in text
    assert "acceptance" in text and "80th percentile" in text and "⟦" in text


def test_a_rerun_resumes_and_other_settings_are_refused(probed, tiny_model_dir, data_file, capsys):
    before = read_json(probed / "probe.json")
    assert run_cli(*probe_args(tiny_model_dir, data_file, probed)) == 0
    after = read_json(probed / "probe.json")
    assert after["sources"] == before["sources"]
    assert after["seconds"]["rollout_and_scoring"] == before["seconds"]["rollout_and_scoring"]
    capsys.readouterr()
    assert run_cli(*probe_args(tiny_model_dir, data_file, probed, "--samples", 3)) == 2
    assert "holds outputs made with other settings (samples)" in capsys.readouterr().err


@pytest.mark.parametrize("flags, line", [
    (["--tau", "1"], "--tau 1: out of range; allowed: (0, 1)"),
    (["--tau", "0"], "--tau 0: out of range; allowed: (0, 1)"),
    (["--problems", "0"], "--problems 0: out of range; allowed: >= 1"),
    (["--samples", "0"], "--samples 0: out of range; allowed: >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: out of range; allowed: >= 1"),
    (["--grader", "maths"], "--grader: unknown grader 'maths'"),
    (["--data", "no/such/file.jsonl"], "no/such/file.jsonl"),
])
def test_bad_input_is_one_line_before_the_model_loads(tmp_path, capsys, data_file, flags, line):
    out = tmp_path / "o"
    # The model does not exist: every error below comes before anything tries to load it.
    code = run_cli("probe", "--model", tmp_path / "no-model", "--data", data_file, "--out", out, *flags)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dail probe: error: ") and line in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_required_settings_are_named(tmp_path, capsys, data_file):
    assert run_cli("probe", "--model", "m", "--data", data_file) == 2
    assert "--out is required" in capsys.readouterr().err
    assert run_cli("probe", "--data", data_file, "--out", tmp_path / "o") == 2
    assert "--model is required" in capsys.readouterr().err


def test_the_shipped_config_loads_and_names_its_command():
    from dail import cli
    from dail.config import ProbeConfig

    path = Path(__file__).parents[2] / "configs" / "probe.yaml"
    assert "#   dail probe --config configs/probe.yaml" in path.read_text(encoding="utf-8")
    args = cli.build_parser().parse_args(["probe", "--config", str(path), "--problems", "3"])
    cfg = cli.stage_config(ProbeConfig, args, ("data", "out", "problems", "samples", "tau", "grader", "engine"))
    assert (cfg.model.model, cfg.data, cfg.problems, cfg.samples, cfg.tau) == ("smollm2", "champ", 3, 4, 0.8)


@pytest.mark.slow
def test_probe_on_smollm2_with_champ(smollm2_dir, tmp_path):
    out = tmp_path / "probe"
    assert run_cli("probe", "--model", "smollm2", "--data", "champ", "--problems", 2, "--samples", 2,
                   "--max-new-tokens", 32, "--out", out) == 0
    summary = read_json(out / "probe.json")
    assert summary["problems"] == 2 and len(summary["problem_ids"]) == 2
    sources = summary["sources"]
    assert set(sources) == set(SOURCES)
    # A real model writes its own samples far more fluently than it would the expert's text.
    assert sources["expert"]["nll_per_token"] > sources["student"]["nll_per_token"]
    assert all(1 <= sources[s]["mean_tokens"] <= 32 for s in ("direct", "mixed", "student"))
    assert 0 < summary["acceptance"] < 1
    fallback = summary["fallback_student_prob"]
    assert fallback["positions"] > 0 and fallback["p10"] <= fallback["median"]
    assert summary["student_entropy"]["positions"] == round(sources["mixed"]["mean_tokens"] * 4)
    assert "### mixed" in (out / "probe.md").read_text(encoding="utf-8")
