"""engine/loader/gguf_file.py reads what gguf-py's GGUFReader reads: the same metadata values and
the same tensor views, on files written by llama.cpp's converter (tests/data/gguf), the default
model, and files with every metadata type in both byte orders."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from hearth.engine.catalog import resolve_model
from hearth.engine.loader.gguf_file import read_gguf

DATA = Path(__file__).parent / "data" / "gguf"


@pytest.fixture(scope="module")
def default_gguf() -> Path:
    return Path(resolve_model(None).path)


def _assert_same_as_reader(path: Path) -> None:
    ours = read_gguf(path)
    reader = gguf.GGUFReader(path)
    want = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == want
    assert len(ours.tensors) == len(reader.tensors)
    for mine, theirs in zip(ours.tensors, reader.tensors, strict=True):
        assert mine.name == theirs.name
        assert mine.tensor_type == theirs.tensor_type
        assert mine.shape == tuple(int(d) for d in theirs.shape)
        assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape
        np.testing.assert_array_equal(mine.data, theirs.data)
        assert not mine.data.flags.writeable


@pytest.mark.parametrize("path", sorted(DATA.glob("*.gguf")), ids=lambda p: p.name)
def test_converter_files_read_as_gguf_py_reads_them(path):
    _assert_same_as_reader(path)


def test_default_model_reads_as_gguf_py_reads_it(default_gguf):
    _assert_same_as_reader(default_gguf)


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_every_value_type_in_both_byte_orders(tmp_path, endian):
    path = tmp_path / "all.gguf"
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    writer.add_uint8("t.u8", 7)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 65535)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 2**63)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ✓")
    writer.add_array("t.strs", ["a", "", "Ġthe", "<|im_end|>"])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.25])
    writer.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("f16", np.arange(8, dtype=np.float16).reshape(2, 4))
    q = gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32),
                             gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_same_as_reader(path)
    md = read_gguf(path).metadata
    assert md["t.str"] == "héllo ✓" and md["t.u64"] == 2**63 and md["t.bool"] is True


def test_tensor_data_past_the_end_is_a_clear_error(tmp_path, default_gguf):
    cut = tmp_path / "cut.gguf"
    with default_gguf.open("rb") as f:
        cut.write_bytes(f.read(default_gguf.stat().st_size - 1000))  # header whole, data short
    with pytest.raises(ValueError, match="runs past the end of the file"):
        read_gguf(cut)
