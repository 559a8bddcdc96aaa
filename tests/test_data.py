"""Problem loading: formats, gold answers, and clean rejection of bad input."""

from __future__ import annotations

import json

import pytest

from dail.data import (
    DataError,
    last_boxed,
    load_problems,
    read_jsonl,
    save_dir_atomic,
    write_jsonl_atomic,
)


def write_lines(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode() + b"\n" for line in lines))
    return path


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{\{a, b\}}", r"\{a, b\}"),
    (r"\boxed{x^{2}+\sqrt{y_{1}}}", r"x^{2}+\sqrt{y_{1}}"),
    (r"\fbox{7}", "7"),
    (r"\boxed 5 and more", "5"),
    (r"\boxed{3} and an unclosed \boxed{4", "3"),
    ("no box here", None),
])
def test_last_boxed_handles_nesting(text, expected):
    assert last_boxed(text) == expected


def test_jsonl_gold_answers(problems_file):
    problems = {p.id: p for p in load_problems(problems_file)}
    assert problems["add"].answer == "5"  # from the last \boxed{} of the solution
    assert problems["div"].answer == "8"  # explicit field
    assert problems["proof"].answer is None and not problems["proof"].verifiable


def test_json_and_datasets_dir(tmp_path):
    rows = [{"id": 1, "problem": "p", "solution": "s \\boxed{2}", "source": "x"}]
    (tmp_path / "a.json").write_text(json.dumps({"data": rows}))
    (p,) = load_problems(tmp_path / "a.json")
    assert (p.id, p.answer, p.meta) == ("1", "2", {"source": "x"})

    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    (q,) = load_problems(tmp_path / "ds")
    assert q == p


@pytest.mark.parametrize("lines, message", [
    (['{"id": "a", "problem": "p", "solution": "s"}', '{"id": "b", "problem": "p"'], ":2: malformed JSON"),
    (['{"id": "a", "problem": "p"}'], ":1: missing field 'solution'"),
    (['{"id": "a", "problem": "  ", "solution": "s"}'], ":1: field 'problem' is empty"),
    (['{"id": "a", "problem": 3, "solution": "s"}'], ":1: field 'problem' must be a string"),
    (['{"id": "a", "problem": "p", "solution": "s"}', '', '{"id": "a", "problem": "q", "solution": "t"}'],
     ":3: field 'id': duplicate id 'a'"),
    ([b'{"id": "a", "problem": "caf\xe9", "solution": "s"}\n'], ":1: not valid UTF-8"),
    (['[1, 2]'], ":1: expected a JSON object"),
    (['{"id": "a", "problem": "p", "solution": "s", "answer": ""}'], ":1: field 'answer' is empty"),
])
def test_bad_input_names_file_line_and_field(tmp_path, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_problems(path)
    assert str(path) + message in str(err.value)


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path):
    row = {"id": "a", "problem": "p", "solution": "s \\boxed{1}"}
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\r\n")
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([row]).encode())
    for path in (jsonl, tmp_path / "bom.json"):
        (problem,) = load_problems(path)
        assert (problem.id, problem.answer) == ("a", "1")


@pytest.mark.parametrize("line, column", [
    ('{"id": "b", "problem": "p"', "column 27 (the line ends at column 26: truncated?)"),
    ('{"id": "b", "problem": "a long stat', "column 24 (the line ends at column 35: truncated?)"),
    ('{"id": "b" "problem": "p"}', "column 12"),
])
def test_malformed_json_is_located_where_it_breaks(tmp_path, line, column):
    path = write_lines(tmp_path / "cut.jsonl", ['{"id": "a", "problem": "p", "solution": "s"}', line])
    with pytest.raises(DataError) as err:
        load_problems(path)
    assert str(err.value).startswith(f"{path}:2: malformed JSON: ")
    assert str(err.value).endswith(f" at {column}")


def test_atomic_writes_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        write_jsonl_atomic(tmp_path / "a.jsonl", [{"a": 1}])
        os.umask(0o022)
        write_jsonl_atomic(tmp_path / "b.jsonl", [{"a": 1}])
    finally:
        os.umask(old)
    assert (tmp_path / "a.jsonl").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b.jsonl").stat().st_mode & 0o777 == 0o644


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_problems(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no problems"):
        load_problems(write_lines(tmp_path / "empty.jsonl", [""]))


def test_atomic_write_leaves_no_partial_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl_atomic(path, [{"a": 1}])

    def broken():
        yield {"a": 2}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, broken())
    assert read_jsonl(path) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_atomic_directory_save_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "model"
    save_dir_atomic(final, lambda d: (d.mkdir(), (d / "a").write_text("1"), (d / "b").write_text("1")))
    save_dir_atomic(final, lambda d: (d.mkdir(), (d / "a").write_text("2")))
    assert sorted(p.name for p in final.iterdir()) == ["a"] and (final / "a").read_text() == "2"

    def broken(d):
        d.mkdir()
        (d / "a").write_text("3")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        save_dir_atomic(final, broken)
    assert (final / "a").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_champ_loader():
    pytest.importorskip("champ_dataset")
    from dail.data import load_champ

    problems = load_champ()
    assert len(problems) == 270
    assert len({p.id for p in problems}) == 270
    assert all(p.problem and p.solution for p in problems)
    assert sum(p.verifiable for p in problems) > 200
