"""fp8 checkpoints (ComfyUI fp8_e4m3fn / fp8_scaled, compressed-tensors) and the quantized formats
vpatch refuses."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import patcher
from patcher.errors import DtypeError, FormatError

from .conftest import K, V, directions, make_delta, model_tensors

FMT = {
    "e4m3": (torch.float8_e4m3fn, 3, -6),
    "e5m2": (torch.float8_e5m2, 2, -14),
}  # mantissa bits, min normal exponent


def half_ulp(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Half the spacing of fp8 numbers around |x| (the worst rounding error), written from the format's definition."""
    _, mant, emin = FMT[fmt]
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0**emin)))
    return 0.5 * 2.0 ** (e - mant)


def fp8_model(tmp_path, fmt, scale):
    """A bf16 reference model, its delta, and an fp8 copy of K and V with the given scale convention."""
    t = model_tensors(torch.float32)
    make_delta(tmp_path / "d.vud", t)
    dt = FMT[fmt][0]
    q = dict(t)
    scales = {}
    for k in (K, V):
        if scale == "comfy":  # ComfyUI fp8_scaled: one value, X.scale_weight
            s = t[k].abs().max() / 448 * 4
            scales[k] = s.reshape(1)
            q[k.removesuffix("weight") + "scale_weight"] = s.reshape(1)
        elif scale == "per_row":  # compressed-tensors: X.weight_scale, one value per output row
            s = t[k].abs().amax(dim=1, keepdim=True) / 200
            scales[k] = s
            q[k + "_scale"] = s
        else:
            scales[k] = torch.ones(1)
        q[k] = (t[k] / scales[k].reshape(-1, 1)).to(dt)
    save_file(q, tmp_path / "f8.safetensors")
    return q, scales


@pytest.mark.parametrize(
    "fmt, scale", [("e4m3", "comfy"), ("e4m3", "per_row"), ("e5m2", "none"), ("e4m3", "none")]
)
def test_fp8_edit_is_the_reference_within_fp8_resolution(tmp_path, fmt, scale):
    q, scales = fp8_model(tmp_path, fmt, scale)
    r = patcher.apply_delta(
        tmp_path / "f8.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors"
    )
    out = load_file(tmp_path / "o.safetensors")
    src = load_file(tmp_path / "f8.safetensors")
    B = directions()
    for k in (K, V):
        s = scales[k].reshape(-1, 1)
        assert out[k].dtype == FMT[fmt][0]
        W = q[k].float() * s  # what the fp8 checkpoint means
        ref = W - (W @ B) @ B.T
        got = out[k].float() * s
        bound = half_ulp(ref / s, fmt) * s * 1.001 + 1e-6
        assert bool(((got - ref).abs() <= bound).all()), float(((got - ref).abs() / bound).max())
        # the concept direction is mostly gone, up to fp8 rounding
        assert float((got @ B).norm()) < 0.35 * float((W @ B).norm())
    for k, v in src.items():  # scales and every untouched tensor are byte-identical
        if k not in (K, V):
            assert torch.equal(
                out[k].view(torch.uint8) if out[k].dtype.itemsize == 1 else out[k],
                v.view(torch.uint8) if v.dtype.itemsize == 1 else v,
            ), k
    st = {s.key: s for s in r.tensors}
    assert st[K].dtype == f"F8_{fmt.upper()}" and 0 < st[K].changed_fraction <= 1
    assert 0 <= st[K].rounding_error < 1.5  # reported, not silently dropped
    # probed on the fp32 base: an fp8 target cannot carry the same fingerprint
    assert all(p["fingerprint"] == "differs" for p in r.planned)


def test_fp8_revert_with_record_is_bit_exact(tmp_path):
    fp8_model(tmp_path, "e4m3", "comfy")
    patcher.apply_delta(
        tmp_path / "f8.safetensors",
        tmp_path / "d.vud",
        tmp_path / "o.safetensors",
        revert_record=tmp_path / "r.vpr",
    )
    r = patcher.revert_delta(
        tmp_path / "o.safetensors",
        tmp_path / "d.vud",
        tmp_path / "b.safetensors",
        record=tmp_path / "r.vpr",
    )
    assert all(s.exact for s in r.tensors)
    a, b = load_file(tmp_path / "f8.safetensors"), load_file(tmp_path / "b.safetensors")
    for k in a:
        assert (
            torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
            if a[k].dtype.itemsize == 1
            else torch.equal(a[k], b[k])
        )


def test_fp8_saturation_is_counted_not_wrapped(tmp_path):
    t = model_tensors(torch.float32)
    make_delta(
        tmp_path / "d.vud", t, strength=-400.0
    )  # a huge "negative removal" pushes values past fp8's range
    q = dict(t)
    q[K] = (t[K] / t[K].abs().max() * 440).to(torch.float8_e4m3fn)
    q[V] = (t[V] / t[V].abs().max() * 440).to(torch.float8_e4m3fn)
    save_file(q, tmp_path / "f8.safetensors")
    r = patcher.apply_delta(
        tmp_path / "f8.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors"
    )
    out = load_file(tmp_path / "o.safetensors")
    assert all(s.saturated > 0 for s in r.tensors)
    assert sum("were clamped" in w for w in r.warnings) == 2
    assert float(out[K].float().abs().max()) == 448.0 and bool(torch.isfinite(out[K].float()).all())


def _write_raw(path, tensors: dict, metadata=None):
    """A safetensors file with arbitrary dtype names (F4, U8...), written byte by byte."""
    hdr, data, pos = {}, b"", 0
    for name, (dtype, shape, nbytes) in tensors.items():
        hdr[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        data += bytes(nbytes)
        pos += nbytes
    if metadata:
        hdr["__metadata__"] = metadata
    text = json.dumps(hdr).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    "extra, dtype, msg",
    [
        ({}, "F4", "F4 \\(4/6-bit float"),
        ({}, "F6_E2M3", "F6_E2M3"),
        ({K + "_scale_inv": ("F32", [1, 1], 4)}, "F8_E4M3", "block-wise scales"),
    ],
)
def test_unsupported_quantizations_are_refused_with_what_is_supported(tmp_path, extra, dtype, msg):
    t = model_tensors(torch.float32)
    make_delta(tmp_path / "d.vud", t)
    out_d, in_d = t[K].shape
    nbytes = {"F4": out_d * in_d // 2, "F6_E2M3": out_d * in_d * 6 // 8, "F8_E4M3": out_d * in_d}[
        dtype
    ]
    _write_raw(
        tmp_path / "q.safetensors",
        {K: (dtype, [out_d, in_d], nbytes), V: ("F32", [out_d, in_d], out_d * in_d * 4), **extra},
    )
    with pytest.raises(DtypeError, match=f"{msg}.*F32, F16, BF16, and F8_E4M3/F8_E5M2"):
        patcher.apply_delta(
            tmp_path / "q.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors"
        )
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(
    "dtype, markers",
    [
        (
            "U8",
            {K + ".absmax": ("F32", [4], 16), K + ".quant_state.bitsandbytes__nf4": ("U8", [8], 8)},
        ),  # 4-bit
        ("I8", {K.removesuffix(".weight") + ".SCB": ("F32", [40], 160)}),  # LLM.int8()
    ],
)
def test_bitsandbytes_weight_with_the_expected_shape_is_refused_by_name(tmp_path, dtype, markers):
    t = model_tensors(torch.float32)
    make_delta(tmp_path / "d.vud", t)
    out_d, in_d = t[K].shape
    spec = {
        K: (dtype, [out_d, in_d], out_d * in_d),
        V: ("F32", [out_d, in_d], out_d * in_d * 4),
        **markers,
    }
    _write_raw(tmp_path / "q.safetensors", spec)
    with pytest.raises(DtypeError, match="bitsandbytes-quantized.*F8_E4M3/F8_E5M2"):
        patcher.apply_delta(
            tmp_path / "q.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors"
        )


def test_gguf_is_refused_as_a_file_and_in_a_folder(tmp_path):
    make_delta(tmp_path / "d.vud", model_tensors(torch.float32))
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(FormatError, match="GGUF.*F8_E4M3/F8_E5M2"):
        patcher.apply_delta(tmp_path / "m.gguf", tmp_path / "d.vud", tmp_path / "o.safetensors")
    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfy" / "wan-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(FormatError, match="GGUF"):
        patcher.apply_delta(tmp_path / "comfy", tmp_path / "d.vud", tmp_path / "o")
