"""One typed config per stage; defaults live here and nowhere else.

YAML supplies values, command-line flags override them, and `__post_init__` rejects bad values
with a message that says how to fix them. The training stage's config (`DAILConfig`) extends
`transformers.TrainingArguments` and lives in `dail.trainer`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that cannot be used."""


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
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ConfigError(f"dtype must be auto, bfloat16, float16 or float32, not {self.dtype!r}")


@dataclass
class PromptConfig:
    """Prompt rendering (see `dail.prompts`).

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
        if self.temperature < 0:
            raise ConfigError("temperature must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError("top_k must be >= 0 (0 disables it)")
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")


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
        grader: Answer checker for selection ("math", "exact", "world" or "module:function").
        suppress_end_of_thinking: For reasoning models, forbid </think> during rollout.
        engine: "draft" (draft and verify with continuous batching) or "reference" (one
            forward over both contexts per token); both give the same traces for the same seeds.
        draft_length: Draft tokens per round of the "draft" engine (0 adapts it, and also lets
            the engine skip the student where no proposal could pass tau and check guessed
            tokens in one forward).
        shard: "i/n": compute only problems k with k mod n == i (array jobs; see
            `dail.distributed`). Does not change any output.
    """

    data: str = ""
    out: str = ""
    tau: float = 0.8
    samples: int = 32
    retries: int = 0
    keep: int = 1
    grader: str = "math"
    suppress_end_of_thinking: bool = True
    engine: str = "draft"
    draft_length: int = 0
    shard: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.tau <= 1:
            raise ConfigError(f"tau must be in [0, 1], not {self.tau}")
        if self.samples < 1 or self.keep < 1 or self.retries < 0:
            raise ConfigError("samples and keep must be >= 1, retries >= 0")
        _check_shard(self.shard)


@dataclass
class EvalConfig:
    """Stage 3: sampling n answers per problem and scoring them.

    Attributes:
        adapter: PEFT adapter directory applied on top of the model (None: base or merged model).
        samples_file: Score samples produced elsewhere (JSONL with id, text) without a model.
        n: Samples per problem.
        budgets: Token budgets for accuracy-under-budget.
        shard: "i/n": sample only problems k with k mod n == i (see GenerateConfig.shard).
    """

    data: str = ""
    out: str = ""
    adapter: str | None = None
    samples_file: str | None = None
    n: int = 128
    grader: str = "math"
    budgets: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])
    shard: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError("n must be >= 1")
        _check_shard(self.shard)


def _check_shard(shard: str | None) -> None:
    from dail.distributed import parse_shard

    parse_shard(shard)


@dataclass
class TrainConfig:
    """Stage 2: LoRA training of the student.

    Attributes:
        traces: Trace records from `dail generate` (selected.jsonl), for losses dail/kl/nll.
        data: Problems with expert solutions, for the sft baseline.
        out: Output directory (adapter/, checkpoints/, merged/).
        loss / gamma: Shortcuts for the same fields of `training`.
        training: Any `dail.trainer.DAILConfig` (i.e. `TrainingArguments`) field.
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
        if self.loss not in ("dail", "kl", "nll", "sft"):
            raise ConfigError(f"loss must be dail, kl, nll or sft, not {self.loss!r}")


# --------------------------------------------------------------------------- loading


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys by name."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    if cls is not ModelConfig:
        values = model_shorthand(values)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
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
