"""`--method twin` on Open-Sora 1.2, whose unconditional branch reads a learned null caption.

STDiT3's guided step gives its unconditional half y_embedder.y_embedding (first L rows) in place of
T5 output, and drops padding before any cross-attention. The recipe's ``null_caption`` makes the twin
edit keep those rows' readings exactly at each site (through the site's chain), and send a removed
concept word at position i to row i. Checked on the shipped tiny STDiT3 (tests/data/opensora12_tiny*,
the golden file of test_opensora12_golden.py) with a tiny T5 of its width (24) and its 12 positions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

pytest.importorskip("transformers")

from patcher.cli import main  # noqa: E402
from patcher.erasure.twin import TwinParams, twin_edit  # noqa: E402
from patcher.errors import ProbeError, RecipeError  # noqa: E402
from patcher.families.recipes import RECIPES_DIR, _load_toml, load_family, parse_family  # noqa: E402
from patcher.merge.engine import apply_delta  # noqa: E402
from patcher.probe import CaptureOptions, ProbeParams, capture, probe  # noqa: E402
from patcher.probe.sites import run_chain  # noqa: E402
from patcher.probe.sources import WeightReader, open_source  # noqa: E402
from patcher.vud.delta import read_delta  # noqa: E402
from tests import tiny_pipes  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
WEIGHTS = DATA / "opensora12_tiny.safetensors"
GOLDEN = DATA / "opensora12_tiny_golden.safetensors"
RECIPE = RECIPES_DIR / "models" / "opensora12.toml"
KV = [
    f"{k}_blocks.{i}.cross_attn.kv_linear.weight" for k in ("spatial", "temporal") for i in (0, 1)
]
# the tiny STDiT3's model_max_length: its null caption has 12 rows, so T5 gives 12 positions
SHORT = ("encoders.text.max_length=12",)


@pytest.fixture(scope="module")
def t5(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("t5_24")
    tiny_pipes.tiny_t5(24).save_pretrained(str(d))
    tiny_pipes.t5_tokenizer(d / "_tok").save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def no_key_recipe(tmp_path_factory) -> Path:
    """The shipped recipe with its null_caption lines removed (what the twin did before)."""
    lines = RECIPE.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if not ln.startswith("null_caption = ")]
    assert len(lines) - len(kept) == 2
    p = tmp_path_factory.mktemp("norec") / "opensora12.toml"
    p.write_text("".join(kept))
    return p


@pytest.fixture(scope="module")
def deltas(t5, no_key_recipe, tmp_path_factory) -> dict[str, Path]:
    """Twin deltas at both sites: with the shipped recipe, and with the copy without the key."""
    d = tmp_path_factory.mktemp("twin")
    _twin(t5, d / "with.vud")
    _twin(t5, d / "without.vud", no_key_recipe)
    return {"with": d / "with.vud", "without": d / "without.vud"}


def _edited(delta: Path) -> dict[str, torch.Tensor]:
    """Each edited key's W' (fp32, as U Vᵀ adds it)."""
    W = load_file(str(WEIGHTS))
    return {e.tensor_key: W[e.tensor_key] + e.U @ e.V.T for e in read_delta(delta).entries}


def _twin(t5: Path, out: Path, family: str | Path | None = None) -> None:
    """A twin probe at both sites of the tiny STDiT3."""
    probe(
        WEIGHTS,
        "violence",
        out,
        CaptureOptions(
            family=str(family) if family else None,
            sites=("caption_proj", "cross_kv"),
            device="cpu",
            encoders={"text": str(t5)},
            overrides=SHORT,
        ),
        ProbeParams(method="twin"),
    )


def test_anchor_empty_is_refused_where_the_null_branch_is_a_learned_caption(t5, tmp_path):
    # the empty prompt is not Open-Sora 1.2's unconditional branch: anchoring it would mislead
    with pytest.raises(ProbeError, match="--anchor-empty.*null caption"):
        probe(
            WEIGHTS,
            "violence",
            tmp_path / "x.vud",
            CaptureOptions(
                sites=("cross_kv",), device="cpu", encoders={"text": str(t5)}, overrides=SHORT
            ),
            ProbeParams(method="twin", anchor_empty=True),
        )
    assert not (tmp_path / "x.vud").exists()


def _null_readings() -> dict[str, torch.Tensor]:
    """What each site reads for the unconditional half: the null caption, raw at fc1 and through
    the caption MLP at every kv_linear (test_opensora12_golden.py checks both against upstream)."""
    null = load_file(str(WEIGHTS))["y_embedder.y_embedding"]
    site = load_family("opensora12").sites["cross_kv"]
    mlp = run_chain(site, open_source(WEIGHTS).weights("transformer"), null)
    return {"y_embedder.y_proj.fc1.weight": null, **{k: mlp for k in KV}}


def _moves(Wp: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖W′x − Wx‖ / ‖Wx‖ over the null caption's rows x, per edited weight."""
    W = load_file(str(WEIGHTS))
    x = _null_readings()
    return {k: float(((Wp[k] - W[k]) @ x[k].T).norm() / (W[k] @ x[k].T).norm()) for k in Wp}


def test_twin_keeps_the_null_caption_reading_and_moves_it_without_the_key(deltas):
    kept = _moves(_edited(deltas["with"]))
    assert sorted(kept) == sorted(["y_embedder.y_proj.fc1.weight", *KV])
    print("with null_caption:", {k: f"{v:.2g}" for k, v in kept.items()})
    assert max(kept.values()) <= 1e-5  # exact up to fp32 rounding (measured <= 3.2e-7)
    moved = _moves(_edited(deltas["without"]))
    print("without:", {k: f"{v:.2g}" for k, v in moved.items()})
    assert min(moved.values()) >= 0.1  # measured 0.88-1.0: the unconditional branch moved


def test_guided_step_keeps_its_unconditional_half(deltas, tmp_path):
    """The golden guided step (2 prompts, then their 2 null captions, as upstream's sampler lays it
    out) run through the patched file: text reaches STDiT3 only through fc1 and the kv_linears, and
    its cross-attention is block-diagonal per sample, so the unconditional half is unchanged when the
    K|V rows it reads are. From the patched file's own weights: fc1 → gelu-tanh → fc2 on the null
    caption's first L rows gives the kv_linear input upstream recorded (unpatched), and every patched
    kv_linear maps upstream's recorded null rows to the K|V the unpatched one gave. The prompts' half
    changes: the edit is there."""
    g = load_file(str(GOLDEN))
    lengths = [int(n) for n in g["input.mask"].sum(1)]  # [7, 4]: 11 prompt rows, then 11 null rows
    cond = slice(0, sum(lengths))
    uncond = slice(sum(lengths), 2 * sum(lengths))

    def step(delta: Path) -> dict[str, float]:
        out = tmp_path / f"{delta.stem}.safetensors"
        apply_delta(WEIGHTS, delta, out)
        P, W = load_file(str(out)), load_file(str(WEIGHTS))
        mlp = load_family("opensora12").sites["cross_kv"]
        y = run_chain(mlp, open_source(out).weights("transformer"), P["y_embedder.y_embedding"])
        y = torch.cat([y[:n] for n in lengths])  # what the patched fc1 path gives the null half
        moves = {"fc1 path": float((y - g["kv_in.spatial.0"][0, uncond]).norm())}
        for k in KV:
            b = k.split("_blocks.")
            x = g[f"kv_in.{b[0]}.{b[1][0]}"][0]
            kv0 = x @ W[k].T + W[k.replace("weight", "bias")]
            kv1 = x @ P[k].T + P[k.replace("weight", "bias")]
            moves[k] = float((kv1[uncond] - kv0[uncond]).norm() / kv0[uncond].norm())
            moves[k + " (prompts)"] = float((kv1[cond] - kv0[cond]).norm() / kv0[cond].norm())
        moves["fc1 path"] /= float(g["kv_in.spatial.0"][0, uncond].norm())
        return moves

    got, base = step(deltas["with"]), step(deltas["without"])
    print("unconditional half, with null_caption:", {k: f"{v:.2g}" for k, v in got.items()})
    print("without:", {k: f"{v:.2g}" for k, v in base.items()})
    for k, v in got.items():
        if k.endswith("(prompts)"):
            assert v > 1e-2, k  # the conditional half does change
        else:
            assert v <= 1e-5, k
            assert base[k] > 1e-2, k  # and the same check fails without the recipe key


def test_removed_word_is_sent_to_its_positions_null_row():
    """A per-position pad (L, H): a concept word deleted at position i targets row i, rows are kept
    exactly; with one row for every position (Wan) the same call sends it to that row."""
    g = torch.Generator().manual_seed(0)
    H, L = 16, 6
    null = torch.randn(L, H, generator=g)
    vocab = torch.randn(10, H, generator=g)
    # unsafe "a b X c" / safe "a b c": X (id 9) at position 2 is deleted; then "X a" / "a"
    pairs = [([1, 2, 9, 3], [1, 2, 3]), ([9, 1], [1])]
    un = [(vocab[ids], ids) for ids, _ in pairs]
    sa = [(vocab[ids], ids) for _, ids in pairs]
    preserve = [vocab[[4, 5, 6, 7, 8]]]
    tp = TwinParams(beta=1.0, ridge=1e-6)
    op, _ = twin_edit(un, sa, preserve, null, tp)
    M = op.matrix().double()
    assert float((null.double() @ M.T - null.double()).abs().max()) < 1e-4
    # the one word at two positions cannot reach both rows: the fit splits between them, and lands
    # nearer each of them than the word was
    y = M @ vocab[9].double()
    for i in (2, 0):
        assert float((y - null[i]).norm()) < 0.9 * float((vocab[9] - null[i]).norm())
    op1, _ = twin_edit(un, sa, preserve, null[2], tp)
    y1 = op1.matrix().double() @ vocab[9].double()
    assert float((y1 - null[2]).norm()) < 0.05 * float((vocab[9] - null[2]).norm())


def test_null_space_directions_leave_the_kept_rows_alone():
    """--null q projects the map's output off q directions; they are taken outside the null
    caption's span, so its rows stay exact (a projection inside it would move them)."""
    g = torch.Generator().manual_seed(1)
    null = torch.randn(5, 16, generator=g)
    vocab = torch.randn(10, 16, generator=g)
    pairs = [([1, 2, 9, 3], [1, 2, 3]), ([4, 9], [4, 8])]
    un = [(vocab[ids], ids) for ids, _ in pairs]
    sa = [(vocab[ids], ids) for _, ids in pairs]
    op, _ = twin_edit(un, sa, [vocab[[5, 6, 7]]], null, TwinParams(null=2))
    M = op.matrix().double()
    assert op.rank >= 2
    assert float((null.double() @ M.T - null.double()).abs().max()) < 1e-4


def test_a_null_caption_spanning_the_whole_input_is_refused():
    null = torch.randn(20, 8)
    X = [(torch.randn(3, 8), [1, 2, 3])]
    S = [(torch.randn(2, 8), [1, 3])]
    with pytest.raises(ValueError, match="span the whole 8-wide input"):
        twin_edit(X, S, [torch.randn(4, 8)], null)


@pytest.mark.parametrize(
    ("key", "extra", "says"),
    [
        ("y_embedder.no_such_tensor", SHORT, "is not in"),
        ("y_embedder.y_proj.fc1.bias", SHORT, "has shape (32,); it must be (positions, 24)"),
        ("y_embedder.y_proj.fc2.weight", SHORT, "has shape (32, 32); it must be (positions, 24)"),
        ("y_embedder.y_embedding", (), "has 12 rows; encoder 'text' gives up to 300"),
    ],
)
def test_bad_null_caption_is_one_line_naming_recipe_and_key(t5, key, extra, says):
    opt = CaptureOptions(
        sites=("cross_kv",),
        device="cpu",
        encoders={"text": str(t5)},
        overrides=(*extra, f"sites.cross_kv.null_caption={key}"),
        token_roles=True,
    )
    with pytest.raises(ProbeError) as e:
        capture(WEIGHTS, "violence", opt)
    msg = str(e.value)
    assert "\n" not in msg and says in msg, msg
    assert f"null_caption {key!r}" in msg and "opensora12.toml" in msg and "'cross_kv'" in msg


def test_bad_null_caption_from_the_cli_exits_2_on_one_line(t5, tmp_path):
    res = CliRunner().invoke(
        main,
        [
            "probe",
            str(WEIGHTS),
            "-c",
            "violence",
            "-o",
            str(tmp_path / "v.vud"),
            "--method",
            "twin",
            "--layers",
            "caption_proj",
            "--encoder",
            f"text={t5}",
            "--set",
            "encoders.text.max_length=12",
            "--set",
            "sites.caption_proj.null_caption=y_embedder.missing",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "'y_embedder.missing' is not in" in res.output
    assert not (tmp_path / "v.vud").exists()


@pytest.mark.parametrize(
    ("site", "value", "says"),
    [
        ("caption_proj", "", "names a stored tensor (non-empty)"),
        ("caption_proj", 3, "must be str"),
    ],
)
def test_recipe_refuses_a_malformed_null_caption(site, value, says):
    data = _load_toml(RECIPE)
    data["sites"][site]["null_caption"] = value
    with pytest.raises(RecipeError, match=r"sites\.caption_proj: field 'null_caption'") as e:
        parse_family(data, "opensora12.toml")
    assert says in str(e.value) and "\n" not in str(e.value)


def test_null_caption_is_for_text_mode_sites_only():
    data = _load_toml(RECIPES_DIR / "models" / "opensora2.toml")
    (name,) = [n for n, s in data["sites"].items() if s["mode"] == "denoise"][:1]
    data["sites"][name]["null_caption"] = "y_embedder.y_embedding"
    with pytest.raises(RecipeError, match="for text-mode sites only"):
        parse_family(data, "opensora2.toml")


def test_twin_activations_keep_the_null_role(t5, tmp_path):
    """--save-activations keeps the null caption's readings: a later build holds the branch too,
    and tune's site objectives use them."""
    from patcher.probe import build_delta, read_activations

    acts = tmp_path / "v.acts"
    probe(
        WEIGHTS,
        "violence",
        tmp_path / "v.vud",
        CaptureOptions(
            sites=("cross_kv",), device="cpu", encoders={"text": str(t5)}, overrides=SHORT
        ),
        ProbeParams(method="twin"),
        save_activations=acts,
    )
    a = read_activations(acts)
    (grp,) = a.groups
    assert grp.roles["null"][0][0].tokens.shape == (12, 32)
    d = build_delta(a, ProbeParams(method="twin", strength=0.5))
    W = load_file(str(WEIGHTS))
    x = _null_readings()[KV[0]]
    (e,) = [e for e in d.entries if e.tensor_key == KV[0]]
    assert float((x @ (e.U @ e.V.T).T).norm() / (x @ W[KV[0]].T).norm()) <= 1e-5
    assert json.loads(json.dumps(d.method))["name"] == "twin"

    # tune's site objectives read the same branch: a removed word's twin is its null row, and the
    # damage set holds, next to each concept-free prompt, the null rows its generation reads
    from patcher.erasure.twin import align_tokens
    from patcher.tune.objectives import SiteObjectives
    from patcher.tune.split import Split

    sp = Split.of([p["unsafe"] for p in a.concept["pairs"]], a.concept["neutral"])
    obj = SiteObjectives(a, sp, WeightReader.for_activations(a)).targets[f"transformer/{KV[0]}"]
    free = [grp.roles["safe"][i][0].tokens for i in sp.val_pairs]
    free += [grp.roles["neutral"][i][0].tokens for i in sp.val_neutral]
    null = grp.roles["null"][0][0].tokens.double()
    want = torch.cat([*free, *[null[: len(x)] for x in free]]).double()
    assert torch.equal(obj["Xf"], want)
    i = sp.val_pairs[0]
    ids = [[int(v) for v in grp.roles[r][i][0].tokens[:, 0]] for r in ("unsafe_ids", "safe_ids")]
    removed = [a_ for a_, b in align_tokens(*ids) if b is None]
    assert removed, ids
    u = grp.roles["unsafe"][i][0].tokens.double()
    gap0 = (u[removed[0]] - null[removed[0]]) @ W[KV[0]].double().T
    assert torch.allclose(obj["gap"][removed[0]], gap0)
