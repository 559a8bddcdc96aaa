"""Checks of settings and command-line arguments, shared by the configs (`dail.config`) and both
command lines (`dail`, `dail world`): numbers in range and finite, choices, keys and value types
of YAML sections, paths of the right kind, devices this machine has. Each refusal is one line
naming the flag or key, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn


class ConfigError(ValueError):
    """A configuration value that cannot be used."""


# The flag of each numeric setting that has one (errors name the flag; other settings by key).
_FLAGS = {"num_train_epochs": "--epochs"} | {key: "--" + key.replace("_", "-") for key in (
    "tau", "samples", "retries", "keep", "draft_length", "max_new_tokens", "temperature", "top_p",
    "top_k", "seed", "batch_size", "max_prompt_tokens", "gamma", "learning_rate", "max_length",
    "teacher_cache_gb", "n", "problems", "seeds", "tensor_parallel_size")}


def check_range(key: str, value: float | None, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Refuse a number outside its allowed range, NaN and infinities, in one line naming flag,
    value and range.

    Raises:
        ConfigError: e.g. "--tau 1.5: out of range; allowed: [0, 1]".
    """
    if value is None:
        return
    problem = range_problem(value, low=low, high=high, low_open=low_open, high_open=high_open)
    if problem:
        raise ConfigError(f"{_FLAGS.get(key, key)} {value}: {problem}")


def range_problem(value: float, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False) -> str | None:
    """What is wrong with `value` for the range, or None."""
    if not math.isfinite(value):
        return "not a finite number"
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    if above and below:
        return None
    if low is not None and high is not None:
        allowed = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"{'>' if low_open else '>='} {low:g}"
    else:
        allowed = f"{'<' if high_open else '<='} {high:g}"
    return f"out of range; allowed: {allowed}"


@dataclass(frozen=True)
class Number:
    """A command-line type: a finite int or float within a range (`dail.cli` gives every numeric
    flag one, so a value out of range stops the command before it reads anything)."""

    kind: type = int
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __call__(self, text: str) -> float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if self.kind is int else 'a number'}") from None
        problem = range_problem(value, low=self.low, high=self.high, low_open=self.low_open, high_open=self.high_open)
        if problem:
            raise argparse.ArgumentTypeError(f"{text}: {problem}")
        return value


@dataclass(frozen=True)
class PathArg:
    """A command-line type: a path to a file, a folder, or either; an input must exist, and an
    existing path must be of its kind (an output folder is no file, an output file no folder)."""

    kind: str = "file"  # "file", "folder" or "file or folder"
    exists: bool = True  # an input (False: an output, written by the command)

    def __call__(self, text: str) -> str:
        path = Path(text)
        if not path.exists():
            if self.exists:
                raise argparse.ArgumentTypeError(f"{text}: no such {self.kind}")
            return text
        if self.kind == "file" and path.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: a folder, not a file")
        if self.kind == "folder" and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: a file, not a folder")
        return text


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{_FLAGS.get(key, key)} {value!r}: not one of {', '.join(choices)}")


def unknown_keys(where: str, given: Any, known: Any, *, shown: str | None = None,
                 first: Any = ()) -> ConfigError | None:
    """The error for keys that are not settings, with the closest known key for each (looked
    for among `first` before the rest); `shown` replaces the list of known keys when it is long."""
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return None
    hints = []
    for key in unknown:
        close = (difflib.get_close_matches(key, list(first), n=1, cutoff=0.6)
                 or difflib.get_close_matches(key, list(known), n=1, cutoff=0.6))
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    return ConfigError(f"{where}: unknown key(s) {', '.join(hints)}; known keys: {shown or sorted(known)}")


def type_problem(value: Any, hint: Any) -> str | None:
    """What `value` should have been for the annotation `hint`, or None when it fits. Only
    plain types are judged (numbers, strings, booleans, lists, mappings); others pass."""
    if hint is Any or value is None and _allows_none(hint):
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        problems = [type_problem(value, h) for h in options]
        return None if any(p is None for p in problems) else " or ".join(p for p in problems if p)
    if origin is typing.Literal:
        return None if value in typing.get_args(hint) else f"one of {list(typing.get_args(hint))}"
    if origin is list or hint is list:
        if not isinstance(value, list):
            return "a list"
        (item,) = typing.get_args(hint) or (Any,)
        problems = [type_problem(v, item) for v in value]
        return next((f"a list of {p.removeprefix('a ').removeprefix('an ')}s" for p in problems if p), None)
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else "a mapping"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    return None


def _allows_none(hint: Any) -> bool:
    return hint is type(None) or type(None) in typing.get_args(hint)


def check_device(device: str) -> None:
    """Refuse a device that this machine or this build of torch does not have.

    Raises:
        ConfigError: e.g. "--device cuda: this torch sees no CUDA device (a CPU build, or no GPU); ...".
    """
    if device == "auto":
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {device}: this torch sees no CUDA device (a CPU build, or no GPU); "
                              "use --device cpu or auto")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return
    backend = getattr(torch.backends, parsed.type, None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise ConfigError(f"--device {device}: this torch cannot use {parsed.type!r} here; use auto, cpu or cuda")


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments are reported in one line, as every other error of `dail` is (argparse's
    own report starts with the whole usage)."""

    def error(self, message: str) -> NoReturn:
        # "argument --tau: 1.5: out of range" reads as the other errors do: "--tau 1.5: out of range".
        named = re.fullmatch(r"argument ([^:]+): (.*)", message, re.DOTALL)
        if named:
            message = f"{named.group(1).split('/')[-1]} {named.group(2)}"
        self.exit(2, f"{self.prog}: error: {message}\n")
