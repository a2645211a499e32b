"""PrefixStore: the tiers below the device's prefix cache, behind the block manager's hooks.

    device blocks (block_manager.py) ── evicted ──► host RAM (host_tier.py, --kv-offload-gib)
          │  registered (write-through,                │ dropped, not on disk yet
          ▼  on the writer thread)                     ▼
    disk (disk_store.py, --prefix-cache-dir) ◄─────────┘

    lookup on a device miss: host RAM, then disk (files read in parallel and checked; on CUDA
    into two pinned chunk buffers in turn, each chunk copied on to a device staging buffer while
    the readers fill the other, so reads, checksums and PCIe copies overlap)
    a hit: the block manager takes a free device block, and transfer() copies the payload into it

The block manager calls the hooks while it schedules (no torch there); the engine calls
`transfer()` after `schedule()` and before the forward pass, and again at the end of each step:
it copies the blocks to save out of the device (evicted blocks first, before a forward reuses
them) and then loads the hits in. Disk writes happen on the writer thread.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from hearth.engine.kv_cache import LayerKVCache
from hearth.engine.kv_tiers.block_io import BlockIO, HostBlocks
from hearth.engine.kv_tiers.disk_store import DiskStore
from hearth.engine.kv_tiers.host_tier import HostEntry, HostTier
from hearth.engine.kv_tiers.identity import ModelIdentity, block_digest

logger = logging.getLogger(__name__)
_GIB = 1 << 30
_STAGING_BYTES = 8 * _GIB  # disk hits read ahead of their admission, at most this much
# file reads (and their checksums: zlib releases the GIL) run on this many threads
_READ_THREADS = min(16, max(8, os.cpu_count() or 8))
_CHUNK_BYTES = 128 << 20  # CUDA: each of the two pinned buffers disk hits are read into


@dataclass(frozen=True)
class TierConfig:
    cache_dir: Path | None = None  # None: no disk tier
    cache_gib: float = 10.0  # the disk tier's budget
    offload_gib: float = 0.0  # the host tier's budget; 0: none


@dataclass
class TierStats:
    """Counters since start (for tests, logs and the monitor)."""

    blocks_loaded_from_host: int = 0
    blocks_loaded_from_disk: int = 0
    blocks_offloaded: int = 0  # device -> host tier
    blocks_written: int = 0  # queued for the disk
    disk_read_s: float = 0.0  # spent in lookups reading (and copying to the device) disk hits


@dataclass
class _Save:
    block_id: int
    digest: bytes
    token_ids: tuple[int, ...]
    to_host: bool  # evicted: into the host tier; else registered: to the disk


class PrefixStore:
    def __init__(self, block_io: BlockIO, host: HostTier | None, disk: DiskStore | None) -> None:
        self.io = block_io
        self.host = host
        self.disk = disk
        self.stats = TierStats()
        self._saves: list[_Save] = []
        self._loads: list[tuple[int, torch.Tensor]] = []
        self._staged: dict[bytes, torch.Tensor] = {}  # disk hits read, not yet loaded
        self._max_staged = max(_STAGING_BYTES // block_io.block_nbytes, 1)
        self._readers = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="hearth-kv-read")
        # CUDA: pinned chunk buffers the readers fill, and the stream of their device copies;
        # made when the disk tier opens, so a restart's first hit does not pay for pinning
        self._chunks: list[tuple[torch.Tensor, list[memoryview]]] | None = None
        self._copy_stream = None
        if disk is not None and block_io.device.type == "cuda":
            self._pinned_chunks()

    # -- hooks the block manager calls (engine thread, no torch work) -----------------------

    def digest(self, parent: bytes | None, token_ids: tuple[int, ...]) -> bytes:
        return block_digest(parent, token_ids)

    def lookup(self, blocks: list[tuple[bytes, tuple[int, ...]]]) -> int:
        """How many of `blocks` (a prefix's next full blocks, in order) the tiers hold, from the
        first on. Disk blocks are read and checked now, so a hit never turns out bad later."""
        run, to_read = 0, []
        for digest, token_ids in blocks:
            if self._in_ram(digest, token_ids):
                pass
            elif self.disk is not None and digest in self.disk and (
                    len(self._staged) + len(to_read) < self._max_staged):
                to_read.append((digest, token_ids))
            else:
                break
            run += 1
        read = self._read_all(to_read)
        for index, (digest, _) in enumerate(blocks[:run]):
            if digest in read:
                if read[digest] is None:
                    return index
                self._staged[digest] = read[digest]
        return run

    def on_registered(self, block_id: int, digest: bytes, token_ids: tuple[int, ...]) -> None:
        if self.disk is not None and digest not in self.disk:
            self._saves.append(_Save(block_id, digest, token_ids, to_host=False))

    def on_evicted(self, block_id: int, digest: bytes, token_ids: tuple[int, ...]) -> None:
        if self.host is not None and digest not in self.host:
            self._saves.append(_Save(block_id, digest, token_ids, to_host=True))

    def on_loaded(self, block_id: int, digest: bytes, token_ids: tuple[int, ...]) -> None:
        payload = self._staged.pop(digest, None)
        if payload is not None:
            self.stats.blocks_loaded_from_disk += 1
        else:
            entry = self.host.get(digest, token_ids)  # lookup() found it: nothing evicts it
            entry.ready()
            payload = entry.payload
            self.stats.blocks_loaded_from_host += 1
        self._loads.append((block_id, payload))

    # -- the engine's calls ------------------------------------------------------------------

    def transfer(self) -> None:
        """Copy out the blocks to save, then copy in the hits (before the next forward)."""
        if self._saves:
            saves, self._saves = self._saves, []
            self._save(saves, self.io.save([s.block_id for s in saves]))
        if self._loads:
            loads, self._loads = self._loads, []
            self.io.load([b for b, _ in loads], [p for _, p in loads])

    def flush(self) -> None:
        """Every queued disk write done (tests, benchmarks)."""
        self.transfer()
        if self.disk is not None:
            self.disk.flush()

    def close(self) -> None:
        self.transfer()
        self._readers.shutdown(wait=True)
        if self.disk is not None:
            self.disk.close()

    # -- internals ---------------------------------------------------------------------------

    def _in_ram(self, digest: bytes, token_ids: tuple[int, ...]) -> bool:
        if digest in self._staged:
            return True
        return self.host is not None and self.host.get(digest, token_ids) is not None

    def _read_all(self, blocks: list[tuple[bytes, tuple[int, ...]]]) -> dict:
        """digest -> payload or None, the files read in parallel: rows of one device buffer
        on CUDA (host memory if the device has no room for it), else of one host buffer."""
        if not blocks:
            return {}
        start = time.perf_counter()
        try:
            if self.io.device.type == "cuda":
                try:
                    return self._read_to_device(blocks)
                except torch.cuda.OutOfMemoryError:
                    logger.info("prefix cache: no device memory to stage %d disk blocks; "
                                "staging them in host memory", len(blocks))
            return self._read_to_host(blocks)
        finally:
            self.stats.disk_read_s += time.perf_counter() - start

    def _read_to_host(self, blocks: list[tuple[bytes, tuple[int, ...]]]) -> dict:
        arena = torch.empty((len(blocks), self.io.block_nbytes), dtype=torch.uint8)
        rows = [memoryview(arena[i].numpy()) for i in range(len(blocks))]
        found = self._read_chunk(blocks, rows)
        return {digest: (arena[i] if ok else None)
                for i, ((digest, _), ok) in enumerate(zip(blocks, found, strict=True))}

    def _read_to_device(self, blocks: list[tuple[bytes, tuple[int, ...]]]) -> dict:
        """The files read and checked in parallel into one of two pinned chunk buffers, each
        chunk copied to its rows of a device staging buffer in one transfer on the copy stream
        while the readers fill the other buffer (an H100 host's probe: 16 threads read and check
        22 GB/s from the page cache; one pinned copy moves 50 GB/s, 2 MB copies each waited on
        10 GB/s: docs/benchmarks.md, "Persistent prefix cache")."""
        nbytes = self.io.block_nbytes
        staging = torch.empty((len(blocks), nbytes), dtype=torch.uint8, device=self.io.device)
        buffers = self._pinned_chunks()
        rows = buffers[0][0].shape[0]
        current = torch.cuda.current_stream(self.io.device)
        self._copy_stream.wait_stream(current)  # the staging buffer was allocated on `current`
        found: list[bool] = []
        copied: list[torch.cuda.Event | None] = [None, None]

        for chunk, first in enumerate(range(0, len(blocks), rows)):
            buffer, views = buffers[chunk % 2]
            if copied[chunk % 2] is not None:
                copied[chunk % 2].synchronize()  # its last copy has left the buffer
            count = min(rows, len(blocks) - first)
            found += self._read_chunk(blocks[first : first + count], views[:count])
            with torch.cuda.stream(self._copy_stream):
                staging[first : first + count].copy_(buffer[:count], non_blocking=True)
                copied[chunk % 2] = torch.cuda.Event()
                copied[chunk % 2].record(self._copy_stream)
        current.wait_stream(self._copy_stream)
        staging.record_stream(self._copy_stream)
        return {digest: (staging[i] if ok else None)
                for i, ((digest, _), ok) in enumerate(zip(blocks, found, strict=True))}

    def _read_chunk(self, blocks: list[tuple[bytes, tuple[int, ...]]],
                    views: list[memoryview]) -> list[bool]:
        """The files into their buffers, split evenly between the reader threads: one task
        per thread, not per file (per-file futures cost GIL time the reads then queue on)."""
        per = max(-(-len(blocks) // _READ_THREADS), 1)
        parts = [(blocks[i : i + per], views[i : i + per]) for i in range(0, len(blocks), per)]
        found: list[bool] = []
        for part in self._readers.map(lambda p: self.disk.read_many(*p), parts):
            found += part
        return found

    def _pinned_chunks(self) -> list[tuple[torch.Tensor, list[memoryview]]]:
        """Two pinned (rows, block_nbytes) buffers of about _CHUNK_BYTES each, made once."""
        if self._chunks is None:
            rows = max(_CHUNK_BYTES // self.io.block_nbytes, 1)
            self._copy_stream = torch.cuda.Stream(self.io.device)
            self._chunks = []
            for _ in range(2):
                buffer = torch.empty((rows, self.io.block_nbytes), dtype=torch.uint8,
                                     pin_memory=True)
                self._chunks.append((buffer, [memoryview(row.numpy()) for row in buffer]))
        return self._chunks

    def _save(self, saves: list[_Save], host: HostBlocks) -> None:
        for row, save in enumerate(saves):
            payload = host.data[row]
            if save.to_host:
                self.host.put(save.digest, HostEntry(save.token_ids, payload, host.wait))
                self.stats.blocks_offloaded += 1
            else:
                self._write(save.digest, save.token_ids, payload, host.wait)

    def _write(self, digest: bytes, token_ids: tuple[int, ...], payload: torch.Tensor,
               ready) -> None:
        def host_bytes():
            ready()
            return payload.numpy()

        if self.disk.write_async(digest, token_ids, host_bytes):
            self.stats.blocks_written += 1

    def _on_host_drop(self, digest: bytes, entry: HostEntry) -> None:
        """A block leaving the host tier goes to the disk unless it is there already."""
        if self.disk is not None and digest not in self.disk:
            self._write(digest, entry.token_ids, entry.payload, entry.ready)


def open_prefix_store(config: TierConfig, identity: ModelIdentity,
                      kv_caches: list[LayerKVCache]) -> PrefixStore | None:
    """The tiers `config` asks for; None when it asks for none (or the disk alone is unusable,
    which is logged: the engine runs on without it)."""
    io = BlockIO(kv_caches)
    disk = None
    if config.cache_dir is not None:
        disk = DiskStore.open(config.cache_dir, identity, int(config.cache_gib * _GIB))
    host_blocks = int(config.offload_gib * _GIB) // io.block_nbytes
    if disk is None and host_blocks < 1:
        return None
    store = PrefixStore(io, None, disk)
    if host_blocks >= 1:
        store.host = HostTier(host_blocks, store._on_host_drop)
    logger.info("KV tiers: host RAM %d blocks, disk %s", host_blocks,
                disk.dir if disk is not None else "off")
    return store
