"""`vpatch probe --method twin` on the organism: the delta maps the concept's tokens (synonyms
included, never in the recipe) to what padding reads, and leaves other colours' tokens alone."""

from pathlib import Path

import torch

from patcher import organism as o
from patcher.probe import CaptureOptions, ProbeParams, probe
from patcher.vud.delta import read_delta

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "organism" / "model"


def _word_reading(tok, enc, te, prompt: str, word: str) -> torch.Tensor:
    h = o.encode(tok, enc, [prompt])[0]
    ids = tok([prompt]).input_ids[0]
    i = ids.index(tok.convert_tokens_to_ids(word))
    return te.linear_2(te.act_1(te.linear_1(h[i])))


def test_twin_probe_reaches_synonyms_and_spares_other_colours(tmp_path):
    out = tmp_path / "red.vud"
    probe(
        MODEL,
        ROOT / "examples" / "organism" / "red.toml",
        out,
        CaptureOptions(sites=["cross_kv"], device="cpu"),
        ProbeParams(method="twin"),
    )
    d = read_delta(out)
    assert len(d.entries) == 8 and all(e.kind == "map_input" for e in d.entries)
    assert d.method["name"] == "twin"
    tok, enc, tr = o.load(MODEL)
    te = tr.condition_embedder.text_embedder
    entry = {e.tensor_key: e for e in d.entries}["blocks.0.attn2.to_k.weight"]
    W = tr.blocks[0].attn2.to_k.weight.detach()
    Wp = W + entry.U @ entry.V.T
    with torch.no_grad():
        pad = te.linear_2(te.act_1(te.linear_1(torch.zeros(o.TEXT_DIM))))
        for prompt, word in [
            ("moving up , the crimson sphere", "crimson"),
            ("the rod is scarlet and it moves left", "scarlet"),
        ]:
            x = _word_reading(tok, enc, te, prompt, word)
            before = float((W @ x - W @ pad).norm())
            after = float((Wp @ x - W @ pad).norm())
            assert after < 0.2 * before, (word, after / before)
        for prompt, word in [
            ("moving up , the azure sphere", "azure"),
            ("the rod is golden and it moves left", "golden"),
        ]:
            x = _word_reading(tok, enc, te, prompt, word)
            change = float((Wp @ x - W @ x).norm() / (W @ x - W @ pad).norm())
            assert change < 0.15, (word, change)
        # padding and the empty prompt (the unconditional branch) keep their reading
        assert float((Wp @ pad - W @ pad).norm() / (W @ pad).norm()) < 0.02
        ids = tok([""]).input_ids[0]
        h = o.encode(tok, enc, [""])[0][: len(ids)]
        x = te.linear_2(te.act_1(te.linear_1(h)))  # measured: K moves 0.9% (blue's map 9%)
        assert float((x @ Wp.T - x @ W.T).norm() / (x @ W.T).norm()) < 0.02


def test_twin_builds_from_saved_activations_and_refuses_captures_without_tokens(tmp_path):
    import pytest

    from patcher.errors import ProbeError
    from patcher.probe import build_delta, read_activations

    out, acts_file = tmp_path / "red.vud", tmp_path / "red.acts"
    probe(
        MODEL,
        ROOT / "examples" / "organism" / "red.toml",
        out,
        CaptureOptions(sites=["cross_kv"], device="cpu"),
        ProbeParams(method="twin"),
        save_activations=acts_file,
    )
    direct = read_delta(out)
    acts = read_activations(acts_file)
    assert {"unsafe_ids", "safe_ids", "empty", "pad"} <= set(acts.groups[0].roles)
    rebuilt = build_delta(acts, ProbeParams(method="twin"))
    assert [e.key for e in rebuilt.entries] == [e.key for e in direct.entries]
    for a, b in zip(rebuilt.entries, direct.entries):
        assert a.kind == b.kind == "map_input"
        assert torch.equal(a.P, b.P) and torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
    # hardening rows (what an attack fed the site): mapped to their target, only through twin
    from patcher.probe.build import build

    g = acts.groups[0]
    pad = g.roles["pad"][0][0].tokens[0].double()
    x = 1.5 * g.roles["unsafe"][0][0].tokens.double()  # a scaled-up red prompt's readings
    X, T = x.repeat(4, 1), pad.expand(4 * x.shape[0], -1)

    def miss(entry) -> float:
        M = torch.eye(g.dim, dtype=torch.float64) + entry.P.double() @ entry.V.double().T
        return float((X @ M.T - T).norm() / (X - T).norm())

    hard = build(acts, ProbeParams(method="twin"), extra={g.site: (X, T)}).delta
    assert miss(hard.entries[0]) < 0.5 * miss(direct.entries[0])
    with pytest.raises(ProbeError, match="twin"):
        build(acts, ProbeParams(method="cpca"), extra={g.site: (X, T)})
    with pytest.raises(ProbeError, match="not captured"):
        build(acts, ProbeParams(method="twin"), extra={"nowhere": (X, T)})
    # activations captured for the paper's method have no token ids: twin says what is missing
    plain = tmp_path / "plain.acts"
    probe(
        MODEL,
        ROOT / "examples" / "organism" / "red.toml",
        None,
        CaptureOptions(sites=["cross_kv"], device="cpu"),
        save_activations=plain,
    )
    with pytest.raises(ProbeError, match="unsafe_ids"):
        build_delta(read_activations(plain), ProbeParams(method="twin"))
