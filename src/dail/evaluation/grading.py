"""Answer checking: extract the last `\\boxed{...}` and compare it with the gold answer.

Graders are picked by name from `GRADERS` (or given as `module:function`):

- `math` (default): a normalised string match first (cheap, and equal strings are equal answers),
  then math-verify's symbolic/numeric comparison, gold passed first as its API expects.
- `exact`: normalised string equality only.
- `world`: the didactic world's grader, `dail.world.scoring:grade`, found by that path on first
  use (`PLUGIN_GRADERS`): the library itself never imports the testbed.

math-verify bounds its work with `signal.alarm`, which only works in the main thread and raises
anywhere else. We turn its timeouts off and bound the whole comparison ourselves:

- in the main thread, with one interval timer (`signal.setitimer`) over parse + verify;
- in any other thread (or when the caller's own interval timer is running), in a helper
  subprocess that applies the same timer in *its* main thread; the caller waits at most the
  deadline plus a grace period and kills the helper if it is stuck in C code. Helpers are reused,
  one per concurrently grading thread.

A comparison that runs out of time counts as not equal (logged at WARNING).
"""

from __future__ import annotations

import atexit
import importlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dail.data import last_boxed

logger = logging.getLogger(__name__)

Grader = Callable[[str, str], bool]

#: Wall-clock bound, in seconds, on one math-verify comparison (parse both sides + verify).
MATH_TIMEOUT_SECONDS = 5.0
# Extra time a helper subprocess gets beyond its own timer before it is killed.
_KILL_GRACE_SECONDS = 2.0
# Helper start-up imports sympy and the LaTeX parser; allow for a slow, busy machine.
_STARTUP_TIMEOUT_SECONDS = 120.0


# --------------------------------------------------------------------------- extraction


def extract_answer(response: str) -> str | None:
    """The content of the last `\\boxed{...}` in `response`, or None when there is none.

    Args:
        response: Model output.

    Returns:
        The box content (stripped), nested braces handled; None without a complete box.
    """
    return last_boxed(response)


# --------------------------------------------------------------------------- normalisation

_WRAPPERS = ("\\text", "\\textbf", "\\textrm", "\\mathrm", "\\mathbf", "\\mbox")
_REMOVE = (
    "\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ", "$",
    "^{\\circ}", "^\\circ", "\\circ", "°",
)
_THOUSANDS = re.compile(r"\d{1,3}(,\d{3})+(\.\d+)?")


def normalize_answer(answer: str) -> str:
    """Canonical string form of an answer for string comparison.

    Removes spacing and sizing commands, `$`, degree marks, `\\text{...}`-style wrappers (keeping
    their content), a trailing period, thousands separators (`1,000` or `1{,}000`, only when the
    whole answer is one such number, so the tuple `1,2` survives), all whitespace, and rewrites
    `\\dfrac`/`\\tfrac` as `\\frac`. Case is kept: `x` and `X` may be different variables.

    Args:
        answer: Answer text (box content or a gold answer).

    Returns:
        The normalised string.
    """
    s = answer.strip()
    for cmd in _WRAPPERS:
        s = _unwrap(s, cmd)
    for token in _REMOVE:
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    s = "".join(s.split())
    s = s.rstrip(".")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def _unwrap(s: str, cmd: str) -> str:
    """Replace every `cmd{content}` by `content` (nested braces handled)."""
    start = s.find(cmd + "{")
    while start >= 0:
        open_pos = start + len(cmd)
        depth = 0
        for i in range(open_pos, len(s)):
            if s[i] == "{":
                depth += 1
            elif s[i] == "}":
                depth -= 1
                if depth == 0:
                    s = s[:start] + s[open_pos + 1 : i] + s[i + 1 :]
                    break
        else:  # unbalanced: leave the rest alone
            return s
        start = s.find(cmd + "{", start)
    return s


def answers_match_exact(answer: str, gold: str) -> bool:
    """Normalised string equality (see `normalize_answer`)."""
    return normalize_answer(answer) == normalize_answer(gold)


# --------------------------------------------------------------------------- math-verify


class _Deadline(BaseException):  # noqa: N818 -- a control-flow signal, not an error
    """Raised by our timer. A BaseException so math-verify's `except Exception` cannot swallow it."""


class _SilenceTimeoutWarning(logging.Filter):
    # math-verify warns once that its timeouts are off; we bound the time ourselves.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


_mv_setup_lock = threading.Lock()
_mv_ready = False


def _load_math_verify() -> Any:
    """Import math-verify (before any timer is armed: an interrupted import leaves it broken)."""
    global _mv_ready
    import math_verify

    with _mv_setup_lock:
        if not _mv_ready:
            for name in ("math_verify.parser", "math_verify.grader"):
                logging.getLogger(name).addFilter(_SilenceTimeoutWarning())
            _mv_ready = True
    return math_verify


def _math_verify_equal_unbounded(answer: str, gold: str) -> bool | None:
    """math-verify comparison with its signal timeouts off. None when either side does not parse."""
    math_verify = _load_math_verify()
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    def parse(text: str) -> list[Any]:
        # Boxing the bare answer makes the LaTeX extractor take all of it (math-verify's advice
        # for LaTeX gold); `$...$` is the second chance for content a box does not parse.
        for wrapped in (f"\\boxed{{{text}}}", f"${text}$"):
            parsed = math_verify.parse(wrapped, extraction_config=config,
                                       parsing_timeout=None)  # type: ignore[arg-type]
            if parsed:
                return parsed
        return []

    gold_parsed = parse(gold)
    answer_parsed = parse(answer)
    if not gold_parsed or not answer_parsed:
        return None
    return bool(math_verify.verify(gold_parsed, answer_parsed, timeout_seconds=None))


def _can_use_local_timer() -> bool:
    """True when a SIGALRM interval timer can be used here without disturbing the caller's."""
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    )


def _math_verify_equal_local(answer: str, gold: str, timeout: float) -> bool | None:
    """`_math_verify_equal_unbounded` under an interval timer (main thread only)."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Deadline

    _load_math_verify()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return _math_verify_equal_unbounded(answer, gold)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
        logger.warning("math-verify gave up after %.1f s comparing %.80r with gold %.80r",
                       timeout, answer, gold)
        return False
    finally:
        signal.signal(signal.SIGALRM, previous)


class _Helper:
    """A subprocess that compares answers in its own main thread, so its timer works."""

    def __init__(self, timeout: float) -> None:
        src_dir = str(Path(__file__).resolve().parents[2])  # src/, above dail/evaluation/
        env = dict(os.environ)
        # The helper must import this very `dail`, even when it is only on the caller's sys.path.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src_dir, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from dail.evaluation.grading import _helper_main; _helper_main()",
             str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        self._buffer = b""
        if self._read_line(_STARTUP_TIMEOUT_SECONDS) != {"ready": True}:
            self.kill()
            raise RuntimeError("the math-verify helper process failed to start")

    def _read_line(self, timeout: float) -> Any:
        """One JSON line from the helper, or None on timeout or exit."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def compare(self, answer: str, gold: str, timeout: float) -> bool | None:
        """Result of the comparison; raises TimeoutError when the helper does not answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"answer": answer, "gold": gold}).encode() + b"\n")
        self.proc.stdin.flush()
        reply = self._read_line(timeout + _KILL_GRACE_SECONDS)
        if reply is None:
            raise TimeoutError
        return reply["equal"]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """Let an idle helper exit on end of input (kill it if it does not)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=_KILL_GRACE_SECONDS)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()


_idle_helpers: list[_Helper] = []
_helpers_lock = threading.Lock()


@atexit.register
def _close_helpers() -> None:
    with _helpers_lock:
        helpers, _idle_helpers[:] = list(_idle_helpers), []
    for helper in helpers:
        helper.close()


def _math_verify_equal_in_helper(answer: str, gold: str, timeout: float) -> bool | None:
    with _helpers_lock:
        helper = _idle_helpers.pop() if _idle_helpers else None
    if helper is None:
        helper = _Helper(timeout)
    try:
        result = helper.compare(answer, gold, timeout)
    except (TimeoutError, BrokenPipeError, OSError):
        # Stuck (or dead) helper: it cannot be interrupted, so it is replaced.
        helper.kill()
        logger.warning("math-verify helper killed after %.1f s comparing %.80r with gold %.80r",
                       timeout, answer, gold)
        return False
    with _helpers_lock:
        _idle_helpers.append(helper)
    return result


def _helper_main() -> None:
    """Entry point of the helper subprocess: JSON lines in, JSON lines out."""
    timeout = float(sys.argv[1])
    _math_verify_equal_unbounded("0", "0")  # import and warm up before saying ready
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        equal = _math_verify_equal_local(request["answer"], request["gold"], timeout)
        out.write(json.dumps({"equal": equal}).encode() + b"\n")
        out.flush()


def math_verify_equal(answer: str, gold: str, *,
                      timeout: float = MATH_TIMEOUT_SECONDS) -> bool | None:
    """Compare two answers with math-verify, from any thread, in bounded time.

    Args:
        answer: Extracted model answer (box content).
        gold: Gold answer (LaTeX or plain).
        timeout: Wall-clock bound in seconds; past it the answers count as not equal.

    Returns:
        True/False from math-verify, or None when either side cannot be parsed.

    Raises:
        ValueError: if `timeout` is not positive.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if _can_use_local_timer():
        return _math_verify_equal_local(answer, gold, timeout)
    if not hasattr(signal, "setitimer"):  # pragma: no cover -- Windows: no timer anywhere
        return _math_verify_equal_unbounded(answer, gold)
    return _math_verify_equal_in_helper(answer, gold, timeout)


# --------------------------------------------------------------------------- graders


def _gold_content(gold: str) -> str:
    """Gold answers are box contents; accept a boxed gold as well."""
    boxed = last_boxed(gold) if "\\boxed" in gold or "\\fbox" in gold else None
    return boxed if boxed is not None else gold.strip()


def grade_math(response: str, gold: str) -> bool:
    """True when the response's last boxed answer equals `gold` mathematically.

    Tries normalised string equality, then math-verify (gold first); when math-verify cannot
    parse a side, the string result stands. No box means False.
    """
    answer = extract_answer(response)
    if answer is None:
        return False
    gold = _gold_content(gold)
    if answers_match_exact(answer, gold):
        return True
    return bool(math_verify_equal(answer, gold))


def grade_exact(response: str, gold: str) -> bool:
    """True when the response's last boxed answer equals `gold` after `normalize_answer`."""
    answer = extract_answer(response)
    return answer is not None and answers_match_exact(answer, _gold_content(gold))


GRADERS: dict[str, Grader] = {"math": grade_math, "exact": grade_exact}
# Graders that live outside the library, by name and `module:function`; a name is resolved on
# first use, so the library depends on none of them.
PLUGIN_GRADERS: dict[str, str] = {"world": "dail.world.scoring:grade"}


def get_grader(name: str) -> Grader:
    """A grader by registered name or as `module:function`.

    Args:
        name: A key of `GRADERS` or `PLUGIN_GRADERS`, or `package.module:function` for a
            callable `(response, gold) -> bool`.

    Returns:
        The grader.

    Raises:
        ValueError: if the name is neither registered nor an importable callable.
    """
    if name in GRADERS:
        return GRADERS[name]
    name = PLUGIN_GRADERS.get(name, name)
    choices = ", ".join(sorted(GRADERS | PLUGIN_GRADERS))
    if ":" not in name:
        raise ValueError(f"unknown grader {name!r}; choose one of {choices} "
                         "or give 'module:function'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"grader {name!r}: cannot import module {module_name!r} ({e}); "
                         f"registered graders: {choices}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"grader {name!r}: {module_name} has no callable {attr!r}; "
                         f"registered graders: {choices}")
    return fn


def grade(response: str, gold: str, *, grader: str = "math") -> bool:
    """Whether `response` answers correctly, judged against `gold`.

    Args:
        response: Model output; its answer is the last `\\boxed{...}`.
        gold: Gold answer.
        grader: Name in `GRADERS` or `module:function`.

    Returns:
        True when correct; False when wrong or when the response has no boxed answer.

    Raises:
        ValueError: for an unknown grader.
    """
    return get_grader(grader)(response, gold)
