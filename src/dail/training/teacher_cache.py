"""Host-memory cache of the frozen teachers' hidden states, reused from the second epoch on.

The privileged and negative-reference roles are the base model with the adapter disabled: their
hidden states over a given (prompt, response) never change while the adapter trains. With the
paper's 3-5 epochs their forwards are most of a DAIL step's extra cost, so a cache that keeps
each row's response-position states (H floats per token, not the V of its logits) lets every
epoch after the first skip them. Rows are keyed by their own tokens, so any batching, order or
padding of a later epoch finds them. It lives and dies with the process: nothing on disk can go
stale when the base model changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch


class TeacherCache:
    """Per-row hidden states of a teacher role, up to `capacity_bytes` (later rows are not kept)."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._rows: dict[bytes, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @staticmethod
    def row_keys(batch: dict[str, torch.Tensor], role: str) -> list[bytes]:
        """One key per row: its unpadded tokens in this role (the role's prompt, then the response)."""
        ids, attention = batch[f"{role}_input_ids"], batch[f"{role}_attention_mask"].bool()
        keys = []
        for row_ids, row_mask in zip(ids.cpu(), attention.cpu(), strict=True):
            digest = hashlib.blake2b(role.encode(), digest_size=16)
            digest.update(row_ids[row_mask].numpy().tobytes())
            keys.append(digest.digest())
        return keys

    def lookup(self, keys: list[bytes]) -> list[torch.Tensor] | None:
        """Every row's states, or None if any row is missing (the forward is then run whole)."""
        rows = [self._rows.get(key) for key in keys]
        return None if any(row is None for row in rows) else rows  # type: ignore[return-value]

    def add(self, rows: Iterable[tuple[bytes, torch.Tensor]]) -> None:
        """Keep each new (key, states) row on the host while the capacity allows."""
        for key, row in rows:
            size = row.numel() * row.element_size()
            if key in self._rows or self.used_bytes + size > self.capacity_bytes:
                continue
            self._rows[key] = row.detach().cpu()
            self.used_bytes += size
