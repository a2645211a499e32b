"""The disk tier's read path on this host, without an engine (issue 20's restart TTFT): N block
files of one fp8 Llama-3.1-8B block each (1 MiB: K and V of 32 layers, 8 KV heads, 128 dims, 16
tokens) written by DiskStore, then read back from the page cache three ways:

    A  the bare loop (open + preadv + crc32 into a pinned buffer, 16 threads): the host's ceiling
    B  DiskStore.read_many from 16 threads, one batch: what the store's own per-file work costs
    C  PrefixStore._read_all: the engine's path (128 MiB pinned chunks, copies to the device)

B and C run on a store opened afresh (as after a restart), then three times warm.

    python bench/disk_reads.py [N]        # N = 1040: a 16k-token prefix
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import types
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch

from hearth.engine.kv_tiers.disk_store import DiskStore
from hearth.engine.kv_tiers.identity import ModelIdentity, block_digest
from hearth.engine.kv_tiers.prefix_store import PrefixStore

SIZE = 1 << 20
ROOT = "/tmp/hearth-disk-reads"
THREADS = 16


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1040
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shutil.rmtree(ROOT, ignore_errors=True)
    ident = ModelIdentity("dummy:0:bench", "bfloat16", "float8_e4m3fn", 16, 32, 8, 128)
    store = DiskStore.open(ROOT, ident, 64 << 30)
    payload = os.urandom(SIZE)
    blocks, parent = [], None
    for i in range(n):
        tokens = tuple(range(i * 16, i * 16 + 16))
        parent = block_digest(parent, tokens)
        blocks.append((parent, tokens))
    start = time.perf_counter()
    for digest, tokens in blocks:
        store.write(digest, tokens, payload)
    print(f"{dev}: wrote {n} blocks of 1 MiB in {time.perf_counter() - start:.2f} s")
    store.close()
    buf = torch.empty((n, SIZE), dtype=torch.uint8, pin_memory=dev.type == "cuda")
    views = [memoryview(row.numpy()) for row in buf]
    paths = [store._path(digest) for digest, _ in blocks]
    pool = ThreadPoolExecutor(THREADS)

    def bare(indices: list[int]) -> None:
        for i in indices:
            fd = os.open(paths[i], os.O_RDONLY)
            try:
                os.preadv(fd, [views[i]], 0)
            finally:
                os.close(fd)
            zlib.crc32(views[i])

    def timed(name: str, run, repeats: int = 3) -> None:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
        shown = " / ".join(f"{t:6.1f}" for t in times)
        print(f"{name:48s} {shown} ms  ({n * SIZE / min(times) / 1e6:.1f} GB/s best)")

    parts = [list(range(t, n, THREADS)) for t in range(THREADS)]
    timed("A bare loop, 16 threads", lambda: list(pool.map(bare, parts)))
    per = -(-n // THREADS)
    for fresh in (True, False):
        label = "fresh" if fresh else "warm"
        disk = DiskStore.open(ROOT, ident, 64 << 30)

        def read_many(disk=disk) -> None:
            found = []
            for part in pool.map(lambda p: disk.read_many(blocks[p:p + per], views[p:p + per]),
                                 range(0, n, per)):
                found += part
            assert all(found)

        timed(f"B DiskStore.read_many, 16 threads ({label})", read_many, 1 if fresh else 3)
        prefix = PrefixStore(types.SimpleNamespace(block_nbytes=SIZE, device=dev), None, disk)

        def read_all(prefix=prefix) -> None:
            got = prefix._read_all(blocks)
            assert all(v is not None for v in got.values())
            if dev.type == "cuda":
                torch.cuda.synchronize()

        timed(f"C PrefixStore._read_all ({label})", read_all, 1 if fresh else 3)
        disk.close()
    shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    main()
