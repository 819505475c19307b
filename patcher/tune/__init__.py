"""``vpatch tune``: pick site, method, k, α, λ and the number of directions automatically.

One capture (every candidate site, with the token roles the twin map needs), then an Optuna
multi-objective study whose trials only *build* deltas from the fit half of that capture and score
them with two cheap objectives on the validation half (objectives.py): concept left and damage.
The chosen trial is the least concept left within the user's damage budget; with a judge, front
candidates are also sampled and scored by the eval machinery, the judge rejects those whose sampled
drift breaks the budget and decides among the rest. The chosen parameters are rebuilt on all of
the recipe's prompts (``refit``) and written with the search record in the delta's method metadata
(``method["tune"]``).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import DeltaError, ProbeError, VpatchError
from ..families.recipes import Concept, Family, load_concept
from ..probe.build import METHODS, TWIN, build, cascade_pairs, may_cascade
from ..probe.capture import CaptureOptions, capture
from ..probe.sources import ModelSource, WeightReader, open_model, resolve_family
from ..vud.delta import _check_entries, versions, write_delta
from .objectives import OrganismObjectives, Scores, SiteObjectives
from .search import Candidate, candidate_of, choose, front, sites_of, suggest
from .split import Split, subset

LEVELS = ("auto", "denoiser", "site")


class TuneError(VpatchError):
    """tune cannot run as asked (no optuna, no site, a level the model cannot serve...)."""


@dataclass(frozen=True)
class TuneOptions:
    trials: int = 40  # trials this run adds to the study
    seed: int = 0  # the TPE sampler's seed
    sites: tuple[str, ...] | None = None  # None: the family's text-mode sites read from text
    methods: tuple[str, ...] | None = None  # None: every build method
    max_damage: float = 0.25  # the damage budget the choice respects
    val_fraction: float = 0.4  # share of pairs and neutral prompts held for validation
    level: str = "auto"  # objectives: auto (denoiser for the organism, else site), denoiser, site
    study: Path | None = None  # SQLite file; default OUT with suffix .tune.db
    study_name: str | None = None  # default "<concept>@<family>"
    judge: str | None = None  # organism | clip | ...: confirm the best candidates by sampling
    confirm: int = 3  # how many sampled candidates must pass the judge (it samples at most 3x)
    judge_seeds: int = 2
    refit: bool = True  # rebuild the chosen parameters on every recipe prompt
    capture: CaptureOptions = field(default_factory=CaptureOptions)
    clip_model: str | None = None
    cascade: bool = False  # also search linked site pairs as one edit, the twin fitted through
    anchor_empty: bool = False  # twin trials also draw probe's --anchor-empty

    def __post_init__(self) -> None:
        if self.trials < 0:
            raise TuneError(f"--trials {self.trials}: a whole number >= 0")
        if self.level not in LEVELS:
            raise TuneError(f"--objectives {self.level!r}: choose one of {', '.join(LEVELS)}")
        if not (math.isfinite(self.max_damage) and self.max_damage > 0):
            raise TuneError(f"--max-damage {self.max_damage!r}: a positive number")
        for m in self.methods or ():
            if m not in METHODS:
                raise TuneError(f"--methods {m!r}: choose among {', '.join(METHODS)}")
        if self.confirm < 1:
            raise TuneError(f"--confirm {self.confirm}: at least 1")


@dataclass(frozen=True)
class TuneReport:
    delta: str
    delta_sha256: str
    report: str
    plot: str | None
    study: str
    study_name: str
    concept: str
    family: str
    level: str
    trials: int  # completed trials in the study
    failed: int  # trials whose build was refused (pruned)
    chosen: dict
    front: list[dict]
    judged: list[dict]
    record: dict
    seconds: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise TuneError(
            "vpatch tune needs Optuna: pip install 'vpatch[tune]' (or 'optuna>=4,<6')"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def default_sites(src: ModelSource, opt: CaptureOptions) -> tuple[str, ...]:
    """The family's text-mode sites that read a text encoder (the search's default sites)."""
    fam = resolve_family(src, opt.family, list(opt.overrides))
    return tuple(
        n
        for n, s in fam.sites.items()
        if s.mode == "text"
        and s.encoder in fam.encoders
        and fam.encoders[s.encoder].kind in ("text", "pipeline")
    )


def _trial_row(t) -> dict:
    return {
        "trial": t.number,
        **t.user_attrs.get("candidate", {}),
        "concept_left": t.values[0],
        "damage": t.values[1],
    }


def _judge_candidates(
    model, con: Concept, split: Split, fits, weights, cands, opt, say, reach=(), cache=None
):
    """Sample the candidates on the validation prompts (never the held-out sets; REACH: the
    validation pairs with the reach words, as the cheap objectives read them) and score them with
    the eval machinery: twin gap closed (judge space) and drift over the seed floor. CACHE: the
    eval's cache (the original model's clips), shared across calls."""
    from ..evaluation.core import EvalOptions, evaluate
    from ..evaluation.prompts import PromptSet

    pairs = [(con.pairs[i].unsafe, con.pairs[i].safe) for i in split.val_pairs] + list(reach)

    class Validation:
        def sets(self, c):
            return [
                PromptSet(
                    "validation", tuple(u for u, _ in pairs), True, tuple(s for _, s in pairs)
                ),
                PromptSet("free", tuple(con.neutral[i] for i in split.val_neutral), False),
            ]

    eopt = EvalOptions(seeds=opt.judge_seeds, judge=opt.judge, clip_model=opt.clip_model)
    out = []
    cache = {} if cache is None else cache
    with tempfile.TemporaryDirectory(prefix="vpatch-tune-") as tmp:
        for t, cand in cands:
            d = build(fits[cand.site], cand.params, weights).delta
            p = Path(tmp) / f"trial{t.number}.vud"
            write_delta(p, d)
            say(f"judging trial {t.number} ({cand.record()})")
            r = evaluate(model, con, delta=p, options=eopt, cache=cache, prompts=Validation())
            tf = r.twin_fidelity.get("validation", {})
            space = "judge" if "judge" in tf else "pixel"
            out.append(
                {
                    **_trial_row(t),
                    "judge_gap_closed": tf.get(space, {}).get("closed"),
                    "judge_space": space,
                    "drift_over_floor": r.drift.get("pixel", {}).get("ratio"),
                }
            )
    return out


def run_trials(
    study,
    n,
    fits,
    weights,
    objective_fn,
    sites,
    methods,
    widths,
    pooling,
    scan: int = 0,
    anchor: bool = False,
) -> None:
    """Add N trials to STUDY: each builds a candidate from the fit activations FITS (per site
    choice) and scores it; a build that is refused (or a non-finite score) is recorded as a pruned
    trial. SCAN > 0 / ANCHOR: twin trials also draw those options (search.suggest)."""
    optuna = _optuna()

    def objective(trial) -> tuple[float, float]:
        cand = suggest(trial, sites, methods, widths, pooling, scan, anchor)
        trial.set_user_attr("candidate", cand.record())
        if "+" in cand.site and cand.params.method != TWIN:  # a cascade pair is the twin map's
            trial.set_user_attr("refused", f"{cand.site} is searched by the twin map only")
            raise optuna.TrialPruned(f"{cand.site}: twin only")
        try:
            d = build(fits[cand.site], cand.params, weights).delta
            _check_entries(d.entries, f"trial {trial.number}")  # what write_delta would refuse
        except (ProbeError, DeltaError) as e:
            trial.set_user_attr("refused", str(e))
            raise optuna.TrialPruned(str(e)) from None
        s: Scores = objective_fn(d)
        if not (math.isfinite(s.concept_left) and math.isfinite(s.damage)):
            trial.set_user_attr("refused", "non-finite objective")
            raise optuna.TrialPruned("non-finite objective")
        return s.concept_left, s.damage

    if n:
        study.optimize(objective, n_trials=n)


def _search_space(src: ModelSource, opt: TuneOptions) -> tuple[Family, tuple[str, ...], list[str]]:
    """The family, the sites and the methods searched, checked against the recipe."""
    fam = resolve_family(src, opt.capture.family, list(opt.capture.overrides))
    sites = tuple(opt.sites or opt.capture.sites or default_sites(src, opt.capture))
    if not sites:
        raise TuneError("the family has no text-mode site to search; give --sites")
    unknown = [s for s in sites if s not in fam.sites]
    if unknown:
        raise TuneError(f"--sites {unknown[0]!r}: family {fam.name} has {', '.join(fam.sites)}")
    # the twin map aligns tokenizer tokens: sites read through a pipeline's own encode_prompt cannot
    # take it (the default method list leaves it out there; asking for it is refused)
    piped = [
        s
        for s in sites
        if fam.encoders.get(fam.sites[s].encoder) is not None
        and fam.encoders[fam.sites[s].encoder].kind == "pipeline"
    ]
    methods = list(opt.methods or (m for m in METHODS if not (piped and m == "twin")))
    if piped and "twin" in methods:
        raise TuneError(
            f"--methods twin aligns tokenizer tokens; site {piped[0]!r} reads the pipeline's own "
            "encoding (leave twin out, or give other --sites)"
        )
    if opt.capture.preserve and "twin" not in methods:
        raise TuneError(
            "--preserve adds to the twin map's preservation set: include twin in --methods"
        )
    for flag, on in (
        ("--scan", opt.capture.scan),
        ("--cascade", opt.cascade),
        ("--anchor-empty", opt.anchor_empty),
    ):
        if on and "twin" not in methods:
            raise TuneError(f"{flag} is an option of the twin edit: include twin in --methods")
    if opt.cascade:
        if not any(may_cascade(fam, a, b) for a in sites for b in sites if a != b):
            raise TuneError(
                "--cascade links two searched sites, one read through the other's edited weight: "
                f"none of {', '.join(sites)} can (give e.g. --sites text_proj,cross_kv)"
            )

    return fam, sites, methods


def _preserve_record(prompts: tuple[str, ...]) -> dict:
    """What the study and the delta record of a --preserve list: its size and content hash."""
    import hashlib

    return {
        "prompts": len(prompts),
        "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
    }


def _objectives_level(model: str | Path, opt: TuneOptions) -> str:
    """Which objectives run (denoiser on the organism, site elsewhere); the judge name checked."""
    from ..organism import is_organism

    level = opt.level
    if level == "auto":
        level = "denoiser" if is_organism(model) else "site"
    if level == "denoiser" and not is_organism(model):
        raise TuneError(
            "--objectives denoiser needs a model whose sampling vpatch can run in memory (the "
            "organism); use --objectives site"
        )
    if opt.cascade and level != "denoiser":
        raise TuneError(
            "--cascade needs --objectives denoiser: the site level scores each site on its own "
            "captured inputs, so it cannot see what the second site reads through the first's edit"
        )
    if opt.judge:
        from ..evaluation.judges import JUDGES

        if opt.judge not in JUDGES:
            raise TuneError(f"--judge {opt.judge!r}: choose among {', '.join(sorted(JUDGES))}")
    return level


def _open_study(optuna, path: Path, others, inputs, name: str, setup: dict, seed: int):
    """The study, created or resumed, refused when it was run with another setup. A resumed study's
    sampler is seeded with the seed plus the trials it holds, so it adds new trials rather than
    repeating the first ones (a fresh study with the same seed reproduces the same trials)."""
    if path.resolve() in {Path(o).resolve() for o in others}:
        raise TuneError(f"--study {path} is one of tune's other outputs; give another path")
    if any(path.resolve().is_relative_to(Path(i).resolve()) for i in inputs):
        raise TuneError(f"--study {path} is inside the model; give a path outside it")
    if not path.parent.is_dir():
        raise TuneError(f"--study {path}: folder {path.parent} does not exist")
    try:
        study = optuna.create_study(
            study_name=name,
            storage=f"sqlite:///{path}",
            directions=["minimize", "minimize"],
            load_if_exists=True,
        )
        prior = study.user_attrs.get("setup")
    except Exception as e:  # not an SQLite file, unreadable, locked: one line
        raise TuneError(
            f"--study {path}: cannot open it as an Optuna SQLite study ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if prior is not None and prior != setup:
        raise TuneError(
            f"study {name!r} in {path} was run with another setup ({prior}); give another "
            "--study or --study-name"
        )
    resumed_from = len(study.trials)
    study.sampler = optuna.samplers.TPESampler(seed=seed + resumed_from)
    study.set_user_attr("setup", setup)
    return study, resumed_from


def _reach(fits: dict, sites, weights, pooling: str, scan: int, say):
    """The reach words (those the vocabulary scan picks at any searched site, read on the fit
    pairs alone: one fixed set for every trial) and the concept's own words. A site whose twin
    build is refused adds none (its twin trials are refused the same way, as pruned trials)."""
    from ..probe.params import ProbeParams

    words: list[str] = []
    for s in sites:
        try:
            built = build(fits[s], ProbeParams(TWIN, 1, 0.0, 1.0, 1, pooling, scan=scan), weights)
        except ProbeError as e:
            say(f"--scan: no reach words from site {s} (its twin build is refused: {e})")
            continue
        for g in built.groups:
            words += [w for w in g.notes.get("scan", {}).get("picked", []) if w not in words]
    plan = next(iter(fits.values())).concept.get("scan") or {}
    own = list(plan.get("concept_words", []))
    return words, own


def _cascade_choices(acts, fam: Family, opt: TuneOptions, say) -> list[str]:
    """With --cascade, each linked pair of searched sites as one more site choice, ``a+b``."""
    if not opt.cascade:
        return []
    pairs = cascade_pairs(acts, fam)
    if not pairs:
        raise TuneError(
            f"--cascade: no searched site reads another's edited weight through its chain "
            f"(sites {', '.join(acts.sites)}); give linked sites, e.g. --sites text_proj,cross_kv"
        )
    say(f"--cascade: also searching {', '.join('+'.join(p) for p in pairs)}")
    return ["+".join(p) for p in pairs]


def _reach_pairs(con: Concept, split: Split, words: list[str], own: list[str]):
    """Each validation pair's unsafe prompt with a reach word in the concept word's place, and
    the pair's twin."""
    from ..erasure.scan import substitute

    out = []
    for w in words:
        for i in split.val_pairs:
            u = substitute(con.pairs[i].unsafe, own, w)
            if u is not None:
                out.append((u, con.pairs[i].safe))
    return out


def _judge_choice(model, con, split, fits, pooling, weights, pareto, chosen, opt, say, reach=()):
    """Prune with the cheap objectives, confirm with the judge: front trials within the budget are
    sampled, least concept left first. The judge holds the budget too: a candidate whose sampled
    drift over the seed floor (what damage estimates) exceeds --max-damage is rejected, and the
    next is sampled, until --confirm pass or 3 x --confirm were sampled. Of those that pass, the
    largest twin gap closed (judge space) wins, the cheap concept left breaking ties (a gap the
    judge could not measure ranks last); if none passes, the least drift. Returns (trial, judged,
    whether the chosen one passed)."""
    pool = sorted(
        (t for t in pareto if t.values[1] <= opt.max_damage), key=lambda t: t.values[0]
    ) or [chosen]
    picked: list = []
    judged: list[dict] = []
    cache: dict = {}  # the original model's clips, sampled once for every candidate
    for t in pool[: 3 * opt.confirm]:
        cand = candidate_of(t.user_attrs["candidate"], pooling)
        row = _judge_candidates(
            model, con, split, fits, weights, [(t, cand)], opt, say, reach, cache
        )[0]
        drift = _finite(row["drift_over_floor"], math.inf)
        row["passed"] = drift <= opt.max_damage
        if not row["passed"]:
            said = "not measured" if drift == math.inf else f"{drift:.3f}, over the budget"
            say(f"trial {t.number}: sampled drift {said} ({opt.max_damage})")
        picked.append(t)
        judged.append(row)
        if sum(r["passed"] for r in judged) >= opt.confirm:
            break
    ok = [i for i, r in enumerate(judged) if r["passed"]]

    def rank(i: int) -> tuple[float, float]:
        return (_finite(judged[i]["judge_gap_closed"], -math.inf), -judged[i]["concept_left"])

    if ok:
        return picked[max(ok, key=rank)], judged, True
    least = min(range(len(judged)), key=lambda i: _finite(judged[i]["drift_over_floor"], math.inf))
    return picked[least], judged, False


def _finite(v, default: float) -> float:
    """V, or DEFAULT where the eval could not measure it (None or NaN)."""
    return v if v is not None and math.isfinite(v) else default


def _build_chosen(acts, fits, weights, chosen, pooling, opt, out, say):
    """The chosen trial's delta, refitted on every recipe prompt unless --no-refit (then: built on
    FITS, the activations its trial was built on); when the refit is refused (e.g. a rank the
    format cannot hold), the delta the trial scored is kept."""
    cand: Candidate = candidate_of(chosen.user_attrs["candidate"], pooling)
    if not opt.refit:
        built = build(fits[cand.site], cand.params, weights)
        _check_entries(built.delta.entries, str(out))
        return built, None
    try:
        built = build(subset(acts, sites_of(cand.site)), cand.params, weights)
        _check_entries(built.delta.entries, str(out))
        return built, None
    except (ProbeError, DeltaError) as e:
        say(f"refit on every prompt refused ({e}); writing the delta fitted on the fit prompts")
        return build(fits[cand.site], cand.params, weights), str(e)


@dataclass(frozen=True)
class _Paths:
    """tune's outputs, checked before anything runs, and the model's own files (never written)."""

    delta: Path
    report: Path
    plot: Path
    study: Path
    inputs: tuple

    @classmethod
    def of(cls, model, out: Path, opt: TuneOptions, overwrite: bool) -> _Paths:
        from ..output import check_target
        from ..probe import _local_inputs

        if out.is_dir() or out.name in ("", ".", ".."):
            raise TuneError(f"-o {out}: give the delta's file name (e.g. {out / 'concept.vud'})")
        p = cls(
            out,
            out.with_suffix(".tune.json"),
            out.with_suffix(".front.png"),
            Path(opt.study) if opt.study else out.with_suffix(".tune.db"),
            tuple(_local_inputs(model)),
        )
        for f, kind in ((p.delta, "delta"), (p.report, "report"), (p.plot, "plot")):
            check_target(f, p.inputs, overwrite, kind)
        return p


def _setup(model, con: Concept, split: Split, fam: Family, sites, methods, level, opt) -> dict:
    """What a study is run with; resuming it with anything else is refused."""
    setup = {
        "sites": list(sites),
        "methods": methods,
        "level": level,
        "split": split.record([p.unsafe for p in con.pairs], list(con.neutral)),
        "concept": con.name,
        "model": model if not Path(model).exists() else str(Path(model).resolve()),
        "family": fam.name,
        "overrides": list(opt.capture.overrides),
    }
    if opt.capture.preserve:  # only then: studies run before the option resume as they were
        setup["preserve"] = _preserve_record(opt.capture.preserve)
    if opt.capture.scan:
        setup["scan"] = opt.capture.scan
    for flag in ("cascade", "anchor_empty"):
        if getattr(opt, flag):
            setup[flag] = True
    return setup


@dataclass(frozen=True)
class _Validation:
    """What every trial is built from (the fit half, per site) and scored on."""

    fits: dict
    words: list  # reach words (--scan), read on the fit pairs
    reach: list  # (unsafe, twin): the validation pairs with a reach word in the concept's place
    objective: Callable


def _validation(model, con, split, acts, sites, weights, pooling, level, opt, say) -> _Validation:
    """SITES: the searched choices, a linked pair ``a+b`` among them (``--cascade``)."""
    fits = {s: subset(acts, sites_of(s), split.fit_pairs, split.fit_neutral) for s in sites}
    words: list[str] = []
    reach: list[tuple[str, str]] = []
    if opt.capture.scan:
        single = [s for s in sites if "+" not in s]
        words, own = _reach(fits, single, weights, pooling, opt.capture.scan, say)
        reach = _reach_pairs(con, split, words, own)
        # the reach validation prompts stay unseen: none is preserved by the fit (--preserve)
        unseen = tuple(u for u, _ in reach)
        fits = {
            s: subset(acts, sites_of(s), split.fit_pairs, split.fit_neutral, unseen) for s in sites
        }
        say(f"reach words (the scan on the fit pairs): {', '.join(words) or 'none'}")
    if level == "denoiser":
        objective = OrganismObjectives(
            model,
            [(con.pairs[i].unsafe, con.pairs[i].safe) for i in split.val_pairs] + reach,
            [con.neutral[i] for i in split.val_neutral],
        )
    else:
        objective = SiteObjectives(acts, split, weights, words)
    return _Validation(fits, words, reach, objective)


def tune(
    model: str | Path,
    concept: str | Path | Concept,
    out: str | Path,
    options: TuneOptions | None = None,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> TuneReport:
    """Search the edit's parameters for CONCEPT on MODEL and write the chosen delta to OUT."""
    from ..output import atomic_file
    from .plot import plot_front

    optuna = _optuna()
    opt = options or TuneOptions()
    say = log or (lambda _m: None)
    paths = _Paths.of(model, Path(out), opt, overwrite)
    con = concept if isinstance(concept, Concept) else load_concept(concept)
    split = Split.of([p.unsafe for p in con.pairs], list(con.neutral), opt.val_fraction)
    t0 = time.perf_counter()

    # everything a user can get wrong is checked before the capture, which can take long
    src = open_model(model, opt.capture)
    fam, sites, methods = _search_space(src, opt)
    level = _objectives_level(model, opt)
    name = opt.study_name or f"{con.name}@{fam.name}"
    setup = _setup(model, con, split, fam, sites, methods, level, opt)
    others = (paths.delta, paths.report, paths.plot)
    study, resumed_from = _open_study(
        optuna, paths.study, others, paths.inputs, name, setup, opt.seed
    )

    # one capture: every candidate site, with the token roles the twin map reads when it is searched
    cap = replace(opt.capture, sites=tuple(sites), token_roles="twin" in methods)
    weights = WeightReader(src)
    say(f"capturing {con.name} at {', '.join(sites)} (once for every trial)")
    acts = capture(src, con, cap, weights)
    pooling = acts.defaults.get("pooling", "tokens")
    widths = {g.site: g.dim for g in acts.groups}
    choices = list(sites) + _cascade_choices(acts, fam, opt, say)
    widths |= {c: min(widths[s] for s in sites_of(c)) for c in choices if "+" in c}
    t_capture = time.perf_counter() - t0
    val = _validation(model, con, split, acts, choices, weights, pooling, level, opt, say)
    t_setup = time.perf_counter() - t0 - t_capture

    t1 = time.perf_counter()
    if opt.trials:
        say(f"{opt.trials} trials ({level} objectives) into study {name!r} at {paths.study}")
    run_trials(
        study,
        opt.trials,
        val.fits,
        weights,
        val.objective,
        choices,
        methods,
        widths,
        pooling,
        opt.capture.scan,
        opt.anchor_empty,
    )
    t_search = time.perf_counter() - t1
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    if not done:
        raise TuneError(f"no trial of study {name!r} completed ({failed} refused)")
    pareto = front(study)
    chosen, within = choose(pareto, opt.max_damage)
    judged: list[dict] = []
    passed = None
    t2 = time.perf_counter()
    if opt.judge:
        chosen, judged, passed = _judge_choice(
            model, con, split, val.fits, pooling, weights, pareto, chosen, opt, say, val.reach
        )
    t_judge = time.perf_counter() - t2

    built, refit_refused = _build_chosen(
        acts, val.fits, weights, chosen, pooling, opt, paths.delta, say
    )
    record = {
        "study": name,
        "storage": str(paths.study),
        "sampler": {"name": "TPESampler", "seed": opt.seed, "seed_offset": resumed_from},
        "trials": len(done),
        "refused": failed,
        "trials_this_run": opt.trials,
        "level": level,
        "objectives": ["concept_left", "damage"],
        "max_damage": opt.max_damage,
        "within_budget": within,
        "split": setup["split"],
        "search_space": {"sites": choices, "methods": methods}
        | ({"scan": [0, opt.capture.scan]} if opt.capture.scan else {})
        | ({"anchor_empty": [False, True]} if opt.anchor_empty else {}),
        "reach": {"words": val.words, "validation_pairs": [u for u, _ in val.reach]}
        if opt.capture.scan
        else None,
        "preserve": setup.get("preserve"),
        "chosen": {**_trial_row(chosen)},
        "judge": opt.judge,
        # with a judge: whether the chosen candidate's sampled drift kept the budget
        "judge_within_budget": passed,
        "refit": opt.refit and refit_refused is None,
        "refit_refused": refit_refused,
        # the written delta is refitted on every recipe prompt, validation ones included: in-sample
        "chosen_delta_scores_in_sample": asdict(val.objective(built.delta)),
        "versions": {**versions(), "optuna": optuna.__version__},
    }
    delta = replace(built.delta, method={**built.delta.method, "tune": record})
    digest = write_delta(paths.delta, delta, overwrite=overwrite)
    rows = [_trial_row(t) for t in pareto]
    plot = plot_front(
        paths.plot,
        [_trial_row(t) for t in done],
        rows,
        record["chosen"],
        opt.max_damage,
        level,
        overwrite=overwrite,
    )
    seconds = {
        "capture": round(t_capture, 2),
        "objectives_setup": round(t_setup, 2),
        "search": round(t_search, 2),
        "judge": round(t_judge, 2),
        "total": round(time.perf_counter() - t0, 2),
    }
    rep = TuneReport(
        str(paths.delta),
        digest,
        str(paths.report),
        plot,
        str(paths.study),
        name,
        con.name,
        acts.family,
        level,
        len(done),
        failed,
        record["chosen"],
        rows,
        judged,
        record,
        seconds,
    )
    with atomic_file(paths.report, paths.inputs, overwrite, "report") as tmp:
        Path(tmp).write_text(json.dumps(rep.to_dict(), indent=2, default=str))
    return rep


__all__ = ["TuneError", "TuneOptions", "TuneReport", "default_sites", "run_trials", "tune"]
