"""A twin edit (map_input) through the other consumers of a delta: the LoRA export adds the same
weights apply writes, the LoRA import keeps its factors, and `merge` composes two maps (W M_a M_b;
tests/test_merge_twin.py checks the composition through apply) but refuses a map with an additive
edit (the LoRA read back)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from patcher.erasure.refusal import orthonormalize
from patcher.errors import DeltaError
from patcher.merge.engine import apply_delta
from patcher.vud.combine import merge_deltas
from patcher.vud.delta import Delta, map_input_entry, write_delta
from patcher.vud.lora import export_lora, lora_to_delta

from . import tiny_pipes

KEY = "condition_embedder.text_embedder.linear_1.weight"


def _delta(W: torch.Tensor, seed: int, name: str) -> Delta:
    g = torch.Generator().manual_seed(seed)
    Q = orthonormalize(torch.randn(W.shape[1], 2, generator=g))
    P = -0.5 * Q + 0.1 * torch.randn(W.shape[1], 2, generator=g)
    e = map_input_entry(f"transformer/{KEY}", W, P, Q, 1.0)
    return Delta([e], {"name": name}, {"name": "twin", "family": "wan"})


def test_map_input_lora_export_equals_apply_and_merge_composes(tmp_path):
    src, _call = tiny_pipes.wan(tmp_path / "wan")
    f = src / "transformer" / "diffusion_pytorch_model.safetensors"
    W = load_file(f)[KEY].float()
    d = _delta(W, 0, "red")
    write_delta(tmp_path / "d.vud", d)
    apply_delta(src, tmp_path / "d.vud", tmp_path / "applied")
    want = load_file(tmp_path / "applied" / "transformer" / "diffusion_pytorch_model.safetensors")[
        KEY
    ].float()
    export_lora(tmp_path / "d.vud", src, tmp_path / "l.safetensors", target="diffusers")
    lora = load_file(tmp_path / "l.safetensors")
    name = f"transformer.{KEY[: -len('.weight')]}"
    got = W + lora[f"{name}.lora_B.weight"] @ lora[f"{name}.lora_A.weight"]
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert not torch.allclose(W, want, rtol=0, atol=1e-3)
    back = lora_to_delta(tmp_path / "l.safetensors")
    assert [e.kind for e in back.entries] == ["add"]
    d2 = _delta(W, 1, "blue")
    (m,) = merge_deltas([d, d2]).entries
    eye = torch.eye(W.shape[1], dtype=torch.float64)
    Ma, Mb = (eye + x.entries[0].P.double() @ x.entries[0].V.double().T for x in (d, d2))
    assert m.kind == "map_input"
    assert torch.allclose(eye + m.P.double() @ m.V.double().T, Ma @ Mb, atol=1e-5)
    with pytest.raises(DeltaError, match="additive"):
        merge_deltas([d, back])
