"""The contrastive loss against a direct reference computation, for each divergence."""

from __future__ import annotations

import pytest
import torch

from dail.training.loss import (
    canonical_divergence,
    contrastive_kl,
    contrastive_kl_with_grad,
    divergence_beta,
    nll,
    token_divergence,
)


def reference_divergence(a, b, divergence):
    """D(a, b) of two float64 probability vectors, by loops over the vocabulary. a is the
    student's distribution, b the teacher's; jsd mixes them as probabilities."""
    def kl(x, y):
        return sum(x[v] * (x[v].log() - y[v].log()) for v in range(len(x)))

    if divergence == "reverse":
        return kl(a, b)
    if divergence == "forward":
        return kl(b, a)
    beta = float(divergence.split(":")[1])
    mixture = (1 - beta) * a + beta * b
    return beta * kl(b, mixture) + (1 - beta) * kl(a, mixture)


def reference_loss(s, p, n, mask, gamma, divergence):
    """Plain loops over tokens and vocabulary entries, in float64."""
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for t in range(s.shape[1]):
            if not mask[b, t]:
                continue
            ps = torch.softmax(s[b, t].double(), -1)
            pp = torch.softmax(p[b, t].double(), -1)
            pn = torch.softmax(n[b, t].double(), -1)
            total += float(reference_divergence(ps, pp, divergence) - gamma * reference_divergence(ps, pn, divergence))
            count += 1
    return total / count


DIVERGENCES = ["reverse", "forward", "jsd:0.5", "jsd:0.1", "jsd:0.9"]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    shape = (2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return [torch.randn(shape, generator=g) * 2 for _ in range(3)] + [mask]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.7])
def test_equals_reference(logits, divergence, gamma):
    s, p, n, mask = logits
    got = contrastive_kl(s, p, n, mask, gamma=gamma, divergence=divergence)
    assert got.item() == pytest.approx(reference_loss(s, p, n, mask, gamma, divergence), rel=1e-5)


def test_jsd_endpoints_are_the_two_kls_and_its_interior_approaches_them(logits):
    """TRL's convention: BETA 0 is KL(teacher || student), 1 is KL(student || teacher); the
    mixture formula near an endpoint is that KL scaled by the distance to the other end."""
    s, p, _, _ = logits
    forward, reverse = (token_divergence(s, p, divergence=d) for d in ("forward", "reverse"))
    assert torch.equal(token_divergence(s, p, divergence="jsd:0"), forward)
    assert torch.equal(token_divergence(s, p, divergence="jsd:1"), reverse)
    assert not torch.allclose(forward, reverse)
    # The definition (checked against token_divergence in between by test_equals_reference):
    # BETA KL(T || M) + (1 - BETA) KL(S || M) ~ BETA KL(T || S) as BETA -> 0, and the mirror.
    small = 1e-6
    for student, teacher in zip(torch.softmax(s.double(), -1).flatten(0, 1), torch.softmax(p.double(), -1).flatten(0, 1),
                                strict=True):
        assert float(reference_divergence(student, teacher, f"jsd:{small}")) / small == pytest.approx(
            float(reference_divergence(student, teacher, "forward")), rel=2e-3)
        assert float(reference_divergence(student, teacher, f"jsd:{1 - small}")) / small == pytest.approx(
            float(reference_divergence(student, teacher, "reverse")), rel=2e-3)
    symmetric = token_divergence(s, p, divergence="jsd:0.5")
    torch.testing.assert_close(symmetric, token_divergence(p, s, divergence="jsd:0.5"))
    assert bool((symmetric <= torch.log(torch.tensor(2.0)) + 1e-6).all()) and bool((symmetric >= 0).all())


def test_divergence_names():
    assert [divergence_beta(d) for d in ("reverse", "forward", "jsd:0", "jsd:0.25", "jsd:1")] == [1, 0, 0, 0.25, 1]
    assert canonical_divergence("jsd:0.50") == "jsd:0.5" and canonical_divergence("forward") == "forward"
    for bad in ("jsd:1.5", "jsd:-0.1", "jsd:", "jsd:nan", "jsd", "foo", "Reverse", "kl:0.5"):
        with pytest.raises(ValueError, match="allowed: reverse, forward, or jsd:BETA with BETA in \\[0, 1\\]"):
            divergence_beta(bad)


def direct_loss(s, p, n, gamma, divergence):
    """Summed D(student, privileged) - gamma * D(student, negative) over positions, written with
    probabilities (not log-probabilities) in float64 so that autograd differentiates an
    independent form."""
    student = torch.softmax(s.double(), -1)
    total = 0.0
    for weight, teacher_logits in ((1.0, p), (-gamma, n)):
        teacher = torch.softmax(teacher_logits.double(), -1)
        if divergence == "reverse":
            d = (student * (student / teacher).log()).sum(-1)
        elif divergence == "forward":
            d = (teacher * (teacher / student).log()).sum(-1)
        else:
            beta = float(divergence.split(":")[1])
            mixture = (1 - beta) * student + beta * teacher
            d = beta * (teacher * (teacher / mixture).log()).sum(-1) + \
                (1 - beta) * (student * (student / mixture).log()).sum(-1)
        total = total + weight * d.sum()
    return total


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_closed_form_gradient_equals_autograd(logits, divergence, gamma):
    s, p, n, _ = logits
    s, p, n = (x.flatten(0, 1) for x in (s, p, n))  # (c, V)
    positive, negative, grad = contrastive_kl_with_grad(s, p, n, gamma=gamma, divergence=divergence)
    student = s.double().requires_grad_(True)
    expected = direct_loss(student, p, n, gamma, divergence)
    expected.backward()
    assert float(positive - gamma * negative) == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), student.grad, rtol=1e-4, atol=1e-6)


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
                          (token_divergence(s, p) * mask).sum() / mask.sum())
    with pytest.raises(ValueError, match="sideways"):
        token_divergence(s, p, divergence="sideways")


def test_nll_is_masked_cross_entropy(logits):
    s, _, _, mask = logits
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.cross_entropy(s[mask.bool()], targets[mask.bool()])
    assert torch.allclose(nll(s, targets, mask), expected)
