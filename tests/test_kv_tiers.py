"""KV tiers below the device cache (engine/kv_tiers/): the disk store's checks, LRU and failure
handling, and the block manager's tier hooks with a fake tier (no model, milliseconds)."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os

import pytest

from hearth.engine.block_manager import BlockManager
from hearth.engine.kv_tiers.disk_store import DiskStore
from hearth.engine.kv_tiers.identity import ModelIdentity, block_digest
from hearth.engine.sampling_params import SamplingParams
from hearth.engine.sequence import Sequence

IDENTITY = ModelIdentity("ab" * 32, "float32", "float32", 4, 2, 1, 8)
PAYLOAD_LEN = 2 * 2 * 4 * 1 * 8 * 4  # K and V, 2 layers, 4 tokens, 1 head, 8 dims, float32


def _payload(seed: int) -> bytes:
    return bytes((seed * 31 + i * 7) % 256 for i in range(PAYLOAD_LEN))


def _store(tmp_path, identity=IDENTITY, budget=1 << 30) -> DiskStore:
    store = DiskStore.open(tmp_path / "cache", identity, budget)
    assert store is not None
    return store


def _chain(num_blocks: int, start: int = 0) -> list[tuple[bytes, tuple[int, ...]]]:
    blocks, parent = [], None
    for b in range(num_blocks):
        tokens = tuple(range(start + 4 * b, start + 4 * b + 4))
        parent = block_digest(parent, tokens)
        blocks.append((parent, tokens))
    return blocks


def test_round_trip_survives_a_new_store(tmp_path):
    store = _store(tmp_path)
    (digest, tokens), = _chain(1)
    store.write(digest, tokens, _payload(1))
    reopened = _store(tmp_path)  # a restart: the index comes from the file names
    assert digest in reopened and reopened.num_blocks == 1
    assert reopened.read(digest, tokens) == _payload(1)


def test_truncated_file_is_detected_and_deleted(tmp_path, caplog):
    store = _store(tmp_path)
    (digest, tokens), = _chain(1)
    store.write(digest, tokens, _payload(1))
    path = store.dir / (digest.hex() + ".kv")
    path.write_bytes(path.read_bytes()[:-10])  # a crash mid-write of an older version
    reopened = _store(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert reopened.read(digest, tokens) is None
    assert "truncated" in caplog.text
    assert not path.exists() and digest not in reopened and reopened.num_rejected == 1


def test_flipped_payload_byte_fails_the_checksum(tmp_path, caplog):
    store = _store(tmp_path)
    (digest, tokens), = _chain(1)
    store.write(digest, tokens, _payload(1))
    path = store.dir / (digest.hex() + ".kv")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert store.read(digest, tokens) is None
    assert "checksum" in caplog.text


@pytest.mark.parametrize("damage", ["none", "truncated", "overlong", "payload", "header",
                                    "tokens"])
def test_read_into_a_buffer_checks_as_much(tmp_path, damage):
    """The prefix store's path (one vectored read into the caller's buffer) rejects what the
    plain read rejects, and deletes the file."""
    store = _store(tmp_path)
    (digest, tokens), = _chain(1)
    store.write(digest, tokens, _payload(1))
    path = store.dir / (digest.hex() + ".kv")
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[-10:]
    elif damage == "overlong":
        data += b"\0"
    elif damage == "payload":
        data[-1] ^= 0x01
    elif damage == "header":
        data[5] ^= 0x01
    path.write_bytes(bytes(data))
    out = memoryview(bytearray(PAYLOAD_LEN))
    want_tokens = (9, 9, 9, 9) if damage == "tokens" else tokens
    got = store.read(digest, want_tokens, out=out)
    if damage == "none":
        assert got is out and bytes(out) == _payload(1)
    else:
        assert got is None and not path.exists() and store.num_rejected == 1


def test_read_many_checks_each_file_and_touches_the_good_ones(tmp_path):
    """A reader thread's share of a long prefix: every file checked as `read` checks it; the
    damaged ones rejected, counted and deleted, the rest read byte-exact and made most recent."""
    store = _store(tmp_path)
    blocks = _chain(6)
    for i, (digest, tokens) in enumerate(blocks):
        store.write(digest, tokens, _payload(i))
    for i in (1, 4):
        path = store.dir / (blocks[i][0].hex() + ".kv")
        data = bytearray(path.read_bytes())
        data[-1 - i] ^= 0x10  # a flipped payload bit
        path.write_bytes(bytes(data))
    outs = [memoryview(bytearray(PAYLOAD_LEN)) for _ in blocks]
    found = store.read_many(blocks[::-1], outs[::-1])[::-1]  # last written, first read
    assert found == [i not in (1, 4) for i in range(6)]
    assert store.num_rejected == 2
    for i, (digest, _) in enumerate(blocks):
        if i in (1, 4):
            assert digest not in store and not (store.dir / (digest.hex() + ".kv")).exists()
        else:
            assert bytes(outs[i]) == _payload(i) and digest in store
    newest = [os.path.basename(p) for p in store._lru][-4:]  # the hits, in read order
    assert newest == [blocks[i][0].hex() + ".kv" for i in (5, 3, 2, 0)]


def test_wrong_tokens_under_a_digest_are_rejected(tmp_path):
    store = _store(tmp_path)
    (digest, tokens), = _chain(1)
    store.write(digest, tokens, _payload(1))
    assert store.read(digest, (9, 9, 9, 9)) is None


@pytest.mark.parametrize("change", [{"block_size": 8}, {"dtype": "bfloat16"},
                                    {"kv_dtype": "float8_e4m3fn"}, {"weights_sha256": "cd" * 32}])
def test_changed_model_dtype_or_block_size_never_loads_stale_blocks(tmp_path, change):
    store = _store(tmp_path)
    (digest, tokens), = _chain(1)
    store.write(digest, tokens, _payload(1))
    other = _store(tmp_path, dataclasses.replace(IDENTITY, **change))
    assert digest not in other and other.num_blocks == 0
    # even a stale file moved into the new identity's directory is refused
    os.replace(store.dir / (digest.hex() + ".kv"), other.dir / (digest.hex() + ".kv"))
    other = _store(tmp_path, dataclasses.replace(IDENTITY, **change))
    assert digest in other and other.read(digest, tokens) is None


def test_budget_evicts_least_recently_used_files(tmp_path):
    blocks = _chain(4)
    store = _store(tmp_path)
    for i, (digest, tokens) in enumerate(blocks[:3]):
        store.write(digest, tokens, _payload(i))
    file_size = store.num_bytes // 3
    store.read(*blocks[0])  # touched: now the most recently used
    store.flush()  # the file's mtime is set on the writer thread
    small = _store(tmp_path, budget=3 * file_size)
    small.write(*blocks[3], _payload(3))
    assert blocks[1][0] not in small  # the oldest one untouched went first
    assert all(d in small for d, _ in (blocks[0], blocks[2], blocks[3]))
    assert small.num_bytes <= 3 * file_size


def test_unusable_cache_dir_logs_and_runs_without(tmp_path, caplog):
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("I am a file")
    with caplog.at_level(logging.ERROR):
        assert DiskStore.open(not_a_dir, IDENTITY, 1 << 30) is None
    assert "unusable" in caplog.text


def test_garbage_in_the_cache_dir_is_skipped(tmp_path):
    store = _store(tmp_path)
    (digest, tokens), = _chain(1)
    (store.dir / "notes.txt").write_text("hello")
    (store.dir / "zz-not-hex.kv").write_bytes(b"junk")
    (store.dir / (digest.hex() + ".kv")).write_bytes(b"HKVB garbage")
    (store.dir / ".stale.kv.tmp").write_bytes(b"half")
    reopened = _store(tmp_path)
    assert reopened.read(digest, tokens) is None
    assert not (store.dir / ".stale.kv.tmp").exists()


def test_full_disk_drops_the_write_and_logs(tmp_path, caplog, monkeypatch):
    store = _store(tmp_path)
    blocks = _chain(2)
    store.write(*blocks[0], _payload(0))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with caplog.at_level(logging.WARNING):
        store.write(*blocks[1], _payload(1))
    assert "full" in caplog.text
    assert blocks[1][0] not in store
    assert not list(store.dir.glob(".*.tmp"))


def test_async_writes_reach_the_disk(tmp_path):
    store = _store(tmp_path)
    blocks = _chain(3)
    for i, block in enumerate(blocks):
        assert store.write_async(*block, lambda i=i: _payload(i))
    store.flush()
    assert all(store.read(*block) == _payload(i) for i, block in enumerate(blocks))
    store.close()


# -- the block manager's hooks -----------------------------------------------------------------


class FakeTier:
    """Holds digests; records the hooks the block manager calls."""

    def __init__(self, held: set[bytes] = frozenset()) -> None:
        self.held = set(held)
        self.registered, self.evicted, self.loaded = [], [], []

    def digest(self, parent, token_ids):
        return block_digest(parent, token_ids)

    def lookup(self, blocks):
        run = 0
        while run < len(blocks) and blocks[run][0] in self.held:
            run += 1
        return run

    def on_registered(self, block_id, digest, token_ids):
        self.registered.append(digest)

    def on_evicted(self, block_id, digest, token_ids):
        self.evicted.append(digest)

    def on_loaded(self, block_id, digest, token_ids):
        self.loaded.append((block_id, digest))


def _seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", tokens, SamplingParams(max_tokens=None))


def _run(bm: BlockManager, seq: Sequence) -> None:
    hit = bm.match_prefix(seq)
    assert bm.allocate(seq, seq.num_tokens - (hit.num_tokens if hit else 0), hit)
    before = seq.num_computed_tokens
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_blocks(seq, before)


def test_registered_blocks_carry_the_stable_chain():
    bm = BlockManager(8, 4)
    bm.tier = tier = FakeTier()
    _run(bm, _seq(0, list(range(10))))
    assert tier.registered == [d for d, _ in _chain(2)]


def test_lookup_continues_past_the_device_into_the_tier():
    chain = _chain(3)
    bm = BlockManager(8, 4)
    bm.tier = tier = FakeTier()
    _run(bm, _seq(0, list(range(4)) + [99]))  # block 0 on the device
    tier.held = {d for d, _ in chain}
    seq = _seq(1, list(range(13)))
    hit = bm.match_prefix(seq)
    assert len(hit.block_ids) == 1 and [d for d, _ in hit.loaded] == [d for d, _ in chain[1:]]
    assert hit.num_tokens == 12
    assert bm.allocate(seq, 1, hit)
    assert [d for _, d in tier.loaded] == [d for d, _ in chain[1:]]
    assert [b for b, _ in tier.loaded] == seq.block_ids[1:3]
    again = bm.match_prefix(_seq(2, list(range(13))))  # now found on the device itself
    assert len(again.block_ids) == 3 and not again.loaded


def test_allocation_counts_loaded_blocks_all_or_nothing():
    chain = _chain(3)
    bm = BlockManager(3, 4)
    bm.tier = tier = FakeTier({d for d, _ in chain})
    seq = _seq(0, list(range(13)))  # 3 loaded blocks + 1 for the last token: 4 > 3 free
    hit = bm.match_prefix(seq)
    assert not bm.allocate(seq, 1, hit)
    assert bm.num_free_blocks == 3 and not tier.loaded and not seq.block_ids


def test_evicted_registered_blocks_reach_the_tier():
    bm = BlockManager(2, 4)
    bm.tier = tier = FakeTier()
    first = _seq(0, list(range(8)))
    _run(bm, first)
    bm.free(first)
    _run(bm, _seq(1, list(range(100, 108))))  # needs both blocks: evicts the cached ones
    assert sorted(tier.evicted) == sorted(d for d, _ in _chain(2))


# -- block payloads between the cache tensors and host memory ---------------------------------


def _caches(device: str, dtype):
    import torch

    from hearth.engine.kv_cache import LayerKVCache

    shape = (6, 4, 2, 8)  # (num_blocks, block_size, num_kv_heads, head_dim)
    out = []
    for _ in range(3):
        key, value = (torch.randn(shape, device=device).to(dtype) for _ in range(2))
        out.append(LayerKVCache(key, value))
    return out


def _round_trip(device: str, dtype) -> None:
    import torch

    from hearth.engine.kv_tiers.block_io import BlockIO

    caches = _caches(device, dtype)
    io = BlockIO(caches)
    saved = io.save([4, 1])
    payloads = [row.clone() for row in saved.wait()]
    assert payloads[0].numel() == io.block_nbytes == 3 * 2 * 4 * 2 * 8 * dtype.itemsize
    io.load([0, 5], payloads)
    for layer in caches:
        for cache in layer:
            raw = cache.view(torch.uint8)  # byte-exact, whatever the dtype
            assert torch.equal(raw[0], raw[4]) and torch.equal(raw[5], raw[1])
            assert not torch.equal(raw[2], raw[4])


def test_block_io_round_trip_is_byte_exact_cpu():
    import torch

    _round_trip("cpu", torch.float32)
    _round_trip("cpu", torch.bfloat16)


@pytest.mark.gpu
def test_block_io_round_trip_is_byte_exact_cuda():
    import torch

    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        _round_trip("cuda", dtype)
    torch.cuda.synchronize()
