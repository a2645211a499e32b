"""What makes stored KV blocks reusable: the model's identity and each block's stable digest.

A block's K/V depend on every token before it, the exact weights, the compute dtype, the cache
dtype and the block size. All of these go into a key, so blocks written by another model, dtype
or block size are never found (they sit under another identity's directory and carry its digest):

    identity digest = blake2b(weights sha256, dtype, kv dtype, block size, model shape, format)
    block digest    = blake2b(parent block digest, this block's token ids)   (chained, stable)

The block manager's in-memory hash (Python's `hash`) is not stable across processes, hence the
separate chained digest here. No torch: the block manager calls `block_digest`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the on-disk block layout changes
DIGEST_SIZE = 16


@dataclass(frozen=True)
class ModelIdentity:
    """Everything the bytes of a KV block depend on, besides its tokens."""

    weights_sha256: str  # of the weight files (or "dummy:<seed>:<config sha256>")
    dtype: str  # compute precision, e.g. "bfloat16", "float32+kept-blocks+bf16-gemv"
    kv_dtype: str  # cache dtype, e.g. "float8_e4m3fn"
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    format_version: int = FORMAT_VERSION

    @property
    def digest(self) -> bytes:
        text = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.blake2b(text, digest_size=DIGEST_SIZE).digest()

    @property
    def block_nbytes_per_value(self) -> int:
        """Values per block (K and V of every layer): the payload is this times the itemsize."""
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim


def block_digest(parent: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """Stable chained digest of one full block (the same in every process and on every host)."""
    h = hashlib.blake2b(parent or b"\0" * DIGEST_SIZE, digest_size=DIGEST_SIZE)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def weights_sha256(files: list[Path], known: dict[str, str], memo_path: Path | None) -> str:
    """One sha256 over the weight files' digests (sorted by name).

    `known`: digests the catalogue lists (checked when the model loads), used as they are. Other
    files are hashed once and remembered in `memo_path` by (path, size, mtime): hashing 16 GB of
    safetensors at every start would take a minute."""
    memo = _read_memo(memo_path)
    digests = []
    for path in sorted(files, key=lambda p: p.name):
        digest = known.get(path.name)
        if digest is None:
            stat = path.stat()
            memo_key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
            digest = memo.get(memo_key) or _sha256(path)
            memo[memo_key] = digest
        digests.append(f"{path.name}:{digest}")
    _write_memo(memo_path, memo)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_memo(path: Path | None) -> dict[str, str]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError) as e:
        logger.warning("ignoring the unreadable weights-digest memo %s: %s", path, e)
        return {}


def _write_memo(path: Path | None, memo: dict[str, str]) -> None:
    if path is None:
        return
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # a read-only or full cache dir costs a re-hash next time, nothing else
        logger.warning("cannot write the weights-digest memo %s: %s", path, e)
