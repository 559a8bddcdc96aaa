"""The mixed-policy decoder: exact acceptance semantics, determinism, stopping, sampling."""

from __future__ import annotations

import pytest
import torch

from dail.data import Problem
from dail.models import eos_token_ids
from dail.rollout.mixed import mixed_rollout
from dail.rollout.rule import RolloutSettings, sample_inverse_cdf, sampling_probs, sequence_seed
from dail.rollout.token_loop import sample_responses
from tests.conftest import role_contexts

PROBLEMS = [
    Problem(id="a", problem="What is 2+3?", solution="2+3=5, so \\boxed{5}.", answer="5"),
    Problem(id="b", problem="Compute 12 * 4 / 6 and explain each step carefully.",
            solution="12 * 4 = 48. Then 48 / 6 = 8. Hence \\boxed{8}.", answer="8"),
]


@pytest.fixture(scope="module")
def contexts(tiny):
    return role_contexts(tiny[1], PROBLEMS)


def rollout(tiny, contexts, *, rows=6, seed=0, **kw):
    model, tokenizer = tiny
    student, privileged = contexts
    settings = RolloutSettings(**{"max_new_tokens": 24, "temperature": 1.0, "top_p": 1.0,
                                  "eos_ids": tuple(eos_token_ids(model, tokenizer)), **kw})
    idx = [i % len(student) for i in range(rows)]
    seeds = [sequence_seed(seed, f"{i}") for i in range(rows)]
    traces = mixed_rollout(model, [student[i] for i in idx], [privileged[i] for i in idx], seeds, settings,
                           pad_id=tokenizer.pad_token_id)
    return traces, idx


def teacher_forced_probs(model, prompt, tokens):
    """Raw next-token distributions of a whole sequence in one forward pass (no KV cache)."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return torch.softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)], dim=-1)


def median_proposal_prob(tiny, contexts):
    traces, _ = rollout(tiny, contexts, tau=0.0)
    return float(torch.tensor([p for t in traces for p in t.proposal_probs]).median())


def test_tau_zero_is_pure_student_and_tau_one_pure_privileged(tiny, contexts):
    student, _ = rollout(tiny, contexts, tau=0.0)
    assert all(set(t.sources) == {"S"} for t in student)
    assert all(t.token_ids == t.proposal_ids for t in student)
    privileged, _ = rollout(tiny, contexts, tau=1.0)
    assert all(set(t.sources) == {"P"} for t in privileged)


@pytest.mark.parametrize("retries", [0, 2])
def test_acceptance_matches_teacher_forced_recomputation(tiny, contexts, retries):
    model, _ = tiny
    tau = median_proposal_prob(tiny, contexts)
    traces, idx = rollout(tiny, contexts, tau=tau, retries=retries)
    sources = "".join(s for t in traces for s in t.sources)
    assert "S" in sources and "P" in sources, "the threshold should give a mix"
    _, privileged = contexts
    for trace, i in zip(traces, idx, strict=True):
        probs = teacher_forced_probs(model, privileged[i], trace.token_ids)
        recomputed = probs.gather(-1, torch.tensor(trace.proposal_ids).unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(recomputed, torch.tensor(trace.proposal_probs), atol=1e-4)
        for j, source in enumerate(trace.sources):
            p = float(recomputed[j])
            if abs(p - tau) < 1e-4:
                continue  # too close to call under float noise
            if source == "S":
                assert p >= tau and trace.token_ids[j] == trace.proposal_ids[j]
            else:
                assert p < tau


@pytest.mark.parametrize("engine", ["draft", "reference"])
def test_a_proposal_is_recorded_exactly_where_some_token_could_pass(tiny, contexts, engine):
    model, _ = tiny
    tau = 0.05
    traces, idx = rollout(tiny, contexts, tau=tau, engine=engine)
    _, privileged = contexts
    recorded = []
    for trace, i in zip(traces, idx, strict=True):
        best = teacher_forced_probs(model, privileged[i], trace.token_ids).amax(-1)
        for j, p in enumerate(best.tolist()):
            if abs(p - tau) < 1e-4:
                continue  # too close to call under float noise
            recorded.append(trace.proposal_ids[j] is not None)
            assert recorded[-1] == (p >= tau) == (trace.proposal_probs[j] is not None), (j, p)
            if not recorded[-1]:
                assert trace.sources[j] == "P"
    assert any(recorded) and not all(recorded), "tau should leave some positions without a passable token"


def test_retries_accept_more(tiny, contexts):
    tau = median_proposal_prob(tiny, contexts)
    once, _ = rollout(tiny, contexts, tau=tau, rows=12)
    retried, _ = rollout(tiny, contexts, tau=tau, rows=12, retries=4)
    rate = lambda ts: sum(t.acceptance_rate for t in ts) / len(ts)  # noqa: E731
    assert rate(retried) > rate(once)


def test_same_seed_same_traces_whatever_the_batch(tiny, contexts):
    tau = median_proposal_prob(tiny, contexts)
    first, _ = rollout(tiny, contexts, tau=tau, rows=4)
    again, _ = rollout(tiny, contexts, tau=tau, rows=4)
    assert [t.token_ids for t in first] == [t.token_ids for t in again]
    # Row k alone, with the same seed, reproduces row k of the batch.
    model, tokenizer = tiny
    student, privileged = contexts
    settings = RolloutSettings(tau=tau, max_new_tokens=24, temperature=1.0, top_p=1.0,
                               eos_ids=tuple(eos_token_ids(model, tokenizer)))
    for k in (1, 2):
        alone = mixed_rollout(model, [student[k % 2]], [privileged[k % 2]], [sequence_seed(0, f"{k}")],
                              settings, pad_id=tokenizer.pad_token_id)[0]
        assert alone.token_ids == first[k].token_ids
    other_seed, _ = rollout(tiny, contexts, tau=tau, rows=4, seed=1)
    assert [t.token_ids for t in other_seed] != [t.token_ids for t in first]


def test_greedy_student_equals_transformers_generate(tiny, contexts):
    """KV caching with left padding reproduces HF generation exactly (greedy)."""
    model, tokenizer = tiny
    student, _ = contexts
    traces, idx = rollout(tiny, contexts, tau=0.0, rows=2, temperature=0.0)
    for trace, i in zip(traces, idx, strict=True):
        out = model.generate(torch.tensor([student[i]]), do_sample=False, max_new_tokens=24,
                             eos_token_id=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
        expected = out[0, len(student[i]):].tolist()
        assert trace.token_ids == expected[:len(trace.token_ids)]


class BoostToken(torch.nn.Module):
    """Wraps a model and adds `bonus` to one token's logits (to force or test suppression)."""

    def __init__(self, model, token_id, bonus):
        super().__init__()
        self.inner, self.token_id, self.bonus = model, token_id, bonus

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits[..., self.token_id] += self.bonus
        return out


def test_eos_ends_traces_and_budget_caps_them(tiny, contexts):
    model, tokenizer = tiny
    student, privileged = contexts
    eos = tokenizer.eos_token_id
    settings = RolloutSettings(tau=0.5, max_new_tokens=7, eos_ids=(eos,), temperature=1.0, top_p=1.0)
    forced = mixed_rollout(BoostToken(model, eos, 50.0), student, privileged, [1, 2], settings,
                           pad_id=tokenizer.pad_token_id)
    assert all(t.token_ids == [eos] and t.finished for t in forced)
    capped = mixed_rollout(BoostToken(model, eos, -1e4), student, privileged, [1, 2], settings,
                           pad_id=tokenizer.pad_token_id)
    assert all(len(t.token_ids) == 7 and not t.finished for t in capped)


def test_suppressed_token_is_never_emitted(tiny, contexts):
    model, tokenizer = tiny
    student, privileged = contexts
    end_think = tokenizer.convert_tokens_to_ids("</think>")
    boosted = BoostToken(model, end_think, 30.0)
    base = RolloutSettings(tau=0.5, max_new_tokens=6, temperature=1.0, top_p=1.0)
    free = mixed_rollout(boosted, student, privileged, [1, 2], base, pad_id=tokenizer.pad_token_id)
    assert any(end_think in t.token_ids for t in free)
    from dataclasses import replace

    held = mixed_rollout(boosted, student, privileged, [1, 2], replace(base, suppress_ids=(end_think,)),
                         pad_id=tokenizer.pad_token_id)
    assert all(end_think not in t.token_ids for t in held)


def test_sample_responses_is_the_pure_student(tiny, contexts):
    model, tokenizer = tiny
    student, privileged = contexts
    settings = RolloutSettings(tau=0.0, max_new_tokens=12, temperature=1.0, top_p=1.0)
    mixed = mixed_rollout(model, student, privileged, [5, 6], settings, pad_id=tokenizer.pad_token_id)
    plain = sample_responses(model, student, [5, 6], settings, pad_id=tokenizer.pad_token_id)
    assert [t.token_ids for t in mixed] == [t.token_ids for t in plain]


# --------------------------------------------------------------------------- sampling helpers


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert (sampling_probs(logits, 1.0, 1.0, 2) > 0).tolist() == [[True, True, False, False]]
    # top_p 0.8: 0.5 + 0.3 reaches it, so the tail goes.
    assert (sampling_probs(logits, 1.0, 0.8, 0) > 0).tolist() == [[True, True, False, False]]
    assert (sampling_probs(logits, 1.0, 0.81, 0) > 0).tolist() == [[True, True, True, False]]
    assert sampling_probs(logits, 0.0, 1.0, 0).tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_inverse_cdf_sampling_matches_the_distribution():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]]).repeat(20000, 1)
    draws = sample_inverse_cdf(probs, torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(draws, minlength=6).float() / 20000
    assert freq[[0, 2, 5]].sum() == 0  # zero-probability tokens are never drawn
    assert torch.allclose(freq, probs[0], atol=0.015)
    edge = sample_inverse_cdf(probs[:2], torch.tensor([0.0, 1.0 - 1e-7]))
    assert edge.tolist() == [1, 4]


@pytest.mark.parametrize("scale", [0.1, 3.0, 12.0])  # flat rows are sorted in full, peaked ones are not
def test_nucleus_equals_a_full_sort(scale):
    from dail.rollout.rule import nucleus

    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(16, 3000, generator=g) * scale, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    expected = torch.zeros_like(probs, dtype=torch.bool).scatter(
        -1, order, (sorted_probs.cumsum(-1) - sorted_probs) < 0.95)
    assert torch.equal(nucleus(probs, 0.95), expected)


@pytest.mark.parametrize("entry", ["draft", "reference", "sample"])
def test_rollouts_run_in_inference_mode(tiny, contexts, monkeypatch, entry):
    # Inference mode skips autograd's bookkeeping on every op, which small decoding forwards
    # notice; nothing a rollout creates outlives it, so nothing is lost.
    model, tokenizer = tiny
    student, privileged = contexts
    modes = []
    forward = model.forward

    def spy(*args, **kwargs):
        modes.append(torch.is_inference_mode_enabled())
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    settings = RolloutSettings(tau=0.5, max_new_tokens=4, engine="reference" if entry == "reference" else "draft")
    if entry == "sample":
        sample_responses(model, student, [1, 2], settings, pad_id=tokenizer.pad_token_id)
    else:
        mixed_rollout(model, student, privileged, [1, 2], settings, pad_id=tokenizer.pad_token_id)
    assert modes and all(modes)


@pytest.mark.parametrize("engine", ["reference", "draft"])
def test_rollouts_pass_the_cache_under_the_name_transformers_reads(tiny, contexts, engine):
    """No deprecation warning about the KV cache's keyword from either engine or from sampling."""
    import warnings

    model, tokenizer = tiny
    student, privileged = contexts
    settings = RolloutSettings(tau=0.5, max_new_tokens=6, engine=engine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixed_rollout(model, student, privileged, [1, 2], settings, pad_id=tokenizer.pad_token_id)
        sample_responses(model, student, [1, 2], settings, pad_id=tokenizer.pad_token_id)
    assert [str(w.message) for w in caught if "past_key_values" in str(w.message)] == []
