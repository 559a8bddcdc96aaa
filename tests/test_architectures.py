"""Every common architecture, as a user's model: tiny random models of each (built, saved and
loaded back through `dail.models`) with their logit transforms and sliding windows."""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics

import pytest
import torch

from dail.config import ConfigError, ModelConfig
from dail.data import Problem
from dail.models import eos_token_ids, load
from dail.rollout.engine import draft_rollout
from dail.rollout.rule import RolloutSettings, sequence_seed
from dail.rollout.token_loop import reference_rollout
from dail.testing import ARCHITECTURES
from dail.training.logits import LogitTransform, ModelHead, model_head
from dail.training.trainer import (
    DAILCollator,
    DAILConfig,
    DAILTrainer,
    response_hidden,
    response_logits,
    response_states,
)
from tests.conftest import role_contexts

ROLES = ("student", "privileged", "negative")
EXAMPLES = [
    {"prompt_ids": {"student": [5, 6, 7], "privileged": [5, 6, 7, 8, 9, 10], "negative": [5, 8]},
     "response_ids": [11, 12, 13, 2]},
    {"prompt_ids": {"student": [5, 6, 7, 9, 9], "privileged": [5, 9], "negative": [5, 8, 8, 8]},
     "response_ids": [14, 2]},
]


def loaded(architecture_dir, name: str, **kw):
    return load(ModelConfig(model=str(architecture_dir(name, **kw))))


def as_tuple(trace):
    return (trace.token_ids, trace.sources, trace.proposal_ids, trace.finished)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_the_loss_head_gives_the_models_own_logits(architecture_dir, architecture):
    """Soft-capping (Gemma 2, 3), logit scaling (Granite, Cohere) and plain heads alike: the head
    the chunked loss applies to hidden states gives `model(...).logits`, in every role."""
    model, tokenizer = loaded(architecture_dir, architecture)
    batch = DAILCollator(tokenizer.pad_token_id, ROLES)(EXAMPLES)
    with torch.no_grad():
        for role in ROLES:
            ours = model_head(model)(response_hidden(model, batch, role))
            torch.testing.assert_close(ours, response_logits(model, batch, role), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["gemma2", "gemma3", "granite", "cohere", "llama"])
@pytest.mark.parametrize("loss", ["dail", "nll"])
def test_chunked_loss_equals_the_full_logit_loss(architecture_dir, tmp_path, architecture, loss):
    """The trainer's chunked loss (the default) and its full-logit loss, which reads the model's
    logits, agree in value and gradients with the adapter on every linear layer."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = loaded(architecture_dir, architecture)
    model.requires_grad_(True)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = DAILCollator(tokenizer.pad_token_id, ROLES)(EXAMPLES)
    results = []
    for chunk in (0, 3):
        args = DAILConfig(output_dir=str(tmp_path / str(chunk)), loss=loss, gamma=0.3, loss_chunk_size=chunk,
                          use_cpu=True)
        model.zero_grad()
        value = DAILTrainer(model=model, args=args).compute_loss(model, batch)
        value.backward()
        results.append((float(value.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (full, full_grads), (chunked, chunked_grads) = results
    assert chunked == pytest.approx(full, abs=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-4)


def test_a_logit_transform_dail_does_not_know_stops_training(architecture_dir, tmp_path, monkeypatch):
    """Stand-in for an architecture whose transform is missing from `dail.training.logits`: the first step
    stops with the way around it instead of training on other logits."""
    from dail.training import trainer as trainer_module

    model, tokenizer = loaded(architecture_dir, "gemma2")
    monkeypatch.setattr(trainer_module, "model_head", lambda lm, head=None: ModelHead(
        lm.get_output_embeddings() if head is None else head, LogitTransform()))
    batch = DAILCollator(tokenizer.pad_token_id, ROLES)(EXAMPLES)
    trainer = DAILTrainer(model=model, args=DAILConfig(output_dir=str(tmp_path), use_cpu=True))
    with pytest.raises(ConfigError, match="does not reproduce the logits of this gemma2 model .* "
                                          "training.loss_chunk_size: 0"):
        trainer.compute_loss(model, batch)


@pytest.mark.parametrize("architecture", ["gemma2", "granite"])
def test_the_head_check_passes_in_bfloat16(architecture_dir, architecture):
    """Rounding in a half-precision model is not mistaken for a missing transform."""
    from dail.training.logits import check_model_head

    model, tokenizer = loaded(architecture_dir, architecture)
    model.to(torch.bfloat16)
    batch = DAILCollator(tokenizer.pad_token_id, ROLES)(EXAMPLES)
    with torch.no_grad():
        _, last_hidden, last_logits = response_states(model, batch, "student")
    check_model_head(model_head(model), last_hidden, last_logits, model_type=architecture)
    with pytest.raises(ConfigError):
        check_model_head(ModelHead(model.get_output_embeddings(), LogitTransform()), last_hidden, last_logits,
                         model_type=architecture)


# --------------------------------------------------------------------------- rollout, train, eval

PROBLEMS = [
    Problem(id="a", problem="What is 2+3?", solution="2+3=5, so \\boxed{5}.", answer="5"),
    Problem(id="b", problem="Compute 12 * 4 / 6 and explain each step carefully.",
            solution="12 * 4 = 48. Then 48 / 6 = 8. Hence \\boxed{8}.", answer="8"),
    Problem(id="c", problem="x+1=3. Find x.", solution="x = 3 - 1 = 2, so \\boxed{2}.", answer="2"),
]
WINDOWED = ("qwen2-window", "mistral", "gemma2", "gemma3")  # every one slides over 8 tokens here
# Run in every test session: the sliding windows, and the layer names, logit transforms and
# adapted modules (fused MoE experts) that differ most from Qwen2's; the others are marked slow.
FAST = (*WINDOWED, "gpt-neox", "granite", "qwen3-moe")
EVERY = [pytest.param(name, marks=() if name in FAST else pytest.mark.slow) for name in ARCHITECTURES]


@pytest.mark.parametrize("architecture", EVERY)
def test_draft_engine_equals_the_token_loop_and_records_what_the_rule_saw(architecture_dir, architecture):
    """Traces of the draft engine (with holes in its cache: drafts of 3, privileged and lookup
    rounds) equal the token-by-token loop's, also where the window is shorter than the prompt;
    every recorded proposal probability is the privileged model's probability in an unpadded
    teacher-forced forward."""
    model, tokenizer = loaded(architecture_dir, architecture)
    student, privileged = role_contexts(tokenizer, PROBLEMS)
    assert min(map(len, privileged)) > 8
    rows = [i % len(PROBLEMS) for i in range(5)]
    contexts = ([student[i] for i in rows], [privileged[i] for i in rows])
    seeds = [sequence_seed(0, str(i)) for i in range(len(rows))]
    settings = RolloutSettings(tau=0.0, max_new_tokens=16, temperature=1.0, top_p=0.9,
                               eos_ids=tuple(eos_token_ids(model, tokenizer)))
    # A threshold that random weights' proposals pass about half the time: both roles decide tokens.
    student_only = reference_rollout(model, *contexts, seeds, settings, pad_id=tokenizer.pad_token_id)
    tau = statistics.median(p for t in student_only for p in t.proposal_probs)
    settings = dataclasses.replace(settings, tau=tau)
    reference = reference_rollout(model, *contexts, seeds, settings, pad_id=tokenizer.pad_token_id)
    for schedule in ({"draft_length": 3, "max_batch": 2}, {"draft_length": 0, "max_batch": 0}):
        traces = draft_rollout(model, *contexts, seeds, dataclasses.replace(settings, **schedule),
                               pad_id=tokenizer.pad_token_id)
        assert [as_tuple(t) for t in traces] == [as_tuple(t) for t in reference], schedule
    sources = "".join("".join(t.sources) for t in reference)
    assert "S" in sources and "P" in sources
    with torch.inference_mode():
        for prompt, trace in zip(contexts[1], traces, strict=True):
            logits = model(input_ids=torch.tensor([prompt + trace.token_ids])).logits[0, len(prompt) - 1:-1]
            probs = torch.softmax(logits.float(), dim=-1)
            for t, proposal in enumerate(trace.proposal_ids):
                if proposal is not None:
                    assert trace.proposal_probs[t] == pytest.approx(float(probs[t, proposal]), abs=1e-5)


def test_a_model_the_engine_cannot_run_is_decoded_token_by_token(caplog):
    """LFM2's convolution layers keep a state, not keys and values: the draft engine says so in
    one line and gives the token-by-token loop's traces instead of a traceback."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("lfm2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  layer_types=["conv", "full_attention"], pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    contexts = ([[5, 6, 7, 8, 9], [5, 6]], [[5, 9, 9, 9, 9, 9, 9], [8, 8, 8]])
    settings = RolloutSettings(tau=0.3, max_new_tokens=8, temperature=1.0)
    reference = reference_rollout(model, *contexts, [1, 2], settings, pad_id=0)
    with caplog.at_level(logging.INFO, logger="dail.rollout.engine.loop"):
        traces = draft_rollout(model, *contexts, [1, 2], settings, pad_id=0)
    assert [as_tuple(t) for t in traces] == [as_tuple(t) for t in reference]
    assert [r.getMessage() for r in caplog.records if r.name == "dail.rollout.engine.loop"] == [
        "the draft engine cannot run this lfm2 model (its conv layers): decoding token by token"]


@pytest.mark.parametrize("architecture", EVERY)
def test_generate_train_and_eval_through_the_cli(architecture_dir, architecture, tmp_path):
    """`dail generate` (the draft engine), a `dail train` step with the default loss and LoRA
    targets, saving only the adapter, and `dail eval` with it."""
    from safetensors import safe_open

    from dail.cli import main

    model = str(architecture_dir(architecture))
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in PROBLEMS[:2]))
    assert main(["generate", "--model", model, "--data", str(problems), "--out", str(tmp_path / "gen"),
                 "--samples", "1", "--max-new-tokens", "6", "--tau", "0.3"]) == 0
    config = tmp_path / "train.yaml"
    config.write_text("training: {max_steps: 1, lora_r: 2, lora_alpha: 4, gradient_accumulation_steps: 1, "
                      "save_strategy: 'no'}\n")
    assert main(["train", "--model", model, "--traces", str(tmp_path / "gen" / "traces.jsonl"),
                 "--out", str(tmp_path / "train"), "--config", str(config)]) == 0
    adapter = tmp_path / "train" / "adapter"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names), names
    assert not any(p.name.startswith("model") for p in adapter.iterdir())
    assert main(["eval", "--model", model, "--adapter", str(adapter), "--data", str(problems),
                 "--out", str(tmp_path / "eval"), "--n", "1", "--max-new-tokens", "4"]) == 0
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["num_problems"] == 2


def test_window_masks_count_valid_slots_not_holes():
    """A sliding-window query sees itself and the window - 1 valid slots before it, however many
    holes lie between (a hole's query, whose output is never read, sees the window before it)."""
    from dail.rollout.engine.window import causal_4d

    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1, 1]])  # valid slots 1, 2, 5, 7, 8
    window = causal_4d(mask, 3, window=3)[0, 0].int().tolist()  # queries: slots 6 (a hole), 7, 8
    assert window == [[0, 1, 1, 0, 0, 1, 1, 0, 0],
                      [0, 0, 1, 0, 0, 1, 0, 1, 0],
                      [0, 0, 0, 0, 0, 1, 0, 1, 1]]
    assert causal_4d(mask, 1, window=3)[0, 0].int().tolist() == [window[-1]]
    assert causal_4d(mask, 1)[0, 0, 0].int().tolist() == [0, 1, 1, 0, 0, 1, 0, 1, 1]
