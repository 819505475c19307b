import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from patcher.errors import FormatError
from patcher.safetensors_io import (
    MAX_HEADER_SIZE,
    TensorReader,
    read_header,
    row_blocks,
    save_tensors,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.randn(2, 2, 2, generator=g).to(torch.float16),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "bytes": torch.arange(5, dtype=torch.uint8),
    }


def test_writer_output_reads_back_in_safe_open_like_save_file(tmp_path):
    t = _tensors()
    save_tensors(tmp_path / "ours.safetensors", t, {"format": "pt", "k": "v"})
    save_file(t, tmp_path / "ref.safetensors", metadata={"format": "pt", "k": "v"})
    with (
        safe_open(tmp_path / "ours.safetensors", "pt") as a,
        safe_open(tmp_path / "ref.safetensors", "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys()) == set(t)
        assert a.metadata() == b.metadata()
        for k in t:
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.dtype == y.dtype == t[k].dtype and x.shape == y.shape
            assert torch.equal(x, y)
    assert (tmp_path / "ours.safetensors").stat().st_size % 1 == 0
    n = struct.unpack("<Q", (tmp_path / "ours.safetensors").read_bytes()[:8])[0]
    assert (8 + n) % 8 == 0  # data buffer is 8-aligned like the reference writer's


def test_reader_agrees_with_save_file(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "ref.safetensors")
    h = read_header(tmp_path / "ref.safetensors")
    assert set(h.tensors) == set(t)
    with TensorReader(h) as rd:
        for k in ("a", "b", "c", "ids"):
            assert torch.equal(rd.tensor(k), t[k])
        assert torch.equal(rd.rows("a", 1, 3), t["a"][1:3])


def test_row_blocks_cover_all_rows():
    blocks = row_blocks((1000, 300), 300 * 4 * 7)
    assert blocks[0] == (0, 7) and blocks[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


def _craft(header: dict | bytes, data: bytes = b"", n: int | None = None) -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(hb) if n is None else n) + hb + data


BAD = {
    "not safetensors": b"this is a README, not weights\n" * 3,
    "too short": b"\x01\x02",
    "header past end": _craft({}, n=10_000),
    "header over bound": struct.pack("<Q", MAX_HEADER_SIZE + 1) + b"{}",
    "bad json": _craft(b'{"a": {"dtype": "F32", '),
    "not an object": _craft(b"[1, 2, 3]"),
    "duplicate key": _craft(
        b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
        b"\x00",
    ),
    "overlap": _craft(
        {
            "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
            "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
        },
        b"\x00" * 3,
    ),
    "hole": _craft(
        {
            "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
            "b": {"dtype": "U8", "shape": [1], "data_offsets": [2, 3]},
        },
        b"\x00" * 3,
    ),
    "byte count": _craft(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\x00" * 4
    ),
    "truncated data": _craft(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\x00" * 9
    ),
    "trailing bytes": _craft(
        {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\x00" * 5
    ),
    "unknown dtype": _craft(
        {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\x00" * 16
    ),
    "bool shape": _craft({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"\x00"),
    "metadata not strings": _craft({"__metadata__": {"x": 1}}),
    "sub-byte": _craft({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\x00" * 2),
    "not utf8": _craft(b"{\xff\xfe}"),
    "deep json": _craft(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_get_a_named_error(tmp_path, case):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(BAD[case])
    with pytest.raises(FormatError) as ei:
        read_header(p)
    assert str(p) in str(ei.value)


def test_real_file_truncated_anywhere_is_rejected(tmp_path):
    save_file(_tensors(), tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    for cut in (1, 8, 20, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(FormatError):
            read_header(p)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzz_header_mutations_only_raise_format_error(tmp_path, data):
    base = tmp_path / "base.safetensors"
    if not base.exists():
        save_file(_tensors(), base, metadata={"m": "x"})
    raw = bytearray(base.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, 8 + n - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(bytes(raw))
    try:
        h = read_header(p)
    except FormatError:
        return
    # whatever parsed must be self-consistent
    assert sum(t.nbytes for t in h.tensors.values()) == h.file_size - h.data_start


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    header=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
        max_leaves=12,
    ),
    tail=st.binary(max_size=32),
)
def test_fuzz_arbitrary_json_headers(tmp_path, header, tail):
    p = tmp_path / "j.safetensors"
    p.write_bytes(_craft(json.dumps(header).encode(), tail))
    try:
        read_header(p)
    except FormatError:
        pass
