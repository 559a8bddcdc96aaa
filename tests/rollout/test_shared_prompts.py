"""Samples of one problem share their prompts' encoding: same traces, one prefill row per prompt."""

from __future__ import annotations

import os

import pytest
import torch

from dail.data import Problem
from dail.models import eos_token_ids
from dail.rollout.engine import EngineStats, draft_rollout
from dail.rollout.engine.shared_prompts import SharedPrompts
from dail.rollout.mixed import mixed_rollout
from dail.rollout.rule import RolloutSettings, sequence_seed
from dail.rollout.token_loop import distinct_prompts, sample_responses
from tests.conftest import role_contexts

PROBLEMS = [
    Problem(id="a", problem="What is 2+3?", solution="2+3=5, so \\boxed{5}.", answer="5"),
    Problem(id="b", problem="Compute 12 * 4 / 6 and explain each step carefully.",
            solution="12 * 4 = 48. Then 48 / 6 = 8. Hence \\boxed{8}.", answer="8"),
]
ORDER = [0, 0, 1, 0, 1, 1]  # samples of two problems, interleaved as continuous batching may admit them


@pytest.fixture(scope="module")
def contexts(tiny):
    return role_contexts(tiny[1], PROBLEMS)


def settings_for(tiny, **kw) -> RolloutSettings:
    model, tokenizer = tiny
    return RolloutSettings(**{"max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0,
                              "eos_ids": tuple(eos_token_ids(model, tokenizer)), **kw})


class PrefillRows:
    """Counts the rows of each forward that reads more than one position (a prompt encoding)."""

    def __init__(self, model):
        self.rows: list[int] = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            self.rows.append(ids.shape[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_distinct_prompts_keeps_first_seen_order():
    assert distinct_prompts([[1, 2], [3], [1, 2], [3], [4]]) == ([[1, 2], [3], [4]], [0, 1, 0, 1, 2])


@pytest.mark.parametrize("engine", ["reference", "draft"])
@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_shared_prompts_give_the_traces_of_separate_runs(tiny, contexts, engine, tau):
    model, tokenizer = tiny
    student, privileged = contexts
    settings = settings_for(tiny, tau=tau, engine=engine)
    seeds = [sequence_seed(3, f"{i}") for i in range(len(ORDER))]
    with PrefillRows(model) as prefill:  # the draft engine's sharing is counted below
        shared = mixed_rollout(model, [student[i] for i in ORDER], [privileged[i] for i in ORDER], seeds, settings,
                               pad_id=tokenizer.pad_token_id)
    alone = [mixed_rollout(model, [student[i]], [privileged[i]], [seed], settings, pad_id=tokenizer.pad_token_id)[0]
             for i, seed in zip(ORDER, seeds, strict=True)]
    for a, b in zip(shared, alone, strict=True):
        assert (a.token_ids, a.sources, a.proposal_ids) == (b.token_ids, b.sources, b.proposal_ids)
        assert a.proposal_probs == pytest.approx(b.proposal_probs, abs=1e-5)
    if engine == "reference":  # one forward encodes both roles: two prompts of each problem
        assert prefill.rows[0] == 2 * len(PROBLEMS), prefill.rows


def test_sampling_shares_prompts_too(tiny, contexts):
    model, tokenizer = tiny
    student, _ = contexts
    settings = settings_for(tiny)
    seeds = [sequence_seed(1, f"{i}") for i in range(len(ORDER))]
    with PrefillRows(model) as prefill:
        shared = sample_responses(model, [student[i] for i in ORDER], seeds, settings, pad_id=tokenizer.pad_token_id)
    alone = [sample_responses(model, [student[i]], [seed], settings, pad_id=tokenizer.pad_token_id)[0]
             for i, seed in zip(ORDER, seeds, strict=True)]
    assert [t.token_ids for t in shared] == [t.token_ids for t in alone]
    assert prefill.rows[0] == len(PROBLEMS)


def test_a_row_joining_later_reuses_its_problems_encoding(tiny, contexts):
    """Continuous batching admits rows as others finish: a later sample of a problem reads the
    encoding made when its first sample joined, and only until the problem's last sample joins."""
    model, tokenizer = tiny
    student, privileged = contexts
    settings = settings_for(tiny, tau=0.5, engine="draft", max_batch=2)
    order = [0, 0, 0, 1, 1]
    seeds = [sequence_seed(4, f"{i}") for i in range(len(order))]
    stats = EngineStats()
    shared = draft_rollout(model, [student[i] for i in order], [privileged[i] for i in order], seeds, settings,
                           pad_id=tokenizer.pad_token_id, stats=stats)
    alone = [mixed_rollout(model, [student[i]], [privileged[i]], [seed], settings, pad_id=tokenizer.pad_token_id)[0]
             for i, seed in zip(order, seeds, strict=True)]
    assert [(t.token_ids, t.sources) for t in shared] == [(t.token_ids, t.sources) for t in alone]
    assert (stats.prompt_rows, stats.prompts_encoded) == (2 * len(order), 2 * len(PROBLEMS))
    assert stats.prompt_tokens_reused > 0  # each student prompt continued its privileged one


class RecordingEncode:
    """An encode function for `SharedPrompts` that records its calls and encodes token t as t."""

    def __init__(self):
        self.calls: list[tuple[list[list[int]], list[int] | None]] = []

    def __call__(self, prompts, prefix=None):
        self.calls.append((prompts, None if prefix is None else prefix[1].sum(-1).tolist()))
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], dtype=torch.float)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        if prefix is not None:
            ids = torch.cat([prefix[0][0][0][:, 0, :, 0], ids], dim=-1)
            mask = torch.cat([prefix[1], mask], dim=-1)
        kv = ids[:, None, :, None].expand(-1, 1, -1, 2)
        return [(kv, kv)], mask


def test_encodings_are_dropped_after_the_last_row_that_reads_them():
    encode = RecordingEncode()
    store = SharedPrompts(encode, upcoming=[[1, 2], [1, 2], [3, 4], [1, 2]])
    kv, mask = store.rows([[1, 2], [3, 4]])
    assert encode.calls == [([[1, 2], [3, 4]], None)] and kv[0][0].shape == (2, 1, 2, 2)
    assert set(store.kept) == {(1, 2)}  # [3, 4] has no row left to read it
    store.rows([[1, 2], [1, 2]])
    assert len(encode.calls) == 1 and not store.kept
    assert (store.requested, store.encoded) == (4, 2)


def test_prompts_of_different_lengths_are_encoded_in_groups_that_pad_little():
    encode = RecordingEncode()
    prompts = [[1] * 4, [2] * 10, [3] * 3, [4] * 8]
    store = SharedPrompts(encode, upcoming=prompts)
    kv, mask = store.rows(prompts)
    assert encode.calls == [([[2] * 10, [4] * 8], None), ([[1] * 4, [3] * 3], None)]
    # Rows come back in the order asked for, each left-padded to the longest.
    assert mask.sum(-1).tolist() == [4, 10, 3, 8]
    assert kv[0][0][:, 0, :, 0].tolist()[0] == [0] * 6 + [1] * 4


def test_a_prompt_that_opens_like_another_encodes_only_the_rest():
    encode = RecordingEncode()
    privileged = [5, 6, 7, 8, 9, 10, 11, 12]
    student = [5, 6, 7, 8, 9, 13]  # the same opening for 5 of its 6 tokens
    other = [5, 6, 20, 21, 22, 23, 24]  # shares 2 tokens only: encoded whole
    store = SharedPrompts(encode, upcoming=[student, privileged, other])
    kv, mask = store.rows([student, privileged, other])
    assert encode.calls == [([privileged, other], None), ([[13]], [5])]
    assert store.reused_tokens == 5
    rows = kv[0][0][:, 0, :, 0]
    assert [row[m.bool()].tolist() for row, m in zip(rows, mask, strict=True)] == [
        [float(t) for t in p] for p in (student, privileged, other)]


def test_an_encoding_continued_after_a_copied_opening_equals_the_whole(tiny, contexts):
    """The keys and values a student prompt gets after its privileged prompt's opening are the
    ones it gets when encoded whole."""
    from dail.rollout.engine.kv_cache import JointBatch

    model, tokenizer = tiny
    student, privileged = (rows[0][:-1] for rows in contexts)
    shared = len(os.path.commonprefix([student, privileged]))
    assert shared >= len(student) / 2  # the chat template puts the problem first in both
    batch = JointBatch(model, tokenizer.pad_token_id)
    with torch.inference_mode():
        whole, _ = batch._encode([student])
        store = SharedPrompts(batch._encode, upcoming=[student, privileged])
        continued, mask = store.rows([student, privileged])
    assert store.reused_tokens == shared
    for (k, v), (ck, cv) in zip(whole, continued, strict=True):
        keep = mask[0].bool()
        torch.testing.assert_close(ck[0][:, keep], k[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cv[0][:, keep], v[0], atol=1e-5, rtol=1e-4)
