"""The model's own logits from its final hidden states.

The memory-bounded loss (`dail.training.loss.chunked_head_loss`) applies the output head itself, chunk by
chunk, instead of asking the model for (B, T, V) logits. Some architectures do more after their
head than the projection: Gemma 2 and 3 soft-cap the logits (cap * tanh(logits / cap)), Granite
divides them by `logits_scaling`, Cohere multiplies them by `logit_scale`, Falcon-H1 by
`lm_head_multiplier`. `model_head` wraps the head with what the model's forward does, and
`check_model_head` compares the two on the last position of every training forward (whose logits
the model computes anyway), so an architecture whose transform is not known here stops the run
with a message instead of training on other logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dail.config import ConfigError


@dataclass(frozen=True)
class LogitTransform:
    """What a causal LM's forward does to its head's output: multiply by `scale`, then soft-cap
    at `softcap` (None: no cap)."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_transform(config: Any) -> LogitTransform:
    """The transform of a model with this (text) config, by the attributes the architectures
    that have one read."""
    model_type = getattr(config, "model_type", "") or ""
    scale = 1.0
    if model_type.startswith("granite") and getattr(config, "logits_scaling", None):
        scale /= config.logits_scaling
    if model_type.startswith("hyperclovax") and getattr(config, "logits_scaling", None):
        scale *= config.logits_scaling  # HyperCLOVA X multiplies by the value Granite divides by
    for name in ("logit_scale", "lm_head_multiplier"):  # Cohere; Falcon-H1
        if getattr(config, name, None) is not None:
            scale *= getattr(config, name)
    return LogitTransform(scale=float(scale), softcap=getattr(config, "final_logit_softcapping", None) or None)


class ModelHead(torch.nn.Module):
    """The output head followed by the model's logit transform; its parameters are the head's
    (a LoRA adapter on the head is trained through it)."""

    def __init__(self, head: torch.nn.Module, transform: LogitTransform):
        super().__init__()
        self.head = head
        self.transform = transform

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform(self.head(hidden))


def model_head(lm: torch.nn.Module, head: torch.nn.Module | None = None) -> ModelHead:
    """`lm`'s output head (or `head`, e.g. its adapter-free base layer) with `lm`'s transform."""
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    return ModelHead(lm.get_output_embeddings() if head is None else head, logit_transform(config))


@torch.no_grad()
def check_model_head(head: ModelHead, hidden: torch.Tensor, logits: torch.Tensor, *, model_type: str) -> None:
    """Refuse to go on when `head` applied to final hidden states (B, H) does not give the logits
    (B, V) the model's forward computed from them.

    The tolerance is a few rounding steps of the logits' largest magnitude in the head's dtype,
    far below what a missing transform changes (a soft-cap at 30 moves a logit of 3 by 0.3%).

    Raises:
        ConfigError: naming the model type and the way around it (the full-logit loss).
    """
    ours, theirs = head(hidden).float(), logits.float()
    eps = torch.finfo(hidden.dtype).eps if hidden.dtype.is_floating_point else 0.0
    tolerance = max(8 * eps, 1e-4) * float(theirs.abs().max().clamp(min=1.0))
    difference = float((ours - theirs).abs().max())
    if not difference <= tolerance:  # NaN fails too
        raise ConfigError(
            f"the chunked loss does not reproduce the logits of this {model_type} model (largest difference "
            f"{difference:.3g}): its forward transforms the output head's values in a way dail does not "
            f"know; train with training.loss_chunk_size: 0, which takes the logits from the model itself")
