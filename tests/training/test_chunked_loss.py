"""The chunked (memory-bounded) losses equal the plain ones in value and gradients."""

from __future__ import annotations

import pytest
import torch

from dail.training.loss import (
    chunked_contrastive_kl_terms,
    chunked_nll_sum,
    contrastive_kl_terms,
    nll,
)


def _setup(lora: bool, seed: int = 0, n: int = 37, hidden: int = 16, vocab: int = 50):
    torch.manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    if lora:
        from peft import LoraConfig, get_peft_model

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lm_head = head

        wrapped = get_peft_model(Wrapper(), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
        student_head = wrapped.base_model.model.lm_head
        with torch.no_grad():  # a non-zero adapter, so its gradients flow in both factors
            for name, p in student_head.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        teacher_head = student_head.get_base_layer()
    else:
        student_head = teacher_head = head
    hs = torch.randn(n, hidden, requires_grad=True)
    hp, hn = torch.randn(n, hidden) * 2, torch.randn(n, hidden) * 2
    return student_head, teacher_head, hs, hp, hn


def _grads(head, hs):
    params = [p for p in head.parameters() if p.requires_grad]
    return [hs.grad.clone()] + [p.grad.clone() for p in params]


def _zero(head, hs):
    hs.grad = None
    for p in head.parameters():
        p.grad = None


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("divergence", ["reverse", "forward", "jsd:0.5", "jsd:0.2"])
@pytest.mark.parametrize("chunk", [1, 8, 100])
def test_chunked_contrastive_equals_plain(lora, divergence, chunk):
    head, teacher, hs, hp, hn = _setup(lora)
    gamma = 0.3
    positive, negative = contrastive_kl_terms(head(hs), teacher(hp).detach(), teacher(hn).detach(),
                                              torch.ones(hs.shape[0]), divergence=divergence)
    (positive - gamma * negative).backward()
    expected = _grads(head, hs)
    _zero(head, hs)
    combined, pos, neg = chunked_contrastive_kl_terms(hs, hp, hn, head, gamma=gamma, divergence=divergence,
                                                      chunk_size=chunk, teacher_head=teacher)
    (combined * 1.0).backward()
    assert float(combined.detach()) == pytest.approx(float((positive - gamma * negative).detach()), abs=1e-5, rel=1e-6)
    assert float(pos) == pytest.approx(float(positive.detach()), rel=1e-6)
    assert float(neg) == pytest.approx(float(negative.detach()), rel=1e-6)
    assert len(expected) == len(_grads(head, hs)) == (3 if lora else 2)
    for a, b in zip(_grads(head, hs), expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_without_negative_and_scaled_output_gradient():
    head, _, hs, hp, _ = _setup(False)
    combined, pos, neg = chunked_contrastive_kl_terms(hs, hp, None, head, gamma=0.1, chunk_size=5)
    (combined * 3.0).backward()
    chunked = _grads(head, hs)
    _zero(head, hs)
    positive, _ = contrastive_kl_terms(head(hs), head(hp).detach(), None, torch.ones(hs.shape[0]))
    (positive * 3.0).backward()
    for a, b in zip(chunked, _grads(head, hs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert float(neg) == 0.0 and float(pos) == pytest.approx(float(positive.detach()), rel=1e-6)


def test_identical_distributions_give_zero_loss():
    head, _, hs, _, _ = _setup(False)
    combined, pos, neg = chunked_contrastive_kl_terms(hs, hs.detach(), hs.detach(), head, gamma=0.1,
                                                      chunk_size=4)
    assert abs(float(combined.detach())) < 1e-5 and abs(float(pos)) < 1e-5


@pytest.mark.parametrize("lora", [False, True])
def test_chunked_nll_equals_plain(lora):
    head, _, hs, _, _ = _setup(lora)
    targets = torch.randint(0, 50, (hs.shape[0],))
    (nll(head(hs)[None], targets[None], torch.ones(1, hs.shape[0])) * hs.shape[0]).backward()
    expected = _grads(head, hs)
    _zero(head, hs)
    total = chunked_nll_sum(hs, targets, head, chunk_size=6)
    total.backward()
    for a, b in zip(_grads(head, hs), expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
