"""Which engine samples: the built-in one on `transformers` forwards, or vLLM.

`open_sampler` gives a stage one object with the two calls every sampling stage makes (a mixed
rollout, plain sampling from one context), whatever the backend; both give the same traces for
the same seeds, up to float noise between their kernels (`dail.rollout.vllm_backend`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dail.config import BACKENDS, ModelConfig
from dail.rollout.rule import STUDENT, RolloutSettings, Trace
from dail.rollout.vllm_backend.engine import BackendError, resolve_backend

__all__ = ["BACKENDS", "BackendError", "Sampler", "open_sampler", "require", "resolve_backend"]

logger = logging.getLogger(__name__)


@dataclass
class Sampler:
    """A model ready to sample, on either backend.

    Attributes:
        backend: "builtin" or "vllm".
        model: The transformers model (builtin), or its layout without weights (vllm): its
            config, generation config and module shapes, for the stages' checks.
        engine: The `vllm.LLM` (vllm only).
        lora: The adapter as a `vllm.lora.request.LoRARequest` (vllm only; the built-in backend
            merges it into `model`).
        pad_id: Left-padding token of the built-in backend.
    """

    backend: str
    model: Any
    pad_id: int
    engine: Any = None
    lora: Any = None

    def mixed_rollout(self, student_prompts: list[list[int]], privileged_prompts: list[list[int]],
                      seeds: list[int], settings: RolloutSettings) -> list[Trace]:
        if self.backend == "vllm":
            from dail.rollout.vllm_backend import rollout

            return rollout.mixed_rollout(self.engine, student_prompts, privileged_prompts, seeds, settings,
                                         lora=self.lora)
        from dail.rollout.mixed import mixed_rollout

        return mixed_rollout(self.model, student_prompts, privileged_prompts, seeds, settings, pad_id=self.pad_id)

    def sample(self, prompts: list[list[int]], seeds: list[int], settings: RolloutSettings, *,
               draw: int = 0, source: str = STUDENT) -> list[Trace]:
        if self.backend == "vllm":
            from dail.rollout.vllm_backend import rollout

            return rollout.sample_responses(self.engine, prompts, seeds, settings, draw=draw, source=source,
                                            lora=self.lora)
        from dail.rollout.token_loop import sample_responses

        return sample_responses(self.model, prompts, seeds, settings, pad_id=self.pad_id, draw=draw, source=source)


def require(backend: str) -> str:
    """The backend `backend` resolves to, checked to run here before any work starts.

    Raises:
        BackendError: vLLM asked for and missing or not importable, with the fix.
    """
    resolved = resolve_backend(backend)
    if resolved == "vllm":
        from dail.rollout.vllm_backend import engine

        engine.check_available()
    return resolved


def open_sampler(backend: str, cfg: ModelConfig, tokenizer: Any, *, adapter: str | None = None,
                 check: Callable[[Any], None] | None = None, model: Any = None,
                 tensor_parallel_size: int = 1) -> Sampler:
    """Load the model (and adapter) for sampling on `backend` ("auto" resolved here).

    Args:
        check: Called with the base model (builtin) or its layout (vllm) before the adapter is
            applied and before vLLM starts, for checks that raise.
        model: The base model, already loaded (the built-in backend samples with it).

    Raises:
        BackendError: vLLM asked for and missing or unable to start, with the fix.
    """
    from dail import models

    backend = resolve_backend(backend)
    if backend == "builtin":
        model = model if model is not None else models.load_model(cfg)
        if check:
            check(model)
        if adapter:
            from dail.models import apply_adapter

            model = apply_adapter(model, adapter)
        return Sampler("builtin", model, tokenizer.pad_token_id)
    from dail.rollout.vllm_backend import engine

    engine.check_available()
    layout = models.layout(cfg)
    if check:
        check(layout)
    spec = engine.EngineSpec(model=models.resolve_model(cfg.model), dtype=engine.resolve_dtype(cfg.dtype),
                             max_lora_rank=lora_rank(adapter) if adapter else 0,
                             tensor_parallel_size=tensor_parallel_size,
                             trust_remote_code=cfg.trust_remote_code)
    llm = engine.engine(spec)
    lora = None
    if adapter:
        from vllm.lora.request import LoRARequest

        # The adapter's path keys vLLM's own cache of loaded adapters: a retrained adapter in
        # the same folder gets another id.
        lora = LoRARequest(Path(adapter).name or "adapter", _adapter_id(adapter), str(Path(adapter).resolve()))
    return Sampler("vllm", layout, tokenizer.pad_token_id, engine=llm, lora=lora)


def lora_rank(adapter: str) -> int:
    """The rank r of a PEFT adapter (its adapter_config.json)."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    return int(max([config.get("r") or 8, *(config.get("rank_pattern") or {}).values()]))


def _adapter_id(adapter: str) -> int:
    import hashlib

    from dail import provenance

    weights = sorted(Path(adapter).glob("adapter_model.*"))
    text = provenance.file_fingerprint(weights[0]) if weights else str(Path(adapter).resolve())
    return 1 + int(hashlib.sha256(text.encode()).hexdigest()[:7], 16)
