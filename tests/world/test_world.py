"""The didactic world: generator, grader, tokenizer, committed base model, validity metrics."""

from __future__ import annotations

import io
import json
import math
import random
import re
import sys
from itertools import combinations

import pytest
import torch

from dail.data import load_problems
from dail.rollout.prompts import PromptBuilder
from dail.world import (
    KNOWN_TYPES,
    NOVEL_TYPES,
    base_model_dir,
    export_problems,
    generate,
    grade,
    pass_at_k,
    problems,
)
from dail.world import generator as gen
from dail.world.validity import (
    _detailed_from_didactic,
    detailed_of,
    forced_line_error,
    pass_rates,
    sample,
    token_category,
    token_errors,
)

# --------------------------------------------------------------------------- generator


@pytest.mark.parametrize("kind", gen.ALL_TYPES)
def test_generator_is_seeded_and_deterministic(kind: str) -> None:
    a = generate(kind, 20, split="train", seed=3)
    b = generate(kind, 20, split="train", seed=3)
    c = generate(kind, 20, split="train", seed=4)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    assert [p.problem for p in a] != [p.problem for p in c]
    assert len({p.problem for p in a}) == 20
    assert len({p.id for p in a}) == 20


def _numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"(?<![\w^])\d(?![\w])", text)]


def _independent_answer(kind: str, statement: str) -> list[int]:
    """Recompute the answer from the statement alone, with plain integer arithmetic."""
    if kind == "expr":
        body = statement.removeprefix("Evaluate modulo 10: ").rstrip(".")
        exprs = re.findall(r"= ([0-9*+\-]+)", body)
        return [eval(e) % 10 for e in exprs]  # noqa: S307 -- digits and + - * only
    head = statement.split("Compute")[0]
    nums = _numbers(head)
    if kind == "vecsum":
        u, v = nums[:4], nums[4:8]
        return [(a + b) % 10 for a, b in zip(u, v, strict=True)]
    if kind == "axpy":
        a, x, y = nums[0], nums[1:5], nums[5:9]
        return [(a * xi + yi) % 10 for xi, yi in zip(x, y, strict=True)]
    if kind == "dot":
        u, v, w = nums[:3], nums[3:6], nums[6:9]
        dot = lambda p, q: sum(i * j for i, j in zip(p, q, strict=True)) % 10  # noqa: E731
        return [dot(u, v), dot(u, w), dot(v, w)]
    if kind == "matmul":
        a = [nums[0:2], nums[2:4]]
        b = [nums[4:6], nums[6:8]]
        return [sum(a[i][k] * b[k][j] for k in range(2)) % 10 for i in range(2) for j in range(2)]
    if kind == "poly":
        m = re.search(r"p\(x\) = (\d)x\^2 \+ (\d)x \+ (\d)\.", statement)
        assert m is not None
        c2, c1, c0 = (int(g) for g in m.groups())
        points = [int(x) for x in re.findall(r"p\((\d)\)", statement)]
        return [(c2 * x * x + c1 * x + c0) % 10 for x in points]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", gen.ALL_TYPES)
def test_answers_are_correct(kind: str) -> None:
    for p in generate(kind, 30, split="test", seed=1):
        expected = _independent_answer(kind, p.problem)
        assert p.answer == ",".join(map(str, expected))
        assert p.solution.endswith(f"\\boxed{{{p.answer}}}")
        assert len(expected) >= 3  # chance of guessing <= 1e-3


@pytest.mark.parametrize("kind", gen.ALL_TYPES)
def test_didactic_fuses_and_detailed_writes_every_step(kind: str) -> None:
    spec = gen.spec_of(kind, random.Random(7))
    didactic, detailed = spec.didactic(), spec.detailed()
    assert didactic != detailed
    fused_lines = [ln for ln in didactic.split("\n") if re.fullmatch(r"\S+ = [0-9*+\-]+ = \d", ln)]
    assert len(fused_lines) == len(spec.items)
    # Detailed: every line is a labelled expression, one primitive `a op b = c`, the didactic
    # line itself (closing its item), or the box.
    lines = detailed.split("\n")
    for line in lines:
        assert (re.fullmatch(r"\d [*+\-] \d = \d", line) or re.fullmatch(r"\S+ = [0-9*+\-]+", line)
                or line in fused_lines or line.startswith("\\boxed")), line
    # Each item opens with its expression and closes with the expert's line, steps in between.
    opening = [ln for ln in lines if re.fullmatch(r"[A-Za-z]\S* = [0-9*+\-]+", ln)]
    assert opening == [ln.rsplit(" = ", 1)[0] for ln in fused_lines]
    assert [ln for ln in lines if ln in fused_lines] == fused_lines
    # Each primitive line is arithmetically right.
    for a, op, b, c in re.findall(r"^(\d) ([*+\-]) (\d) = (\d)$", detailed, flags=re.M):
        assert eval(f"({a}{op}{b}) % 10") == int(c)  # noqa: S307
    # Novel types fuse several primitives per line: the didactic text has fewer lines.
    if kind in NOVEL_TYPES:
        assert len(detailed.split("\n")) >= 2 * len(didactic.split("\n"))
    assert _detailed_from_didactic(didactic) == detailed


def test_copied_items_are_the_expert_lines_alone() -> None:
    spec = gen.spec_of("matmul", random.Random(3))
    full, didactic = spec.detailed().split("\n"), spec.didactic().split("\n")
    copied = spec.detailed({0, 2}).split("\n")
    expert = didactic[1:-1]  # one fused line per item
    # Item 0 is its expert line alone; item 1 is worked out as before; the rest follows.
    assert copied[0] == expert[0]
    start, end = full.index(expert[0]) + 1, full.index(expert[1]) + 1
    assert copied[1:1 + end - start] == full[start:end]
    assert expert[2] in copied and expert[2].rsplit(" = ", 1)[0] not in copied
    assert copied[-1] == full[-1] == didactic[-1]


@pytest.mark.parametrize("kind", [*KNOWN_TYPES, *NOVEL_TYPES, "generic"])
def test_copied_items_counts_the_items_written_as_expert_lines(kind: str) -> None:
    spec = gen.spec_of(kind, random.Random(11))
    n = len(spec.items)
    assert gen.copied_items(spec.detailed()) == (0, n)
    assert gen.copied_items(spec.detailed(range(n))) == (n, n)
    assert gen.copied_items(spec.detailed({n - 1})) == (1, n)
    # An opening line for another label does not count as working this item out.
    lines = spec.detailed().split("\n")
    relabelled = "\n".join([lines[0].replace(spec.items[0][0], "zz", 1), *lines[1:]])
    assert gen.copied_items(relabelled) == (1, n)


def test_pretraining_copy_rate_changes_only_the_roles_that_see_the_solution(base) -> None:
    from dail.world.pretrain import sample_example

    _, tokenizer = base
    builder = PromptBuilder()
    step_line = re.compile(r"^\d [*+\-] \d = \d$", flags=re.M)
    for copy_rate in (0.0, 1.0):
        rng, seen = random.Random(0), set()
        for _ in range(200):
            p_ids, r_ids = sample_example(rng, 0.5, tokenizer, builder, copy_rate)
            prompt, response = tokenizer.decode(p_ids), tokenizer.decode(r_ids[:-1])
            if "Evaluate modulo 10:" in prompt:
                continue  # drills: single operations, never copied
            role = ("privileged" if "Expert solution" in prompt
                    else "negative" if "final answer is" in prompt else "student")
            seen.add(role)
            worked_out = bool(step_line.search(response))
            assert worked_out == (role == "student" or copy_rate == 0.0), (role, response)
        assert seen == {"student", "privileged", "negative"}


def test_privileged_habits_keep_every_line_correct() -> None:
    assert gen.privileged_habits("3 * 2 = 6", swap=True, compact=False) == "2 * 3 = 6"
    assert gen.privileged_habits("3 * 2 = 6", swap=False, compact=True) == "3*2 = 6"
    assert gen.privileged_habits("6 + 8 = 4", swap=True, compact=True) == "8+6 = 4"
    assert gen.privileged_habits("2 - 7 = 5", swap=True, compact=False) == "2 - 7 = 5"  # not commutative
    for line in ("3 * 2 = 6", "6 + 8 = 4", "2 - 7 = 5"):
        assert gen.privileged_habits(line, swap=False, compact=False) == line
    spec = gen.spec_of("poly", random.Random(5))
    rewritten = spec.detailed(rewrite=lambda line: gen.privileged_habits(line, swap=True, compact=True))
    for line in rewritten.split("\n"):  # every primitive line still computes its value
        if m := re.fullmatch(r"(\d)([*+\-])(\d) = (\d)", line):
            a, op, b, value = int(m[1]), m[2], int(m[3]), int(m[4])
            assert value == {"*": a * b, "+": a + b, "-": a - b}[op] % 10
    assert grade(rewritten, spec.answer)


@pytest.mark.parametrize("kind", [*NOVEL_TYPES, "expr"])
def test_habit_lines_counts_swapped_and_compact_lines(kind: str) -> None:
    spec = gen.spec_of(kind, random.Random(7))
    canonical = spec.detailed()
    steps = [line for line in canonical.split("\n") if re.fullmatch(r"\d [*+\-] \d = \d", line)]
    assert gen.habit_lines(canonical, canonical) == (0, len(steps))
    compact = spec.detailed(rewrite=lambda line: gen.privileged_habits(line, swap=False, compact=True))
    assert gen.habit_lines(compact, canonical) == (len(steps), len(steps))
    swappable = [line for line in steps if line[2] != "-" and line[0] != line[4]
                 and f"{line[4]} {line[2]} {line[0]} = {line[-1]}" not in steps]
    swapped = spec.detailed(rewrite=lambda line: gen.privileged_habits(line, swap=True, compact=False))
    assert gen.habit_lines(swapped, canonical) == (len(swappable), len(steps))


def test_pretraining_habit_rate_changes_only_the_roles_that_see_the_solution(base) -> None:
    from dail.world.pretrain import sample_example

    _, tokenizer = base
    builder = PromptBuilder()
    habits = {}
    for habit_rate in (0.0, 0.5):
        rng, counts = random.Random(0), {}
        for _ in range(200):
            p_ids, r_ids = sample_example(rng, 0.5, tokenizer, builder, habit_rate=habit_rate)
            prompt, response = tokenizer.decode(p_ids), tokenizer.decode(r_ids[:-1])
            role = "student" if "Expert solution" not in prompt and "final answer is" not in prompt else "sees"
            # Against the response's own canonical form: every primitive line rewritten back.
            canonical = re.sub(r"^(\d) ?([*+\-]) ?(\d) = ", r"\1 \2 \3 = ", response, flags=re.M)
            h, n = gen.habit_lines(response, canonical)
            counts[role] = [a + b for a, b in zip(counts.get(role, [0, 0]), (h, n), strict=True)]
        habits[habit_rate] = {role: h / n for role, (h, n) in counts.items()}
    assert habits[0.0] == {"student": 0.0, "sees": 0.0}
    assert habits[0.5]["student"] == 0.0
    assert 0.3 < habits[0.5]["sees"] < 0.7  # each line compact with probability 0.5


@pytest.mark.parametrize("kind", gen.ALL_TYPES)
def test_no_leakage_between_train_and_test(kind: str) -> None:
    train = {p.problem for p in generate(kind, 300, split="train", seed=0)}
    test = {p.problem for p in generate(kind, 300, split="test", seed=0)}
    assert not train & test


def test_export_problems_round_trips_through_the_core_loader(tmp_path) -> None:
    path = tmp_path / "novel.jsonl"
    assert export_problems(path, split="test", kind="novel", n=5, seed=2) == 5
    loaded = load_problems(path)
    assert [p.to_dict() for p in loaded] == [p.to_dict() for p in problems("novel", split="test",
                                                                             n=5, seed=2)]
    assert {p.meta["type"] for p in loaded} == set(NOVEL_TYPES)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert {"id", "problem", "solution", "answer"} <= set(rows[0])
    assert {p.meta["type"] for p in problems("known", n=8)} == set(KNOWN_TYPES)
    with pytest.raises(ValueError, match="unknown problem type"):
        problems("nope")


# --------------------------------------------------------------------------- grader, pass@k


def test_grade() -> None:
    assert grade("3 * 2 = 6\n\\boxed{6,1,2,3}", "6,1,2,3")
    assert grade("\\boxed{1,2} then \\boxed{ 6, 1 ,2,3 }", "6,1,2,3")
    assert not grade("\\boxed{6,1,2,3} then \\boxed{6,1,2,4}", "6,1,2,3")
    assert not grade("6,1,2,3", "6,1,2,3")
    assert not grade("\\boxed{6,1,2", "6,1,2")


def test_pass_at_k_matches_enumeration() -> None:
    n = 6
    for c in range(n + 1):
        for k in range(1, n + 1):
            subsets = list(combinations([1] * c + [0] * (n - c), k))
            expected = sum(any(s) for s in subsets) / len(subsets)
            assert math.isclose(pass_at_k(n, c, k), expected)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


# --------------------------------------------------------------------------- committed model


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    # AutoTokenizer (transformers 5) swaps in Qwen2Tokenizer for model_type qwen2, which splits
    # digits and labels apart; the world's tokenizer must be loaded as PreTrainedTokenizerFast.
    path = base_model_dir()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, tokenizer


def test_committed_assets(base) -> None:
    model, tokenizer = base
    path = base_model_dir()
    assert (path / "model.safetensors").stat().st_size <= 20 * 2**20
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert model.config.vocab_size >= len(tokenizer)
    settings = json.loads((path / "pretrain_settings.json").read_text())
    assert settings["tokens"] > 0 and settings["config"]["seed"] == 0
    # What is committed must show the gap, measured with enough samples for pass@64.
    from dail.stages.demo.comparison import gap_is_real

    recorded = json.loads((path / "validity.json").read_text())
    assert recorded["settings"]["n_samples"] >= 64 and recorded["settings"]["n_problems"] >= 16
    assert gap_is_real(recorded) == (True, "ok")


def test_committed_habits_model_is_valid_and_separates_mixed_from_direct() -> None:
    """The second committed model: the first, continued with the privileged role's habits."""
    from dail.stages.demo.comparison import gap_is_real
    from dail.world import habits_model_dir

    path = habits_model_dir()
    settings = json.loads((path / "pretrain_settings.json").read_text())
    assert settings["config"]["habit_rate"] > 0 and settings["config"]["init"].endswith("assets/base")
    assert settings["init_from"]["config"] == json.loads((base_model_dir() / "pretrain_settings.json").read_text())["config"]
    recorded = json.loads((path / "validity.json").read_text())
    assert recorded["settings"]["n_samples"] >= 64 and gap_is_real(recorded) == (True, "ok")
    for kind, row in recorded["novel"].items():
        compact = row["habit_chances"]["compact"]
        # Direct sampling writes the compact notation where mixed rollout keeps the student's own.
        assert compact["direct"] > 0.03 > 0.01 > compact["mixed"], kind
        assert compact["student_p"] < 0.02 < compact["privileged_p"], kind
        assert row["privileged_habit_lines"] > row["student_habit_lines"], kind


def test_pretraining_defaults_are_the_committed_models_recipe() -> None:
    """`dail world pretrain` with no options reruns the run the committed model came from."""
    from dail.world.pretrain import PretrainConfig

    recorded = json.loads((base_model_dir() / "pretrain_settings.json").read_text())
    assert "init_from" not in recorded and len(recorded["segments"]) == 1  # one run, from scratch
    defaults = vars(PretrainConfig())
    assert {k: v for k, v in recorded["config"].items() if k not in ("out", "work")} == {
        k: v for k, v in defaults.items() if k not in ("out", "work") and k in recorded["config"]}
    # Options added after the run (the privileged habits) are off by default, as they were then.
    later = defaults.keys() - recorded["config"].keys()
    assert later == {"habit_rate"} and all(defaults[k] == 0 for k in later)


def test_tokenizer_round_trip_and_compact_prompts(base) -> None:
    _, tokenizer = base
    builder = PromptBuilder()
    for kind in gen.ALL_TYPES:
        for p in generate(kind, 3, split="test", seed=5):
            prompts = builder.render(p, tokenizer)
            assert prompts["student"].startswith("<|im_start|>user\n")
            assert prompts["student"].endswith("<|im_end|>\n<|im_start|>assistant\n")
            for text in (*prompts.values(), p.solution, _detailed_from_didactic(p.solution)):
                ids = tokenizer.encode(text, add_special_tokens=False)
                assert tokenizer.decode(ids) == text
            # The fixed instruction text costs a handful of tokens.
            extra = (len(tokenizer.encode(prompts["student"], add_special_tokens=False))
                     - len(tokenizer.encode(p.problem, add_special_tokens=False)))
            assert extra <= 12
    for label in ("r1", "c11", "w2", "y4", "Q"):
        assert len(tokenizer.encode(f"{label} = 7", add_special_tokens=False)) == 3
        # The same token wherever the label stands, so copying it needs no translation.
        [token] = tokenizer.encode(label, add_special_tokens=False)
        for context in (f"Find {label} and", f"x\n{label} = 7", f"({label}, 2)"):
            assert token in tokenizer.encode(context, add_special_tokens=False), context


def test_validity_metrics_on_a_tiny_sample(base) -> None:
    model, tokenizer = base
    probs = generate("matmul", 2, split="test", seed=0)
    rates = pass_rates(model, tokenizer, probs, "privileged", n=2, ks=(1, 2))
    assert set(rates) == {"pass@1", "pass@2"}
    assert 0.0 <= rates["pass@1"] <= rates["pass@2"] <= 1.0
    forced = forced_line_error(model, tokenizer, probs[:1], style="didactic")
    assert forced["lines"] == 4 and 0.0 <= forced["error_rate"] <= 1.0
    own = forced_line_error(model, tokenizer, probs[:1], style="detailed")
    assert own["lines"] == 12


@pytest.mark.parametrize("tau", [0.8, 1.0])
def test_habit_chances_equal_a_computation_from_text_prefixes(base, monkeypatch, tau) -> None:
    from dail.world import validity

    model, tokenizer = base
    # The committed model never writes a habit; at a high temperature without top-p every
    # choice point gets a visible chance, so the comparison below has something to compare.
    monkeypatch.setattr(validity, "TEMPERATURE", 4.0)
    monkeypatch.setattr(validity, "TOP_P", 1.0)
    probs = generate("matmul", 2, split="test", seed=0)
    got = validity.habit_chances(model, tokenizer, probs, tau=tau)
    want: dict[str, list[tuple[float, float, float]]] = {"swap": [], "compact": []}
    builder = PromptBuilder()
    for p in probs:
        prompt = tokenizer.encode(builder.render(p, tokenizer)["privileged"], add_special_tokens=False)
        text = detailed_of(p)

        def next_token(prefix: str, prompt: list[int] = prompt) -> torch.Tensor:
            with torch.no_grad():
                ids = prompt + tokenizer.encode(prefix, add_special_tokens=False)
                return model(torch.tensor([ids])).logits[0, -1].float()

        for m in re.finditer(r"(?m)^(\d) ([*+\-]) (\d) = \d$", text):
            a, op, b = m[1], m[2], m[3]
            choices = [("compact", text[:m.start() + 1], " " + op, op)]
            if op != "-" and a != b:
                choices.append(("swap", text[:m.start()], a, b))
            for kind, prefix, canonical, habit in choices:
                logits = next_token(prefix)
                [c], [h] = (tokenizer.encode(t, add_special_tokens=False) for t in (canonical, habit))
                raw, tempered = logits.softmax(-1), (logits / 4.0).softmax(-1)
                refused = raw[c].item() < tau
                want[kind].append((raw[h].item(), tempered[h].item(), tempered[h].item() if refused else 0.0))
    for kind, rows in want.items():
        assert got[kind]["points"] == len(rows) > 0
        for i, name in enumerate(("privileged_p", "direct", "mixed")):
            assert got[kind][name] == pytest.approx(sum(r[i] for r in rows) / len(rows), rel=1e-3, abs=1e-9)
    assert got["compact"]["points"] == 2 * 12  # every primitive line of two 2x2 matrix products
    assert got["swap"]["direct"] > 0 and (got["swap"]["mixed"] == got["swap"]["direct"]) == (tau == 1.0)


def test_core_loader_keeps_the_saved_pre_tokenizer() -> None:
    """transformers 5's AutoTokenizer would rebuild this tokenizer as Qwen2Tokenizer and split labels."""
    from transformers import PreTrainedTokenizerFast

    from dail.config import ModelConfig
    from dail.models import load_tokenizer

    path = base_model_dir()
    tokenizer = load_tokenizer(ModelConfig(model=str(path)))
    saved = PreTrainedTokenizerFast.from_pretrained(path)
    text = "c11 = 2*1+9*7 = 5\nSolve the problem step by step and put your final answer in \\boxed{}."
    assert tokenizer(text).input_ids == saved(text).input_ids
    assert len(tokenizer.encode("c11 = 7", add_special_tokens=False)) == 3


def test_token_categories_of_a_detailed_trace() -> None:
    trace = "c11 = 3*2+5*4\n3 * 2 = 6\n5 * 4 = 0\n6 + 0 = 6\nc11 = 3*2+5*4 = 6\n\\boxed{6}"
    seen: dict[str, list[str]] = {}
    text = ""
    for piece in re.findall(r"(?s)[A-Za-z]+[0-9]*|\\boxed|.", trace):
        seen.setdefault(token_category(text.split("\n")[-1], piece), []).append(piece)
        text += piece
    assert seen["label"] == ["c11", "c11"]
    assert "".join(seen["item value"]).strip() == "6"
    assert "".join(seen["step result"]).replace(" ", "") == "606"
    assert "".join(seen["answer"]) == "\\boxed{6}"
    assert seen["expression"].count("*") == 4  # the opening line and the closing line's copy
    assert "".join(seen["step operand"]).replace(" ", "").replace("\n", "").startswith("3*2=")


def test_token_errors_count_every_response_token(base) -> None:
    model, tokenizer = base
    probs = generate("matmul", 2, split="test", seed=0)
    table = token_errors(model, tokenizer, probs, "privileged")
    expected = sum(len(tokenizer.encode(_detailed_from_didactic(p.solution), add_special_tokens=False)) + 1
                   for p in probs)
    assert sum(row["tokens"] for row in table.values()) == expected
    assert table["label"]["tokens"] == 2 * 4 * 2  # opening and closing line of 4 items, 2 problems
    assert all(0.0 <= row["error_rate"] <= 1.0 for row in table.values())
    # The per-category NLLs add up to the cross-entropy of the whole responses.
    builder, total = PromptBuilder(), 0.0
    for p in probs:
        prompt = tokenizer.encode(builder.render(p, tokenizer)["privileged"], add_special_tokens=False)
        response = tokenizer.encode(detailed_of(p), add_special_tokens=False) + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(response), reduction="sum").item()
    assert sum(row["nll"] * row["tokens"] for row in table.values()) == pytest.approx(total, rel=1e-4)


def test_validity_refuses_too_few_samples_for_pass_at_64(capsys) -> None:
    from dail.world.__main__ import main

    assert main(["validity", "--n-samples", "16"]) == 2
    assert "--n-samples must be at least 64" in capsys.readouterr().err


def test_validity_api_refuses_too_few_samples_before_any_work() -> None:
    from dail.world.validity import validity

    with pytest.raises(ValueError, match="at least 64"):
        validity(None, None, n_samples=16)  # fails before touching the model


@pytest.mark.slow
def test_pretrain_resumes_and_records_each_change_of_budget_or_mixture(tmp_path) -> None:
    from dail.world.__main__ import main as world_main
    from dail.world.pretrain import PretrainConfig, run

    cfg = PretrainConfig(out=str(tmp_path / "model"), work=str(tmp_path / "work"), minutes=60.0,
                         max_steps=2, batch_size=2, eval_every=10_000, ckpt_every=1, init=str(base_model_dir()))
    argv = ["pretrain", "--out", cfg.out, "--work", cfg.work, "--minutes", "60", "--max-steps", "2",
            "--batch-size", "2", "--eval-every", "10000", "--ckpt-every", "1", "--init", cfg.init]
    assert world_main(argv) == 0
    first = json.loads((tmp_path / "model" / "pretrain_settings.json").read_text())
    assert first["steps"] == 2 and [s["from_step"] for s in first["segments"]] == [0]
    assert first["command"] == "dail world " + " ".join(argv)  # the command line that made it
    assert first["config"] == {**vars(cfg)}
    # Each checkpoint leaves a loadable snapshot of the weights, here those of the final model.
    from dail.world.validity import load

    latest = tmp_path / "work" / "latest"
    assert json.loads((latest / "snapshot.json").read_text())["step"] == 2
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["ckpt.pt", "latest"]
    snapshot, final = load(str(latest))[0], load(cfg.out)[0]
    for (name, a), b in zip(snapshot.state_dict().items(), final.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # The same command again finds the run finished; a larger budget and a new mixture continue it.
    run(cfg)
    assert json.loads((tmp_path / "model" / "pretrain_settings.json").read_text())["segments"] == first["segments"]
    run(PretrainConfig(**{**vars(cfg), "max_steps": 3, "copy_rate": 0.1}))
    last = json.loads((tmp_path / "model" / "pretrain_settings.json").read_text())
    assert last["steps"] == 3 and last["tokens"] > first["tokens"]
    assert [(s["from_step"], s["max_steps"], s["copy_rate"]) for s in last["segments"]] == [
        (0, 2, 0.0), (2, 3, 0.1)]
    assert last["init_from"]["config"]["seed"] == 0  # the committed model's own history is kept


def test_many_labels_changes_only_the_generic_tasks_labels(base) -> None:
    from dail.world.pretrain import sample_example

    _, tokenizer = base
    builder = PromptBuilder()
    label_line = re.compile(r"^([A-Za-z]+[0-9]*) = \S+ = \d$", flags=re.M)
    labels: dict[bool, set[str]] = {False: set(), True: set()}
    for many in (False, True):
        rng = random.Random(0)
        for _ in range(300):
            p_ids, r_ids = sample_example(rng, 0.5, tokenizer, builder, 0.0, many)
            prompt = tokenizer.decode(p_ids)
            if "Expert solution" in prompt and "Evaluate modulo 10:" not in prompt:
                labels[many] |= set(label_line.findall(tokenizer.decode(r_ids[:-1])))
    # Off: the few labels of the known types and r1..r4; on: many more, all single tokens.
    assert set(gen.LABELS) <= labels[False] and len(labels[False]) < 20
    assert len(labels[True] - labels[False]) > 50 and labels[True] <= set(gen.ALL_LABELS)


def test_pretraining_stream_is_the_one_earlier_runs_saw(base) -> None:
    """A resumed run must see the batches it would have seen: new options draw nothing when off.

    The digests pin the text of the first 200 examples of five settings; the first three are the
    streams pinned (as token ids) before the newer options existed. A run encodes its data with
    the tokenizer it saved when it started, so the digests are of text: they came out the same
    decoded by the committed tokenizer and by a newer build whose ids differ. A change to the
    generator or the prompts that moves them breaks the resumption of runs in progress.
    """
    import hashlib

    from dail.world.pretrain import sample_example

    _, tokenizer = base
    builder = PromptBuilder()
    settings = {"default": (0.0, False, 0.0), "many": (0.0, True, 0.0), "copy": (0.1, False, 0.0),
                "ambiguous": (0.0, False, 0.3), "ambiguous-many": (0.0, True, 0.3)}
    digests = {}
    for name, args in settings.items():
        rng = random.Random(7)
        pairs = [sample_example(rng, 0.5, tokenizer, builder, *args) for _ in range(200)]
        texts = [[tokenizer.decode(prompt), tokenizer.decode(response)] for prompt, response in pairs]
        digests[name] = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
    assert digests == {"default": "57a156e60674bdd0", "many": "cf1af0b954a307f8", "copy": "fd3f813b55fdaeb8",
                       "ambiguous": "09e2f72b34c24d5c", "ambiguous-many": "3ff76d4ed9b95ed9"}


def test_ambiguous_references_repeat_digits_and_openings() -> None:
    rng = random.Random(3)
    shared = 0
    for _ in range(200):
        exprs = gen.ambiguous_exprs(rng, 4)
        digits = {d for expr in exprs for _, factors in expr for d in factors}
        assert len(exprs) == 4 and len(digits) <= 3
        assert all(sum(len(f) for _, f in expr) > 1 for expr in exprs)  # every line has an operation
        assert all(gen.detailed_steps(expr)[1] == gen.evaluate(expr) for expr in exprs)
        first = exprs[0][0][1]
        shared += sum(expr[0][1][:1] == first[:1] for expr in exprs[1:])
    assert shared > 200 * 3 * 0.5  # half share the opening by construction, more by chance
    spec = gen.make_generic(random.Random(5), ambiguous=True)
    assert spec.kind == "generic" and len(spec.items) >= 2
    assert _detailed_from_didactic(spec.to_problem("x").solution) == spec.detailed(set())


def test_ambiguous_rate_applies_to_the_generic_task_only(base) -> None:
    from dail.world.pretrain import sample_example

    _, tokenizer = base
    builder = PromptBuilder()
    rng = random.Random(0)
    few_digits = other = 0
    for _ in range(300):
        p_ids, r_ids = sample_example(rng, 0.9, tokenizer, builder, 0.0, False, 1.0)
        prompt, response = tokenizer.decode(p_ids), tokenizer.decode(r_ids[:-1])
        openings = re.findall(r"^\S+ = ([0-9*+-]+)$", response, flags=re.M)
        digits = set("".join(openings)) & set("0123456789")
        generic = "Expert solution" in prompt and not any(k in prompt for k in ("Evaluate modulo 10:", "p(x)"))
        if generic and openings and len(digits) <= 3:
            few_digits += 1
        elif not generic:
            other += 1
    assert few_digits > 50 and other > 50


def _clock_gaining_an_hour_per_reading(clock):
    readings = iter(range(1_000_000))
    return lambda: clock() + 3600.0 * next(readings)


@pytest.mark.slow
def test_a_step_budget_alone_gives_the_same_model_whatever_the_pace(tmp_path, monkeypatch) -> None:
    import time

    from transformers import AutoModelForCausalLM

    from dail.world.pretrain import PretrainConfig, run

    tiny = dict(minutes=0.0, max_steps=3, batch_size=2, eval_every=10_000, ckpt_every=10_000,
                hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    weights = []
    for name in ("fast", "slow"):
        if name == "slow":  # under a wall-clock budget this run would end at its first reading
            monkeypatch.setattr(time, "time", _clock_gaining_an_hour_per_reading(time.time))
        out = run(PretrainConfig(out=str(tmp_path / name), work=str(tmp_path / f"{name}-work"), **tiny))
        monkeypatch.undo()
        assert json.loads((out / "pretrain_settings.json").read_text())["steps"] == 3
        weights.append(AutoModelForCausalLM.from_pretrained(out).state_dict())
    for name, a in weights[0].items():
        assert torch.equal(a, weights[1][name]), name


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so progress bars draw on it."""

    def isatty(self) -> bool:
        return True


def _terminal(monkeypatch) -> _Terminal:
    screen = _Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    return screen


def test_validity_sampling_shows_a_bar_on_a_terminal(base, monkeypatch) -> None:
    model, tokenizer = base
    screen = _terminal(monkeypatch)
    sample(model, tokenizer, ["a", "b", "c"], n=1, max_new_tokens=2, batch_size=2)
    assert "sampling:" in screen.getvalue() and "/2 [" in screen.getvalue()  # two batches of two


def test_pretraining_shows_a_bar_over_its_budget_on_a_terminal(tmp_path, monkeypatch) -> None:
    from dail.world.pretrain import PretrainConfig, run

    screen = _terminal(monkeypatch)
    run(PretrainConfig(out=str(tmp_path / "model"), work=str(tmp_path / "work"), minutes=0.0, max_steps=2,
                       batch_size=2, eval_every=10_000, ckpt_every=10_000, hidden=32, layers=1, heads=2,
                       kv_heads=1, intermediate=64))
    assert "pretraining: 100%" in screen.getvalue()


@pytest.mark.parametrize(("flags", "message"), [
    (["--minutes", "-1"], "--minutes -1: out of range; allowed: >= 0"),
    (["--max-steps", "0"], "--max-steps 0: out of range; allowed: >= 1"),
    (["--many-labels", "1.5"], "--many-labels 1.5: out of range; allowed: [0, 1]"),
    (["--copy-rate", "-0.1"], "--copy-rate -0.1: out of range; allowed: [0, 1]"),
    (["--lr", "nan"], "--lr nan: not a finite number")])
def test_pretrain_refuses_impossible_budgets_and_shares(flags, message, tmp_path, capsys) -> None:
    from dail.world.__main__ import main as world_main

    assert world_main(["pretrain", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()
