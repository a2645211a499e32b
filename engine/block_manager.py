"""BlockManager: the paged KV cache's bookkeeping (no tensors, no torch).

It owns which physical blocks are free, how many block tables hold each block (reference counts),
copy-on-write after a fork, and the automatic prefix cache.

    seq.block_ids  [ 7 | 2 | 9 ]          block_size = 4, num_tokens = 10
    block 7        [ t0 t1 t2 t3 ]        full, computed -> hashed, findable by later prompts
    block 2        [ t4 t5 t6 t7 ]        full, computed -> hashed
    block 9        [ t8 t9 __ __ ]        partial -> never hashed

Prefix cache: a full computed block is keyed by a chained hash, block_hash(parent hash, its tokens),
so one dictionary lookup per block walks a prompt's prefix. A hash only finds a candidate: the
candidate's stored tokens must equal ours and its parent must be the very block we matched one step
earlier (`key`, a number never reused), so a collision can cost a miss but never give wrong K/V.

Free blocks: blocks without a hash are reused first; freed blocks that are still findable ("cached")
wait in LRU order and are evicted least-recently-freed first, losing their hash entry.

Sliding window (every layer attends to the last `sliding_window` positions only, as Mistral's):
a block whose positions every future query of its sequence has left behind is released while the
sequence runs. Its table entry stays (positions keep their index) but is stale, never read:

    window 6, block_size 4, num_computed 14: the next query sits at 14 and sees 9..14
    seq.block_ids  [ 7 | 2 | 9 | 4 ]      num_dropped_blocks = 2: blocks 7 and 2 released
                     ~~~~~

A block is released only once its successor is registered in the prefix cache (whose chain needs
the parent), and a released block that is registered stays findable: its K/V still serve prefix
hits, which attach whole prefixes as before.

Tiers below the device (engine/kv_tiers/: host RAM, disk), when attached, see three hooks: a
registered block (to write through to disk), an evicted block (to keep in host RAM), and a lookup
that continues past the device's last hit; blocks they hold are attached like cached ones, into
fresh blocks that the tier fills before the next forward (`PrefixHit.loaded`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol

from hearth.engine.kv_tiers.identity import DIGEST_SIZE
from hearth.engine.outputs import BlockCopy
from hearth.engine.sequence import Sequence


def block_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chained hash of one full block: depends on every token before it through `parent_hash`."""
    return hash((parent_hash, token_ids))


@dataclass(frozen=True)
class _Root:
    """What a sequence's first block chains from. Sequences whose K/V differ for the same tokens
    get different roots, so their blocks never serve each other: longrope's long regime
    (`Sequence.rope_long`, keys rotated with the long factors) has its own."""

    hash: int | None
    key: int | None  # a block's parent_key; block keys count up from 0, so -1 is nobody's
    digest: bytes | None  # the tiers' chained digest (engine/kv_tiers/identity.py)


_SHORT_ROOT = _Root(None, None, None)
_LONG_ROOT = _Root(hash("hearth: longrope long factors"), -1,
                   hashlib.blake2b(b"hearth: longrope long factors",
                                   digest_size=DIGEST_SIZE).digest())


def _root(seq: Sequence) -> _Root:
    return _LONG_ROOT if seq.rope_long else _SHORT_ROOT


@dataclass(frozen=True)
class PrefixHit:
    """Cached blocks that start a sequence, and how many of its tokens need no compute."""

    block_ids: tuple[int, ...] = ()
    num_tokens: int = 0  # at most num_tokens - 1: the last position is always computed
    loaded: tuple[tuple[bytes, tuple[int, ...]], ...] = ()  # after block_ids: (digest, tokens)
    # of blocks a lower tier holds; attaching them takes free blocks that the tier fills


class PrefixTier(Protocol):
    """A store below the device cache (engine/kv_tiers/prefix_store.py): the hooks it sees."""

    def digest(self, parent: bytes | None, token_ids: tuple[int, ...]) -> bytes: ...
    def lookup(self, blocks: list[tuple[bytes, tuple[int, ...]]]) -> int: ...
    def on_registered(self, block_id: int, digest: bytes, token_ids: tuple[int, ...]) -> None: ...
    def on_evicted(self, block_id: int, digest: bytes, token_ids: tuple[int, ...]) -> None: ...
    def on_loaded(self, block_id: int, digest: bytes, token_ids: tuple[int, ...]) -> None: ...


@dataclass(frozen=True)
class BlockSnapshot:
    """A copy of the cache state for a UI block map and metrics; safe to hand to another thread.

    The engine takes one every 0.2 s, so it copies only what is live: each sequence's block ids
    and the cached free blocks. The per-block views (`block_owner`, `block_cached`) are built on
    first read, by whoever reads them (the UI's thread): an 80 GB card holds ≈ 40,000 blocks,
    and building them on the engine thread cost 5.2 ms a snapshot (2.6% of its time)."""

    num_blocks: int
    block_size: int
    num_free: int  # includes cached blocks
    num_used: int
    num_cached: int  # free, but still holding a reusable prefix
    seq_blocks: tuple[tuple[int, tuple[int, ...]], ...]  # (seq id, the blocks it holds)
    cached_block_ids: tuple[int, ...]  # free but findable by the prefix cache
    prefix_queries_tokens: int
    prefix_hits_tokens: int
    usage: float  # num_used / num_blocks
    num_window_freed: int = 0  # blocks released: they left every layer's sliding window

    @functools.cached_property
    def block_owner(self) -> tuple[tuple[int, ...] | None, ...]:
        """Per block: None = free, else the ids of the sequences holding it."""
        holders: list[list[int] | None] = [None] * self.num_blocks
        for seq_id, block_ids in self.seq_blocks:
            for block_id in block_ids:
                owners = holders[block_id]
                if owners is None:
                    holders[block_id] = [seq_id]
                else:
                    owners.append(seq_id)
        return tuple(tuple(h) if h else None for h in holders)

    @functools.cached_property
    def block_cached(self) -> tuple[bool, ...]:
        """Per block: free but findable by the prefix cache."""
        cached = [False] * self.num_blocks
        for block_id in self.cached_block_ids:
            cached[block_id] = True
        return tuple(cached)


class _Block:
    __slots__ = ("ref_count", "hash", "token_ids", "key", "parent_key", "digest")

    def __init__(self) -> None:
        self.ref_count = 0
        self.clear()

    def clear(self) -> None:
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None
        self.key: int | None = None  # unique per registration: identifies this exact content
        self.parent_key: int | None = None
        self.digest: bytes | None = None  # stable chained digest, when a tier is attached


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}"
            )
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window  # None: some layer reads the whole context
        self.num_window_freed = 0
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free_uncached: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # LRU: oldest first
        self._hash_to_block: dict[int, int] = {}
        self._holders: dict[int, Sequence] = {}  # seq_id -> seq, for every seq holding blocks
        self._pending_copies: list[BlockCopy] = []
        self._keys = itertools.count()
        self.prefix_queries_tokens = 0
        self.prefix_hits_tokens = 0
        self.tier: PrefixTier | None = None  # host RAM / disk below the device (engine sets it)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def usage(self) -> float:
        return (self.num_blocks - self.num_free_blocks) / self.num_blocks

    # -- prefix cache ---------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> PrefixHit | None:
        """The longest run of cached full blocks that starts `seq` (no side effects).

        None when there is nothing to look up: caching is off or `seq` has computed tokens."""
        if not self.enable_prefix_caching or seq.block_ids or seq.num_computed_tokens:
            return None
        hit_ids: list[int] = []
        root = _root(seq)
        parent_hash, parent_key, missed = root.hash, root.key, False
        for start in range(0, seq.num_tokens - self.block_size + 1, self.block_size):
            tokens = tuple(seq.token_ids[start : start + self.block_size])
            parent_hash = block_hash(parent_hash, tokens)
            block_id = self._hash_to_block.get(parent_hash)
            if block_id is None:
                missed = True
                break
            block = self._blocks[block_id]
            if block.token_ids != tokens or block.parent_key != parent_key:
                break  # a hash collision: different content behind the same hash
            hit_ids.append(block_id)
            parent_key = block.key
        loaded = self._match_tier(seq, hit_ids, missed)
        num_tokens = min((len(hit_ids) + len(loaded)) * self.block_size, seq.num_tokens - 1)
        return PrefixHit(tuple(hit_ids), num_tokens, loaded)

    def _match_tier(self, seq: Sequence, hit_ids: list[int],
                    missed: bool) -> tuple[tuple[bytes, tuple[int, ...]], ...]:
        """The blocks after the device's hits that the tier holds (`missed`: the device walk
        ended on a missing hash, not a collision or the end of the prompt)."""
        if self.tier is None or not missed:
            return ()
        parent = self._blocks[hit_ids[-1]].digest if hit_ids else _root(seq).digest
        if hit_ids and parent is None:
            return ()  # its chain was not tracked (registered before the tier)
        blocks = []
        bs = self.block_size
        for start in range(len(hit_ids) * bs, seq.num_tokens - bs + 1, bs):
            tokens = tuple(seq.token_ids[start : start + bs])
            parent = self.tier.digest(parent, tokens)
            blocks.append((parent, tokens))
        return tuple(blocks[: self.tier.lookup(blocks)]) if blocks else ()

    def cache_blocks(self, seq: Sequence, num_computed_before: int) -> None:
        """Register the blocks that became full and computed since `num_computed_before`."""
        if not self.enable_prefix_caching:
            return
        first = num_computed_before // self.block_size
        last = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        for index in range(first, last):
            block = self._blocks[seq.block_ids[index]]
            if block.key is not None:
                continue  # a prefix hit or a shared block, registered already
            parent = self._blocks[seq.block_ids[index - 1]] if index else None
            start = index * self.block_size
            tokens = tuple(seq.token_ids[start : start + self.block_size])
            self._register(seq.block_ids[index], parent, tokens, root=_root(seq))
            if self.tier is not None and block.digest is not None:
                self.tier.on_registered(seq.block_ids[index], block.digest, tokens)

    def _register(self, block_id: int, parent: _Block | None, tokens: tuple[int, ...],
                  digest: bytes | None = None, root: _Root = _SHORT_ROOT) -> None:
        """`root` stands in for the parent of a sequence's first block."""
        block = self._blocks[block_id]
        block.token_ids = tokens
        block.hash = block_hash(parent.hash if parent else root.hash, tokens)
        block.key = next(self._keys)
        block.parent_key = parent.key if parent else root.key
        if digest is None and self.tier is not None and (parent is None or parent.digest):
            digest = self.tier.digest(parent.digest if parent else root.digest, tokens)
        block.digest = digest
        self._hash_to_block.setdefault(block.hash, block_id)

    # -- allocation -----------------------------------------------------------------------------

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: PrefixHit | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens of `seq`, after attaching `prefix` (admit).

        All or nothing: returns False and changes nothing when too few blocks are free."""
        if prefix is None and num_new_tokens == 1 and self._fits_in_place(seq):
            return True  # a decode token in its own last block: every step, every sequence
        num_computed = seq.num_computed_tokens if prefix is None else prefix.num_tokens
        hit_ids = () if prefix is None else prefix.block_ids
        num_loaded = 0 if prefix is None else len(prefix.loaded)
        num_have = len(seq.block_ids) + len(hit_ids) + num_loaded
        num_needed = -(-(num_computed + num_new_tokens) // self.block_size)
        cow_indices = self._cow_indices(seq, num_computed, num_new_tokens)
        num_revived = sum(1 for b in hit_ids if self._blocks[b].ref_count == 0)
        num_taken = num_revived + num_loaded
        if max(num_needed - num_have, 0) + len(cow_indices) + num_taken > self.num_free_blocks:
            return False
        if prefix is not None:
            self._attach_prefix(seq, prefix)
        for index in cow_indices:
            self._copy_on_write(seq, index)
        for _ in range(num_needed - num_have):
            seq.block_ids.append(self._take_free_block())
        self._holders[seq.seq_id] = seq
        return True

    def _fits_in_place(self, seq: Sequence) -> bool:
        """The next token's slot is in a block `seq` already holds, which needs no copy on
        write (unshared, or registered: what `allocate` would find with no work to do)."""
        index = seq.num_computed_tokens // self.block_size
        if index >= len(seq.block_ids) or seq.seq_id not in self._holders:
            return False
        block = self._blocks[seq.block_ids[index]]
        return block.ref_count == 1 or block.key is not None

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares all of `parent`'s blocks; a shared partial block is copied on write."""
        for block_id in parent.live_block_ids:
            self._blocks[block_id].ref_count += 1
        child.block_ids = list(parent.block_ids)
        child.num_dropped_blocks = parent.num_dropped_blocks
        self._holders[child.seq_id] = child

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; its last blocks are freed first so prefixes outlive tails."""
        for block_id in reversed(seq.live_block_ids):
            self._unref(block_id)
        seq.block_ids = []
        seq.num_dropped_blocks = 0
        self._holders.pop(seq.seq_id, None)

    def free_tail(self, seq: Sequence, num_tokens: int) -> int:
        """Release the blocks past the first `num_tokens` positions of `seq`: after speculative
        decoding, the blocks that only rejected proposals occupied. Returns how many."""
        keep = max(-(-num_tokens // self.block_size), seq.num_dropped_blocks)
        tail = seq.block_ids[keep:]
        for block_id in reversed(tail):
            self._unref(block_id)
        del seq.block_ids[keep:]
        return len(tail)

    def drop_out_of_window(self, seq: Sequence) -> int:
        """Release the blocks that no future query of `seq` reads (sliding window; see the
        module docstring). Returns how many were released."""
        if self.sliding_window is None:
            return 0
        bs = self.block_size
        first_needed = seq.num_computed_tokens - self.sliding_window + 1  # next query's window
        limit = max(first_needed, 0) // bs
        if self.enable_prefix_caching:  # the prefix chain registers a block through its parent
            limit = min(limit, seq.num_computed_tokens // bs - 1)
        limit = min(limit, len(seq.block_ids))
        for index in range(seq.num_dropped_blocks, limit):
            self._unref(seq.block_ids[index])
        released = max(limit - seq.num_dropped_blocks, 0)
        seq.num_dropped_blocks += released
        self.num_window_freed += released
        return released

    def _unref(self, block_id: int) -> None:
        block = self._blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self._release(block_id)

    def take_block_copies(self) -> list[BlockCopy]:
        """Copy-on-write copies recorded since the last call (the runner does them)."""
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def _attach_prefix(self, seq: Sequence, prefix: PrefixHit) -> None:
        for block_id in prefix.block_ids:
            if self._blocks[block_id].ref_count == 0:
                del self._free_cached[block_id]
            self._blocks[block_id].ref_count += 1
        seq.block_ids = list(prefix.block_ids)
        for digest, tokens in prefix.loaded:  # after the hits: taking blocks may evict others
            parent = self._blocks[seq.block_ids[-1]] if seq.block_ids else None
            block_id = self._take_free_block()
            self._register(block_id, parent, tokens, digest, _root(seq))
            self.tier.on_loaded(block_id, digest, tokens)
            seq.block_ids.append(block_id)
        seq.num_computed_tokens = seq.num_cached_tokens = prefix.num_tokens
        self.prefix_queries_tokens += seq.num_tokens
        self.prefix_hits_tokens += prefix.num_tokens

    def _cow_indices(self, seq: Sequence, num_computed: int, num_new_tokens: int) -> list[int]:
        """Table indices of shared, unregistered blocks that this step would write into."""
        first = num_computed // self.block_size
        last = min(-(-(num_computed + num_new_tokens) // self.block_size), len(seq.block_ids))
        return [
            i
            for i in range(first, last)
            if self._blocks[seq.block_ids[i]].ref_count > 1
            and self._blocks[seq.block_ids[i]].key is None  # registered ones hold final K/V
        ]

    def _copy_on_write(self, seq: Sequence, index: int) -> None:
        src = seq.block_ids[index]
        dst = self._take_free_block()
        self._blocks[src].ref_count -= 1
        seq.block_ids[index] = dst
        self._pending_copies.append(BlockCopy(src, dst))

    def _take_free_block(self) -> int:
        if self._free_uncached:
            block_id = self._free_uncached.popleft()
        else:
            block_id, _ = self._free_cached.popitem(last=False)  # evict least recently freed
            self._forget(block_id)
        self._blocks[block_id].ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.hash is not None and self._hash_to_block.get(block.hash) == block_id:
            self._free_cached[block_id] = None
        else:
            block.clear()  # not findable (a duplicate lost the hash slot): plain free block
            # handed out next (LIFO): `free` releases tails first, so a finished turn's partial
            # last block is reused by the next turn's first new block, right after the cached
            # prefix it extends. A single user's block table then stays one consecutive run,
            # which the CPU's decode attention reads in place instead of gathering it
            # (engine/attention.py, _block_run; tests/test_block_manager.py)
            self._free_uncached.appendleft(block_id)

    def _forget(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if self._hash_to_block.get(block.hash) == block_id:
            del self._hash_to_block[block.hash]
            if self.tier is not None and block.digest is not None:
                self.tier.on_evicted(block_id, block.digest, block.token_ids)
        block.clear()

    # -- monitoring -----------------------------------------------------------------------------

    def snapshot(self) -> BlockSnapshot:
        """Call on the engine thread; the result may then go to any thread."""
        seq_blocks = tuple((seq.seq_id, tuple(seq.live_block_ids))
                           for seq in list(self._holders.values()))
        num_free = self.num_free_blocks
        return BlockSnapshot(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            num_free=num_free,
            num_used=self.num_blocks - num_free,
            num_cached=len(self._free_cached),
            num_window_freed=self.num_window_freed,
            seq_blocks=seq_blocks,
            cached_block_ids=tuple(self._free_cached),
            prefix_queries_tokens=self.prefix_queries_tokens,
            prefix_hits_tokens=self.prefix_hits_tokens,
            usage=self.usage,
        )

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def is_free(self, block_id: int) -> bool:
        """Whether `block_id` sits in a free list (O(num_blocks): for tests and debugging)."""
        return block_id in self._free_cached or block_id in self._free_uncached
