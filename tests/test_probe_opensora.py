"""Open-Sora 1.2 / 2.0: no diffusers port, so the probe reads the official single file lazily and
runs only the T5 (and CLIP) encoders from transformers. Fixtures are synthetic files with the real
key names (small shapes)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

pytest.importorskip("transformers")

from patcher.cli import main  # noqa: E402
from patcher.erasure.refusal import edit_weight  # noqa: E402
from patcher.vud.delta import read_delta  # noqa: E402
from tests import tiny_pipes  # noqa: E402


def _t5_folder(d):
    tiny_pipes.tiny_t5().save_pretrained(str(d))
    tiny_pipes.t5_tokenizer(d / "_tok").save_pretrained(str(d))
    return d


def _clip_folder(d, hidden=16):
    tiny_pipes.tiny_clip_text(hidden).save_pretrained(str(d))
    tiny_pipes.clip_tokenizer(d / "_tok").save_pretrained(str(d))
    return d


def _opensora12(path, H=48, C=32, prefix=""):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    t = {
        "y_embedder.y_proj.fc1.weight": r(H, C),
        "y_embedder.y_proj.fc1.bias": r(H),
        "y_embedder.y_proj.fc2.weight": r(H, H),
        "y_embedder.y_proj.fc2.bias": r(H),
        "y_embedder.y_embedding": r(300, C),
        "x_embedder.proj.weight": r(H, 4, 1, 2, 2),
        "t_embedder.mlp.0.weight": r(H, 256),
    }
    for kind in ("spatial", "temporal"):
        for i in range(2):
            t[f"{kind}_blocks.{i}.cross_attn.kv_linear.weight"] = r(2 * H, H)
            t[f"{kind}_blocks.{i}.cross_attn.kv_linear.bias"] = r(2 * H)
            t[f"{kind}_blocks.{i}.attn.qkv.weight"] = r(3 * H, H)
    save_file(
        {prefix + k: v.to(torch.bfloat16) for k, v in t.items()},
        str(path),
        metadata={"format": "pt"},
    )
    return t


def _opensora2(path, H=64, C=32, P=16):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    t = {
        "txt_in.weight": r(H, C),
        "txt_in.bias": r(H),
        "vector_in.in_layer.weight": r(H, P),
        "vector_in.in_layer.bias": r(H),
        "vector_in.out_layer.weight": r(H, H),
        "img_in.weight": r(H, 16),
    }
    for i in range(2):
        for s in ("img", "txt"):
            t[f"double_blocks.{i}.{s}_attn.qkv.weight"] = r(3 * H, H)
            t[f"double_blocks.{i}.{s}_attn.proj.weight"] = r(H, H)
            t[f"double_blocks.{i}.{s}_mlp.0.weight"] = r(4 * H, H)
            t[f"double_blocks.{i}.{s}_mlp.2.weight"] = r(H, 4 * H)
        t[f"single_blocks.{i}.linear1.weight"] = r(3 * H + 4 * H, H)
    save_file({k: v.to(torch.bfloat16) for k, v in t.items()}, str(path), metadata={"format": "pt"})
    return t


def run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res


@pytest.mark.parametrize("version", ["1.2", "1.2-prefixed", "2.0"])
def test_opensora_single_file_probe_and_apply(version, tmp_path):
    prefix = "model.diffusion_model." if version.endswith("prefixed") else ""
    version = version.split("-")[0]
    ck = tmp_path / ("opensora12.safetensors" if version == "1.2" else "Open_Sora_v2.safetensors")
    _opensora12(ck, prefix=prefix) if version == "1.2" else _opensora2(ck)
    t5 = _t5_folder(tmp_path / "t5")
    args = [
        "probe",
        ck,
        "-c",
        "violence",
        "-o",
        tmp_path / "v.vud",
        "--rank",
        "4",
        "--json",
        "--encoder",
        f"text={t5}",
    ]
    if (
        version == "2.0"
    ):  # the text-mode sites (the default, txt_mlp, is denoise mode: test_opensora2_probe.py)
        args += [
            "--encoder",
            f"pooled={_clip_folder(tmp_path / 'clip')}",
            "--layers",
            "txt_in,vector_in",
        ]
    res = run(*args)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["family"] == (
        "opensora12" if version == "1.2" else "opensora2"
    )  # detected from the keys
    delta = read_delta(tmp_path / "v.vud")
    want = (
        [f"transformer/{prefix}y_embedder.y_proj.fc1.weight"]
        if version == "1.2"
        else ["transformer/txt_in.weight", "transformer/vector_in.in_layer.weight"]
    )
    assert sorted(e.key for e in delta.entries) == want
    assert all(e.base_dtype == "BF16" for e in delta.entries)

    out = tmp_path / "safe.safetensors"
    res = run("apply", ck, tmp_path / "v.vud", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    edited = {e.tensor_key: e for e in delta.entries}
    with safe_open(str(ck), "pt") as a, safe_open(str(out), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            if k in edited:
                W0 = a.get_tensor(k).float()
                ref = edit_weight(W0, edited[k].V, 1.0).to(torch.bfloat16)
                assert torch.equal(b.get_tensor(k), ref) or torch.allclose(
                    b.get_tensor(k).float(), ref.float(), atol=1e-2 * float(W0.abs().max())
                )
                assert not torch.equal(a.get_tensor(k), b.get_tensor(k))
            else:
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_opensora12_cross_kv_edits_every_fused_kv_linear_through_the_caption_mlp(prefix, tmp_path):
    """kv_linear reads y_embedder's output: the probe's chain (fc1, gelu-tanh, fc2) must reproduce it,
    and the edit lands on both row blocks (K and V) of every spatial and temporal cross-attention."""
    from transformers import AutoTokenizer, T5EncoderModel

    from patcher.probe.capture import site_inputs

    ck = tmp_path / "opensora12.safetensors"
    t = _opensora12(ck, prefix=prefix)
    t5 = _t5_folder(tmp_path / "t5")
    res = run(
        "probe",
        ck,
        "-c",
        "violence",
        "--layers",
        "cross_kv",
        "-o",
        tmp_path / "v.vud",
        "--rank",
        "4",
        "--json",
        "--encoder",
        f"text={t5}",
    )
    assert res.exit_code == 0, res.output
    delta = read_delta(tmp_path / "v.vud")
    assert sorted(e.tensor_key for e in delta.entries) == sorted(
        f"{prefix}{k}_blocks.{i}.cross_attn.kv_linear.weight"
        for k in ("spatial", "temporal")
        for i in range(2)
    )
    assert (
        len({tuple(e.V.flatten().tolist()) for e in delta.entries}) == 1
    )  # one shared input, one direction

    # the captured site input is y_embedder's MLP applied to the T5 output, computed here by hand
    enc, tok = T5EncoderModel.from_pretrained(str(t5)), AutoTokenizer.from_pretrained(str(t5))
    # Open-Sora 1.2's inference appends its aesthetic score before T5 (the recipe's template)
    ids = tok(["a red ball aesthetic score: 6.5."], return_tensors="pt")
    with torch.no_grad():
        h = (
            enc(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
            .last_hidden_state[0]
            .float()
        )
    W = {k: v.to(torch.bfloat16).float() for k, v in t.items()}
    y = torch.nn.functional.gelu(
        h @ W["y_embedder.y_proj.fc1.weight"].T + W["y_embedder.y_proj.fc1.bias"],
        approximate="tanh",
    )
    y = y @ W["y_embedder.y_proj.fc2.weight"].T + W["y_embedder.y_proj.fc2.bias"]
    ((got, mask),) = next(
        iter(
            site_inputs(
                ck, "cross_kv", ["a red ball"], family="opensora12", encoders={"text": str(t5)}
            ).values()
        )
    )
    n = int(ids.attention_mask.sum())
    assert got.shape[-1] == y.shape[-1] and (mask is None or int(mask.sum()) == n)
    assert torch.allclose(
        got.reshape(-1, y.shape[-1])[:n].float(), y[:n], atol=1e-3 * float(y.abs().max())
    )

    res = run("apply", ck, tmp_path / "v.vud", "-o", tmp_path / "safe.safetensors", "-q")
    assert res.exit_code == 0, res.output
    with safe_open(str(ck), "pt") as a, safe_open(str(tmp_path / "safe.safetensors"), "pt") as b:
        for e in delta.entries:
            W0, W1 = a.get_tensor(e.tensor_key).float(), b.get_tensor(e.tensor_key).float()
            H = W0.shape[0] // 2
            for rows in (slice(0, H), slice(H, None)):  # K and V halves both lose the direction
                assert float((W1[rows] @ e.V).norm()) < 0.1 * float((W0[rows] @ e.V).norm())


def test_opensora_needs_its_encoder(tmp_path):
    ck = tmp_path / "opensora12.safetensors"
    _opensora12(ck)
    res = run("probe", ck, "-c", "gore", "-o", tmp_path / "g.vud")
    assert res.exit_code == 2, res.output
    assert "--encoder text=" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "g.vud").exists()
