"""The twin edit's reach options: the vocabulary scan (--scan), the cascade of sites (--cascade) and
the preservation file (--preserve), on synthetic readings and on the organism."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from patcher.erasure.scan import concept_positions, kept_slots, scan_scores, substitute
from patcher.errors import ProbeError
from patcher.probe import CaptureOptions, ProbeParams, WeightReader, build, capture, open_model

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "organism" / "model"
RED = ROOT / "examples" / "organism" / "red.toml"


def _prompt(
    ids: list[int], slot: torch.Tensor, ctx: torch.Tensor
) -> tuple[torch.Tensor, list[int]]:
    """Readings of a 3-token prompt 'a WORD ball': context rows, the word's row at position 1."""
    return torch.stack([ctx[0], slot, ctx[1]]), ids


def test_scan_scores_pick_a_synthetic_synonym_and_not_words_far_from_padding():
    g = torch.Generator().manual_seed(0)
    H = 16
    e = torch.eye(H)
    here = 6.0 * e[15]  # what every word shares at the slot: "a word, not padding"
    concept = here + 3.0 * e[0]
    unsafe, safe, scanned = [], [], {}
    words = {"syn": concept + 0.2 * e[1], "other": here + 3.0 * e[2], "third": here + 3.0 * e[3]}
    words |= {f"w{i}": here + 3.0 * e[4 + i] for i in range(5)}
    for p in range(3):
        ctx = torch.randn(2, H, generator=g)
        unsafe.append(_prompt([1, 5, 2 + p], concept + 0.05 * torch.randn(H, generator=g), ctx))
        safe.append((ctx.clone(), [1, 2 + p]))
        for k, (w, r) in enumerate(words.items()):
            x, ids = _prompt([1, 10 + k, 2 + p], r + 0.05 * torch.randn(H, generator=g), ctx)
            scanned.setdefault(w, []).append((p, x, ids))
    res = scan_scores(unsafe, safe, scanned, 0.6)
    assert res.picked == ("syn",)
    assert res.scores["syn"] > 0.8 and max(v for w, v in res.scores.items() if w != "syn") < 0.3
    # every word is as far from padding along the concept-minus-padding direction as the concept:
    # that reading would not separate them (the reason the rule references the average word)
    u = concept / concept.norm()
    assert all(float(r @ u) > 0.7 * float(concept @ u) for r in words.values())


def test_concept_positions_and_substitution():
    assert concept_positions([4, 25, 7], [4, 7]) == [1]  # "a red ball" -> "a ball": deleted
    assert concept_positions([4, 31, 20], [4, 7, 20]) == [1]  # square -> ball: replaced
    assert substitute("a red ball, red!", ["red"], "crimson") == "a crimson ball, crimson!"
    assert substitute("a reddish ball", ["red"], "crimson") is None  # whole words only


_FIXTURE = CaptureOptions(
    sites=("text_proj", "cross_kv"),
    device="cpu",
    token_roles=True,
    scan=64,
    preserve=("a red ball moving up", "a blue ball moving up", "a crimson ball moving up"),
)


@pytest.fixture(scope="module")
def red_acts():
    w = WeightReader(open_model(MODEL, _FIXTURE))
    return capture(w.source, RED, _FIXTURE, w), w


def test_scan_on_the_organism_picks_red_synonyms_and_no_other_colour(red_acts):
    acts, w = red_acts
    plan = acts.concept["scan"]
    assert plan["concept_words"] == ["red"]
    assert "red" not in plan["words"] and "<pad>" not in plan["words"] and "," not in plan["words"]
    assert {"crimson", "scarlet", "purple", "blue"} <= set(plan["words"])
    one = replace(acts, sites=("cross_kv",), groups=acts.groups[1:])
    built = build(one, ProbeParams(method="twin", scan=64), w)
    picked = built.delta.method["scan_picked"]["transformer:cross_kv"]["picked"]
    assert sorted(picked) == ["crimson", "scarlet"]
    plain = build(one, ProbeParams(method="twin"), w)
    assert "scan_picked" not in plain.delta.method
    # the picked words' pairs joined the fit: more edit rows, and another map
    assert built.groups[0].samples > plain.groups[0].samples
    a, b = built.delta.entries[0], plain.delta.entries[0]
    assert not torch.allclose(a.U @ a.V.T, b.U @ b.V.T, atol=1e-4)


def test_preserve_drops_prompts_naming_the_concept_or_a_picked_word(red_acts):
    from patcher.probe.build import _extra_preserved

    acts, _w = red_acts
    kept = acts.concept["scan"]["preserve"]
    assert kept == ["a blue ball moving up", "a crimson ball moving up"]
    g = acts.groups[1]
    assert len(_extra_preserved(acts, g, [])) == 2
    assert len(_extra_preserved(acts, g, ["crimson", "scarlet"])) == 1


def _plain(acts):
    """The capture without the scan's and the --preserve file's roles."""
    drop = ("scan", "scan_ids", "preserve")
    return replace(
        acts,
        concept={k: v for k, v in acts.concept.items() if k != "scan"},
        groups=tuple(
            replace(g, roles={r: p for r, p in g.roles.items() if r not in drop})
            for g in acts.groups
        ),
    )


def _patched_capture(delta, tmp_path, opt=None):
    """What cross_kv reads (or OPT's capture) on a model whose text_proj was really patched
    (apply) with DELTA's text_proj entry, and that model's weight reader."""
    from patcher import apply_delta
    from patcher.vud.delta import Delta, write_delta

    tp = [e for e in delta.entries if "linear_1" in e.key]
    assert len(tp) == 1
    part = tmp_path / "tp.vud"
    write_delta(part, Delta(tp, delta.concept, delta.method, delta.versions))
    patched = tmp_path / "patched"
    apply_delta(MODEL, part, patched)
    opt = opt or CaptureOptions(sites=("cross_kv",), device="cpu", token_roles=True)
    w2 = WeightReader(open_model(patched, opt))
    return capture(w2.source, RED, opt, w2), w2


def test_cascade_fits_cross_kv_on_what_it_reads_through_the_text_proj_edit(red_acts, tmp_path):
    """The cascade's cross_kv map equals a cross_kv-only twin probed on a model whose text_proj
    was really patched (apply), and differs from fitting both sites on the original readings."""
    acts, w = red_acts
    plain = _plain(acts)
    cas = build(plain, ProbeParams(method="twin", cascade=True), w).delta
    both = build(plain, ProbeParams(method="twin"), w).delta
    assert cas.method["cascade"] is True
    through, w2 = _patched_capture(cas, tmp_path)
    ref = build(through, ProbeParams(method="twin"), w2).delta
    key = "transformer/blocks.2.attn2.to_v.weight"
    D = {e.key: e.U @ e.V.T for e in cas.entries}[key]
    R = {e.key: e.U @ e.V.T for e in ref.entries}[key]
    B = {e.key: e.U @ e.V.T for e in both.entries}[key]
    assert float((D - R).norm() / R.norm()) < 1e-3
    assert float((B - R).norm() / R.norm()) > 0.05


def test_cascade_repair_fits_through_the_edit_toward_the_original_readings(red_acts, tmp_path):
    """--cascade-repair with every option that adds rows (scan, --preserve, --anchor-empty): the
    cross_kv map equals a fit, written out here, of what cross_kv reads on a model whose text_proj
    was really patched (apply) to the original model's readings: the twin's, and each preserved
    prompt's and anchor's own. On its own preserved prompts (in sample: the objective asks for
    it) it halves the displacement the carried cascade keeps."""
    from patcher.erasure.twin import TwinParams, twin_edit
    from patcher.probe.build import _extra_preserved, _with_ids

    acts, w = red_acts
    opts = dict(method="twin", scan=64, cascade=True, anchor_empty=True, beta=2.0)
    rep = build(acts, ProbeParams(**opts, cascade_repair=True), w).delta
    car = build(acts, ProbeParams(**opts), w).delta
    assert rep.method["cascade_repair"] is True and "cascade_repair" not in car.method
    opt = replace(_FIXTURE, sites=("cross_kv",))
    patched_acts = _patched_capture(rep, tmp_path, opt)[0]
    through, before = patched_acts.groups[0], acts.groups[1]
    assert before.site == through.site == "cross_kv"
    picked = rep.method["scan_picked"]["transformer:cross_kv"]["picked"]
    assert sorted(picked) == ["crimson", "scarlet"]
    plan = acts.concept["scan"]
    slots = [(wd, int(p)) for wd, pairs in zip(plan["words"], plan["pairs"]) for p in pairs]
    scan_rows = _with_ids(through, "scan")
    extra = [x for x, (wd, _p) in zip(scan_rows, slots) if wd in picked]
    pair_of = [p for wd, p in slots if wd in picked]
    safe = _with_ids(before, "safe")

    def kept(a, g):
        own = [c.tokens for r in ("neutral", "safe", "empty") for p in g.roles[r] for c in p]
        return own + _extra_preserved(a, g, picked)

    def empty(g):
        return torch.cat([c.tokens for p in g.roles["empty"] for c in p])

    op, _ = twin_edit(
        _with_ids(through, "unsafe") + extra,
        safe + [safe[p] for p in pair_of],
        kept(patched_acts, through),
        before.roles["pad"][0][0].tokens[0],
        TwinParams(beta=2.0),
        None,
        empty(through),
        (kept(acts, before), empty(before)),
    )
    key = "transformer/blocks.2.attn2.to_v.weight"
    e = {e.key: e for e in rep.entries}[key]
    D = e.P.double() @ e.V.double().T
    R = op.P.double() @ op.Q.double().T
    # measured 5e-6 (float32 captures of a patched model); anchors taken through the edit instead
    # of their originals give 5e-4 (the text_proj map keeps the empty prompt nearly in place)
    assert float((D - R).norm() / R.norm()) < 5e-5
    # the neutral prompts' cross_kv readings after both edits, against the original ones
    X = torch.cat([c.tokens for p in through.roles["neutral"] for c in p]).double()
    X0 = torch.cat([c.tokens for p in before.roles["neutral"] for c in p]).double()

    def off(delta):
        e = {e.key: e for e in delta.entries}[key]
        Y = X + X @ (e.P.double() @ e.V.double().T).T
        return float((Y - X0).norm() / X0.norm())

    assert off(rep) < 0.5 * off(car), (off(rep), off(car))


def test_cascade_repair_scores_the_scan_on_the_original_readings(red_acts):
    acts, w = red_acts
    one = replace(acts, sites=("cross_kv",), groups=acts.groups[1:])
    alone = build(one, ProbeParams(method="twin", scan=64), w).delta.method["scan_picked"]
    rep = build(
        acts, ProbeParams(method="twin", scan=64, cascade=True, cascade_repair=True), w
    ).delta.method["scan_picked"]
    assert rep["transformer:cross_kv"] == alone["transformer:cross_kv"]
    # scored through the edit (the carried cascade) the record differs, so the check can fail
    car = build(acts, ProbeParams(method="twin", scan=64, cascade=True), w).delta
    assert car.method["scan_picked"]["transformer:cross_kv"] != alone["transformer:cross_kv"]


def test_scan_and_cascade_are_refused_where_they_cannot_apply(red_acts):
    acts, w = red_acts
    with pytest.raises(ProbeError, match="--scan"):
        ProbeParams(method="twin", scan=-1)
    with pytest.raises(ProbeError, match="--scan"):
        CaptureOptions(scan=-2)
    with pytest.raises(ProbeError, match="--cascade-repair.*--cascade"):
        ProbeParams(method="twin", cascade_repair=True)
    with pytest.raises(ProbeError, match="--scan-keep-whole.*--scan-keep"):
        ProbeParams(method="twin", scan=4, scan_keep_whole=True)
    for bad in ("nan", "-inf"):
        with pytest.raises(ProbeError, match=f"--scan-keep-max {bad}"):
            ProbeParams(method="twin", scan=4, scan_keep=True, scan_keep_max=float(bad))
    one = replace(acts, sites=("cross_kv",), groups=acts.groups[1:])
    with pytest.raises(ProbeError, match="--cascade"):
        build(one, ProbeParams(method="twin", cascade=True), w)
    bare = replace(
        one,
        groups=(
            replace(
                one.groups[0], roles={r: p for r, p in one.groups[0].roles.items() if r != "scan"}
            ),
        ),
    )
    with pytest.raises(ProbeError, match="vocabulary scan"):
        build(bare, ProbeParams(method="twin", scan=64), w)


def test_build_uses_the_nearest_n_scanned_words_and_refuses_more_than_captured(red_acts):
    acts, w = red_acts
    one = replace(acts, sites=("cross_kv",), groups=acts.groups[1:])
    words = acts.concept["scan"]["words"]
    # candidates are stored nearest first; a build with --scan n scores only the first n of them
    n = words.index("crimson")
    assert n >= 2, words  # the check below needs crimson outside a short scan that is not trivial
    short = build(one, ProbeParams(method="twin", scan=n), w)
    rec = short.delta.method["scan_picked"]["transformer:cross_kv"]
    assert set(rec["scores"]) <= set(words[:n]) and "crimson" not in rec["picked"]
    assert short.delta.method["scan"] == n
    full = build(one, ProbeParams(method="twin", scan=64), w)
    assert "crimson" in full.delta.method["scan_picked"]["transformer:cross_kv"]["picked"]
    with pytest.raises(ProbeError, match="--scan 65.*64"):
        build(one, ProbeParams(method="twin", scan=65), w)


def test_twin_only_options_are_refused_with_another_method(red_acts):
    acts, w = red_acts
    one = replace(acts, sites=("cross_kv",), groups=acts.groups[1:])
    for kw, flag in (
        ({"scan": 4}, "--scan"),
        ({"cascade": True}, "--cascade"),
        ({"cascade": True, "cascade_repair": True}, "--cascade-repair"),
        ({"anchor_empty": True}, "--anchor-empty"),
        ({"scan": 4, "scan_keep": True}, "--scan-keep"),
    ):
        with pytest.raises(ProbeError, match=f"{flag}.*cpca"):
            build(one, ProbeParams(method="cpca", **kw), w)


def test_cli_flags_reach_the_method_and_bad_values_exit_2(tmp_path):
    from click.testing import CliRunner

    from patcher.cli import main

    base = ["probe", str(MODEL), "-c", str(RED), "-o", str(tmp_path / "x.vud")]
    res = CliRunner().invoke(main, [*base, "--method", "twin", "--scan", "-1"])
    assert res.exit_code == 2 and "--scan -1" in res.output
    res = CliRunner().invoke(main, [*base, "--method", "twin", "--cascade-repair"])
    assert res.exit_code == 2 and "--cascade-repair" in res.output
    res = CliRunner().invoke(main, [*base, "--method", "twin", "--scan-keep"])
    assert res.exit_code == 2 and "--scan-keep" in res.output and "--scan N" in res.output
    res = CliRunner().invoke(
        main, [*base, "--method", "cpca", "--scan", "4", "--layers", "cross_kv"]
    )
    assert res.exit_code == 2 and "twin" in res.output
    bad = tmp_path / "empty.txt"
    bad.write_text("# nothing\n\n")
    res = CliRunner().invoke(main, [*base, "--method", "twin", "--preserve", str(bad)])
    assert res.exit_code == 2 and "no prompts" in res.output
    assert not (tmp_path / "x.vud").exists()
    # and the flags reach the method: the picks are in the written delta's metadata
    res = CliRunner().invoke(
        main, [*base, "--method", "twin", "--layers", "cross_kv", "--scan", "64", "--json"]
    )
    assert res.exit_code == 0, res.output
    from patcher.vud.delta import read_delta

    method = read_delta(tmp_path / "x.vud").method
    assert method["scan"] == 64 and method["scan_min"] == 0.6
    assert sorted(method["scan_picked"]["transformer:cross_kv"]["picked"]) == ["crimson", "scarlet"]
    assert "scan_keep" not in method
    res = CliRunner().invoke(
        main,
        [*base, "--method", "twin", "--layers", "cross_kv", "--scan", "64", "--scan-keep"]
        + ["--overwrite", "--json"],
    )
    assert res.exit_code == 0, res.output
    method = read_delta(tmp_path / "x.vud").method
    assert method["scan_keep"] is True and "scan_keep_max" not in method
    assert method["scan_picked"]["transformer:cross_kv"]["kept"] == 31  # 33 words, 2 picked
    res = CliRunner().invoke(
        main,
        [*base, "--method", "twin", "--layers", "cross_kv", "--scan", "64", "--scan-keep"]
        + ["--scan-keep-max", "0", "--overwrite", "--json"],
    )
    assert res.exit_code == 0, res.output
    method = read_delta(tmp_path / "x.vud").method
    rec = method["scan_picked"]["transformer:cross_kv"]
    assert method["scan_keep_max"] == 0.0
    # violet, purple, golden and yellow read a little like red (scores > 0): not held
    assert all(rec["scores"][w] > 0 for w in ("violet", "purple", "golden", "yellow"))
    assert rec["kept"] == 27
    res = CliRunner().invoke(
        main, [*base, "--method", "twin", "--scan", "4", "--scan-keep-max", "0"]
    )
    assert res.exit_code == 2 and "--scan-keep-max" in res.output and "--scan-keep" in res.output


def test_anchor_empty_holds_the_unconditional_prompt_among_many_preserved_tokens():
    from patcher.erasure.twin import twin_edit

    g = torch.Generator().manual_seed(1)
    H = 12
    concept = torch.zeros(H)
    concept[0] = 4.0
    empty = torch.randn(1, H, generator=g) + 0.8 * concept  # shares part of the concept direction
    ctx = torch.randn(3, H, generator=g)
    unsafe = [(torch.cat([ctx[:1], concept[None], ctx[1:]]), [1, 9, 2, 3])]
    safe = [(ctx.clone(), [1, 2, 3])]
    many = [torch.randn(300, H, generator=g)]
    pad = torch.zeros(H)

    def moved(anchors):
        op, _ = twin_edit(unsafe, safe, many + [empty], pad, anchors=anchors)
        M = op.matrix().double()
        return float((empty.double() @ M.T - empty.double()).norm() / empty.norm())

    loose, held = moved(None), moved(empty)
    assert held < 0.25 * loose


def test_kept_slots_are_the_unpicked_words_readings_where_the_concept_sits():
    H = 4
    row = lambda v: torch.full((H,), float(v))  # noqa: E731
    # pair 0 deletes the concept ("a red ball" -> "a ball"); pair 1 replaces it (square -> ball)
    safe = [(torch.stack([row(1), row(2)]), [1, 7]), (torch.stack([row(1), row(2)]), [1, 7])]
    scanned = {
        "crimson": [(0, torch.stack([row(1), row(90), row(2)]), [1, 40, 7])],
        "blue": [
            (0, torch.stack([row(1), row(50), row(2)]), [1, 41, 7]),
            (1, torch.stack([row(1), row(51)]), [1, 41]),
        ],
        "ball": [(1, torch.stack([row(1), row(2)]), [1, 7])],  # reads as the twin: no slot
        "colored": [(0, torch.stack([row(1), row(60), row(2)]), [1, 42, 7])],
    }
    kept, held = kept_slots(safe, scanned, ("crimson",))
    assert [k[:, 0].tolist() for k in kept] == [[50.0], [51.0], [60.0]]
    assert held == ["blue", "colored"]  # "ball" gave no slot row: not counted as held
    assert all(k.dtype == torch.float64 and k.shape == (1, H) for k in kept)
    assert kept_slots(safe, scanned, ("crimson", "blue", "colored")) == ([], [])
    # with a bound, only the words scoring below it; a word with a slot but no score is not held
    scanned["the"] = [(0, torch.stack([row(1), row(70), row(2)]), [1, 43, 7])]
    scores = {"crimson": 0.9, "blue": 0.3, "colored": -0.2}
    bounded, held = kept_slots(safe, scanned, ("crimson",), scores, 0.0)
    assert [k[:, 0].tolist() for k in bounded] == [[60.0]] and held == ["colored"]
    assert kept_slots(safe, scanned, ("crimson",), scores, 0.5)[1] == ["blue", "colored"]
    assert kept_slots(safe, scanned, ("crimson",))[1] == ["blue", "colored", "the"]
    # whole: every token of those prompts, not the slot only
    rows, held = kept_slots(safe, scanned, ("crimson",), scores, 0.0, whole=True)
    assert held == ["colored"] and [r[:, 0].tolist() for r in rows] == [[1.0, 60.0, 2.0]]
    rows, held = kept_slots(safe, scanned, ("crimson",), whole=True)  # "ball" has no slot: skipped
    assert held == ["blue", "colored", "the"]
    assert [r[:, 0].tolist() for r in rows] == [[1, 50, 2], [1, 51], [1, 60, 2], [1, 70, 2]]


def test_scan_keep_holds_the_unpicked_words_at_the_concept_slot_on_the_organism(red_acts):
    from patcher.probe.build import _scanned

    acts, w = red_acts
    one = replace(acts, sites=("cross_kv",), groups=acts.groups[1:])
    g = one.groups[0]
    plan = acts.concept["scan"]
    params = ProbeParams(method="twin", scan=64, scan_keep=True)
    _rows, _pairs, rec, (slots, slots_as) = _scanned(one, g, params)
    assert sorted(rec["picked"]) == ["crimson", "scarlet"] and rec["kept"] == 31
    # one row per unpicked word and pair: the scan prompt's reading where the pair says "red"
    unsafe_ids = [[int(v) for v in p[0].tokens[:, 0].tolist()] for p in g.roles["unsafe_ids"]]
    from patcher import organism

    red_id = organism.tokens(organism.tokenizer(), ["red"]).input_ids[0, 0].item()
    where = [ids.index(red_id) for ids in unsafe_ids]
    expected, ambiguous, at = [], 0, 0
    for word, pairs in zip(plan["words"], plan["pairs"]):
        for p in pairs:
            if word not in rec["picked"]:
                x = g.roles["scan"][at][0].tokens.double()
                ids = g.roles["scan_ids"][at][0].tokens[:, 0].tolist()
                cand = ids[where[int(p)]]
                # "a a ball": the pair's own "a" and the candidate are the same token; the slot is
                # then one of the two (alignment's choice), the same reading kind either way
                same = [i for i, v in enumerate(ids) if v == cand]
                expected.append(x[where[int(p)]] if len(same) == 1 else x[same])
                ambiguous += len(same) > 1
            at += 1
    assert len(slots) == len(expected) == 31 * len(unsafe_ids)
    assert all(s.shape[0] == 1 for s in slots)
    assert ambiguous < len(expected) // 4  # most slots are one token that occurs once
    for s, e in zip(slots, expected):
        assert torch.equal(s[0], e) if e.dim() == 1 else any(torch.equal(s[0], r) for r in e)
    assert all(torch.equal(a, b) for a, b in zip(slots, slots_as))  # no upstream edit: the same
    # and the map holds them: the unpicked words' slot readings move less than under --scan alone
    kept = build(one, params, w).delta.entries[0]
    loose = build(one, ProbeParams(method="twin", scan=64), w).delta.entries[0]
    W = w.target(g.targets[0]).double()
    X = torch.cat(slots)

    def moved(e):
        dW = e.U.double() @ e.V.double().T
        return float((X @ dW.T).norm() / (X @ W.T).norm())

    assert moved(kept) < 0.7 * moved(loose), (moved(kept), moved(loose))


def test_scan_keep_under_cascade_repair_holds_the_slots_at_their_original_readings(
    red_acts, tmp_path
):
    """With --cascade-repair the held slot rows are read through the text_proj edit and fitted
    back to their original readings: the cross_kv map equals a fit written out here from a model
    whose text_proj was really patched (the same check as the repair's own test)."""
    from patcher.erasure.scan import kept_slots
    from patcher.erasure.twin import TwinParams, twin_edit
    from patcher.probe.build import _with_ids

    acts, w = red_acts
    opts = dict(method="twin", scan=64, cascade=True, cascade_repair=True, scan_keep=True)
    rep = build(acts, ProbeParams(**opts, scan_keep_max=0.0), w).delta
    rec = rep.method["scan_picked"]["transformer:cross_kv"]
    assert rep.method["scan_keep_max"] == 0.0 and rec["kept"] == 27
    opt = replace(_FIXTURE, sites=("cross_kv",))
    patched_acts = _patched_capture(rep, tmp_path, opt)[0]
    through, before = patched_acts.groups[0], acts.groups[1]
    picked = rec["picked"]
    plan = acts.concept["scan"]

    def by_word(g):
        rows, out, at = _with_ids(g, "scan"), {}, 0
        for wd, pairs in zip(plan["words"], plan["pairs"]):
            for p in pairs:
                out.setdefault(wd, []).append((int(p), *rows[at]))
                at += 1
        return out

    # the scores are the original readings' (a repair scores what the site alone would)
    scores = {wd: v for wd, v in rec["scores"].items()}
    below = {wd for wd in plan["words"] if wd not in picked and wd not in scores}
    scores |= {wd: -1.0 for wd in below}  # the record keeps the top 8; the rest score below 0
    safe = _with_ids(before, "safe")
    slots, _ = kept_slots(_with_ids(through, "safe"), by_word(through), picked, scores, 0.0)
    slots_as, _ = kept_slots(safe, by_word(before), picked, scores, 0.0)
    assert len(slots) == len(slots_as) == 27 * len(safe)
    moved = torch.cat(slots) - torch.cat(slots_as)
    assert float(moved.norm() / torch.cat(slots_as).norm()) > 0.01  # the first edit moved them
    slot_of = [(wd, int(p)) for wd, pairs in zip(plan["words"], plan["pairs"]) for p in pairs]
    extra = [x for x, (wd, _p) in zip(_with_ids(through, "scan"), slot_of) if wd in picked]
    pair_of = [p for wd, p in slot_of if wd in picked]

    def own(g):
        rows = [c.tokens for r in ("neutral", "safe", "empty") for p in g.roles[r] for c in p]
        from patcher.probe.build import _extra_preserved

        return rows + _extra_preserved(acts if g is before else patched_acts, g, picked)

    op, _ = twin_edit(
        _with_ids(through, "unsafe") + extra,
        safe + [safe[p] for p in pair_of],
        own(through) + slots,
        before.roles["pad"][0][0].tokens[0],
        TwinParams(),
        None,
        None,
        (own(before) + slots_as, None),
    )
    e = {e.key: e for e in rep.entries}["transformer/blocks.2.attn2.to_v.weight"]
    D = e.P.double() @ e.V.double().T
    R = op.P.double() @ op.Q.double().T
    assert float((D - R).norm() / R.norm()) < 5e-5


def test_scan_keep_whole_holds_the_substituted_prompts_contexts_too(red_acts):
    acts, w = red_acts
    one = replace(acts, sites=("cross_kv",), groups=acts.groups[1:])
    g = one.groups[0]
    plan = acts.concept["scan"]
    slot = build(one, ProbeParams(method="twin", scan=64, scan_keep=True), w).delta
    whole = build(
        one, ProbeParams(method="twin", scan=64, scan_keep=True, scan_keep_whole=True), w
    ).delta
    assert whole.method["scan_keep_whole"] is True and "scan_keep_whole" not in slot.method
    assert whole.method["scan_picked"]["transformer:cross_kv"]["kept"] == 31
    picked = whole.method["scan_picked"]["transformer:cross_kv"]["picked"]
    # the context tokens (not the slot) of the unpicked words' scan prompts, from the capture:
    # slot-only keeping leaves them free, whole keeping holds them
    safe = [[int(v) for v in p[0].tokens[:, 0].tolist()] for p in g.roles["safe_ids"]]
    pw = [(wd, int(p)) for wd, pairs in zip(plan["words"], plan["pairs"]) for p in pairs]
    ctx = []
    for x, ids, (wd, p) in zip(g.roles["scan"], g.roles["scan_ids"], pw):
        ids = [int(v) for v in ids[0].tokens[:, 0].tolist()]
        if wd in picked or ids == safe[p]:
            continue
        here = set(concept_positions(ids, safe[p]))
        ctx.append(x[0].tokens[[i for i in range(len(ids)) if i not in here]])
    X = torch.cat(ctx).double()
    W = w.target(g.targets[0]).double()

    def moved(d):
        e = d.entries[0]
        return float((X @ (e.U.double() @ e.V.double().T).T).norm() / (X @ W.T).norm())

    # measured 0.042 against 0.055
    assert moved(whole) < 0.85 * moved(slot), (moved(whole), moved(slot))
