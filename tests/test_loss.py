"""The contrastive KL loss against a direct reference computation."""

from __future__ import annotations

import pytest
import torch

from dail.loss import contrastive_kl, nll, token_kl


def reference_loss(s, p, n, mask, gamma, direction):
    """Plain loops over tokens and vocabulary entries, in float64."""
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for t in range(s.shape[1]):
            if not mask[b, t]:
                continue
            ps = torch.softmax(s[b, t].double(), -1)
            pp = torch.softmax(p[b, t].double(), -1)
            pn = torch.softmax(n[b, t].double(), -1)
            if direction == "reverse":
                kl_p = sum(ps[v] * (ps[v].log() - pp[v].log()) for v in range(len(ps)))
                kl_n = sum(ps[v] * (ps[v].log() - pn[v].log()) for v in range(len(ps)))
            else:
                kl_p = sum(pp[v] * (pp[v].log() - ps[v].log()) for v in range(len(ps)))
                kl_n = sum(pn[v] * (pn[v].log() - ps[v].log()) for v in range(len(ps)))
            total += float(kl_p - gamma * kl_n)
            count += 1
    return total / count


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    shape = (2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return [torch.randn(shape, generator=g) * 2 for _ in range(3)] + [mask]


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.7])
def test_equals_reference(logits, direction, gamma):
    s, p, n, mask = logits
    got = contrastive_kl(s, p, n, mask, gamma=gamma, direction=direction)
    assert got.item() == pytest.approx(reference_loss(s, p, n, mask, gamma, direction), rel=1e-5)


def test_zero_when_distributions_agree(logits):
    s, _, _, mask = logits
    shifted = s + 3.0  # the same distributions after softmax
    assert contrastive_kl(s, shifted, shifted, mask, gamma=0.1).abs().item() < 1e-6


def test_padding_is_ignored_and_empty_mask_gives_zero(logits):
    s, p, n, mask = logits
    garbage = s.clone()
    garbage[0, 3:] = 1e4  # padded positions of row 0
    assert torch.allclose(contrastive_kl(garbage, p, n, mask), contrastive_kl(s, p, n, mask))
    assert contrastive_kl(s, p, n, torch.zeros_like(mask)).item() == 0.0


def test_num_tokens_normalises_across_micro_batches(logits):
    """Summing micro-batch losses divided by the global token count gives the full-batch mean."""
    s, p, n, mask = logits
    full = contrastive_kl(s, p, n, mask)
    parts = sum(contrastive_kl(s[i:i + 1], p[i:i + 1], n[i:i + 1], mask[i:i + 1], num_tokens=mask.sum())
                for i in range(2))
    assert torch.allclose(full, parts)
    # The naive average of per-micro-batch means differs when lengths differ.
    naive = sum(contrastive_kl(s[i:i + 1], p[i:i + 1], n[i:i + 1], mask[i:i + 1]) for i in range(2)) / 2
    assert not torch.allclose(full, naive)


def test_gradient_flows_to_student_only(logits):
    s, p, n, mask = logits
    s, p, n = (x.clone().requires_grad_(True) for x in (s, p, n))
    contrastive_kl(s, p.detach(), n.detach(), mask).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert s.grad[0, 3:].abs().sum() == 0  # no gradient through padding


def test_negative_required_unless_gamma_zero(logits):
    s, p, _, mask = logits
    with pytest.raises(ValueError, match="negative_logits"):
        contrastive_kl(s, p, None, mask, gamma=0.1)
    assert torch.allclose(contrastive_kl(s, p, None, mask, gamma=0.0),
                          (token_kl(s, p) * mask).sum() / mask.sum())
    with pytest.raises(ValueError, match="direction"):
        token_kl(s, p, direction="sideways")


def test_nll_is_masked_cross_entropy(logits):
    s, _, _, mask = logits
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.cross_entropy(s[mask.bool()], targets[mask.bool()])
    assert torch.allclose(nll(s, targets, mask), expected)
