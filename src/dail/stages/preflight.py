"""What each stage checks before it loads a model or writes anything.

A stage's dataclass config already refuses unknown keys, wrong types and numbers out of range
(`dail.config`). The checks here need more than the config: the problems file is read and
validated whole, template files must exist, graders and waypoint extractors must resolve, the
training arguments must build, and the model name must name something loadable. `dail run`
runs every stage's checks before its first stage starts, so a typo in the last stage's settings
costs seconds, not a rollout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dail.config import (
    ConfigError,
    EvalConfig,
    GenerateConfig,
    ModelConfig,
    ProbeConfig,
    PromptConfig,
    TrainConfig,
)
from dail.data import DataError, Problem, resolve_problems

_TEMPLATE_FLAGS = {"student_template": "--student-template", "privileged_template": "--privileged-template",
                   "negative_template": "--negative-template"}


def check_generate(cfg: GenerateConfig) -> list[Problem]:
    """Returns:
        The problems, read and validated.
    """
    problems = resolve_problems(cfg.data)
    check_prompts(cfg.prompts)
    check_grader(cfg.grader)
    check_budget(cfg)
    return problems


def check_train(cfg: TrainConfig, *, traces_pending: bool = False) -> Any:
    """Args:
        traces_pending: The traces file is an earlier stage's output, not written yet.

    Returns:
        The Trainer's arguments (`dail.training.DAILConfig`).
    """
    from dail import distributed
    from dail.training.arguments import training_arguments

    distributed.check_training_strategy(cfg.training, loss=cfg.loss)  # before DeepSpeed is imported
    args = training_arguments(cfg)
    check_lora_targets(cfg.model, args.lora_target_modules)
    check_prompts(cfg.prompts)
    if cfg.loss == "sft":
        if not (cfg.data or cfg.traces):
            raise DataError("the sft loss trains on expert solutions: pass --data PROBLEMS")
        if cfg.data:
            resolve_problems(cfg.data)
    elif not cfg.traces:
        raise DataError(f"the {cfg.loss} loss trains on traces: pass --traces selected.jsonl")
    elif not traces_pending and not Path(cfg.traces).is_file():
        raise DataError(f"{cfg.traces}: no such traces file (--traces)")
    return args


def check_lora_targets(cfg: ModelConfig, wanted: str | list[str]) -> None:
    """Named LoRA targets must be linear layers of the model (read from its config alone)."""
    from dail.models import skeleton
    from dail.training.arguments import check_lora_targets as check
    from dail.training.trainer import ALL_LINEAR

    if wanted == ALL_LINEAR or not cfg.model:
        return
    model = skeleton(cfg)
    if model is not None:
        check(model, wanted)


def check_eval(cfg: EvalConfig, *, adapter_pending: bool = False) -> list[Problem]:
    """Args:
        adapter_pending: The adapter is an earlier stage's output, not written yet.

    Returns:
        The problems, read and validated.
    """
    problems = resolve_problems(cfg.data)
    check_grader(cfg.grader)
    if cfg.samples_file:
        if not Path(cfg.samples_file).is_file():
            raise DataError(f"{cfg.samples_file}: no such samples file (--samples)")
        return problems
    check_prompts(cfg.prompts)
    check_budget(cfg)
    if cfg.adapter and not adapter_pending and not (Path(cfg.adapter) / "adapter_config.json").is_file():
        raise DataError(f"{cfg.adapter}: not a PEFT adapter directory (no adapter_config.json; --adapter)")
    return problems


def check_probe(cfg: ProbeConfig) -> list[Problem]:
    """Returns:
        The problems, read and validated.
    """
    problems = resolve_problems(cfg.data)
    check_prompts(cfg.prompts)
    check_grader(cfg.grader)
    check_budget(cfg)
    return problems


def check_budget(cfg: GenerateConfig | EvalConfig | ProbeConfig) -> None:
    """The token budget must leave room for a prompt in the model's context, or every problem
    would be skipped as too long.

    Raises:
        ConfigError: `--max-new-tokens` is not below the model's context.
    """
    from dail.models import context_length

    budget, context = cfg.sampling.max_new_tokens, context_length(cfg.model)
    if context is not None and budget >= context:
        raise ConfigError(f"--max-new-tokens {budget}: not below the context of {cfg.model.model}, {context} tokens "
                          f"(max_position_embeddings), so no prompt would fit; set it below {context}")


def check_prompts(cfg: PromptConfig) -> None:
    from dail.rollout.prompts import get_waypoint_extractor

    for key, flag in _TEMPLATE_FLAGS.items():
        path = getattr(cfg, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such template file")
    get_waypoint_extractor(cfg.waypoints)


def check_grader(name: str) -> None:
    from dail.evaluation.grading import get_grader

    try:
        get_grader(name)
    except ValueError as e:
        raise ConfigError(f"--grader: {e}") from None


def check_model(cfg: ModelConfig) -> None:
    """The model names a local model, a GGUF file, a packaged model or a reachable hub id."""
    from dail.models import check_loadable, resolve_model

    check_loadable(resolve_model(cfg.model), trust_remote_code=cfg.trust_remote_code)
