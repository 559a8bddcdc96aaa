"""Problems in, records out.

Input problems come from JSONL, JSON (a list of objects, or an object with a "data" list) or a
directory saved with `datasets.Dataset.save_to_disk`. Each holds `id`, `problem`, `solution` and
an optional `answer`. Without `answer`, the gold answer is the last `\\boxed{...}` of the solution;
with neither, the problem is unverifiable (proof-style).

Every rejection raises `DataError` naming the file, the line (or record index) and the field,
before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

RecordT = TypeVar("RecordT", bound=Mapping[str, Any])

REQUIRED_FIELDS = ("id", "problem", "solution")
_BOX_COMMANDS = ("\\boxed", "\\fbox")


class Interrupted(KeyboardInterrupt):
    """A stop by the user, with what rerunning the command will do (when it is not resuming
    where the work stopped)."""


class DataError(ValueError):
    """Input that cannot be used; the message names file, line and field."""


@dataclass(frozen=True)
class Problem:
    """One problem with its expert solution.

    Attributes:
        id: Unique identifier (string; integers in the input are converted).
        problem: Problem statement shown to every role.
        solution: Expert (reference) solution, shown only to the privileged role.
        answer: Gold final answer, or None when the problem is unverifiable.
        meta: Any other fields of the input record, passed through untouched.
    """

    id: str
    problem: str
    solution: str
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def verifiable(self) -> bool:
        return self.answer is not None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "problem": self.problem, "solution": self.solution,
                "answer": self.answer, **self.meta}


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces handled.

    Returns None when there is no complete box. `\\boxed 5` (no braces) yields "5". Runs in
    linear time: braces are matched in one pass, so text full of unclosed boxes stays cheap.
    """
    starts = [m.end() for m in _BOX_PATTERN.finditer(text)]
    if not starts:
        return None
    closing = _matching_braces(text)
    for pos in reversed(starts):
        content = _braced_argument(text, pos, closing)
        if content is not None:
            return content.strip()
        # An unclosed box: look for an earlier, complete one.
    return None


_BOX_PATTERN = re.compile("|".join(re.escape(c) for c in _BOX_COMMANDS))


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each `{` -> position of its `}`; braces after a backslash are literal."""
    stack: list[int] = []
    closing: dict[int, int] = {}
    for m in re.finditer(r"[{}]", text):
        i = m.start()
        if i > 0 and text[i - 1] == "\\":
            continue
        if m.group() == "{":
            stack.append(i)
        elif stack:
            closing[stack.pop()] = i
    return closing


def _braced_argument(text: str, pos: int, closing: dict[int, int]) -> str | None:
    """The `{...}` argument starting at `pos` (after optional spaces), or a bare token."""
    while pos < len(text) and text[pos] == " ":
        pos += 1
    if pos >= len(text):
        return None
    if text[pos] != "{":
        end = pos
        while end < len(text) and not text[end].isspace() and text[end] not in "$}":
            end += 1
        return text[pos:end] or None
    end = closing.get(pos)
    return None if end is None else text[pos + 1 : end]


# --------------------------------------------------------------------------- loading


def load_problems(path: str | os.PathLike[str]) -> list[Problem]:
    """Load and validate problems from JSONL, JSON or a saved `datasets` directory.

    Raises:
        DataError: on a missing file, malformed line, missing/empty/non-string field,
            duplicate id or text that is not UTF-8. The message names file, line and field.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        rows = _rows_from_datasets_dir(path)
    elif path.suffix == ".json":
        rows = _rows_from_json(path)
    else:
        rows = iter_jsonl(path)
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        problem = _problem_from_row(row, where)
        if problem.id in seen:
            raise DataError(f"{where}: field 'id': duplicate id {problem.id!r} "
                            f"(first seen at {seen[problem.id]})")
        seen[problem.id] = where
        problems.append(problem)
    if not problems:
        raise DataError(f"{path}: no problems found")
    return problems


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[str, Any]]:
    """Yield ("file:line", parsed value) for every non-blank line; bad lines raise DataError."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                # Editors on Windows start files with a byte-order mark; it is not part of the JSON.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte {e.start})") from None
            # Without its line ending, a cut-off line breaks where it ends, not at column 1 of
            # the next line.
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON: {_json_problem(e, line)}") from None


def _json_problem(error: json.JSONDecodeError, line: str) -> str:
    """The parser's complaint and where on the line it arose; a line that simply stops is
    called truncated."""
    where = f"column {error.colno}"
    if error.pos >= len(line.rstrip()) or error.msg.startswith("Unterminated string"):
        where += f" (the line ends at column {len(line)}: truncated?)"
    return f"{error.msg} at {where}"


def _rows_from_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of problems (or an object with a 'data' list)")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _rows_from_datasets_dir(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a saved `datasets` directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise DataError(f"{path}: holds splits {list(ds)}; point at one split's directory")
        ds = next(iter(ds.values()))
    for i, row in enumerate(ds):
        yield f"{path}[{i}]", row


def _problem_from_row(row: Any, where: str) -> Problem:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    values: dict[str, str] = {}
    for key in REQUIRED_FIELDS:
        if key not in row or row[key] is None:
            raise DataError(f"{where}: missing field {key!r}")
        value = row[key]
        if key == "id" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{where}: field {key!r} is empty")
        values[key] = value
    answer = row.get("answer")
    if answer is not None:
        if isinstance(answer, int | float) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise DataError(f"{where}: field 'answer' must be a string, got {type(answer).__name__}")
        answer = answer.strip() or None
        if answer is None:
            raise DataError(f"{where}: field 'answer' is empty (omit it for unverifiable problems)")
    else:
        answer = last_boxed(values["solution"])
    meta = {k: v for k, v in row.items() if k not in (*REQUIRED_FIELDS, "answer")}
    return Problem(id=values["id"], problem=values["problem"], solution=values["solution"],
                   answer=answer, meta=meta)


def load_champ() -> list[Problem]:
    """The CHAMP competition problems (270, MIT licence) with their step-by-step solutions.

    Needs the optional extra: `pip install 'dail[champ]'`.
    """
    try:
        import champ_dataset
    except ImportError:
        raise DataError("the CHAMP loader needs `pip install 'dail[champ]'`") from None
    dataset = champ_dataset.load("v0")
    problems = []
    for pid, p in dataset.problems.items():
        steps = "\n".join(step.text for step in p.solution.steps)
        problems.append(Problem(id=pid, problem=p.text, solution=steps,
                                answer=p.answer.strip() or None,
                                meta={"category": p.category}))
    return problems


def resolve_problems(source: str | os.PathLike[str]) -> list[Problem]:
    """`load_problems`, plus the built-in source name `champ`."""
    if str(source) == "champ":
        return load_champ()
    return load_problems(source)


# --------------------------------------------------------------------------- records


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL file of records (traces, samples); errors name file and line."""
    records = []
    for where, row in iter_jsonl(Path(path)):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        records.append(row)
    return records


def group_by_problem(records: Iterable[RecordT]) -> dict[str, list[RecordT]]:
    """Records (traces, samples) by their problem's `id`, in the order they come."""
    groups: dict[str, list[RecordT]] = {}
    for record in records:
        groups.setdefault(str(record["id"]), []).append(record)
    return groups


def write_jsonl_atomic(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> None:
    """Write records to `path` via a temporary file and rename: readers never see half a file."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file readable by its owner only; the final file gets the mode
        # any other new file would (0644 under the usual umask 022).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (only readable by setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def match_umask(root: Path) -> None:
    """Give `root` and everything under it the modes the user's umask gives a new file or
    folder: libraries that write weights through private temporary files (`safetensors`,
    `torch.save`, `tempfile`) leave them readable by their owner alone."""
    mask = _umask()
    folder_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if not path.is_symlink():
            path.chmod(folder_mode if path.is_dir() else file_mode)


def save_dir_atomic(final: Path, save: Callable[[Path], Any]) -> Path:
    """`save(dir)` into a temporary sibling directory, then swap it in for `final`: readers see
    the old directory or the new one whole, never a half-written one (a failed save leaves the
    old one in place). Its files get the user's umask, whatever wrote them."""
    tmp = final.with_name(f".{final.name}.tmp")
    old = final.with_name(f".{final.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        save(tmp)
        match_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
