"""HostTier: the CPU-RAM tier (`--kv-offload-gib`), KV blocks evicted from the device, LRU.

Entries are host tensors of one block's payload (engine/kv_tiers/block_io.py), keyed by the
block's stable digest. What falls out of this tier goes to `on_drop` (the disk, when it has no
copy yet). Only the engine thread touches it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class HostEntry:
    token_ids: tuple[int, ...]
    payload: torch.Tensor  # (block_nbytes,) uint8; may still be filling: see `ready`
    ready: Callable[[], object]  # waits for the device copy (cheap once done)


class HostTier:
    def __init__(self, capacity_blocks: int,
                 on_drop: Callable[[bytes, HostEntry], None] | None = None) -> None:
        self.capacity_blocks = capacity_blocks
        self._entries: OrderedDict[bytes, HostEntry] = OrderedDict()  # oldest first
        self._on_drop = on_drop

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes, token_ids: tuple[int, ...]) -> HostEntry | None:
        """The entry (now most recently used), or None; token ids must match the lookup's."""
        entry = self._entries.get(digest)
        if entry is None or entry.token_ids != token_ids:
            return None
        self._entries.move_to_end(digest)
        return entry

    def put(self, digest: bytes, entry: HostEntry) -> None:
        if self.capacity_blocks < 1:
            return
        self._entries[digest] = entry
        self._entries.move_to_end(digest)
        while len(self._entries) > self.capacity_blocks:
            old_digest, old = self._entries.popitem(last=False)
            if self._on_drop is not None:
                self._on_drop(old_digest, old)
