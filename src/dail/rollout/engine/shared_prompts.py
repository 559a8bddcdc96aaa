"""Prompt encodings shared by the rows that read the same prompt, or the same opening.

The paper samples 32 traces per problem, and each reads the same two prompts, the privileged one
holding a whole expert solution. Serving engines call this prefix caching. Here a prompt is run
through the model once per rollout call and every row that reads it gets a copy of its keys and
values; and a prompt that opens like a longer one for at least half its length (a student prompt
is its problem's privileged prompt up to the expert's section) is encoded as the rest after a copy
of that opening. Prompts encoded together are grouped by length, so left padding stays small.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

# Per layer (keys, values), each (rows, heads, length, head_dim).
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]
# encode(bodies, prefix) -> (keys and values, mask): runs the model over left-padded `bodies`,
# after `prefix` (left-padded keys and values with their mask) when given.
Encode = Callable[..., tuple[LayerKV, torch.Tensor]]

# A group of prompts encoded in one forward is cut where the next (shorter) one would leave more
# than this share of its row as padding.
MAX_PADDING = 0.25


class SharedPrompts:
    """Encodes prompts for rows, each distinct prompt once while rows that still need it wait.

    An encoding is kept while rows that have not been admitted still read it (so samples of a
    problem that join a continuous batch later reuse it) and dropped after the last.
    """

    def __init__(self, encode: Encode, upcoming: Iterable[list[int]]):
        self._encode = encode
        self.demand = Counter(tuple(p) for p in upcoming)
        self.kept: dict[tuple[int, ...], LayerKV] = {}
        self.requested = 0  # rows asked for
        self.encoded = 0  # prompts run through the model
        self.reused_tokens = 0  # prompt tokens copied from another prompt's opening

    def rows(self, prompts: list[list[int]]) -> tuple[LayerKV, torch.Tensor]:
        """Left-padded per-layer keys and values (m, H, L, D) and mask (m, L) of `prompts`."""
        keys = [tuple(p) for p in prompts]
        new = sorted((k for k in dict.fromkeys(keys) if k not in self.kept), key=len, reverse=True)
        whole, continued = self._plan(new)
        for group in _length_groups(whole):
            self._keep(group, *self._encode([list(k) for k in group]))
        continued.sort(key=lambda item: len(item[0]) - item[1], reverse=True)
        for group in _length_groups(continued, length=lambda item: len(item[0]) - item[1]):
            prefix = _left_padded([[(k[:, :, :shared], v[:, :, :shared]) for k, v in self.kept[source]]
                                   for _, shared, source in group], max(shared for _, shared, _ in group))
            prefix_mask = _left_mask([shared for _, shared, _ in group], prefix[0][0].shape[2], prefix[0][0].device)
            kv, mask = self._encode([list(key[shared:]) for key, shared, _ in group], prefix=(prefix, prefix_mask))
            self._keep([key for key, _, _ in group], kv, mask)
            self.reused_tokens += sum(shared for _, shared, _ in group)
        self.requested += len(keys)
        self.encoded += len(new)
        rows = _left_padded([self.kept[k] for k in keys], max(1, max(len(k) for k in keys)))
        mask = _left_mask([len(k) for k in keys], rows[0][0].shape[2], rows[0][0].device)
        for key in keys:
            self.demand[key] -= 1
            if self.demand[key] <= 0:
                self.kept.pop(key, None)
        return rows, mask

    def _plan(self, new: list[tuple[int, ...]]) -> tuple[list, list]:
        """Split new prompts (longest first) into those encoded whole and (prompt, shared length,
        source) for those that open like a kept or longer new prompt for at least half their length."""
        whole: list[tuple[int, ...]] = []
        continued: list[tuple[tuple[int, ...], int, tuple[int, ...]]] = []
        for key in new:
            shared, source = max(((len(os.path.commonprefix([key, other])), other)
                                  for other in [*self.kept, *whole]), default=(0, ()))
            shared = min(shared, len(key) - 1)  # at least one token of its own to encode
            if shared >= max(1, len(key) / 2):
                continued.append((key, shared, source))
            else:
                whole.append(key)
        return whole, continued

    def _keep(self, keys: list[tuple[int, ...]], kv: LayerKV, mask: torch.Tensor) -> None:
        """Store each row's encoding without its padding (views where the row is contiguous)."""
        for i, key in enumerate(keys):
            slots = mask[i].nonzero().flatten()
            start = int(slots[0]) if len(slots) else mask.shape[1]
            if len(slots) == mask.shape[1] - start:
                self.kept[key] = [(k[i:i + 1, :, start:], v[i:i + 1, :, start:]) for k, v in kv]
            else:  # holes between a copied opening and the rest
                self.kept[key] = [(k[i:i + 1, :, slots], v[i:i + 1, :, slots]) for k, v in kv]


def _length_groups(items: list, length: Callable = len) -> list[list]:
    """Consecutive runs of `items` (longest first) whose padding to the run's first stays small."""
    groups: list[list] = []
    for item in items:
        if groups and length(item) >= (1 - MAX_PADDING) * length(groups[-1][0]):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _left_mask(lengths: list[int], width: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros((len(lengths), width), dtype=torch.long, device=device)
    for i, length in enumerate(lengths):
        mask[i, width - length:] = 1
    return mask


def _left_padded(parts: list[LayerKV], width: int) -> LayerKV:
    """Stack single-row encodings into one (m, H, width, D) tensor per layer, padded on the left."""
    layers = []
    for layer in range(len(parts[0])):
        keys = [F.pad(part[layer][0], (0, 0, width - part[layer][0].shape[2], 0)) for part in parts]
        values = [F.pad(part[layer][1], (0, 0, width - part[layer][1].shape[2], 0)) for part in parts]
        layers.append((torch.cat(keys), torch.cat(values)))
    return layers
