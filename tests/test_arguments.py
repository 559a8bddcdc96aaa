"""Every command's arguments, driven over its own argument table (`dail` and `dail world`): a
bad number, path, device or name stops the command with one line and exit 2 before it writes
anything, so a flag added later is covered by these tests when it is added."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dail.cli import build_parser, main
from dail.validation import Number, PathArg
from dail.world.__main__ import build_parser as build_world_parser


def commands() -> Iterator[tuple[list[str], argparse.ArgumentParser]]:
    """(the words before the arguments, the command's parser) of every command."""
    for top, words in ((build_parser(), []), (build_world_parser("dail world"), ["world"])):
        sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        for name, parser in sub.choices.items():
            yield [*words, name], parser


def arguments(kind: type) -> list[tuple[list[str], argparse.Action]]:
    return [(words, action) for words, parser in commands() for action in parser._actions
            if isinstance(action.type, kind)]


def label(case: tuple[list[str], argparse.Action]) -> str:
    words, action = case
    return " ".join([*words, action.option_strings[-1] if action.option_strings else action.dest])


def run(words: list[str], action: argparse.Action, value: str) -> int:
    """The command with this one argument (the others missing: a bad value stops it first);
    `--flag=value`, so that argparse reads "-inf" as a value."""
    argv = [*words, f"{action.option_strings[-1]}={value}" if action.option_strings else value]
    try:
        return main(argv)
    except SystemExit as e:  # argparse's exit
        return e.code


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "usage:" not in err, err
    return err


NUMBERS = arguments(Number)
PATHS = arguments(PathArg)
CHOICES = [(words, action) for words, parser in commands() for action in parser._actions
           if action.choices and not isinstance(action, argparse._SubParsersAction)]


def test_every_number_and_path_argument_says_what_it_accepts():
    untyped = [label((words, action)) for words, parser in commands() for action in parser._actions
               if action.type in (int, float)]
    assert untyped == []  # a numeric flag takes a `Number`, whose range the tests below read
    assert len(NUMBERS) > 50 and len(PATHS) > 20 and len(CHOICES) > 15


def below_range(number: Number) -> str | None:
    if number.low is None:
        return None
    if number.low_open:
        return f"{number.low:g}"
    return str(int(number.low) - 1) if number.kind is int else f"{number.low - 0.5:g}"


@pytest.mark.parametrize("case", NUMBERS, ids=label)
def test_numbers_out_of_range_nan_and_infinities_stop_the_command(case, tmp_path, monkeypatch, capsys):
    words, action = case
    monkeypatch.chdir(tmp_path)
    number = action.type
    values = ["nan", "inf", "-inf", "ten"]
    values += [v for v in (below_range(number),) if v is not None]
    if number.high is not None:
        values.append(f"{number.high:g}" if number.high_open else f"{number.high + 1:g}")
    for value in values:
        assert run(words, action, value) == 2, value
        err = one_line_error(capsys)
        assert action.option_strings[-1] in err and value in err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("case", PATHS, ids=label)
def test_paths_that_are_missing_or_of_the_other_kind_stop_the_command(case, tmp_path, monkeypatch, capsys):
    words, action = case
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file.jsonl").write_text("{}\n")
    path = action.type
    wrong = []
    if path.exists:
        wrong.append(("missing.jsonl", "no such"))
    if path.kind == "file":
        wrong.append(("a-folder", "a folder, not a file"))
    if path.kind == "folder":
        wrong.append(("a-file.jsonl", "a file, not a folder"))
    assert wrong
    for value, message in wrong:
        assert run(words, action, value) == 2, value
        err = one_line_error(capsys)
        assert message in err and value in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file.jsonl", "a-folder"]


@pytest.mark.parametrize("case", CHOICES, ids=label)
def test_unknown_names_stop_the_command_naming_the_valid_ones(case, capsys):
    words, action = case
    assert run(words, action, "bogus") == 2
    err = one_line_error(capsys)
    assert all(str(choice) in err for choice in action.choices)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--grader", "bogus", "choose one of exact, math, world"),
    ("--waypoints", "bogus", "choose one of ['math', 'none']"),
    ("--device", "cuda:7", "--device cuda:7"),
    ("--device", "tpu", "--device 'tpu': not a device"),
])
def test_names_and_devices_checked_by_the_stages_stop_them_before_any_output(flag, value, message, tiny_model_dir,
                                                                              problems_file, tmp_path, capsys):
    out = tmp_path / "out"
    for command in ("generate", "eval", "probe"):
        argv = [command, "--model", str(tiny_model_dir), "--data", str(problems_file), "--out", str(out), flag, value]
        assert main(argv) == 2, command
        assert message in one_line_error(capsys)
        assert not out.exists()


def test_a_section_the_stage_does_not_use_is_refused_like_a_typo(tiny_model_dir, problems_file, tmp_path, capsys):
    config = tmp_path / "generate.yaml"
    config.write_text(json.dumps({"training": {"learning_rate": 1e-3}}))
    argv = ["generate", "--config", str(config), "--model", str(tiny_model_dir), "--data", str(problems_file),
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "unknown key(s) 'training'" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_one_model_and_data_under_other_spellings_of_their_paths_are_the_same_inputs(tiny_model_dir, problems_file,
                                                                                    tmp_path, monkeypatch, capsys):
    out = tmp_path / "gen"
    args = ["--samples", "1", "--max-new-tokens", "2", "--out", str(out)]
    assert main(["generate", "--model", str(tiny_model_dir), "--data", str(problems_file), *args]) == 0
    monkeypatch.chdir(tiny_model_dir.parent)
    relative_model = f"{tiny_model_dir.name}/"
    relative_data = os.path.relpath(problems_file, tiny_model_dir.parent)
    assert main(["generate", "--model", relative_model, "--data", relative_data, *args]) == 0
    assert "other settings" not in capsys.readouterr().err
    assert Path(json.loads((out / "generate_config.json").read_text())["model"]["model"]) == tiny_model_dir.resolve()
