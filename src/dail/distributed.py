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

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dail.config import ConfigError

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


def launch_rank(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) set by accelerate launch / torchrun; (0, 1) otherwise."""
    env = os.environ if env is None else env
    try:
        return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    except ValueError:
        return 0, 1


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
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState()  # joins the process group the launcher described (gloo on the CPU)
    dist.barrier()


# --------------------------------------------------------------------------- training strategies


def training_strategy(args: Any, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What the Trainer will do: {"deepspeed_stage": int | None, "fsdp_version": int | None}."""
    env = os.environ if env is None else env
    stage = None
    ds = getattr(args, "deepspeed", None)
    if ds:
        stage = _zero_stage(ds)
    elif _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        stage = int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"]) if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") \
            else _zero_stage(env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
    fsdp = None
    if getattr(args, "fsdp", None):
        config = getattr(args, "fsdp_config", None) or {}
        fsdp = int(config.get("version", config.get("fsdp_version", 1)))
    elif _true(env.get("ACCELERATE_USE_FSDP")):
        fsdp = int(env.get("FSDP_VERSION", "1"))
    return {"deepspeed_stage": stage, "fsdp_version": fsdp}


def check_training_strategy(args: Any, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Refuse, before any model loads, the strategies known to break DAIL's teacher passes.

    The privileged and negative-reference passes run the student's own frozen base weights a
    second and third time per step, adapter disabled, without gradients, through the unwrapped
    model, between the student's forward and backward.

    - DeepSpeed ZeRO-3 with a teacher loss (dail, kl): parameters are partitioned and gathered
      module by module by hooks that trace the forward order; the extra passes break that
      bookkeeping and the adapter toggling, which is why TRL loads a separate reference model
      under ZeRO-3 instead of disabling the adapter. Use ZeRO-2 (LoRA's optimizer state is tiny,
      so ZeRO-3 saves only the frozen base's copy) or FSDP2.
    - FSDP version 1 with a teacher loss: the root unit's parameters (embeddings, final norm,
      LM head) stay sharded outside the FSDP wrapper, so a forward pass of the unwrapped model
      reads flat shards. Use FSDP version 2 (`fully_shard` hooks the modules themselves).

    Returns:
        The strategy (see `training_strategy`).

    Raises:
        ConfigError: a refused combination, with the reason and the alternative.
    """
    strategy = training_strategy(args, env)
    teacher = getattr(args, "uses_teacher", False)
    if teacher and strategy["deepspeed_stage"] == 3:
        raise ConfigError(
            f"DeepSpeed ZeRO-3 cannot run the {args.loss} loss: the privileged and negative-"
            "reference passes reuse the student's partitioned base weights with the LoRA adapter "
            "disabled, extra forward passes that ZeRO-3's gather/release hooks do not support. "
            "Use configs/accelerate/deepspeed_zero2.yaml (LoRA's optimizer state is tiny, so "
            "ZeRO-3 would only save the frozen base's copy) or configs/accelerate/fsdp.yaml "
            "(FSDP version 2); the nll and sft losses do run under ZeRO-3")
    if teacher and strategy["fsdp_version"] == 1:
        raise ConfigError(
            f"FSDP version 1 cannot run the {args.loss} loss: the teacher passes call the "
            "unwrapped model, whose root parameters (embeddings, LM head) FSDP1 keeps sharded "
            "outside its wrapper. Set fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
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
