"""What the command line tells about itself: defaults in help, version, and who logs."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest

from dail.cli import build_parser, configure_logging, main


def help_text(capsys, *argv: str) -> dict[str, str]:
    """Each option's help as printed, by its flags (argparse wraps lines anywhere)."""
    assert main([*argv, "--help"]) == 0
    entries: dict[str, str] = {}
    flags = None
    for line in capsys.readouterr().out.split("options:", 1)[1].splitlines():
        if re.match(r"^  -", line):  # an option's first line; its help may follow on the same line
            flags = line.split("  ")[1].strip() if "   " in line.strip() else line.strip()
            entries[flags] = line
        elif flags and line.startswith("    "):
            entries[flags] += " " + line
    return {names: " ".join(text.split()) for names, text in entries.items()}


def option_help(entries: dict[str, str], flag: str) -> str:
    found = [text for names, text in entries.items()
             if flag in (name.split(" ")[0] for name in names.split(", "))]
    assert len(found) == 1, f"{flag}: {found}"
    return found[0]


@pytest.mark.parametrize("command, config, flags", [
    ("generate", "GenerateConfig", {"--tau": "tau", "--samples": "samples", "--keep": "keep",
                                    "--max-new-tokens": "max_new_tokens", "--temperature": "temperature",
                                    "--batch-size": "batch_size", "--draft-length": "draft_length"}),
    ("eval", "EvalConfig", {"--n": "n", "--grader": "grader", "--top-p": "top_p", "--seed": "seed"}),
    ("probe", "ProbeConfig", {"--problems": "problems", "--samples": "samples", "--tau": "tau",
                              "--max-new-tokens": "max_new_tokens"}),
])
def test_help_shows_the_configs_defaults(capsys, command, config, flags):
    from dail import config as config_module

    cls = getattr(config_module, config)
    defaults = {f.name: f.default for c in (cls, config_module.SamplingConfig) for f in dataclasses.fields(c)}
    text = help_text(capsys, command)
    for flag, name in flags.items():
        assert f"(default: {defaults[name]})" in option_help(text, flag), flag


def test_train_help_shows_the_training_arguments_defaults(capsys):
    from dail.training.trainer import DAILConfig

    defaults = {f.name: f.default for f in dataclasses.fields(DAILConfig)}
    text = help_text(capsys, "train")
    assert f"(default: {defaults['learning_rate']})" in option_help(text, "--learning-rate")
    assert f"(default: {defaults['num_train_epochs']})" in option_help(text, "--epochs")
    assert f"(default: {defaults['max_length']})" in option_help(text, "--max-length")
    assert "(default: dail)" in option_help(text, "--loss")
    assert "(default: 0.1)" in option_help(text, "--gamma")


@pytest.mark.parametrize("command", ["generate", "train", "eval", "inspect", "probe", "plot", "demo", "run"])
def test_every_option_says_its_default_or_that_it_is_required(capsys, command):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    flags = [a.option_strings[-1] for a in sub.choices[command]._actions if a.option_strings and a.dest != "help"]
    text = help_text(capsys, command)
    for flag in flags:
        shown = option_help(text, flag)
        assert "default" in shown or "required" in shown, shown
    assert "SUPPRESS" not in text  # argparse's marker for --help's own default


def test_version(capsys):
    from dail import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dail {__version__}"


def test_world_help_names_dail_world(capsys):
    assert main(["world", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dail world ")
    assert main(["world", "export", "--n", "x"]) == 2
    assert capsys.readouterr().err == "dail world export: error: --n 'x' is not a whole number\n"


def test_only_the_main_process_logs_progress(caplog, capsys):
    root = logging.getLogger()
    before = root.level

    def progress(env):
        configure_logging(False, env)
        logging.getLogger("dail.stages.generate").info("rolled out")
        return [r.getMessage() for r in caplog.records]

    try:
        assert progress({"RANK": "0", "WORLD_SIZE": "2"}) == ["rolled out"]
        caplog.clear()
        assert progress({"RANK": "1", "WORLD_SIZE": "2"}) == []
        logging.getLogger("dail.stages.generate").warning("a problem was skipped")
        assert [r.getMessage() for r in caplog.records] == ["a problem was skipped"]
    finally:
        root.setLevel(before)


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_only_the_main_process_draws_progress_bars(monkeypatch, capsys, tmp_path, rank, shown):
    from dail.batching import run_per_problem

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    records = run_per_problem(["a", "b"], 2, key=str, parts=tmp_path, batch_size=3, desc="rollout",
                              generate=lambda rows: [{"sample": s} for _, s in rows])
    assert len(records) == 4
    assert ("rollout" in capsys.readouterr().err) is shown
