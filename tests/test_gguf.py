"""The GGUF reader and writer against the `gguf` package (llama.cpp's own Python reader) on the real file."""
import gguf
import numpy as np
import pytest

from tinyllava.gguf import GGUFError, GGUFFile, GGUFTensor, ValueType, write_gguf
from tinyllava.quant import GGMLType, quantize


def test_metadata_and_tensor_bytes_match_gguf_package(decoder_gguf):
    theirs = gguf.GGUFReader(decoder_gguf)
    ours = GGUFFile(decoder_gguf)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for k in keys:
        field = theirs.fields[k]
        assert ours.types[k][0] == field.types[0], k
        want, got = field.contents(), ours.metadata[k]
        if isinstance(want, list):
            assert list(got) == want, k
        else:
            assert got == want, k
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.type == t.tensor_type, t.name
        assert mine.shape == tuple(int(d) for d in reversed(t.shape)), t.name
        assert np.array_equal(mine.data, t.data.reshape(-1).view(np.uint8)), t.name


def test_rewriting_the_real_file_reproduces_it_byte_for_byte(decoder_gguf, tmp_path):
    g = GGUFFile(decoder_gguf)
    out = write_gguf(tmp_path / "copy.gguf", g.metadata, g.tensors, types=g.types, alignment=g.alignment)
    assert out.read_bytes() == decoder_gguf.read_bytes()


def test_round_trip_every_value_type(tmp_path):
    meta = {
        "u8": np.uint8(200), "i8": np.int8(-100), "u16": np.uint16(60000), "i16": np.int16(-30000),
        "u32": 4_000_000_000, "i32": np.int32(-2_000_000_000), "f32": 0.25, "bool": True, "str": "héllo 😀",
        "u64": np.uint64(2**63 + 5), "i64": np.int64(-2**62), "f64": np.float64(1 / 3),
        "arr_f32": np.array([1.5, -2.0], np.float32), "arr_str": ["a", "", "ü"], "arr_bool": np.array([True, False]),
        "arr_empty": [], "arr_i64": np.array([-1, 2**40], np.int64),
    }
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    tensors = {"f32": x, "f16": x.astype(np.float16),
               "q8": GGUFTensor("q8", GGMLType.Q8_0, x.shape, quantize(x, GGMLType.Q8_0))}
    path = write_gguf(tmp_path / "t.gguf", meta, tensors, alignment=64)
    g = GGUFFile(path)
    assert g.alignment == 64 and g.version == 3
    expected_types = {"u8": ValueType.UINT8, "i8": ValueType.INT8, "u16": ValueType.UINT16, "i16": ValueType.INT16,
                      "u32": ValueType.UINT32, "i32": ValueType.INT32, "f32": ValueType.FLOAT32,
                      "bool": ValueType.BOOL, "str": ValueType.STRING, "u64": ValueType.UINT64,
                      "i64": ValueType.INT64, "f64": ValueType.FLOAT64}
    for k, v in meta.items():
        if k.startswith("arr"):
            assert g.types[k][0] == ValueType.ARRAY
            assert list(g.metadata[k]) == list(v), k
        else:
            assert g.types[k][0] == expected_types[k], k
            assert g.metadata[k] == v, k
    assert np.array_equal(g.tensors["f32"].numpy(), x)
    assert np.array_equal(g.tensors["f16"].numpy(), x.astype(np.float16).astype(np.float32))
    assert g.tensors["q8"].type == GGMLType.Q8_0 and g.tensors["q8"].shape == (4, 64)
    for t in g.tensors.values():  # every tensor starts on the alignment
        assert t.data.ctypes.data % 64 == 0  # the map starts on a page: offsets in the file are addresses


def test_gguf_package_reads_what_we_write(tmp_path):
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    path = write_gguf(tmp_path / "t.gguf", {"general.architecture": "test", "n": 7}, {"w": x})
    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "test" and r.fields["n"].contents() == 7
    assert np.array_equal(r.tensors[0].data, x)


def test_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "t.gguf"
    path.write_bytes(b"old")
    with pytest.raises(GGUFError):
        write_gguf(path, {"bad": object()}, {})
    with pytest.raises(GGUFError):
        write_gguf(path, {}, {"w": np.zeros(3, np.int64)})
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["t.gguf"]
