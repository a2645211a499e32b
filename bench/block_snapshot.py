"""The engine thread's cost of BlockManager.snapshot() (taken every 0.2 s for the UI and metrics)
at an 80 GB card's block count: 40,000 blocks, 256 sequences of 32 blocks. CPU only, no model.

    python bench/block_snapshot.py
"""

import time

from hearth.engine.block_manager import BlockManager
from hearth.engine.sampling_params import SamplingParams
from hearth.engine.sequence import Sequence

bm = BlockManager(40_000, 16, True)
seqs = []
for i in range(1000):  # 1,000 sequences of 32 blocks; 256 keep theirs
    s = Sequence(i, f"r{i}", [100 + (i * 7 + j) % 30000 for j in range(512)], SamplingParams())
    assert bm.allocate(s, 512)
    s.num_computed_tokens = 512
    seqs.append(s)
for s in seqs[256:]:
    bm.free(s)
n = 20
t0 = time.perf_counter()
for _ in range(n):
    snap = bm.snapshot()
engine_s = (time.perf_counter() - t0) / n
t1 = time.perf_counter()
owners, cached = snap.block_owner, snap.block_cached
reader_s = time.perf_counter() - t1
print(f"snapshot {engine_s * 1e3:.2f} ms on the engine thread; the per-block map "
      f"{reader_s * 1e3:.2f} ms for its reader; {snap.num_used} blocks used, "
      f"{sum(o is not None for o in owners)} owned")
