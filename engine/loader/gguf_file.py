"""A GGUF file's header: metadata and tensor index, parsed in one pass over a memory map.

Why not `gguf.GGUFReader`: it builds numpy views for every part of every metadata value, so a
tokenizer's 49k tokens and 48k merges take it 5.4 s on the 2-core box, most of the default
model's cold start. Here a string array is one loop of `struct.unpack_from`, a numeric array
one `np.frombuffer`: the default model's header parses in about 0.1 s. The `gguf` package still
supplies the type tables (GGMLQuantizationType, GGML_QUANT_SIZES) and the dequantizers.

The format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), versions 2 and 3:

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count × (key: string, value_type u32, value)     string = u64 length + UTF-8 bytes
    tensor_count × (name: string, n_dims u32, dims u64 × n_dims, ggml_type u32, offset u64)
    padding to general.alignment (32) | tensor data, each tensor at data start + offset

Byte order follows the file (big-endian files exist; the version field tells). A tensor's
`data` has numpy's shape (the reverse of GGUF's dims); block-quantized types and BF16 come as
uint8 with the last dimension in bytes, as `gguf.quants.dequantize` expects.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF value types: struct format of the scalars (8 = string, 9 = array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
# ggml types numpy holds natively; every other type is read as bytes
_NATIVE = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64,
           28: np.float64}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: dims[0] is the fastest-varying (a row's length)
    data: np.ndarray  # a read-only view into the file, numpy order (see the module docstring)


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]  # key → str | int | float | bool | list
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, buf: mmap.mmap, endian: str):
        self.buf, self.pos, self.endian = buf, 0, endian
        # one compiled Struct per scalar format: a vocabulary reads ~100k lengths
        self._structs = {fmt: struct.Struct(endian + fmt) for fmt in _SCALARS.values()}

    def scalar(self, fmt: str) -> Any:
        packed = self._structs[fmt]
        (value,) = packed.unpack_from(self.buf, self.pos)
        self.pos += packed.size
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        raw = self.buf[self.pos:self.pos + n]
        if len(raw) != n:
            raise ValueError("a string runs past the end of the file")
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("I"), self.scalar("Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            if etype not in _SCALARS:
                raise ValueError(f"unknown array element type {etype}")
            dtype = np.dtype(self.endian + _SCALARS[etype])
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return values.tolist()
        raise ValueError(f"unknown metadata value type {vtype}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of the GGUF file at `path`; raises ValueError on anything unreadable."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # the type tables only

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    with path.open("rb") as f:
        if f.read(4) != MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        (version,) = struct.unpack_from("<I", buf, 4)
        endian = "<" if version & 0xFFFF else ">"  # a big-endian file's version reads swapped
        cur = _Cursor(buf, endian)
        cur.pos = 4
        version = cur.scalar("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (Hearth reads versions 2 and 3)")
        n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(cur.scalar("Q") for _ in range(cur.scalar("I")))
            infos.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
        alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        start = -(-cur.pos // alignment) * alignment
        tensors = [_tensor(buf, start, info, endian, GGMLQuantizationType, GGML_QUANT_SIZES)
                   for info in infos]
    except (struct.error, OverflowError, IndexError, KeyError, ValueError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e}); it may be truncated") from e
    return GGUFFile(path, version, metadata, tensors)


def _tensor(buf: mmap.mmap, start: int, info: tuple, endian: str, types: Any,
            sizes: dict) -> GGUFTensor:
    name, dims, ggml_type, offset = info
    qtype = types(ggml_type)  # ValueError for a type this gguf package does not know
    shape = tuple(reversed(dims))
    if ggml_type in _NATIVE:
        dtype = np.dtype(_NATIVE[ggml_type]).newbyteorder(endian)
        count = int(np.prod(dims, dtype=np.int64))
    else:
        block, nbytes = sizes[qtype]
        if shape[-1] % block:
            raise ValueError(f"tensor {name}: row of {shape[-1]} is not whole {qtype.name} blocks")
        shape = (*shape[:-1], shape[-1] // block * nbytes)
        dtype = np.dtype(np.uint8)
        count = int(np.prod(shape, dtype=np.int64))
    if start + offset + count * dtype.itemsize > len(buf):
        raise ValueError(f"tensor {name} runs past the end of the file")
    data = np.frombuffer(buf, dtype=dtype, count=count, offset=start + offset).reshape(shape)
    return GGUFTensor(name, qtype, dims, data)
