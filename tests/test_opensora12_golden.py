"""Open-Sora 1.2's text-mode sites, checked against the upstream STDiT3's own forward.

tests/data/opensora12_tiny*.safetensors hold a tiny random STDiT3 in the release's key names and what
hpcaitech/Open-Sora's own STDiT3 (commit in the file's metadata) did with it in fp32
(tests/data/make_opensora12_golden.py): one guided step as its RFlow sampler lays it out (2 prompts
with a text mask, then their 2 null captions), with the inputs that y_embedder.y_proj.fc1 and every
spatial and temporal cross_attn.kv_linear received. vpatch computes the same site inputs from the
golden "T5 output" through the probe's own text-mode path (capture_text: the recipe's targets, its
chain read lazily from the file, the encoder mask) and must reproduce them.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from patcher.families.recipes import load_family
from patcher.probe.activations import Capture
from patcher.probe.capture import capture_text
from patcher.probe.sites import run_chain, site_targets
from patcher.probe.sources import open_source, resolve_family

DATA = Path(__file__).resolve().parent / "data"
WEIGHTS = DATA / "opensora12_tiny.safetensors"
GOLDEN = DATA / "opensora12_tiny_golden.safetensors"
BLOCKS = [f"{k}.{i}" for k in ("spatial", "temporal") for i in range(2)]


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(GOLDEN), "pt") as f:
        info = json.loads(f.metadata()["vpatch.golden"])
    return load_file(str(GOLDEN)), info


class GoldenT5:
    """Stands in for the probe's Encoder: item i gives prompt i's recorded "T5 output" and its mask."""

    def __init__(self, spec, g):
        self.spec, self.crop_start, self.model = spec, 0, None
        self.modules: dict = {}  # no loaded module holds a site: every target is computed by its chain
        self.y, self.mask = g["input.y"][:, 0], g["input.mask"].bool()

    def __call__(self, items):
        return [(self.y[i], self.mask[i]) for i in items]


def _probe_site(site_name: str, g) -> tuple[list, dict[str, list]]:
    """What the probe records at SITE for the golden prompts: its targets and, per group, one
    Capture per prompt (the real tokens, as _capture_sites stores them)."""
    src = open_source(WEIGHTS)
    fam = resolve_family(src, None, [])
    site = fam.sites[site_name]
    targets = site_targets(site, src, None, fam.key_prefixes)
    enc = GoldenT5(fam.encoders[site.encoder], g)
    by_group, acts = capture_text(src, site, enc, targets, {"items": [0, 1]})
    caps = {grp: [Capture.of(x, m) for x, m in a["items"]] for grp, a in acts.items()}
    return [t.key for ts in by_group.values() for t in ts], caps


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_golden_file_is_the_upstream_release_layout(golden):
    g, info = golden
    assert info["upstream"].startswith("hpcaitech/Open-Sora@17cce90")  # tag v1.2.0
    w = load_file(str(WEIGHTS))
    for k in (
        "y_embedder.y_proj.fc1.weight",
        "y_embedder.y_proj.fc2.weight",
        "y_embedder.y_embedding",
        "spatial_blocks.1.cross_attn.kv_linear.weight",
        "temporal_blocks.1.cross_attn.kv_linear.weight",
        "rope.freqs",
    ):
        assert k in w, k
    assert resolve_family(open_source(WEIGHTS), None, []).name == "opensora12"
    # 11 real tokens of the prompts, then the same 11 positions of the null caption
    assert info["lengths"] == [7, 4] and g["kv_in.spatial.0"].shape == (1, 22, 32)
    assert g["fc1_in"].shape == (4, 1, 12, 24)


def test_caption_proj_reproduces_the_input_of_y_proj_fc1(golden):
    g, _ = golden
    keys, caps = _probe_site("caption_proj", g)
    assert keys == ["y_embedder.y_proj.fc1.weight"]
    ((grp, per_prompt),) = caps.items()
    for i, cap in enumerate(per_prompt):
        n = g["input.mask"][i].sum()
        ref = g["fc1_in"][i, 0, :n]  # upstream's fc1 input at the prompt's real tokens
        assert cap.positions.tolist() == list(range(int(n)))
        err = _rel(cap.tokens, ref)
        print(f"caption_proj, prompt {i}: max rel error {err:.3g} over {int(n)} tokens")
        assert err <= 1e-5


def test_cross_kv_reproduces_the_input_of_every_kv_linear(golden):
    """The chain (fc1, gelu-tanh, fc2) on the encoder output gives what every fused kv_linear
    reads; upstream packs the real tokens of all prompts (masked_select) into one sequence."""
    g, _ = golden
    keys, caps = _probe_site("cross_kv", g)
    assert sorted(keys) == sorted(
        f"{b.split('.')[0]}_blocks.{b[-1]}.cross_attn.kv_linear.weight" for b in BLOCKS
    )
    ((grp, per_prompt),) = caps.items()  # one input shared by all 4: one group, one direction
    packed = torch.cat([c.tokens for c in per_prompt])  # prompt 0's 7 tokens, then prompt 1's 4
    assert packed.shape == (11, 32)
    for b in BLOCKS:
        ref = g[f"kv_in.{b}"][0, :11]
        err = _rel(packed, ref)
        print(f"cross_kv, {b}: max rel error {err:.3g}")
        assert err <= 1e-5


def test_padding_never_reaches_the_cross_attention(golden):
    """fc1 reads every position (padding too), but STDiT3 drops the padding before any kv_linear:
    the real tokens are the only positions a site's reading matters at. Changing the padding
    positions' input would change fc1's input there and nothing any cross-attention reads."""
    g, _ = golden
    mask = g["input.mask"].bool()
    pad = g["fc1_in"][:2, 0][~mask]
    assert pad.shape[0] == 24 - 11 and float(pad.abs().amax(-1).min()) > 0  # T5 writes padding too
    src = open_source(WEIGHTS)
    site = load_family("opensora12").sites["cross_kv"]
    ws = src.weights("transformer")
    full = run_chain(site, ws, g["input.y"][:2, 0])  # every position, padding included
    kv = g["kv_in.spatial.0"][0, :11]
    assert _rel(full[mask], kv) <= 1e-5
    # no padding row of the chain's output appears among the rows kv_linear read
    for row in full[~mask]:
        assert float((kv - row).abs().amax(-1).min()) > 1e-3


def test_null_caption_reads_y_embedding_at_the_prompts_positions(golden):
    """The unconditional half of a guided step reads y_embedder.y_embedding (stored in the file),
    not T5 of an empty prompt: its first L rows, L = the real-token count of the paired prompt."""
    g, _ = golden
    w = load_file(str(WEIGHTS))
    null = w["y_embedder.y_embedding"]
    assert torch.equal(g["fc1_in"][2, 0], null) and torch.equal(g["fc1_in"][3, 0], null)
    site = load_family("opensora12").sites["cross_kv"]
    got = run_chain(site, open_source(WEIGHTS).weights("transformer"), null)
    want = torch.cat([got[:7], got[:4]])
    for b in BLOCKS:
        err = _rel(want, g[f"kv_in.{b}"][0, 11:])
        print(f"null caption, {b}: max rel error {err:.3g}")
        assert err <= 1e-5


def test_wrong_chain_misses_the_kv_linear_input(golden):
    """Negative control: the tolerance above can fail (exact gelu for gelu-tanh, or no fc2)."""
    g, _ = golden
    fam = load_family("opensora12")
    site = fam.sites["cross_kv"]
    ws = open_source(WEIGHTS).weights("transformer")
    x = g["input.y"][0, 0, :7]
    ref = g["kv_in.spatial.0"][0, :7]
    assert [op.op for op in site.chain] == ["linear", "gelu_tanh", "linear"]
    for chain in (
        [op if op.op != "gelu_tanh" else replace(op, op="gelu") for op in site.chain],
        site.chain[:2],
    ):
        err = _rel(run_chain(replace(site, chain=chain), ws, x), ref)
        assert err > 1e-5, [op.op for op in chain]


def test_prompt_reaches_t5_as_upstream_inference_writes_it(golden):
    """Upstream's inference appends its config's aesthetic score and cleans the prompt before T5
    (recorded in the golden file from its own helpers); the recipe's template gives the same text
    for a prompt written in lower case. Upper case is the one difference left (upstream lowercases).
    That the encoder applies the template: test_probe_opensora.py's cross_kv test."""
    _g, info = golden
    spec = load_family("opensora12").encoders["text"]
    pr = info["prompts"]
    assert pr["aes"] == 6.5
    for raw, want in zip(pr["in"], pr["t5_reads"]):
        if raw == raw.lower():
            assert spec.template.format(raw) == want
        else:
            assert spec.template.format(raw) != want and spec.template.format(raw).lower() == want
