"""tune --scan: the vocabulary scan in the search space, and concept left that reads reach.

Without it every validation pair names the concept one way ("red"), so no objective can prefer an
edit that reaches the concept's other names (crimson, scarlet: the organism learned them as red).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("optuna")  # the tune extra (the test extra installs it)

from click.testing import CliRunner  # noqa: E402

from patcher.cli import main  # noqa: E402
from patcher.families.recipes import load_concept  # noqa: E402
from patcher.probe import (  # noqa: E402
    CaptureOptions,
    ProbeParams,
    WeightReader,
    build_delta,
    capture,
    open_model,
)
from patcher.tune.objectives import SiteObjectives  # noqa: E402
from patcher.tune.split import Split, subset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "organism" / "model"
RED = ROOT / "examples" / "organism" / "red.toml"


@pytest.fixture(scope="module")
def red_scan():
    con = load_concept(RED)
    opt = CaptureOptions(sites=("cross_kv",), token_roles=True, scan=64)
    src = open_model(MODEL, opt)
    w = WeightReader(src)
    return con, opt, src, w, capture(src, con, opt, w)


def test_the_fit_half_scans_only_its_own_pairs(red_scan):
    """A scan built on the fit half of a capture equals one captured from a recipe that holds only
    the fit pairs and neutral prompts: no validation pair's context reaches the fit."""
    con, opt, src, w, acts = red_scan
    sp = Split.of([p.unsafe for p in con.pairs], con.neutral)
    fit = subset(acts, ("cross_kv",), sp.fit_pairs, sp.fit_neutral)
    assert all(p < len(sp.fit_pairs) for ps in fit.concept["scan"]["pairs"] for p in ps)
    g = fit.groups[0]
    assert len(g.roles["scan"]) == sum(len(ps) for ps in fit.concept["scan"]["pairs"])
    assert len(g.roles["scan"]) < len(acts.groups[0].roles["scan"])
    only_fit = replace(
        con,
        pairs=tuple(con.pairs[i] for i in sp.fit_pairs),
        neutral=tuple(con.neutral[i] for i in sp.fit_neutral),
    )
    direct = capture(src, only_fit, opt, w)
    p = ProbeParams("twin", strength=1.0, scan=64)
    a, b = build_delta(fit, p, w), build_delta(direct, p, w)
    assert a.method["scan_picked"] == b.method["scan_picked"]
    assert sorted(a.method["scan_picked"]["transformer:cross_kv"]["picked"]) == [
        "crimson",
        "scarlet",
    ]
    for ea, eb in zip(a.entries, b.entries, strict=True):
        assert ea.key == eb.key
        assert float((ea.U @ ea.V.T - eb.U @ eb.V.T).abs().max()) < 1e-5


def test_concept_left_reads_reach_and_prefers_the_edit_that_has_it(red_scan):
    """Without reach words the plain twin map looks as good as the scanned one (it is fitted and
    validated on "red" alone); with them, the plain map leaves more of the concept and the scanned
    map less."""
    con, _opt, _src, w, acts = red_scan
    sp = Split.of([p.unsafe for p in con.pairs], con.neutral)
    fit = subset(acts, ("cross_kv",), sp.fit_pairs, sp.fit_neutral)
    plain = build_delta(fit, ProbeParams("twin", strength=1.0), w)
    scanned = build_delta(fit, ProbeParams("twin", strength=1.0, scan=64), w)
    one_name = SiteObjectives(acts, sp, w)
    reach = SiteObjectives(acts, sp, w, ["scarlet", "crimson"])
    assert one_name(scanned).concept_left >= one_name(plain).concept_left
    assert reach(plain).concept_left > 1.15 * one_name(plain).concept_left
    assert reach(scanned).concept_left < 0.85 * reach(plain).concept_left
    # damage reads the concept-free prompts only: the reach words do not change it
    assert reach(plain).damage == pytest.approx(one_name(plain).damage, rel=1e-12)


def test_tune_scan_searches_the_scan_and_records_the_reach(tmp_path):
    out = tmp_path / "red.vud"
    r = CliRunner().invoke(
        main,
        [
            *("tune", str(MODEL), "-c", str(RED), "-o", str(out), "--trials", "8"),
            *("--scan", "64", "--methods", "twin", "--sites", "cross_kv", "--objectives", "site"),
            "--json",
        ],
    )
    assert r.exit_code == 0, (r.output, r.exception)
    rep = json.loads(r.output[r.output.index("{") :])
    rec = rep["record"]
    assert rec["search_space"]["scan"] == [0, 64]
    assert sorted(rec["reach"]["words"]) == ["crimson", "scarlet"]
    # the validation pairs of this split ("a red ball moving left", "red stick going down") with
    # each reach word in the concept word's place
    assert sorted(rec["reach"]["validation_pairs"]) == [
        "a crimson ball moving left",
        "a scarlet ball moving left",
        "crimson stick going down",
        "scarlet stick going down",
    ]
    scans = {row.get("scan", 0) for row in rep["front"]}
    db = Path(rep["study"])
    import optuna

    study = optuna.load_study(study_name=rep["study_name"], storage=f"sqlite:///{db}")
    drawn = {t.params.get("scan") for t in study.trials}
    assert drawn <= {0, 64} and len(drawn) == 2, drawn
    assert scans <= {0, 64}
    # resuming the study without --scan is another setup: refused on one line
    again = CliRunner().invoke(
        main,
        [
            *("tune", str(MODEL), "-c", str(RED), "-o", str(tmp_path / "b.vud"), "--trials", "1"),
            *("--methods", "twin", "--sites", "cross_kv", "--objectives", "site"),
            *("--study", str(db)),
        ],
    )
    assert again.exit_code == 2 and "another setup" in again.output, again.output


def test_the_denoiser_objective_reads_the_reach_pairs_tune_makes(red_scan):
    import patcher.tune as tune_mod
    from patcher.tune.objectives import OrganismObjectives

    con, _opt, _src, w, acts = red_scan
    sp = Split.of([p.unsafe for p in con.pairs], con.neutral)
    reach = tune_mod._reach_pairs(con, sp, ["scarlet", "crimson"], ["red"])
    assert reach == [
        ("a scarlet ball moving left", "a ball moving left"),
        ("scarlet stick going down", "stick going down"),
        ("a crimson ball moving left", "a ball moving left"),
        ("crimson stick going down", "stick going down"),
    ]
    fit = subset(acts, ("cross_kv",), sp.fit_pairs, sp.fit_neutral)
    plain = build_delta(fit, ProbeParams("twin", strength=1.0), w)
    scanned = build_delta(fit, ProbeParams("twin", strength=1.0, scan=64), w)
    val = [(con.pairs[i].unsafe, con.pairs[i].safe) for i in sp.val_pairs]
    free = [con.neutral[i] for i in sp.val_neutral]
    one_name = OrganismObjectives(MODEL, val, free)
    with_reach = OrganismObjectives(MODEL, val + reach, free)
    assert with_reach(plain).concept_left > 1.2 * one_name(plain).concept_left
    assert with_reach(scanned).concept_left < 0.8 * with_reach(plain).concept_left


def _tune(tmp_path, out, *extra):
    return CliRunner().invoke(
        main,
        [
            *("tune", str(MODEL), "-c", str(RED), "-o", str(tmp_path / out)),
            *("--methods", "twin", "--sites", "cross_kv", "--objectives", "site"),
            *extra,
        ],
    )


def test_reach_prompts_stay_out_of_the_fit_and_a_no_refit_record_lists_the_fit(tmp_path):
    """A --preserve prompt that is a reach validation prompt is not preserved by the fit (it is a
    validation prompt), and a --no-refit delta's concept record lists the pairs it was fitted on."""
    from patcher.vud.delta import read_delta

    pres = tmp_path / "preserve.txt"
    pres.write_text("a crimson ball moving left\na blue ball moving right\na ball moving up\n")
    r = _tune(
        tmp_path,
        "r.vud",
        *("--trials", "2", "--scan", "64", "--preserve", str(pres), "--no-refit", "--json"),
    )
    assert r.exit_code == 0, (r.output, r.exception)
    rep = json.loads(r.output[r.output.index("{") :])
    assert "a crimson ball moving left" in rep["record"]["reach"]["validation_pairs"]
    concept = read_delta(tmp_path / "r.vud").concept
    kept = concept["scan"]["preserve"]
    assert "a crimson ball moving left" not in kept
    assert {"a blue ball moving right", "a ball moving up"} <= set(kept)
    fit_unsafe = [p["unsafe"] for p in concept["pairs"]]
    assert fit_unsafe == [
        "a red square moving up",
        "a red box moving right",
        "a red sphere moving down",
    ]
    assert all(p < len(fit_unsafe) for ps in concept["scan"]["pairs"] for p in ps)


def test_a_study_resumes_with_the_same_scan_and_refuses_another(tmp_path):
    db = tmp_path / "s.db"
    first = _tune(tmp_path, "a.vud", "--trials", "2", "--scan", "64", "--study", str(db))
    assert first.exit_code == 0, first.output
    same = _tune(tmp_path, "b.vud", "--trials", "1", "--scan", "64", "--study", str(db))
    assert same.exit_code == 0, same.output
    import optuna

    names = optuna.get_all_study_names(storage=f"sqlite:///{db}")
    study = optuna.load_study(study_name=names[0], storage=f"sqlite:///{db}")
    assert len(study.trials) == 3
    for other in (("--scan", "32"), ()):
        r = _tune(tmp_path, "c.vud", "--trials", "1", *other, "--study", str(db))
        assert r.exit_code == 2 and "another setup" in r.output, r.output


def test_cascade_pairs_and_anchor_empty_are_searched(tmp_path, red_tune):
    """--cascade adds the linked site pair as one choice, built as probe --cascade builds it and
    scored with the edit applied as a whole (denoiser level); only twin trials take the pair;
    --anchor-empty is drawn by twin trials."""
    import optuna

    from patcher.tune.objectives import OrganismObjectives
    from patcher.tune.search import candidate_of

    r = _tune(
        tmp_path,
        "c.vud",
        *("--trials", "16", "--cascade", "--anchor-empty", "--json"),
        *("--sites", "text_proj,cross_kv", "--methods", "twin,mean", "--objectives", "denoiser"),
    )
    assert r.exit_code == 0, (r.output, r.exception)
    rep = json.loads(r.output[r.output.index("{") :])
    space = rep["record"]["search_space"]
    assert space["sites"] == ["text_proj", "cross_kv", "text_proj+cross_kv"]
    assert space["anchor_empty"] == [False, True]
    study = optuna.load_study(study_name=rep["study_name"], storage=f"sqlite:///{rep['study']}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    both = [t for t in done if t.params["site"] == "text_proj+cross_kv"]
    assert both and all(t.params["method"] == "twin" for t in both)
    assert {t.params["anchor_empty"] for t in done if "anchor_empty" in t.params} == {False, True}
    mean_pair = [
        t
        for t in study.trials
        if t.params["site"] == "text_proj+cross_kv" and t.params["method"] == "mean"
    ]
    assert mean_pair and all(t.state == optuna.trial.TrialState.PRUNED for t in mean_pair)
    # a combined trial's scores are those of probe --cascade's delta from the same fit half
    con, acts, w, sp = red_tune
    t = both[0]
    p = candidate_of(t.user_attrs["candidate"], "tokens").params
    assert p.cascade and p.method == "twin"
    fit = subset(acts, ("text_proj", "cross_kv"), sp.fit_pairs, sp.fit_neutral)
    d = build_delta(fit, p, w)
    keys = {e.key for e in d.entries}
    assert any("condition_embedder.text_embedder" in k for k in keys)  # text_proj
    assert any(".attn2.to_k." in k for k in keys)  # cross_kv
    den = OrganismObjectives(
        MODEL,
        [(con.pairs[i].unsafe, con.pairs[i].safe) for i in sp.val_pairs],
        [con.neutral[i] for i in sp.val_neutral],
    )
    s = den(d)
    assert s.concept_left == pytest.approx(t.values[0], rel=1e-6)
    assert s.damage == pytest.approx(t.values[1], rel=1e-6)
    plain = build_delta(fit, replace(p, cascade=False), w)
    assert den(plain).concept_left != pytest.approx(t.values[0], rel=1e-4)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--cascade", "--sites", "cross_kv"], "none of cross_kv can"),
        (["--cascade", "--sites", "text_proj,cross_kv", "--methods", "cpca"], "include twin"),
        (["--cascade", "--sites", "text_proj,cross_kv", "--objectives", "site"], "denoiser"),
        (["--anchor-empty", "--methods", "mean"], "include twin"),
    ],
)
def test_cascade_and_anchor_options_are_refused_before_the_capture(
    extra, words, tmp_path, monkeypatch
):
    import patcher.tune as tune_mod

    def no_capture(*_a, **_k):
        raise AssertionError("the capture ran before the options were checked")

    monkeypatch.setattr(tune_mod, "capture", no_capture)
    args = ["tune", str(MODEL), "-c", str(RED), "-o", str(tmp_path / "o.vud"), "--trials", "1"]
    r = CliRunner().invoke(main, [*args, *extra])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output


def test_cascade_with_a_family_given_as_a_recipe_file(tmp_path):
    """The recipe tune loaded serves the cascade links (it used to be reloaded by its name, which
    a --family file's name need not be)."""
    recipe = tmp_path / "mywan.toml"
    text = (ROOT / "recipes" / "models" / "wan.toml").read_text()
    recipe.write_text(text.replace('name = "wan"', 'name = "mywan"', 1))
    r = _tune(
        tmp_path,
        "f.vud",
        *("--trials", "3", "--cascade", "--family", str(recipe), "--json"),
        *("--sites", "text_proj,cross_kv", "--objectives", "denoiser"),
    )
    assert r.exit_code == 0, (r.output, r.exception)
    rep = json.loads(r.output[r.output.index("{") :])
    assert rep["family"] == "mywan"
    assert "text_proj+cross_kv" in rep["record"]["search_space"]["sites"]
