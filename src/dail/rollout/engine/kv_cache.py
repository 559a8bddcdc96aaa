"""The draft engine's joint KV cache: [students; privileged] rows with a hole-aware mask.

`GrowingLayer` appends into spare capacity instead of concatenating, `grouped_sdpa` attends
for a whole group of query heads per key/value head, and `JointBatch` holds the active
sequences: their cache, mask, pending tokens, and the prefill, admission and compaction of rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dail.models import returned_cache, with_cache
from dail.rollout.engine.shared_prompts import LayerKV, SharedPrompts
from dail.rollout.engine.window import MaskLayout


class GrowingLayer(DynamicLayer):
    """A KV cache layer that appends into spare capacity instead of concatenating.

    `DynamicLayer.update` copies the whole cache on every forward, which at large batch costs as
    much as attention itself. Here `keys`/`values` are views of the first slots of a buffer that
    grows by half when full, so appending q slots copies q slots (amortised), for at most half
    the cache again in spare slots. Assigning new `keys`/`values` (as `JointBatch.admit` and
    `compact` do) is allowed: the next update sees they are no longer views of the buffer and
    starts a new one.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fed_rows: slice | None = None  # the rows the next update feeds, if not all (`JointBatch.forward`)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        used, new = self.keys.shape[-2], key_states.shape[-2]
        buffers = self._buffers
        if (buffers is None or buffers[0].shape[-2] < used + new
                or self.keys.data_ptr() != buffers[0].data_ptr() or self.keys.shape[0] != buffers[0].shape[0]):
            capacity = used + new + max(64, (used + new) // 2)
            buffers = tuple(old.new_empty((*old.shape[:2], capacity, old.shape[3])) for old in (self.keys, self.values))
            buffers[0][:, :, :used] = self.keys
            buffers[1][:, :, :used] = self.values
            self._buffers = buffers
        fed = self.fed_rows
        if fed is None:
            buffers[0][:, :, used:used + new] = key_states
            buffers[1][:, :, used:used + new] = value_states
        else:
            # The rows not fed get holes: masked, but zeroed, since a masked NaN left in an
            # uninitialised buffer would still reach the attention output (0 * NaN).
            buffers[0][:, :, used:used + new] = 0
            buffers[1][:, :, used:used + new] = 0
            buffers[0][fed, :, used:used + new] = key_states
            buffers[1][fed, :, used:used + new] = value_states
        self.keys, self.values = buffers[0][:, :, :used + new], buffers[1][:, :, :used + new]
        return (self.keys, self.values) if fed is None else (self.keys[fed], self.values[fed])


def grouped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """`transformers`' SDPA attention for a forward of a few tokens over a grouped-query model's
    KV cache, without copying the cache once per query head in every layer (`repeat_kv`, what
    `transformers` does for masked forwards of more than one token): each key/value head attends
    for its whole group of query heads, (B, H, q, d) -> (B, KVH, H / KVH * q, d), as `transformers`
    itself does for one token."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups == 1 or query.shape[2] == 1 or attention_mask is None or attention_mask.shape[1] != 1
            or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, q, dim = query.shape
    query = query.reshape(batch, heads // groups, groups * q, dim)  # head h = g * groups + r -> (g, r * q + i)
    mask = attention_mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(
        attention_mask.shape[0], 1, groups * q, attention_mask.shape[-1])
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, q, dim).transpose(1, 2).contiguous(), None


GROUPED_SDPA = "dail_grouped_sdpa"
AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)


class JointBatch:
    """Active sequences: a joint KV cache over [students; privileged] with a hole-aware mask."""

    def __init__(self, model: torch.nn.Module, pad_id: int, prompts: Iterable[list[int]] = (),
                 layout: MaskLayout | None = None):
        self.model = model
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.layout = layout or MaskLayout({"full_attention": None})
        # With SDPA the model takes a ready 4D mask as is, which spares it building one from the
        # 2D mask every forward (a noticeable share of a small batch's round). Other attention
        # kernels (flash attention wants 2D masks) get the 2D mask, except where layers slide:
        # from a 2D mask the model would count their window in slots, holes included.
        self.sdpa = getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa"
        self.mask_4d = self.sdpa or self.layout.windowed
        self.cache = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (2n, L)
        self.rows = torch.zeros(0, dtype=torch.long, device=self.device)  # (n,) input index of each sequence
        # (2n,) the token each context has chosen but not yet read: [students; privileged]
        self.pending = torch.zeros(0, dtype=torch.long, device=self.device)
        self.forwards = 0
        self.prefill_seconds = 0.0
        # Every prompt the call's rows will read (minus the pending last token), counted so that
        # an encoding is kept exactly until the last row reading it has joined.
        self.prompts = SharedPrompts(self._encode, (p[:-1] for p in prompts))

    @property
    def size(self) -> int:
        return len(self.rows)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """Feed ids (m, q) whose slots are marked by `valid` (m, q) to `rows` of the joint cache (all
        2n by default, else `self.students` or `self.privileged`); returns logits (m, q, V).

        Rows not fed get q holes, and cost nothing: the model runs over the fed rows only.
        """
        valid = valid.long()
        if rows is None:
            positions = self.mask.sum(-1, keepdim=True) + valid.cumsum(-1) - 1
            self.mask = mask = torch.cat([self.mask, valid], dim=-1)
        else:
            positions = self.mask[rows].sum(-1, keepdim=True) + valid.cumsum(-1) - 1
            fed, valid = valid, self.mask.new_zeros((self.mask.shape[0], ids.shape[1]))
            valid[rows] = fed
            self.mask = torch.cat([self.mask, valid], dim=-1)
            mask = self.mask[rows]
            for layer in self.cache.layers:
                layer.fed_rows = rows
        attention = self.layout.masks(mask, ids.shape[1], self.dtype) if self.mask_4d else mask
        grouped = self.sdpa and ids.shape[1] > 1  # a ready 4D mask: no mask is built for the name
        if grouped:
            self.model.config._attn_implementation = GROUPED_SDPA
        try:
            out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions.clamp(min=0),
                             **with_cache(self.model, self.cache), use_cache=True)
        finally:
            if grouped:
                self.model.config._attn_implementation = "sdpa"
            if rows is not None:
                for layer in self.cache.layers:
                    layer.fed_rows = None
        self.cache = returned_cache(out)
        self.forwards += 1
        return out.logits.float()

    @property
    def students(self) -> slice:
        return slice(0, self.size)

    @property
    def privileged(self) -> slice:
        return slice(self.size, 2 * self.size)

    # ------------------------------------------------------------------ membership

    def _encode(self, bodies: list[list[int]], prefix: tuple[LayerKV, torch.Tensor] | None = None
                ) -> tuple[LayerKV, torch.Tensor]:
        """Run the model over left-padded prompt bodies, after `prefix` (keys and values with their
        mask) if given; returns per-layer (keys, values) and the mask, the prefix's included."""
        width = max(1, max(len(b) for b in bodies))
        ids = torch.full((len(bodies), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, body in enumerate(bodies):
            if body:
                ids[i, width - len(body):] = torch.tensor(body, dtype=torch.long)
                mask[i, width - len(body):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = None
        if prefix is not None:
            cache = DynamicCache()
            cache.layers = [GrowingLayer(keys, values) for keys, values in prefix[0]]
            mask = torch.cat([prefix[1], mask], dim=-1)
        positions = (mask.cumsum(-1)[:, -width:] - 1).clamp(min=0)
        attention = mask
        if self.layout.windowed:  # the model's own cache would drop the slots that left a window
            attention = self.layout.masks(mask, width, self.dtype)
            cache = cache if cache is not None else DynamicCache()
        tic = clock(self.device)
        out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions, **with_cache(self.model, cache),
                         use_cache=True, logits_to_keep=1)
        self.prefill_seconds += clock(self.device) - tic
        self.forwards += 1
        return [(layer.keys, layer.values) for layer in returned_cache(out).layers], mask

    def admit(self, rows: list[int], student: list[list[int]], privileged: list[list[int]]) -> None:
        """Prefill `rows` and join them to the batch.

        Prompts minus their last token (it stays pending) are encoded; rows that read the same
        prompt share one encoding, and a student prompt continues its privileged prompt's opening
        (`SharedPrompts`).
        """
        n, m = self.size, len(rows)
        both, both_mask = self.prompts.rows([student[i][:-1] for i in rows] + [privileged[i][:-1] for i in rows])
        s_kv, p_kv = [(k[:m], v[:m]) for k, v in both], [(k[m:], v[m:]) for k, v in both]
        s_mask, p_mask = both_mask[:m], both_mask[m:]
        pending = torch.tensor([student[i][-1] for i in rows] + [privileged[i][-1] for i in rows],
                               dtype=torch.long, device=self.device)
        if self.cache is None:
            parts_kv, parts_mask = [s_kv, p_kv], [s_mask, p_mask]
            old_pending = [self.pending[:0], pending[:m], self.pending[:0], pending[m:]]
        else:
            old = [(layer.keys, layer.values) for layer in self.cache.layers]
            parts_kv = [[(k[:n], v[:n]) for k, v in old], s_kv, [(k[n:], v[n:]) for k, v in old], p_kv]
            parts_mask = [self.mask[:n], s_mask, self.mask[n:], p_mask]
            old_pending = [self.pending[:n], pending[:m], self.pending[n:], pending[m:]]
        width = max(mask.shape[1] for mask in parts_mask)
        cache = DynamicCache()
        cache.layers = [
            GrowingLayer(torch.cat([F.pad(part[layer][0], (0, 0, width - part[layer][0].shape[2], 0))
                                    for part in parts_kv]),
                         torch.cat([F.pad(part[layer][1], (0, 0, width - part[layer][1].shape[2], 0))
                                    for part in parts_kv]))
            for layer in range(len(s_kv))]
        self.cache = cache
        self.mask = torch.cat([F.pad(mask, (width - mask.shape[1], 0)) for mask in parts_mask])
        self.rows = torch.cat([self.rows, torch.tensor(rows, dtype=torch.long, device=self.device)])
        self.pending = torch.cat(old_pending)  # (2n,): [students; privileged]

    def compact(self, keep: torch.Tensor | None = None) -> None:
        """Keep the sequences where `keep` (n,) is True and squeeze out every hole."""
        n = self.size
        keep_rows = torch.arange(n, device=self.device) if keep is None else torch.nonzero(keep).flatten()
        joint = torch.cat([keep_rows, keep_rows + n])
        mask = self.mask[joint]
        # A stable sort of the 0/1 mask moves holes to the left and keeps valid slots in order.
        order = torch.sort(mask, dim=-1, stable=True).indices
        width = max(1, int(mask.sum(-1).max())) if mask.numel() else 1
        order = order[:, -width:]
        self.mask = mask.gather(-1, order)
        for layer in self.cache.layers:
            heads, dim = layer.keys.shape[1], layer.keys.shape[3]
            index = order[:, None, :, None].expand(-1, heads, -1, dim)
            layer.keys = layer.keys[joint].gather(2, index)
            layer.values = layer.values[joint].gather(2, index)
        self.rows = self.rows[keep_rows]
        self.pending = self.pending[joint]
        if not self.size:
            self.cache = None
            self.mask = self.mask[:0, :0]

    @property
    def hole_fraction(self) -> float:
        if self.mask.numel() == 0:
            return 0.0
        return 1.0 - float(self.mask.sum(-1).max()) / self.mask.shape[1]


def clock(device: torch.device) -> float:
    """Host seconds once the device's queued work is done: on a GPU, reading the clock without
    synchronising would time the kernels' launches, and the draft length would be chosen on them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
