"""vpatch tune: the split, the cheap objectives on the organism, the search's reproducibility and
resumption, and the verb end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

optuna = pytest.importorskip("optuna")  # the tune extra (the test extra installs it)

from click.testing import CliRunner  # noqa: E402

from patcher import organism  # noqa: E402
from patcher.cli import main  # noqa: E402
from patcher.errors import ProbeError  # noqa: E402
from patcher.evaluation.organism_judge import judge  # noqa: E402
from patcher.families.recipes import load_concept  # noqa: E402
from patcher.probe import (  # noqa: E402
    CaptureOptions,
    ProbeParams,
    WeightReader,
    build_delta,
    capture,
    open_model,  # noqa: E402
)
from patcher.tune import run_trials  # noqa: E402
from patcher.tune.objectives import OrganismObjectives, SiteObjectives  # noqa: E402
from patcher.tune.split import Split, subset  # noqa: E402
from patcher.vud.delta import read_delta  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "organism" / "model"
RED = ROOT / "examples" / "organism" / "red.toml"
FREE = [  # concept-free captions: other colours and colour-free
    "a blue ball moving right",
    "a green stick moving left",
    "a yellow square moving down",
    "a ball moving up",
    "a purple sphere moving up",
    "the stick moves right",
]


def test_split_is_by_content_and_deterministic():
    u = [f"a red thing number {i}" for i in range(5)]
    n = [f"neutral {i}" for i in range(8)]
    a = Split.of(u, n, 0.4)
    b = Split.of(list(reversed(u)), list(reversed(n)), 0.4)
    assert len(a.val_pairs) == 2 and len(a.val_neutral) == 3
    assert not set(a.val_pairs) & set(a.fit_pairs)
    assert sorted(a.val_pairs + a.fit_pairs) == list(range(5))
    # reordering the recipe moves no prompt across the split
    assert {u[i] for i in a.val_pairs} == {list(reversed(u))[i] for i in b.val_pairs}
    # adding a prompt moves no other one out of validation unless it takes its rank
    c = Split.of([*u, "another red thing"], n, 0.4)
    assert (
        len({u[i] for i in a.val_pairs} & {([*u, "another red thing"])[i] for i in c.val_pairs})
        >= 1
    )
    with pytest.raises(ProbeError):
        Split.of(["only one"], n)


def _fit(red, site, p):
    con, acts, w, sp = red
    return build_delta(subset(acts, (site,), sp.fit_pairs, sp.fit_neutral), p, w)


def _sample(delta, prompts):
    """Organism clips with DELTA applied in memory (12 steps, seed 1000), judged."""
    tok, enc, tr = organism.load(MODEL)
    with torch.no_grad():
        for e in delta.entries if delta else []:
            p = dict(tr.named_parameters())[e.tensor_key]
            p.add_(e.U @ e.V.T)
        clips = organism.sample(tok, enc, tr, prompts, [1000] * len(prompts), steps=12)
    return [judge(c) for c in clips]


def test_objectives_catch_over_strength_and_over_erasure(red_tune):
    con, acts, w, sp = red_tune
    assert set(sp.val_pairs).isdisjoint(sp.fit_pairs)
    den = OrganismObjectives(
        MODEL,
        [(con.pairs[i].unsafe, con.pairs[i].safe) for i in sp.val_pairs],
        [con.neutral[i] for i in sp.val_neutral],
    )
    site = SiteObjectives(acts, sp, w)
    exact = _fit(red_tune, "text_proj", ProbeParams("cpca", 8, 1.0, 1.0, 1, "tokens"))
    over = _fit(red_tune, "text_proj", ProbeParams("cpca", 8, 1.0, 1.5, 1, "tokens"))
    twin = _fit(red_tune, "cross_kv", ProbeParams("twin", strength=1.0))
    wipe = _fit(red_tune, "cross_kv", ProbeParams("pca", 32, 0.0, 1.0, 16, "tokens"))
    d_exact, d_over, d_twin, d_wipe = (den(x) for x in (exact, over, twin, wipe))
    s_exact, s_over, s_twin, s_wipe = (site(x) for x in (exact, over, twin, wipe))
    # over-strength: λ = 1.5 flips the component; both levels see more of the concept left
    assert d_over.concept_left > d_exact.concept_left + 0.1
    assert s_over.concept_left > s_exact.concept_left + 0.1
    assert s_over.concept_left > 1.0  # past the twin: further away than before the edit
    # the twin map leaves the least concept, the paper's form far more
    assert d_twin.concept_left < 0.5 * d_exact.concept_left
    # over-erasure: 16 directions out of the cross-attention input wreck concept-free prompts
    assert d_wipe.damage > 0.25 > d_twin.damage
    assert d_wipe.damage > 3 * d_twin.damage and s_wipe.damage > 3 * s_twin.damage
    # ... which generation confirms: concept-free clips lose their colour or shape under it,
    # and keep them under the twin map
    before = _sample(None, FREE)
    wiped = _sample(wipe, FREE)
    kept = _sample(twin, FREE)

    def same(a, b):
        return sum(x.colour == y.colour and x.shape == y.shape for x, y in zip(a, b))

    assert same(before, wiped) <= len(FREE) // 2
    assert same(before, kept) >= len(FREE) - 1


def _study(tmp_path, name, seed):
    return optuna.create_study(
        study_name=name,
        storage=f"sqlite:///{tmp_path / 's.db'}",
        directions=["minimize", "minimize"],
        sampler=optuna.samplers.TPESampler(seed=seed),
        load_if_exists=True,
    )


def test_same_seed_same_trials_and_the_study_resumes(red_tune, tmp_path):
    con, acts, w, sp = red_tune
    sites = ["text_proj", "cross_kv"]
    fits = {s: subset(acts, (s,), sp.fit_pairs, sp.fit_neutral) for s in sites}
    obj = SiteObjectives(acts, sp, w)
    widths = {g.site: g.dim for g in acts.groups}
    runs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        st = _study(tmp_path, name, seed)
        run_trials(st, 6, fits, w, obj, sites, ["cpca", "mean", "twin"], widths, "tokens")
        runs.append([(t.params, t.values) for t in st.trials])
    assert runs[0] == runs[1]
    assert [p for p, _ in runs[0]] != [p for p, _ in runs[2]]
    # resumed: the same study name in the same file gains trials, keeping the old ones
    st = _study(tmp_path, "a", 7)
    run_trials(st, 3, fits, w, obj, sites, ["cpca", "mean", "twin"], widths, "tokens")
    assert len(st.trials) == 9
    assert [(t.params, t.values) for t in st.trials[:6]] == runs[0]


def test_tune_verb_writes_delta_record_report_and_plot(tmp_path):
    out = tmp_path / "red.vud"
    args = ["tune", str(MODEL), "-c", str(RED), "-o", str(out), "--trials", "4", "--seed", "3"]
    args += ["--sites", "text_proj", "--methods", "cpca,twin", "--objectives", "site", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    d = read_delta(out)
    rec = d.method["tune"]
    assert rec["sampler"] == {"name": "TPESampler", "seed": 3, "seed_offset": 0}
    assert rec["versions"]["optuna"] == optuna.__version__
    assert rec["chosen"] == rep["chosen"] and rec["chosen"] in rep["front"]
    assert d.method["name"] == rep["chosen"]["method"] and d.method["strength"] == pytest.approx(
        rep["chosen"]["strength"]
    )
    assert set(rec["split"]["validation_pairs"]) <= {p.unsafe for p in load_concept(RED).pairs}
    assert Path(rep["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(rep["report"]).read_text())["delta_sha256"] == rep["delta_sha256"]
    # the delta is never replaced without --overwrite: one line, exit 2, nothing changed
    before = out.read_bytes()
    r2 = CliRunner().invoke(main, args[:-1])
    assert r2.exit_code == 2 and "Traceback" not in r2.output
    assert out.read_bytes() == before
    # the same study extended: 2 more trials, new ones (the resumed sampler's seed is offset)
    r3 = CliRunner().invoke(main, [*args, "--overwrite", "--trials", "2"])
    assert r3.exit_code == 0, r3.output
    assert json.loads(r3.stdout)["trials"] + json.loads(r3.stdout)["failed"] == 6
    st = optuna.load_study(study_name=rec["study"], storage=f"sqlite:///{rec['storage']}")
    params = [t.params for t in st.trials]
    assert params[4] not in params[:4] and params[5] not in params[:4], params
    assert read_delta(out).method["tune"]["sampler"]["seed_offset"] == 4
    # --preserve: a study run without it is not resumed with it; a new one records the file
    captions = ROOT / "examples" / "organism" / "captions.txt"
    pres = [*args, "--overwrite", "--trials", "1", "--preserve", str(captions)]
    r4 = CliRunner().invoke(main, pres)
    assert r4.exit_code == 2 and "another setup" in r4.output and "Traceback" not in r4.output
    r5 = CliRunner().invoke(main, [*pres, "--study", str(tmp_path / "p.db")])
    assert r5.exit_code == 0, r5.output
    lines = [x for x in captions.read_text().splitlines() if x and not x.startswith("#")]
    d5 = read_delta(out)
    assert d5.method["tune"]["preserve"]["prompts"] == len(lines)
    assert json.loads(r5.stdout)["record"]["preserve"] == d5.method["tune"]["preserve"]
    # the refit keeps them all, less those that name the concept (12 of the 72 say "red")
    kept = d5.concept["scan"]["preserve"]
    assert len(kept) == len(lines) - 12 and not any("red" in x.split() for x in kept)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--judge", "nosuchjudge"], "--judge"),
        (["--sites", "nosuchsite"], "--sites"),
        (["--study", "{model}/x.db"], "inside the model"),
        (["--study", "{tmp}/not-sqlite.db"], "cannot open it"),
        (["--study", "{tmp}/no/such/folder/s.db"], "does not exist"),
        (["-o", "{tmp}"], "file name"),
        (["--preserve", "{captions}", "--methods", "cpca,mean"], "include twin"),
        (["--scan", "8", "--methods", "cpca,mean"], "include twin"),
        (["--scan", "-1"], "whole number >= 0"),
    ],
)
def test_bad_options_are_refused_on_one_line_before_the_capture(
    extra, words, tmp_path, monkeypatch
):
    import patcher.tune as tune_mod

    def no_capture(*_a, **_k):
        raise AssertionError("the capture ran before the options were checked")

    monkeypatch.setattr(tune_mod, "capture", no_capture)
    (tmp_path / "not-sqlite.db").write_bytes(b"this is not a database" * 10)
    captions = ROOT / "examples" / "organism" / "captions.txt"
    extra = [e.format(model=MODEL, tmp=tmp_path, captions=captions) for e in extra]
    args = ["tune", str(MODEL), "-c", str(RED), "-o", str(tmp_path / "o.vud"), "--trials", "1"]
    r = CliRunner().invoke(main, [*args, *extra])
    assert r.exit_code == 2, (r.output, r.exception)
    assert "Traceback" not in r.output and words in r.output, r.output
    assert not (MODEL / "x.db").exists() and not (tmp_path / "o.vud").exists()
    assert (tmp_path / "not-sqlite.db").read_bytes() == b"this is not a database" * 10


def test_tune_runs_on_a_family_read_through_the_pipelines_own_encode_prompt(tmp_path):
    pytest.importorskip("diffusers")
    from tests import tiny_pipes_llm

    src, _call = tiny_pipes_llm.BUILDERS["sana_video"](tmp_path / "sana")
    out = tmp_path / "c.vud"
    args = ["tune", str(src), "-c", "nudity", "-o", str(out), "--trials", "3", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rec = read_delta(out).method["tune"]
    assert "twin" not in rec["search_space"]["methods"] and rec["search_space"]["sites"]
    # asking for the twin map there is refused on one line
    r2 = CliRunner().invoke(main, [*args[:5], str(tmp_path / "d.vud"), "--methods", "twin"])
    assert (
        r2.exit_code == 2
        and "Traceback" not in r2.output
        and "pipeline's own encoding" in r2.output
    )


def test_the_judge_confirms_among_the_front_and_an_unmeasured_gap_ranks_last(monkeypatch):
    import patcher.tune as tune_mod

    class T:
        def __init__(self, n, left, damage):
            self.number, self.values = n, (left, damage)
            self.user_attrs = {"candidate": {"site": "cross_kv", "method": "mean", "strength": 1.0}}

    pareto = [T(0, 0.1, 0.1), T(1, 0.2, 0.1), T(2, 0.3, 0.1), T(3, 0.05, 0.9)]  # 3: over budget
    gaps = {0: None, 1: 0.0, 2: -0.1}
    monkeypatch.setattr(
        tune_mod,
        "_judge_candidates",
        lambda *a: [
            {
                "judge_gap_closed": gaps[t.number],
                "concept_left": t.values[0],
                "drift_over_floor": 0.1,
            }
            for t, _c in a[5]
        ],
    )

    class Opt:
        max_damage, confirm = 0.25, 3

    chosen, judged, passed = tune_mod._judge_choice(
        None, None, None, None, "tokens", None, pareto, pareto[0], Opt, print
    )
    assert len(judged) == 3 and passed  # the over-budget trial is never sampled
    assert chosen.number == 1  # gap 0.0 beats -0.1, and the unmeasured gap (None) ranks last


def test_the_judge_rejects_candidates_whose_sampled_drift_breaks_the_budget(monkeypatch):
    """Sampled drift over the seed floor above --max-damage rejects a candidate (its cheap damage
    was within); the judge goes on down the front, least concept left first, until --confirm pass
    or 3 x --confirm were sampled; with none passing, the least drift is chosen and said."""
    import patcher.tune as tune_mod

    class T:
        def __init__(self, n, left):
            self.number, self.values = n, (left, 0.2)
            self.user_attrs = {"candidate": {"site": "cross_kv", "method": "mean", "strength": 1.0}}

    pareto = [T(n, 0.1 * (n + 1)) for n in (5, 2, 7, 0, 3, 6, 1, 4)]  # any order: sorted by left
    drift = {0: 0.34, 1: 0.33, 2: 0.2, 3: 0.5, 4: 0.1, 5: 0.1, 6: 0.1, 7: 0.1}
    gaps = {n: 0.9 - 0.01 * n for n in range(8)}
    gaps[4] = 0.95  # the best gap among those that pass
    sampled: list[int] = []

    def fake(*a):
        sampled.extend(t.number for t, _c in a[5])
        return [
            {
                "judge_gap_closed": gaps[t.number],
                "concept_left": t.values[0],
                "drift_over_floor": drift[t.number],
            }
            for t, _c in a[5]
        ]

    monkeypatch.setattr(tune_mod, "_judge_candidates", fake)

    class Opt:
        max_damage, confirm = 0.25, 2

    chosen, judged, passed = tune_mod._judge_choice(
        None, None, None, None, "tokens", None, pareto, pareto[3], Opt, print
    )
    assert sampled == [0, 1, 2, 3, 4]  # stops once 2 passed (trials 2 and 4)
    assert [j["passed"] for j in judged] == [False, False, True, False, True]
    assert chosen.number == 4 and passed  # 0 and 1 had larger gaps but broke the budget
    drift.update({n: 0.3 + 0.01 * n for n in range(8)})
    drift[3] = 0.26  # the least drift, neither first, nor least concept left, nor best gap
    drift[0] = float("nan")  # not measured: neither passes nor counts as the least
    sampled.clear()
    chosen, judged, passed = tune_mod._judge_choice(
        None, None, None, None, "tokens", None, pareto, pareto[3], Opt, print
    )
    assert sampled == [0, 1, 2, 3, 4, 5]  # at most 3 x --confirm
    assert chosen.number == 3 and not passed  # none passed: the least drift
    assert not judged[0]["passed"]


def test_tune_says_when_the_judge_rejected_every_candidate(tmp_path, monkeypatch):
    """The CLI says it (stderr) and the record keeps the cheap budget apart from the judge's."""
    import patcher.tune as tune_mod

    def fake(*a):
        return [
            {
                **tune_mod._trial_row(t),
                "judge_gap_closed": 0.5,
                "judge_space": "judge",
                "drift_over_floor": 0.9,
            }
            for t, _c in a[5]
        ]

    monkeypatch.setattr(tune_mod, "_judge_candidates", fake)
    out = tmp_path / "j.vud"
    args = ["tune", str(MODEL), "-c", str(RED), "-o", str(out), "--trials", "3"]
    args += ["--sites", "cross_kv", "--methods", "twin", "--judge", "organism", "--confirm", "1"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "no sampled candidate drifted within --max-damage 0.25" in r.stderr
    assert "drift 0.900, over the budget" in r.stderr and "(over the budget)" in r.stderr
    rec = read_delta(out).method["tune"]
    assert rec["judge_within_budget"] is False
    assert rec["within_budget"] is True  # the cheap objectives' budget: met
    rep = json.loads(out.with_suffix(".tune.json").read_text())
    assert rep["judged"] and all(not j["passed"] for j in rep["judged"])


def test_tune_with_the_organism_judge_in_the_loop(tmp_path):
    out = tmp_path / "r.vud"
    args = ["tune", str(MODEL), "-c", str(RED), "-o", str(out), "--trials", "3", "--json"]
    args += ["--sites", "cross_kv", "--methods", "twin", "--judge", "organism", "--confirm", "2"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    judged = rep["judged"]
    assert 1 <= len(judged) <= 6 and all(j["judge_gap_closed"] is not None for j in judged)
    ok = [j for j in judged if j["passed"]]
    assert all((j["drift_over_floor"] <= 0.25) == j["passed"] for j in judged)
    if ok:
        best = max(ok, key=lambda j: (j["judge_gap_closed"], -j["concept_left"]))
    else:
        best = min(judged, key=lambda j: j["drift_over_floor"])
    assert rep["chosen"]["trial"] == best["trial"]
    rec = read_delta(out).method["tune"]
    assert rec["judge"] == "organism" and rec["judge_within_budget"] == bool(ok)


def test_damage_is_real_on_colours_the_fit_never_preserved():
    """Blue's validation neutral prompts hold the only red and green ones of its recipe, so the twin
    map fitted on the fit half never preserves them: the cheap damage puts it over the budget, and
    generation agrees (the red ball turns magenta). With every recipe prompt preserved (the refit
    tune writes) the red ball stays red and the damage is within the budget; so it is with a
    --preserve file of captions, less the validation prompts themselves (tune's fit)."""
    con = load_concept(ROOT / "examples" / "organism" / "blue.toml")
    captions = [
        x
        for x in (ROOT / "examples" / "organism" / "captions.txt").read_text().splitlines()
        if x and not x.startswith("#")
    ]
    opt = CaptureOptions(sites=("cross_kv",), token_roles=True, preserve=tuple(captions))
    src = open_model(MODEL, opt)
    w = WeightReader(src)
    acts = capture(src, con, opt, w)
    plain = replace(  # the same capture without the --preserve prompts
        acts,
        groups=tuple(
            replace(g, roles={r: v for r, v in g.roles.items() if r != "preserve"})
            for g in acts.groups
        ),
    )
    sp = Split.of([p.unsafe for p in con.pairs], con.neutral)
    val_free = [con.neutral[i] for i in sp.val_neutral]
    assert "a red ball moving left" in val_free and "a red ball moving left" in captions
    assert not any("red" in con.neutral[i] for i in sp.fit_neutral)
    # the split holds the validation prompts out of the --preserve prompts too
    fit_acts = subset(acts, ("cross_kv",), sp.fit_pairs, sp.fit_neutral)
    kept = fit_acts.concept["scan"]["preserve"]
    assert "a red ball moving left" not in kept and "a red ball moving right" in kept
    assert len(kept) == len(fit_acts.groups[0].roles["preserve"]) < len(captions)
    assert not any("blue" in x for x in kept)
    den = OrganismObjectives(
        MODEL, [(con.pairs[i].unsafe, con.pairs[i].safe) for i in sp.val_pairs], val_free
    )
    p = ProbeParams("twin", strength=1.0)
    fit = build_delta(subset(plain, ("cross_kv",), sp.fit_pairs, sp.fit_neutral), p, w)
    every = build_delta(plain, p, w)
    pres = build_delta(fit_acts, p, w)
    s_fit, s_every, s_pres = den(fit), den(every), den(pres)
    assert s_fit.damage > 0.25 > s_every.damage
    assert s_pres.damage < 0.25 and s_pres.concept_left < s_fit.concept_left
    tok, enc, tr = organism.load(MODEL)
    prompts, seeds = ["a red ball moving left"] * 2, [2000, 2001]
    colours = {}
    for name, d in (("original", None), ("fit", fit), ("every", every), ("pres", pres)):
        saved = []
        with torch.no_grad():
            for e in d.entries if d else []:
                q = dict(tr.named_parameters())[e.tensor_key]
                saved.append((q, q.detach().clone()))
                q.add_(e.U @ e.V.T)
            clips = organism.sample(tok, enc, tr, prompts, seeds, steps=12)
            for q, v in saved:
                q.copy_(v)
        colours[name] = [judge(c).colour for c in clips]
    assert colours["original"] == ["red", "red"]
    assert "red" not in colours["fit"]
    assert colours["every"] == colours["pres"] == ["red", "red"]
