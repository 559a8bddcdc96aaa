"""One typed config per stage; defaults live here and nowhere else.

YAML supplies values, command-line flags override them, and `__post_init__` rejects bad values
with a message that says how to fix them. The training stage's config (`DAILConfig`) extends
`transformers.TrainingArguments` and lives in `dail.training.trainer`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

# The checks, defined with the command lines' argument types; imported from here too.
from dail.validation import (  # noqa: F401
    ConfigError,
    check_choice,
    check_device,
    check_range,
    range_problem,
    type_problem,
    unknown_keys,
)

T = TypeVar("T")


# Sampling backends (`dail.rollout.backend`): auto is vLLM where it is installed and a GPU is
# present, else the built-in engine.
BACKENDS = ("auto", "builtin", "vllm")


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
