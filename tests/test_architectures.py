"""Every common architecture, as a user's model: tiny random models of each (built, saved and
loaded back through `dail.models`) with their logit transforms and sliding windows."""

from __future__ import annotations

import pytest
import torch

from dail.config import ConfigError, ModelConfig
from dail.logits import LogitTransform, ModelHead, model_head
from dail.models import load
from dail.testing import ARCHITECTURES
from dail.trainer import (
    DAILCollator,
    DAILConfig,
    DAILTrainer,
    response_hidden,
    response_logits,
    response_states,
)

ROLES = ("student", "privileged", "negative")
EXAMPLES = [
    {"prompt_ids": {"student": [5, 6, 7], "privileged": [5, 6, 7, 8, 9, 10], "negative": [5, 8]},
     "response_ids": [11, 12, 13, 2]},
    {"prompt_ids": {"student": [5, 6, 7, 9, 9], "privileged": [5, 9], "negative": [5, 8, 8, 8]},
     "response_ids": [14, 2]},
]


def loaded(architecture_dir, name: str, **kw):
    return load(ModelConfig(model=str(architecture_dir(name, **kw))))


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
    """Stand-in for an architecture whose transform is missing from `dail.logits`: the first step
    stops with the way around it instead of training on other logits."""
    from dail import trainer as trainer_module

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
    from dail.logits import check_model_head

    model, tokenizer = loaded(architecture_dir, architecture)
    model.to(torch.bfloat16)
    batch = DAILCollator(tokenizer.pad_token_id, ROLES)(EXAMPLES)
    with torch.no_grad():
        _, last_hidden, last_logits = response_states(model, batch, "student")
    check_model_head(model_head(model), last_hidden, last_logits, model_type=architecture)
    with pytest.raises(ConfigError):
        check_model_head(ModelHead(model.get_output_embeddings(), LogitTransform()), last_hidden, last_logits,
                         model_type=architecture)
