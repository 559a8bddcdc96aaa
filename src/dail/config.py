"""One typed config per stage; defaults live here and nowhere else.

YAML supplies values, command-line flags override them, and `__post_init__` rejects bad values
with a message that says how to fix them. The training stage's config (`DAILConfig`) extends
`transformers.TrainingArguments` and lives in `dail.training.trainer`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that cannot be used."""


# The flag of each numeric setting that has one (errors name the flag; other settings by key).
_FLAGS = {"num_train_epochs": "--epochs"} | {key: "--" + key.replace("_", "-") for key in (
    "tau", "samples", "retries", "keep", "draft_length", "max_new_tokens", "temperature", "top_p",
    "top_k", "seed", "batch_size", "max_prompt_tokens", "gamma", "learning_rate", "max_length",
    "teacher_cache_gb", "n", "problems", "seeds", "tensor_parallel_size")}

# Sampling backends (`dail.rollout.backend`): auto is vLLM where it is installed and a GPU is
# present, else the built-in engine.
BACKENDS = ("auto", "builtin", "vllm")


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
        import argparse

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
        import argparse

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


def parse_shard(text: str | None) -> tuple[int, int]:
    """`"i/n"` -> (i, n); None -> (0, 1).

    Raises:
        ConfigError: not two integers with 0 <= i < n.
    """
    if text is None or text == "":
        return 0, 1
    try:
        index, count = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"shard must look like i/n (e.g. 0/4), not {text!r}") from None
    if not 0 <= index < count:
        raise ConfigError(f"shard {text!r}: need 0 <= i < n (shards are numbered from 0)")
    return index, count


def resolve_divergence(divergence: str | None, kl_direction: str | None = None) -> str:
    """The divergence named by the setting or by its older name `kl_direction`, in one spelling
    ("jsd:0.50" -> "jsd:0.5"); "reverse" when neither is given.

    Raises:
        ConfigError: e.g. "--divergence 'jsd:1.5': not a divergence; allowed: reverse, forward,
            or jsd:BETA with BETA in [0, 1]", or the two names asking for different divergences.
    """
    from dail.training.loss import DIVERGENCES, canonical_divergence, divergence_beta

    if kl_direction is not None:
        check_choice("kl_direction", kl_direction, ("reverse", "forward"))
    given = divergence if divergence is not None else kl_direction or "reverse"
    try:
        resolved = canonical_divergence(given)
    except ValueError:
        raise ConfigError(f"--divergence {given!r}: not a divergence; allowed: {DIVERGENCES}") from None
    if kl_direction is not None and divergence_beta(resolved) != divergence_beta(kl_direction):
        raise ConfigError(f"--kl-direction {kl_direction!r} (the older name of --divergence) contradicts "
                          f"--divergence {divergence!r}; give --divergence alone")
    return resolved


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


def check_types(where: str, cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Refuse a value whose type does not fit its dataclass field, naming key and value.

    YAML 1.1 reads `2e-4` (no dot) as text, so a number field takes a string that is a number.

    Returns:
        The values, such strings as numbers.

    Raises:
        ConfigError: e.g. "train.yaml: training: learning_rate: 'fast' is not a number".
    """
    hints = typing.get_type_hints(cls)
    values = {key: _number_from_text(value, hints.get(key, Any)) for key, value in values.items()}
    for key, value in values.items():
        problem = "a mapping" if hints.get(key) is _NESTED.get(key) and not isinstance(value, dict) else \
            type_problem(value, hints.get(key, Any))
        if problem:
            raise ConfigError(f"{where}: {key}: {value!r} is not {problem}")
    return values


def _number_from_text(value: Any, hint: Any) -> Any:
    if isinstance(value, str) and (hint is float or float in typing.get_args(hint)):
        try:
            return float(value)
        except ValueError:
            return value
    return value


@dataclass
class ModelConfig:
    """How to load the base model (shared by every stage).

    Attributes:
        model: Hugging Face model id, local directory, GGUF file (or a directory holding one),
            or a packaged model's name (`smollm2`); see `dail.models.resolve_model`.
        dtype: "auto" (bf16 on a GPU that supports it, else float32), "bfloat16", "float16",
            "float32".
        device: "auto", "cpu", "cuda", "cuda:1", ...
        trust_remote_code: Run code shipped with the model; off unless asked.
    """

    model: str = ""
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, ("auto", "bfloat16", "float16", "float32"))
        check_device(self.device)


def check_device(device: str) -> None:
    """Refuse a device that this machine or this build of torch does not have.

    Raises:
        ConfigError: e.g. "--device cuda: this torch has no CUDA device (a CPU build, or no GPU)".
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


@dataclass
class PromptConfig:
    """Prompt rendering (see `dail.rollout.prompts`).

    Attributes:
        student_template / privileged_template / negative_template: Files replacing the default
            user-message templates ({problem}, {solution}, {answer}, {waypoints}, {hints}).
        waypoints: Waypoint extractor name ("math", "none") or "module:function".
        thinking: Open the assistant turn with <think>; None detects from the tokenizer.
        system_prompt: Optional system message for all roles.
        max_prompt_tokens: Longest privileged prompt; longer expert solutions are shortened
            (trailing "Solution k:" blocks dropped) or the problem skipped. None = model context
            minus the token budget.
    """

    student_template: str | None = None
    privileged_template: str | None = None
    negative_template: str | None = None
    waypoints: str = "math"
    thinking: bool | None = None
    system_prompt: str | None = None
    max_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        check_range("max_prompt_tokens", self.max_prompt_tokens, low=1)


@dataclass
class SamplingConfig:
    """Sampling settings shared by rollout and evaluation (the release's defaults)."""

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 2048
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        check_range("temperature", self.temperature, low=0)  # 0 is greedy
        check_range("top_p", self.top_p, low=0, high=1, low_open=True)
        check_range("top_k", self.top_k, low=0)  # 0 disables it
        check_range("max_new_tokens", self.max_new_tokens, low=1)
        check_range("batch_size", self.batch_size, low=1)
        check_range("seed", self.seed, low=0)


@dataclass
class GenerateConfig:
    """Stage 1: mixed-policy rollout and selection.

    Attributes:
        data: Problems (JSONL, JSON, `datasets` directory, or "champ").
        out: Output directory (traces.jsonl, selected.jsonl).
        tau: Acceptance threshold on the privileged probability of the student's proposal.
            0 = pure student sampling, 1 = pure privileged sampling ("direct sampling").
        samples: Traces per problem.
        retries: Extra student proposals tried before the privileged model samples (release: 0 or 5).
        keep: Traces kept per problem by selection.
        keep_unfinished: Let selection keep traces that hit the token budget (a correct answer
            cut off mid-solution, a proof never ended); by default it keeps finished ones only.
        grader: Answer checker for selection ("math", "exact", "world" or "module:function").
        suppress_end_of_thinking: For reasoning models, forbid </think> during rollout.
        engine: "draft" (draft and verify with continuous batching) or "reference" (one
            forward over both contexts per token); both give the same traces for the same seeds.
        draft_length: Draft tokens per round of the "draft" engine (0 adapts it, and also lets
            the engine skip the student where no proposal could pass tau and check guessed
            tokens in one forward).
        shard: "i/n": compute only problems k with k mod n == i (array jobs; see
            `dail.distributed`). Does not change any output.
        backend: "builtin" (the built-in engine on `transformers` forwards), "vllm", or "auto"
            (vLLM where it is installed and a GPU is present, else builtin); same traces for the
            same seeds, up to float noise (`dail.rollout.backend`).
        tensor_parallel_size: GPUs one vLLM engine spreads the model over (vllm only).
    """

    data: str = ""
    out: str = ""
    tau: float = 0.8
    samples: int = 32
    retries: int = 0
    keep: int = 1
    keep_unfinished: bool = False
    grader: str = "math"
    suppress_end_of_thinking: bool = True
    engine: str = "draft"
    draft_length: int = 0
    shard: str | None = None
    backend: str = "auto"
    tensor_parallel_size: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        check_range("tau", self.tau, low=0, high=1)
        check_range("samples", self.samples, low=1)
        check_range("keep", self.keep, low=1)
        check_range("retries", self.retries, low=0)
        check_range("draft_length", self.draft_length, low=0)
        check_choice("engine", self.engine, ("draft", "reference"))
        parse_shard(self.shard)
        check_backend(self)


def check_backend(cfg: Any) -> None:
    check_choice("backend", cfg.backend, BACKENDS)
    check_range("tensor_parallel_size", cfg.tensor_parallel_size, low=1)


@dataclass
class EvalConfig:
    """Stage 3: sampling n answers per problem and scoring them.

    Attributes:
        adapter: PEFT adapter directory applied on top of the model (None: base or merged model).
        samples_file: Score samples produced elsewhere (JSONL with id, text) without a model.
        allow_other_base: Apply an adapter to a `--model` whose weights differ from those of the
            base it was trained on (refused by default: the tokenizer and architecture may match,
            as between a base model and its instruct version, and the results mean nothing).
        n: Samples per problem.
        budgets: Token budgets for accuracy-under-budget, each at most `max_new_tokens` (None:
            an eighth, a quarter, a half and all of it).
        shard: "i/n": sample only problems k with k mod n == i (see GenerateConfig.shard).
        backend: "builtin" (the built-in engine on `transformers` forwards), "vllm", or "auto"
            (vLLM where it is installed and a GPU is present, else builtin); same traces for the
            same seeds, up to float noise (`dail.rollout.backend`).
        tensor_parallel_size: GPUs one vLLM engine spreads the model over (vllm only).
    """

    data: str = ""
    out: str = ""
    adapter: str | None = None
    samples_file: str | None = None
    allow_other_base: bool = False
    n: int = 128
    grader: str = "math"
    budgets: list[int] | None = None
    shard: str | None = None
    backend: str = "auto"
    tensor_parallel_size: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        check_range("n", self.n, low=1)
        budget = self.sampling.max_new_tokens
        if self.budgets is None:
            self.budgets = sorted({max(1, budget // d) for d in (8, 4, 2, 1)})
        for value in self.budgets:
            check_range("budgets", value, low=1)
        if self.budgets and max(self.budgets) > budget:
            raise ConfigError(f"--budgets {max(self.budgets)}: above --max-new-tokens {budget}, where every "
                              "response ends")
        parse_shard(self.shard)
        check_backend(self)


@dataclass
class ProbeConfig:
    """`dail probe`: does Stage 1 work for this model and these problems?

    The same problems are rolled out at tau 0 (the student alone), at `tau` (mixed) and at tau 1
    (direct sampling from the privileged prompt), and every text, the expert solutions included,
    is scored under the student's problem-only prompt (see `dail.stages.probe`).

    Attributes:
        data: Problems (JSONL, JSON, `datasets` directory, or "champ").
        out: Output directory (probe.json, probe.md, traces/, parts/).
        problems: At most this many problems, a sample drawn with `sampling.seed` when the data
            holds more.
        samples: Traces per problem and source.
        tau: Acceptance threshold of the mixed source, strictly between 0 and 1 (0 and 1 are
            the student and direct sources themselves).
        grader: Answer checker for `answer_match` (see `GenerateConfig.grader`).
        suppress_end_of_thinking: For reasoning models, forbid </think> (as `dail generate`).
        engine: Scheduling of the mixed rollout (see `GenerateConfig.engine`); same traces.
        backend: "builtin" (the built-in engine on `transformers` forwards), "vllm", or "auto"
            (vLLM where it is installed and a GPU is present, else builtin); same traces for the
            same seeds, up to float noise (`dail.rollout.backend`).
        tensor_parallel_size: GPUs one vLLM engine spreads the model over (vllm only).
    """

    data: str = ""
    out: str = ""
    problems: int = 20
    samples: int = 4
    tau: float = 0.8
    grader: str = "math"
    suppress_end_of_thinking: bool = True
    engine: str = "draft"
    backend: str = "auto"
    tensor_parallel_size: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        check_range("problems", self.problems, low=1)
        check_range("samples", self.samples, low=1)
        check_range("tau", self.tau, low=0, high=1, low_open=True, high_open=True)
        check_choice("engine", self.engine, ("draft", "reference"))
        check_backend(self)


@dataclass
class TrainConfig:
    """Stage 2: LoRA training of the student.

    Attributes:
        traces: Trace records from `dail generate` (selected.jsonl), for losses dail/kl/nll.
        data: Problems with expert solutions, for the sft baseline.
        out: Output directory (adapter/, checkpoints/, merged/).
        loss / gamma: Shortcuts for the same fields of `training`.
        training: Any `dail.training.DAILConfig` (i.e. `TrainingArguments`) field.
    """

    traces: str | None = None
    data: str | None = None
    out: str = ""
    loss: str = "dail"
    gamma: float = 0.1
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("loss", self.loss, ("dail", "kl", "nll", "sft"))
        check_range("gamma", self.gamma, low=0)  # it weights a term that is subtracted


# --------------------------------------------------------------------------- loading


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys by name."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    if cls is not ModelConfig:
        values = model_shorthand(values)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    error = unknown_keys(where, values, fields)
    if error:
        raise error
    values = check_types(where, cls, values)
    kwargs = {}
    for name, value in values.items():
        sub = _NESTED.get(name)
        kwargs[name] = from_dict(sub, value, f"{where}.{name}") if sub and isinstance(value, dict) else value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def model_shorthand(values: dict[str, Any]) -> dict[str, Any]:
    """`model: NAME` stands for `model: {model: NAME}` (the other model settings at defaults)."""
    if isinstance(values.get("model"), str):
        return {**values, "model": {"model": values["model"]}}
    return values


# Sections shared by several stages: a key of this name is always this dataclass.
_NESTED: dict[str, type] = {"model": ModelConfig, "prompts": PromptConfig, "sampling": SamplingConfig}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file; errors name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base` (None values in `override` are skipped)."""
    out = dict(base)
    for key, value in override.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (recorded beside every stage's outputs)."""
    return dataclasses.asdict(cfg)
