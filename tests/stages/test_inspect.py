"""`dail inspect --traces F --sample N --tokens K`: any trace of a problem, as many tokens as asked."""

from __future__ import annotations

import json
import re

import pytest

from dail.cli import main


@pytest.fixture
def traces_file(tmp_path, tiny):
    _, tokenizer = tiny
    ids = tokenizer("We compute 12 * 4 = 48 and 48 / 6 = 8. Hence \\boxed{8}. " * 2).input_ids
    assert len(ids) > 12
    rows = []
    for sample in (0, 1):
        token_ids = ids[sample:]  # the two traces differ in length
        sources = "".join("SP"[(j + sample) % 2] for j in range(len(token_ids)))
        rows.append({"id": "div", "sample": sample, "token_ids": token_ids, "sources": sources,
                     "proposal_ids": [t if s == "S" else ids[0] for t, s in zip(token_ids, sources, strict=True)],
                     "proposal_probs": [0.9 if s == "S" else 0.1 for s in sources]})
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, [len(r["token_ids"]) for r in rows]


def table_rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.match(r"^\| \d+ \|", line)]


def test_inspect_shows_the_chosen_sample_and_every_token(tiny_model_dir, problems_file, traces_file, capsys):
    path, lengths = traces_file
    assert main(["inspect", "--model", str(tiny_model_dir), "--data", str(problems_file), "--id", "div",
                 "--traces", str(path), "--sample", "1", "--tokens", "0"]) == 0
    out = capsys.readouterr().out
    assert f"trace sample 1 from {path}" in out
    rows = table_rows(out)
    assert len(rows) == lengths[1] > 24
    assert "more tokens" not in out
    first = [c.strip() for c in rows[0].split("|")]
    assert first[3] == "P" and first[5] == "0.100"  # sample 1 starts with a privileged token


def test_inspect_tokens_limits_the_table(tiny_model_dir, problems_file, traces_file, capsys):
    path, lengths = traces_file
    assert main(["inspect", "--model", str(tiny_model_dir), "--data", str(problems_file), "--id", "div",
                 "--traces", str(path), "--tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "trace sample 0" in out
    assert len(table_rows(out)) == 5
    assert f"... {lengths[0] - 5} more tokens" in out


@pytest.mark.parametrize("extra, message", [
    (["--sample", "7"], "problem 'div' has no trace with sample 7 (its samples: 0, 1)"),
    (["--sample", "-1"], "--sample -1: out of range; allowed: >= 0"),
    (["--tokens", "-3"], "--tokens -3: out of range; allowed: >= 0"),
])
def test_inspect_refuses_bad_choices_before_loading_the_model(monkeypatch, tiny_model_dir, problems_file,
                                                              traces_file, capsys, extra, message):
    monkeypatch.setattr("dail.models.load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["inspect", "--model", str(tiny_model_dir), "--data", str(problems_file), "--id", "div",
                 "--traces", str(traces_file[0]), *extra]) == 2
    assert message in capsys.readouterr().err


def test_inspect_sample_needs_a_traces_file(problems_file, tiny_model_dir, capsys):
    assert main(["inspect", "--model", str(tiny_model_dir), "--data", str(problems_file), "--id", "div",
                 "--sample", "1"]) == 2
    assert "--sample picks a trace from --traces FILE" in capsys.readouterr().err
