"""The Trainer's arguments (`DAILConfig`) from a training stage's config, and the LoRA targets
it may name, both checked before any model loads."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from dail.config import ConfigError, TrainConfig, check_types, unknown_keys

logger = logging.getLogger(__name__)


def training_arguments(cfg: TrainConfig, out: Path | None = None) -> Any:
    """The Trainer's arguments (`DAILConfig`) for the stage, checked before anything loads.

    Raises:
        ConfigError: a key that is no `TrainingArguments`/`DAILConfig` field (with the closest
            one), a value of the wrong type or out of range, or one `TrainingArguments` refuses.
    """
    from dail.training.trainer import DAILConfig

    out = Path(cfg.out) if out is None else out
    known = {f.name for f in dataclasses.fields(DAILConfig) if f.init}
    own = sorted({f.name for f in dataclasses.fields(DAILConfig)} - _TRAINING_ARGUMENT_FIELDS)
    error = unknown_keys("training", cfg.training, known, first=own,
                         shown=f"{own} and any transformers.TrainingArguments field")
    if error:
        raise error
    values: dict[str, Any] = {"output_dir": str(out / "checkpoints"), "loss": cfg.loss,
                              "gamma": cfg.gamma, **check_types("training", DAILConfig, cfg.training)}
    if torch.cuda.is_available():
        # The release trains in bf16 with gradient checkpointing; on a CPU both only cost time.
        values.setdefault("bf16", torch.cuda.is_bf16_supported())
        values.setdefault("gradient_checkpointing", True)
    if values.get("gradient_checkpointing"):
        # Re-entrant checkpointing marks LoRA parameters ready twice under DDP.
        values.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        values.setdefault("use_cpu", True)  # several CPU processes: DDP over gloo
    # Every LoRA parameter takes part in every step; searching for unused ones costs a graph walk.
    values.setdefault("ddp_find_unused_parameters", False)
    try:
        return DAILConfig(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # TrainingArguments' own checks
        raise ConfigError(f"training: {e}") from None


_TRAINING_ARGUMENT_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}


def optimizer_steps(args: Any, examples: int, world_size: int = 1) -> int:
    """The optimizer steps the Trainer will take: `max_steps`, else epochs x ceil(batches per
    process / accumulation), counted as the Trainer counts them."""
    if args.max_steps > 0:
        return int(args.max_steps)
    batches = math.ceil(examples / (args.per_device_train_batch_size * world_size))
    return max(1, math.ceil(args.num_train_epochs * math.ceil(batches / args.gradient_accumulation_steps)))


RELEASE_WARMUP_STEPS = 5


def resolve_warmup(args: Any, steps: int, *, explicit: bool) -> int:
    """Set and return the warm-up's optimizer steps for a run of `steps`.

    Unless set, the release's 5 steps, at most a tenth of the run: a short run would otherwise
    spend most of its steps, or all of them, below the learning rate asked for (the rate is 0 at
    the first step). A warm-up that is set is kept, and refused if it is not shorter than the run.

    Raises:
        ConfigError: a warm-up that was set is as long as the run or longer.
    """
    if not explicit:
        args.warmup_steps = min(RELEASE_WARMUP_STEPS, steps // 10)
        return args.warmup_steps
    warmup = args.get_warmup_steps(steps)
    if warmup >= steps:
        raise ConfigError(
            f"training: warmup_steps {args.warmup_steps:g} is {warmup} steps, not shorter than the run's {steps} "
            f"optimizer steps: the learning rate would never reach {args.learning_rate:g}; set --warmup-steps "
            f"below {steps} (a value below 1 is a share of the run), or train longer")
    if warmup > steps / 2:
        logger.warning("the warm-up takes %d of the run's %d optimizer steps: the learning rate reaches %g only "
                       "at step %d", warmup, steps, args.learning_rate, warmup + 1)
    return warmup


def check_lora_targets(model: torch.nn.Module, wanted: str | list[str]) -> None:
    """Refuse target names that are no linear layer of `model` ("all-linear" fits any model).

    Raises:
        ConfigError: naming the missing layers and the model's linear layers.
    """
    from dail.training.trainer import ALL_LINEAR

    if wanted == ALL_LINEAR:
        return
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [w for w in wanted if w not in names]
    if missing:
        raise ConfigError(f"lora_target_modules: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          f"no linear layer of this model; its linear layers are named {', '.join(sorted(names))} "
                          f"(or give {ALL_LINEAR})")
