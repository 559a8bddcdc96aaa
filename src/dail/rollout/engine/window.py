"""Attention masks of the draft engine, sliding-window layers included.

The engine (`dail.rollout.engine`) keeps one KV cache over both roles' rows and leaves *holes* in it:
slots a row did not use, masked out. Its masks are built from a (rows, slots) 0/1 slot mask, and
a query sees the valid slots up to itself. A sliding-window layer of window w lets a token see
itself and the w - 1 tokens before it; with holes a slot's index is not its position, so the
window counts *valid* slots (a slot's position is the number of valid slots before it). Every
layer keeps its whole cache (slots that left a window are never read again, but stay), so
`compact` and prompt sharing work as for full attention.

A model whose layers all attend alike (all full, or all sliding with one window: Mistral) gets
one 4D mask; one that mixes them (Gemma 2 and 3, Qwen2 with `use_sliding_window`) gets a mask
per layer type, keyed as its `config.layer_types` names them, which `transformers` models take
in place of a mask they would build. SDPA takes boolean masks, eager attention additive ones.
Layouts this cannot express (chunked or linear attention, layers sharing another's cache,
sliding layers with different windows, flash or flex attention with sliding layers) are
reported by `mask_layout`, and the rollout falls back to the token-by-token loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class MaskLayout:
    """How a model's layers attend, for the engine's masks.

    Attributes:
        windows: Each layer type's window in tokens (None: full attention), in the names of
            `config.layer_types`.
        per_type: Give a mask per layer type (a dict), not one mask for every layer.
        additive: Float masks added to the attention scores (eager attention), 0 where a slot
            is seen and the dtype's minimum where not; else boolean (SDPA).
    """

    windows: dict[str, int | None]
    per_type: bool = False
    additive: bool = False

    @property
    def windowed(self) -> bool:
        return any(w is not None for w in self.windows.values())

    def masks(self, mask: torch.Tensor, queries: int,
              dtype: torch.dtype = torch.float32) -> torch.Tensor | dict[str, torch.Tensor]:
        """The 4D mask(s) (B, 1, q, L) of a forward whose queries are the last `queries` slots of
        `mask` (B, L)."""
        built: dict[int | None, torch.Tensor] = {}
        for window in self.windows.values():
            if window not in built:
                allowed = causal_4d(mask, queries, window)
                built[window] = _additive(allowed, dtype) if self.additive else allowed
        if not self.per_type:
            return next(iter(built.values()))
        return {kind: built[window] for kind, window in self.windows.items()}


def mask_layout(model: torch.nn.Module) -> MaskLayout | str:
    """The model's `MaskLayout`, or why the engine cannot run it (one line)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    if getattr(model, "config", None) is None:  # a wrapper (tests): full attention, as it forwards
        return MaskLayout({FULL: None})
    config = model.config.get_text_config(decoder=True)
    kinds, kwargs = get_layer_types_and_kwargs(config)
    windows: dict[str, int | None] = {}
    for kind, extra in zip(kinds, kwargs, strict=True):
        if kind not in (FULL, SLIDING):
            return f"its {kind} layers"
        window = extra.get("sliding_window") if kind == SLIDING else None
        if kind == SLIDING and not window:
            return "a sliding-window layer without a window"
        if windows.setdefault(kind, window) != window:
            return f"sliding-window layers with different windows ({windows[kind]}, {window})"
    per_type = len(windows) > 1
    if per_type and getattr(config, "layer_types", None) is None:
        return "mixed layer types that its config does not name (layer_types)"
    implementation = getattr(config, "_attn_implementation", None) or getattr(model.config, "_attn_implementation", None)
    windowed = any(w is not None for w in windows.values())
    if windowed and implementation not in ("sdpa", "eager"):
        return f"sliding-window layers under {implementation} attention (the engine builds SDPA or eager masks)"
    return MaskLayout(windows, per_type=per_type, additive=implementation == "eager")


def causal_4d(mask: torch.Tensor, queries: int, window: int | None = None) -> torch.Tensor:
    """(B, L) slot mask -> (B, 1, q, L) boolean mask for the last q slots as queries.

    A query sees the valid slots up to itself, within `window` valid slots if given, and always
    itself: a hole's query then never has an empty row (whose NaNs would reach the cache), and
    holes stay invisible to every other slot.
    """
    valid = mask.bool() if mask.dtype != torch.bool else mask.clone()  # written to below
    if window is not None:
        counts = mask.cumsum(-1)  # a slot's count of valid slots up to and including it
        valid = valid[:, None, :] & (counts[:, None, :] > counts[:, -queries:, None] - window)  # (B, q, L)
    if queries == 1:  # the usual case, in fewer operations
        allowed = valid if window is None else valid[:, 0]
        allowed[:, -1] = True
        return allowed[:, None, None, :]
    width = mask.shape[1]
    allowed = (valid[:, None, None, :] if window is None else valid[:, None])  # (B, 1, 1 or q, L)
    cols = torch.arange(width, device=mask.device)
    rows = torch.arange(width - queries, width, device=mask.device)
    allowed = allowed & (cols[None, :] <= rows[:, None])
    return allowed | (cols[None, :] == rows[:, None])


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as one added to attention scores."""
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)
