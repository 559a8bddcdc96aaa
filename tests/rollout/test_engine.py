"""The draft-and-verify engine reproduces the token-by-token decoder exactly and in distribution."""

from __future__ import annotations

import dataclasses
import math

import pytest

from dail.data import Problem
from dail.models import eos_token_ids
from dail.rollout.engine import EngineStats, draft_rollout, expected_tokens
from dail.rollout.engine.scheduler import LOOKUP
from dail.rollout.mixed import mixed_rollout
from dail.rollout.rule import RolloutSettings, sequence_seed
from dail.rollout.token_loop import reference_rollout
from tests.conftest import role_contexts

PROBLEMS = [
    Problem(id="a", problem="What is 2+3?", solution="2+3=5, so \\boxed{5}.", answer="5"),
    Problem(id="b", problem="Compute 12 * 4 / 6 and explain each step carefully.",
            solution="12 * 4 = 48. Then 48 / 6 = 8. Hence \\boxed{8}.", answer="8"),
    Problem(id="c", problem="x+1=3. Find x.", solution="x = 3 - 1 = 2, so \\boxed{2}.", answer="2"),
]


@pytest.fixture(scope="module")
def contexts(tiny):
    return role_contexts(tiny[1], PROBLEMS)


def run(tiny, contexts, settings, *, rows=7, seed=0, engine="reference", stats=None, **schedule):
    model, tokenizer = tiny
    student, privileged = contexts
    idx = [i % len(student) for i in range(rows)]
    seeds = [sequence_seed(seed, str(i)) for i in range(rows)]
    s = dataclasses.replace(settings, engine=engine, **schedule)
    args = (model, [student[i] for i in idx], [privileged[i] for i in idx], seeds, s)
    if engine == "draft":
        return draft_rollout(*args, pad_id=tokenizer.pad_token_id, stats=stats)
    return reference_rollout(*args, pad_id=tokenizer.pad_token_id)


def settings_for(tiny, **kw):
    model, tokenizer = tiny
    base = {"max_new_tokens": 20, "temperature": 1.0, "top_p": 0.9,
            "eos_ids": tuple(eos_token_ids(model, tokenizer))}
    return RolloutSettings(**{**base, **kw})


def as_tuple(trace):
    return (trace.token_ids, trace.sources, trace.proposal_ids, trace.finished)


@pytest.mark.parametrize(("tau", "retries"), [(0.0, 0), (0.02, 0), (0.5, 2), (1.0, 1)])
def test_draft_engine_equals_token_by_token(tiny, contexts, tau, retries):
    settings = settings_for(tiny, tau=tau, retries=retries, max_new_tokens=12)
    reference = run(tiny, contexts, settings, rows=5)
    for schedule in ({"draft_length": 3, "max_batch": 2}, {"draft_length": 0, "max_batch": 0}):
        traces = run(tiny, contexts, settings, rows=5, engine="draft", **schedule)
        assert [as_tuple(t) for t in traces] == [as_tuple(t) for t in reference], schedule
        for trace, ref in zip(traces, reference, strict=True):
            assert trace.proposal_probs == pytest.approx(ref.proposal_probs, abs=1e-5)


@pytest.mark.parametrize("engine", ["reference", "draft"])
def test_tau_one_samples_the_privileged_context_alone_with_the_same_tokens(tiny, contexts, engine):
    model, tokenizer = tiny
    student, privileged = contexts
    settings = settings_for(tiny, tau=1.0, max_new_tokens=16, engine=engine)
    for seed in range(2):
        full = run(tiny, contexts, settings, seed=seed, engine=engine)
        seeds = [sequence_seed(seed, str(i)) for i in range(7)]
        fast = mixed_rollout(model, [student[i % 3] for i in range(7)], [privileged[i % 3] for i in range(7)],
                             seeds, settings, pad_id=tokenizer.pad_token_id)
        assert [(t.token_ids, t.finished) for t in fast] == [(t.token_ids, t.finished) for t in full]
        assert all(set(t.sources) == {"P"} and not t.proposal_ids for t in fast)
        assert any(t.proposal_ids for t in full)  # the full loop did run the student


@pytest.mark.slow
@pytest.mark.parametrize("tau", [0.0, 0.02, 0.3, 1.0])
def test_draft_engine_equals_token_by_token_many_seeds(tiny, contexts, tau):
    settings = settings_for(tiny, tau=tau, retries=1 if tau == 0.3 else 0)
    for seed in range(3):
        reference = [as_tuple(t) for t in run(tiny, contexts, settings, seed=seed)]
        for schedule in ({"draft_length": 1}, {"draft_length": 5, "max_batch": 1}):
            traces = run(tiny, contexts, settings, seed=seed, engine="draft", **schedule)
            assert [as_tuple(t) for t in traces] == reference, (seed, schedule)


def test_draft_engine_suppress_eos_budget_and_greedy(tiny, contexts):
    model, tokenizer = tiny
    probe = run(tiny, contexts, settings_for(tiny, tau=0.0, eos_ids=(), max_new_tokens=10), rows=3)
    common = max({t for trace in probe for t in trace.token_ids},
                 key=lambda t: sum(trace.token_ids.count(t) for trace in probe))
    for kw in ({"suppress_ids": (common,)}, {"eos_ids": (common,)},
               {"temperature": 0.0, "top_k": 5, "max_new_tokens": 7}):
        settings = settings_for(tiny, tau=0.02, max_new_tokens=kw.pop("max_new_tokens", 10), **kw)
        reference = [as_tuple(t) for t in run(tiny, contexts, settings, rows=4)]
        assert [as_tuple(t) for t in run(tiny, contexts, settings, rows=4, engine="draft",
                                         draft_length=2, max_batch=2)] == reference, kw
        if "suppress_ids" in kw:
            assert all(common not in t[0] for t in reference)
        if kw.get("eos_ids") == (common,):
            assert all(t[3] == (common in t[0]) for t in reference)


def test_same_seed_same_trace_whatever_the_batch_or_draft(tiny, contexts):
    settings = settings_for(tiny, tau=0.02, max_new_tokens=10)
    alone = [as_tuple(run(tiny, contexts, settings, rows=1, engine="draft")[0])]
    for schedule in ({"draft_length": 4}, {"draft_length": 2, "max_batch": 3}):
        assert [as_tuple(run(tiny, contexts, settings, rows=6, engine="draft", **schedule)[0])] == alone


def test_draft_length_adapts_and_is_reported(tiny, contexts):
    stats = EngineStats()
    run(tiny, contexts, settings_for(tiny, tau=0.0, max_new_tokens=10), rows=3, engine="draft",
        stats=stats, draft_length=3)
    assert stats.acceptance_rate == 1.0 and stats.rounds > 0
    assert 0 < stats.tokens <= 3 * 10 and stats.mean_draft_length > 1
    assert 0 < stats.prefill_seconds < stats.seconds and 0 < stats.prefill_share < 1
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 4.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.5)


def force_rounds(monkeypatch, schedule: tuple[int, ...]) -> tuple[list[int], list[tuple[int, int]]]:
    """Make the draft engine run rounds of these draft lengths in turn (0: privileged rounds,
    LOOKUP: lookup rounds, or one-token rounds while the students lag). Returns the lists it
    fills: k of every round, and (round, lag) of every student feed."""
    from dail.rollout.engine import loop
    from dail.rollout.engine.scheduler import DraftLength

    def choose(self, remaining, lookup=False):
        if self.scheduled == LOOKUP:
            return LOOKUP if lookup else 1
        return min(self.scheduled, remaining)

    chosen, feeds = [], []
    monkeypatch.setattr(DraftLength, "scheduled", schedule[0], raising=False)
    monkeypatch.setattr(DraftLength, "choose", choose)

    def observe(self, k, **_):
        chosen.append(k)
        self.scheduled = schedule[len(chosen) % len(schedule)]

    feed = loop._student_feed
    monkeypatch.setattr(DraftLength, "observe", observe)
    monkeypatch.setattr(loop, "_student_feed", lambda *a: feeds.append((len(chosen), a[4])) or feed(*a))
    return chosen, feeds


@pytest.mark.slow
@pytest.mark.parametrize(("tau", "schedule"), [(0.02, None), (0.06, (0, 0, 1, 0, 2)),
                                               (0.06, (0, 1, LOOKUP, 0, LOOKUP, 2))])
def test_draft_engine_matches_the_reference_in_distribution(tiny, contexts, monkeypatch, tau, schedule):
    """Independent seeds for the two engines: acceptance rate and per-position token frequencies
    agree within sampling error (a test that does not rely on the shared uniform table). Drafts
    of 3, or privileged rounds mixed with drafts where many positions have no passable token, or
    lookup rounds mixed with both."""
    settings = settings_for(tiny, tau=tau, max_new_tokens=6, eos_ids=())
    n = 400
    reference = run(tiny, contexts, settings, rows=n, seed=11)
    if schedule:
        force_rounds(monkeypatch, schedule)
        monkeypatch.setattr("dail.rollout.engine.loop.LOOKUP_ROWS", n)  # lookup rounds at any batch size
    stats = EngineStats()
    engine = run(tiny, contexts, settings, rows=n, seed=12, engine="draft", draft_length=0 if schedule else 3,
                 stats=stats)
    assert (stats.unasked > 0) == (schedule is not None and 0 in schedule)  # privileged rounds skipped the student
    assert (stats.guessed > 0) == (schedule is not None and LOOKUP in schedule)  # lookup rounds guessed
    # Row i uses problem i mod 3 in both runs; compare per problem and position.
    for position in range(4):
        for problem in range(3):
            a = [t.token_ids[position] for i, t in enumerate(reference) if i % 3 == problem]
            b = [t.token_ids[position] for i, t in enumerate(engine) if i % 3 == problem]
            for token in set(a) | set(b):
                pa, pb = a.count(token) / len(a), b.count(token) / len(b)
                pooled = (a.count(token) + b.count(token)) / (len(a) + len(b))
                se = math.sqrt(max(pooled * (1 - pooled), 1e-4) * (1 / len(a) + 1 / len(b)))
                assert abs(pa - pb) <= 4.5 * se, (position, problem, token, pa, pb)
    rate = [sum(t.sources.count("S") for t in traces) / sum(len(t.sources) for t in traces)
            for traces in (reference, engine)]
    pooled = sum(rate) / 2
    assert abs(rate[0] - rate[1]) <= 4.5 * math.sqrt(max(pooled * (1 - pooled), 1e-4) * 2 / (4 * n))
    assert 0 < pooled < 1


def test_growing_cache_layer_appends_like_concatenation_and_survives_reassignment():
    import torch

    from dail.rollout.engine.kv_cache import GrowingLayer

    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    layer = GrowingLayer(keys, values)
    expected_k, expected_v = keys, values
    for step in range(70):  # past the first capacity, so the buffer grows at least once
        if step == 40:  # what compaction does: rows leave and the layer is given new tensors
            layer.keys, layer.values = layer.keys[[0, 2]].clone(), layer.values[[0, 2]].clone()
            expected_k, expected_v = expected_k[[0, 2]], expected_v[[0, 2]]
        shape = (expected_k.shape[0], 2, 1 + step % 3, 4)
        k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        got_k, got_v = layer.update(k, v)
        expected_k, expected_v = torch.cat([expected_k, k], dim=2), torch.cat([expected_v, v], dim=2)
        assert torch.equal(got_k, expected_k) and torch.equal(got_v, expected_v)
    assert layer.get_seq_length() == expected_k.shape[2] == 5 + sum(1 + s % 3 for s in range(70))


@pytest.mark.slow
def test_a_finished_row_makes_room_for_a_waiting_one_at_once(tiny, contexts):
    """Continuous batching: with room for 2 rows, each waiting row starts the round after a row
    finishes, so the rounds are those of filling two slots greedily, not of running pairs."""
    settings = settings_for(tiny, tau=0.02, eos_ids=(), max_new_tokens=12)
    probe = [t.token_ids for t in run(tiny, contexts, settings, rows=8)]
    # A token many rows write once in a while: as the end token it ends rows at different lengths.
    common = max({t for ids in probe for t in ids}, key=lambda t: sum(t in ids for ids in probe))
    stats = EngineStats()
    traces = run(tiny, contexts, dataclasses.replace(settings, eos_ids=(common,)), rows=8, engine="draft",
                 draft_length=1, max_batch=2, stats=stats)
    lengths = [len(t.token_ids) for t in traces]
    assert len(set(lengths)) > 2, lengths  # rows of several lengths, or the test shows nothing
    free_at = [0, 0]  # the round after which each slot is free
    for length in lengths:  # rows join in input order, each into the slot freed first
        slot = free_at.index(min(free_at))
        free_at[slot] += length
    in_pairs = sum(max(lengths[i:i + 2]) for i in range(0, len(lengths), 2))
    assert stats.rounds == max(free_at) < in_pairs


@pytest.mark.parametrize("schedule", [(0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3), (0, 0, 0, 0, 0, 4)])
def test_privileged_rounds_and_lagging_students_give_the_same_traces(tiny, contexts, monkeypatch, schedule):
    """Privileged rounds (k = 0) leave the students behind wherever no token can pass tau; every
    later kind of round must catch them up exactly, also when rows join a batch mid-lag."""
    settings = settings_for(tiny, tau=0.06, retries=1, eos_ids=(), max_new_tokens=16)
    probe = [t.token_ids for t in run(tiny, contexts, settings, rows=6)]
    common = max({t for ids in probe for t in ids}, key=lambda t: sum(t in ids for ids in probe))
    settings = dataclasses.replace(settings, eos_ids=(common,))  # rows end at different lengths
    reference = run(tiny, contexts, settings, rows=6)

    chosen, feeds = force_rounds(monkeypatch, schedule)
    stats = EngineStats()
    traces = run(tiny, contexts, settings, rows=6, engine="draft", max_batch=2, stats=stats)
    assert [as_tuple(t) for t in traces] == [as_tuple(t) for t in reference]
    for trace, ref in zip(traces, reference, strict=True):
        assert trace.proposal_probs == pytest.approx(ref.proposal_probs, abs=1e-5)

    lagged = {chosen[r] for r, lag in feeds if lag > 0}  # kinds of rounds that caught a student up
    assert lagged >= set(schedule), lagged
    assert len({len(t.token_ids) for t in traces}) > 2  # rows left and joined at different rounds
    assert 0 < stats.unasked < stats.tokens
    proposals = [p for t in traces for p in t.proposal_ids]
    assert None in proposals and any(p is not None for p in proposals)


def test_draft_length_chooses_privileged_rounds_only_where_few_positions_need_the_student():
    from dail.rollout.engine.scheduler import DraftLength

    def settle(consulted: bool, privileged: float, student: float, joint: float = 1.0) -> int:
        chooser = DraftLength(0, max_length=64)
        for k in (1, 1, 0, 0) * 5:  # each kind's first round is a warm-up whose timing is dropped
            chooser.observe(k, accepted=0, verified=1, consulted=consulted,
                            student_seconds=student if k == 0 and consulted else None,
                            seconds=privileged if k == 0 else joint)
        return chooser.choose(64)

    assert settle(consulted=False, privileged=0.6, student=0.6) == 0  # nothing passes tau: skip the student
    assert settle(consulted=True, privileged=0.6, student=0.6) == 1  # two forwards cost more than one
    assert settle(consulted=False, privileged=1.1, student=0.6) == 1  # one role's rows cost no less
    fresh = DraftLength(0, max_length=64)
    fresh.observe(1, accepted=0, verified=1, consulted=False, student_seconds=None, seconds=5.0)
    assert fresh.choose(64) == 1 and not fresh.verify_cost  # the warm-up round's time is not kept


def test_growing_cache_layer_feeds_a_block_of_rows_and_zeroes_the_others():
    import torch

    from dail.rollout.engine.kv_cache import GrowingLayer

    keys = torch.full((4, 2, 3, 5), float("nan"))  # NaN in place, as an uninitialised buffer may hold
    layer = GrowingLayer(keys.clone(), keys.clone())
    layer.fed_rows = slice(2, 4)
    new = torch.randn(2, 2, 1, 5)
    got_k, _ = layer.update(new, new)
    assert got_k.shape == (2, 2, 4, 5) and torch.equal(got_k[:, :, -1:], new)
    assert torch.equal(layer.keys[:2, :, -1], torch.zeros(2, 2, 5)) and layer.values.shape == (4, 2, 4, 5)


def test_stats_add_up_over_calls_and_each_call_is_logged(tiny, contexts, caplog):
    settings = settings_for(tiny, tau=0.5, max_new_tokens=6, eos_ids=())
    stats = EngineStats()
    with caplog.at_level("DEBUG", logger="dail.rollout.engine.loop"):
        for _ in range(2):
            run(tiny, contexts, settings, rows=3, engine="draft", stats=stats)
    assert stats.tokens == 2 * 3 * 6 and stats.rounds == 2 * 6
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("draft engine")]
    assert len(logged) == 2 and all("3 rows, 18 tokens" in m for m in logged)


def oracle_guesses(reference, privileged, start, corrupt_every=3):
    """A stand-in for `lookup_guesses` that guesses each row's true next tokens (read off the
    reference traces), except that every few calls one guess of each row is made wrong."""
    import torch

    calls = []

    def guess(text, ends, count, pad_id):
        calls.append(len(calls))
        guesses = torch.full((len(ends), count), pad_id, dtype=torch.long)
        exists = torch.zeros((len(ends), count), dtype=torch.bool)
        for i, end in enumerate(ends.tolist()):
            response = text[i, start:end].tolist()
            row = next(r for r, (ids, prompt) in enumerate(zip(reference, privileged, strict=True))
                       if text[i, start - len(prompt):start].tolist() == prompt
                       and ids[:len(response)] == response)
            truth = reference[row][len(response):len(response) + count]
            guesses[i, :len(truth)], exists[i, :len(truth)] = torch.tensor(truth, dtype=torch.long), True
            if len(calls) % corrupt_every == 0 and len(truth) > 1:
                guesses[i, 1] = (guesses[i, 1] + 1) % 50  # the second guess is wrong: one more token, not more
        return guesses, exists

    return guess


def test_lookup_rounds_decide_the_same_traces_whatever_their_guesses(tiny, contexts, monkeypatch):
    """Lookup rounds decide every guessed position by the rule and keep the tokens up to the
    first guess that is not the decided token: right, wrong and missing guesses, mixed with
    privileged rounds, drafts and rows joining, give the token-by-token loop's traces."""
    from dail.rollout.engine import loop

    settings = settings_for(tiny, tau=0.06, retries=1, eos_ids=(), max_new_tokens=16)
    probe = [t.token_ids for t in run(tiny, contexts, settings, rows=6)]
    common = max({t for ids in probe for t in ids}, key=lambda t: sum(t in ids for ids in probe))
    settings = dataclasses.replace(settings, eos_ids=(common,))  # rows end at different lengths
    reference = run(tiny, contexts, settings, rows=6)

    student, privileged = contexts
    rows_privileged = [privileged[i % len(privileged)] for i in range(6)]
    start = max(len(p) for p in rows_privileged)
    monkeypatch.setattr(loop, "lookup_guesses",
                        oracle_guesses([t.token_ids for t in reference], rows_privileged, start))
    chosen, _ = force_rounds(monkeypatch, (LOOKUP, 0, LOOKUP, LOOKUP, 2, 1))
    stats = EngineStats()
    traces = run(tiny, contexts, settings, rows=6, engine="draft", max_batch=2, stats=stats)
    assert [as_tuple(t) for t in traces] == [as_tuple(t) for t in reference]
    for trace, ref in zip(traces, reference, strict=True):
        assert trace.proposal_probs == pytest.approx(ref.proposal_probs, abs=1e-5)
    assert LOOKUP in chosen and 0 < stats.guessed_right < stats.guessed
    assert stats.rounds < sum(len(t.token_ids) for t in traces) / 2  # guesses decided many tokens at once


def test_lookup_guesses_follow_the_latest_longest_match():
    import torch

    from dail.rollout.engine.lookup import lookup_guesses

    # 9 8 | 1 2 3 4 . 7 2 3 5 . 2 3 -> the last bigram (2 3) was last followed by 5 . 2 3
    text = torch.tensor([[-1, -1, 9, 8, 1, 2, 3, 4, 0, 7, 2, 3, 5, 0, 2, 3, 6, 6]])
    guesses, exists = lookup_guesses(text, torch.tensor([16]), 3, pad_id=99)
    assert guesses.tolist() == [[5, 0, 2]] and exists.all()
    # ... but a longer match wins: 1 2 3 was followed by 4
    text[0, 13] = 1
    guesses, exists = lookup_guesses(text, torch.tensor([16]), 3, pad_id=99)
    assert guesses.tolist() == [[4, 0, 7]]
    # A guess stops where the text does, and a lone repeated token is no match.
    guesses, exists = lookup_guesses(text, torch.tensor([12]), 3, pad_id=99)  # ... 7 2 3: (2 3) at 5
    assert guesses.tolist() == [[4, 0, 7]] and exists.tolist() == [[True, True, True]]
    guesses, exists = lookup_guesses(text, torch.tensor([11]), 3, pad_id=99)  # ... 0 7 2: no earlier 7 2
    assert not exists.any() and guesses.tolist() == [[99, 99, 99]]
    short = torch.tensor([[-1, 5, 6, 7, 5, 6]])
    guesses, exists = lookup_guesses(short, torch.tensor([6]), 4, pad_id=0)
    assert guesses.tolist() == [[7, 5, 6, 0]] and exists.tolist() == [[True, True, True, False]]


def test_draft_length_chooses_lookup_rounds_where_they_decide_enough_tokens():
    from dail.rollout.engine.scheduler import LOOKUP, PROBE_EVERY, DraftLength

    def settle(tokens_per_row: float, lookup_cost: float) -> tuple[int, DraftLength]:
        chooser = DraftLength(0, max_length=64)
        for k in (1, 1, LOOKUP, LOOKUP) * 5:  # the first round of each kind is a warm-up
            chooser.observe(k, accepted=0, verified=tokens_per_row * 4 if k == LOOKUP else 4, consulted=True,
                            student_seconds=None, seconds=lookup_cost if k == LOOKUP else 1.0, rows=4)
        return chooser.choose(64, lookup=True), chooser

    assert settle(2.0, 1.5)[0] == LOOKUP
    k, chooser = settle(1.2, 1.5)
    assert k == 1 and chooser.choose(64, lookup=False) == 1
    for wait in (PROBE_EVERY, 2 * PROBE_EVERY):  # ... until it is time to look again, later each time
        for _ in range(wait):
            assert chooser.choose(64, lookup=True) == 1
            chooser.observe(1, accepted=0, verified=4, consulted=True, student_seconds=None, seconds=1.0, rows=4)
        assert chooser.choose(64, lookup=False) == 1  # never while the students lag
        assert chooser.choose(64, lookup=True) == LOOKUP
        chooser.observe(LOOKUP, accepted=0, verified=4, consulted=True, student_seconds=None, seconds=1.5, rows=4)


def test_grouped_attention_equals_transformers_sdpa_for_several_masked_tokens():
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from dail.rollout.engine.kv_cache import grouped_sdpa

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, 4, 8, generator=g)  # (B, H, q, d): 6 query heads
    key, value = torch.randn(2, 2, 11, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g)  # 2 KV heads
    mask = torch.rand(2, 1, 4, 11, generator=g) > 0.3
    mask[..., -1] = True  # no query sees nothing
    ours, _ = grouped_sdpa(module, query, key, value, mask, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert ours.shape == theirs.shape == (2, 4, 6, 8)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_multi_token_forwards_use_grouped_attention_and_leave_the_model_as_it_was(tiny, contexts, monkeypatch):
    from transformers import AttentionInterface

    from dail.rollout.engine.kv_cache import GROUPED_SDPA, grouped_sdpa

    model, _ = tiny
    assert model.config._attn_implementation == "sdpa"
    calls = []
    grouped = grouped_sdpa
    monkeypatch.setitem(AttentionInterface._global_mapping, GROUPED_SDPA,
                        lambda module, query, *a, **kw: calls.append(query.shape[2]) or grouped(module, query, *a, **kw))
    settings = settings_for(tiny, tau=0.02, max_new_tokens=6)
    run(tiny, contexts, settings, rows=3, engine="draft", draft_length=3)
    assert calls and min(calls) > 1  # the verify forwards of three drafts, and only they
    assert model.config._attn_implementation == "sdpa"
