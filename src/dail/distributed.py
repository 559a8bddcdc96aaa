"""Several processes, one result: sharding problems, merging parts, refusing broken strategies.

Generation and evaluation split the *problems* between workers. A worker is either a process
started by `accelerate launch` / `torchrun` (rank r of w, read from the environment) or one task
of a plain array job (`--shard i/n`); both combine, so an array of multi-GPU jobs works too:
global shard = i * w + r of n * w. Problem k belongs to shard k mod N. Every per-sample random
draw depends only on (seed, problem id, sample), so the merged output is byte-identical to a
one-process run whatever N is.

Each worker writes one part file per finished problem (atomically). The final files are written
once every part exists: under a launcher, rank 0 waits for the parts on disk (no collective
timeout however long the other ranks take), writes them, and all ranks meet at a barrier before
returning; in an array job, whichever shard finds every part present writes them (two shards
finishing together write identical bytes through atomic renames, so the race is harmless), and
rerunning any shard's command after all have finished merges without generating anything.

Training runs data-parallel through the `transformers.Trainer`; `check_training_strategy`
refuses, before anything loads, the strategies that break DAIL's teacher passes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dail.config import ConfigError, parse_shard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """Which problems this worker computes, and whether it writes the merged output.

    Attributes:
        index: This worker's shard, in [0, count).
        count: Number of shards.
        launched: Started by a launcher (accelerate / torchrun) with more than one process.
        rank: Rank within the launch (0 when not launched).
    """

    index: int = 0
    count: int = 1
    launched: bool = False
    rank: int = 0

    def owns(self, position: int) -> bool:
        """Does problem number `position` belong to this shard?"""
        return position % self.count == self.index

    @property
    def writes_merged(self) -> bool:
        """Under a launcher only rank 0 writes the final files; an array task writes if it can."""
        return self.rank == 0

    def describe(self) -> str:
        return "all problems" if self.count == 1 else f"shard {self.index}/{self.count}"


def launch_rank(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) set by accelerate launch / torchrun; (0, 1) otherwise."""
    env = os.environ if env is None else env
    try:
        return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    except ValueError:
        return 0, 1


def is_main_process(env: Mapping[str, str] | None = None) -> bool:
    """Rank 0 of a launch, or a process started without a launcher: the one that reports progress."""
    return launch_rank(env)[0] == 0


def current_shard(shard: str | None, env: Mapping[str, str] | None = None) -> Shard:
    """This worker's shard: the array-job shard `i/n` refined by the launcher's rank."""
    index, count = parse_shard(shard)
    rank, world = launch_rank(env)
    return Shard(index=index * world + rank, count=count * world, launched=world > 1, rank=rank)


def local_device_index(env: Mapping[str, str] | None = None) -> int | None:
    """LOCAL_RANK under a launcher (the GPU this process owns), else None."""
    env = os.environ if env is None else env
    value = env.get("LOCAL_RANK")
    return int(value) if value not in (None, "") and int(env.get("WORLD_SIZE", 1)) > 1 else None


# --------------------------------------------------------------------------- waiting and merging


def wait_for(paths: list[Path], *, poll_seconds: float = 0.5, describe: str = "parts") -> None:
    """Block until every path exists, logging progress once a minute.

    Polling the file system instead of a collective barrier means no timeout, however long the
    slowest rank takes; if a rank dies, the launcher stops the others.
    """
    last_log = time.monotonic()
    while True:
        missing = sum(not p.exists() for p in paths)
        if not missing:
            return
        if time.monotonic() - last_log > 60:
            logger.info("waiting for %d of %d %s from other processes", missing, len(paths), describe)
            last_log = time.monotonic()
        time.sleep(poll_seconds)


def barrier(shard: Shard) -> None:
    """All launched processes meet here (a no-op without a launcher)."""
    if not shard.launched:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        # Joins the process group the launcher described: NCCL on GPUs, gloo on the CPU.
        PartialState(cpu=not torch.cuda.is_available())
    dist.barrier()


# --------------------------------------------------------------------------- training strategies


def training_strategy(training: Mapping[str, Any],
                      env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What the Trainer will do: {"deepspeed_stage": int | None, "fsdp_version": int | None}.

    Args:
        training: The `TrainingArguments` values (`deepspeed`, `fsdp`, `fsdp_config`).
        env: The environment `accelerate launch` filled from its config (default: os.environ).
    """
    env = os.environ if env is None else env
    stage = None
    if training.get("deepspeed"):
        stage = _zero_stage(training["deepspeed"])
    elif _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        stage = int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"]) if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") \
            else _zero_stage(env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
    fsdp = None
    if training.get("fsdp"):
        config = training.get("fsdp_config") or {}
        fsdp = int(config.get("version", config.get("fsdp_version", 1))) if isinstance(config, dict) else 1
    elif _true(env.get("ACCELERATE_USE_FSDP")):
        fsdp = int(env.get("FSDP_VERSION", "1"))
    return {"deepspeed_stage": stage, "fsdp_version": fsdp}


def check_training_strategy(training: Mapping[str, Any], *, loss: str,
                            env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Refuse, before anything loads, the strategies known to break DAIL's teacher passes.

    The privileged and negative-reference passes run the student's own frozen base weights a
    second and third time per step, adapter disabled, without gradients, through the unwrapped
    model, between the student's forward and backward (losses dail and kl; nll and sft have no
    teacher and are not refused).

    - DeepSpeed ZeRO-3 with a teacher loss: parameters are partitioned and gathered module by
      module by hooks that trace the forward order; the extra passes through the unwrapped
      module break that bookkeeping, which is why TRL loads a separate reference model under
      ZeRO-3 instead of disabling the adapter. Use ZeRO-2 (LoRA's optimizer state is tiny, so
      ZeRO-3 would save only the frozen base's copy) or FSDP2.
    - FSDP version 1 with a teacher loss: the root unit's parameters (embeddings, final norm,
      LM head) stay flat shards outside the FSDP wrapper, so a forward pass of the unwrapped
      model reads shards. Use FSDP version 2 (`fully_shard` hooks the modules themselves).

    Args:
        training: The `TrainingArguments` values the user gave.
        loss: The training loss.
        env: The environment (default: os.environ).

    Returns:
        The strategy (see `training_strategy`).

    Raises:
        ConfigError: a refused combination, with the reason and the alternative.
    """
    strategy = training_strategy(training, env)
    if strategy["deepspeed_stage"] is not None and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("this launch asks for DeepSpeed, which is not installed: "
                          "pip install deepspeed (or launch with a DDP/FSDP config)")
    teacher = loss in ("dail", "kl")
    if teacher and strategy["deepspeed_stage"] == 3:
        raise ConfigError(
            f"DeepSpeed ZeRO-3 cannot run the {loss} loss: the privileged and negative-reference "
            "passes reuse the student's partitioned base weights with the LoRA adapter disabled, "
            "extra forward passes of the unwrapped model that ZeRO-3's parameter gathering does "
            "not support. Use configs/accelerate/deepspeed_zero2.yaml (LoRA's optimizer state is "
            "tiny, so ZeRO-3 would only save the frozen base's copy) or configs/accelerate/"
            "fsdp.yaml (FSDP version 2); the nll and sft losses do run under ZeRO-3")
    if teacher and strategy["fsdp_version"] == 1:
        raise ConfigError(
            f"FSDP version 1 cannot run the {loss} loss: the teacher passes call the unwrapped "
            "model, whose root parameters (embeddings, LM head) FSDP1 keeps sharded outside its "
            "wrapper. Use FSDP version 2 (fsdp_version: 2, as in configs/accelerate/fsdp.yaml)")
    return strategy


def _zero_stage(config: Any) -> int | None:
    if isinstance(config, dict):
        data = config
    elif config and Path(str(config)).is_file():
        try:
            data = json.loads(Path(str(config)).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config}: invalid DeepSpeed JSON: {e}") from None
    else:
        return None
    stage = (data.get("zero_optimization") or {}).get("stage")
    return int(stage) if stage is not None else None


def _true(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")
