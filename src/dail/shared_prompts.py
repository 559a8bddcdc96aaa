"""Prompt encodings shared by the rows that read the same prompt.

The paper samples 32 traces per problem, and each reads the same two prompts, the privileged one
holding a whole expert solution. Serving engines call this prefix caching; here it is exact
matches only: a prompt is run through the model once per rollout call, and every row that
reads it gets a copy of its keys and values.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

# Per layer (keys, values), each (rows, heads, length, head_dim).
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


class SharedPrompts:
    """Encodes prompts for rows, each distinct prompt once while rows that still need it wait.

    `encode(prompts)` runs the model over left-padded prompts and returns (per-layer keys and
    values, mask). An encoding is kept while rows that have not been admitted still read it (so
    samples of a problem that join a continuous batch later reuse it) and dropped after the last.
    """

    def __init__(self, encode: Callable[[list[list[int]]], tuple[LayerKV, torch.Tensor]],
                 upcoming: Iterable[list[int]]):
        self._encode = encode
        self.demand = Counter(tuple(p) for p in upcoming)
        self.kept: dict[tuple[int, ...], LayerKV] = {}
        self.requested = 0  # rows asked for
        self.encoded = 0  # prompts run through the model

    def rows(self, prompts: list[list[int]]) -> tuple[LayerKV, torch.Tensor]:
        """Left-padded per-layer keys and values (m, H, L, D) and mask (m, L) of `prompts`."""
        keys = [tuple(p) for p in prompts]
        new = [k for k in dict.fromkeys(keys) if k not in self.kept]
        if new:
            kv, mask = self._encode([list(k) for k in new])
            width = mask.shape[1]
            for i, key in enumerate(new):  # unpadded views of the batch's tensors
                start = width - len(key)
                self.kept[key] = [(k[i:i + 1, :, start:], v[i:i + 1, :, start:]) for k, v in kv]
        self.requested += len(keys)
        self.encoded += len(new)
        rows = _left_padded([self.kept[k] for k in keys], max(1, max(len(k) for k in keys)))
        mask = torch.zeros((len(keys), rows[0][0].shape[2]), dtype=torch.long, device=rows[0][0].device)
        for i, key in enumerate(keys):
            mask[i, mask.shape[1] - len(key):] = 1
        for key in keys:
            self.demand[key] -= 1
            if self.demand[key] <= 0:
                self.kept.pop(key, None)
        return rows, mask


def _left_padded(parts: list[LayerKV], width: int) -> LayerKV:
    """Stack single-row encodings into one (m, H, width, D) tensor per layer, padded on the left."""
    layers = []
    for layer in range(len(parts[0])):
        keys = [F.pad(part[layer][0], (0, 0, width - part[layer][0].shape[2], 0)) for part in parts]
        values = [F.pad(part[layer][1], (0, 0, width - part[layer][1].shape[2], 0)) for part in parts]
        layers.append((torch.cat(keys), torch.cat(values)))
    return layers
