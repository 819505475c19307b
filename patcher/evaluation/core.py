"""``vpatch eval``: generate with the original and the patched checkpoint, judge, compare.

Both models generate the same prompts with the same seeds; the patched one is loaded from disk after
``apply`` (never edited in memory), so the measurement covers the path a user runs. The pieces are
separate: a generator (``generators``), a judge (``judges``), prompt sets with safe twins
(``prompts``) and metrics (``metrics``); this module runs them and assembles the report.

What is reported (every rate with a Wilson 95% interval, every paired measure with a cluster
bootstrap over prompts):
- presence: how often the concept is fully shown, per prompt set, before and after;
- outcomes: shown / a trace of it (e.g. a pale red) / came out as its safe twin / something else;
- twin fidelity (the primary efficacy number): the fraction of the unsafe -> safe-twin distance the
  edit closes, in the judge's feature space and in pixel space;
- drift: how far concept-free clips move, against the model's own seed-to-seed spread;
- collateral: per kind of concept-free prompt, accuracy of each label and the paired shift of each
  continuous attribute (hue, saturation, value for the organism), and interior texture ratios.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..families.recipes import Concept, load_concept
from ..merge.engine import NullReporter, Reporter, apply_delta
from .generators import check_device, generator_for, torch_dtype
from .judges import JUDGES, EvalError, Judge
from .metrics import drift, shifts, texture_ratio, twin_fidelity
from .prompts import HELDOUT, PromptSet, RecipePrompts
from .stats import mean_ci, rate, wilson  # noqa: F401  (re-exported for callers and tests)

__all__ = ["EvalError", "EvalOptions", "EvalReport", "evaluate", "mean_ci", "rate", "wilson"]


@dataclass
class EvalOptions:
    seeds: int = 4  # samples per prompt
    steps: int = 16
    guidance: float = 3.0
    judge: str = "organism"  # a key of judges.JUDGES
    clip_model: str | None = None  # path or hub id of a CLIP model (judge = clip)
    strength: float = 1.0  # passed to apply when the patched model is built here
    preview: Path | None = None  # before/after GIF
    sheet: Path | None = None  # before/after/twin contact sheet (PNG)
    seed: int = 1000
    device: str = "cpu"
    dtype: str = "float32"
    call: dict = field(default_factory=dict)  # extra pipeline kwargs for diffusers generation


@dataclass
class EvalReport:
    model: str
    patched: str
    delta: str | None
    concept: str
    judge: str
    seeds: int
    presence: dict  # set -> {"before": rate, "after": rate, "relative_drop": x}
    collateral: (
        dict  # attribute -> {"before", "after"} accuracy on the held-out concept-free prompts
    )
    concept_prompt_attributes: dict  # non-concept attributes of concept prompts
    distance: dict  # before/after distance on concept-free prompts
    per_set: dict = field(default_factory=dict)  # set -> attribute accuracies before/after
    preview: str | None = None
    outcomes: dict = field(default_factory=dict)  # set -> side -> shown/trace/twin/other rates
    twin_fidelity: dict = field(default_factory=dict)  # set -> space -> gap closed
    drift: dict = field(default_factory=dict)  # space -> drift vs seed floor (concept-free)
    collateral_kinds: dict = field(default_factory=dict)  # kind -> shifts, accuracy, texture
    concept_shifts: dict = field(default_factory=dict)  # attribute shifts on concept prompts
    texture: dict = field(default_factory=dict)  # concept / concept-free -> texture ratio
    misses: list = field(default_factory=list)  # concept prompts that leak (see ``_misses``)
    sheet: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _mmd(a: torch.Tensor, b: torch.Tensor) -> float:
    """MMD² (biased, >= 0) with an RBF kernel (median-distance bandwidth) between two sets of clips."""
    x, y = a.flatten(1).double(), b.flatten(1).double()
    z = torch.cat([x, y])
    d = torch.cdist(z, z) ** 2
    bw = d[d > 0].median().clamp_min(1e-9)
    k = torch.exp(-d / bw)
    n = len(x)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return float(kxx.mean() + kyy.mean() - 2 * kxy.mean())


@dataclass(frozen=True)
class Job:
    set: str
    prompt: str
    seed: int
    concept: bool
    twin: str | None


def plan_jobs(sets: list[PromptSet], seeds: int, seed0: int) -> list[Job]:
    jobs = []
    for ps in sets:
        twins = ps.twins or (None,) * len(ps.prompts)
        for i, (p, t) in enumerate(zip(ps.prompts, twins)):
            for s in range(seeds):
                jobs.append(Job(ps.name, p, seed0 + 1000 * i + s, ps.concept, t))
    return jobs


def evaluate(
    model: str | Path,
    concept: str | Path | Concept,
    *,
    delta: str | Path | None = None,
    patched: str | Path | None = None,
    options: EvalOptions | None = None,
    reporter: Reporter | None = None,
    log: Callable[[str], None] | None = None,
    cache: dict | None = None,
    prompts=None,
) -> EvalReport:
    """Compare the original MODEL with its patched copy (built here from DELTA, or given as PATCHED).

    ``cache`` (a dict the caller keeps) reuses the original model's clips across calls with the same
    prompts, seeds and sampler settings, as the ablation benchmark does. ``prompts`` is a prompt
    source (default: the recipe's own sets, ``RecipePrompts``)."""
    from ..probe.encoders import quiet_libraries

    quiet_libraries()
    opt = options or EvalOptions()
    say = log or (lambda _m: None)
    rep = reporter or NullReporter()
    con = concept if isinstance(concept, Concept) else load_concept(concept)
    if opt.judge not in JUDGES:
        raise EvalError(f"--judge {opt.judge!r}: choose one of {', '.join(JUDGES)}")
    if opt.preview is not None:
        preview_targets(Path(opt.preview))  # before any sampling, not after
    if opt.seeds < 2:
        raise EvalError(
            "--seeds must be at least 2 (intervals and distances need several samples per prompt)"
        )
    torch_dtype(opt.dtype)
    check_device(opt.device)
    model = Path(model)
    if (delta is None) == (patched is None):
        raise EvalError(
            "give exactly one of --delta (eval applies it to a temporary copy) or --patched (an already patched folder)"
        )
    judge: Judge = JUDGES[opt.judge](con, opt)
    tmp = None
    if patched is None:
        tmp = tempfile.TemporaryDirectory(prefix="vpatch-eval-")
        patched = Path(tmp.name) / "patched"
        say(f"applying {delta} to a temporary copy (loaded back from disk for the comparison)")
        apply_delta(model, delta, patched, strength=opt.strength)
    patched = Path(patched)
    try:
        sets = (prompts or RecipePrompts()).sets(con)
        jobs = plan_jobs(sets, opt.seeds, opt.seed)
        twin_jobs = sorted({(j.twin, j.seed) for j in jobs if j.twin is not None})
        gen_cls = generator_for(model)
        key = json.dumps(
            [
                str(model.resolve()),
                [asdict(j) for j in jobs],
                twin_jobs,
                opt.steps,
                opt.guidance,
                opt.judge,
                opt.device,
                opt.dtype,
                sorted(opt.call.items()),
            ],
            default=str,
        )
        rep.start("generating", 2 * len(jobs) + len(twin_jobs))
        if cache is not None and key in cache:
            before, vb, twin_clips, vt = cache[key]
            rep.advance(len(jobs) + len(twin_jobs))
        else:
            gen = gen_cls(model, opt)
            before = gen([j.prompt for j in jobs], [j.seed for j in jobs])
            rep.advance(len(jobs))
            twin_clips = gen([p for p, _s in twin_jobs], [s for _p, s in twin_jobs])
            rep.advance(len(twin_jobs))
            del gen
            vb, vt = judge.verdicts(before), judge.verdicts(twin_clips)
            if cache is not None:
                cache[key] = (before, vb, twin_clips, vt)
        gen = gen_cls(patched, opt)
        after = gen([j.prompt for j in jobs], [j.seed for j in jobs])
        rep.advance(len(jobs))
        del gen
        rep.stop()
        va = judge.verdicts(after)
        twin_at = {tj: i for i, tj in enumerate(twin_jobs)}
        report = _assemble(judge, jobs, sets, before, after, vb, va, twin_clips, vt, twin_at)
        preview = sheet = None
        if opt.preview is not None:
            preview = str(write_preview(opt.preview, jobs, {"before": before, "after": after}))
        if opt.sheet is not None:
            from .sheets import contact_sheet

            sheet = str(
                contact_sheet(
                    opt.sheet, judge, jobs, before, after, vb, va, twin_clips, vt, twin_at
                )
            )
        return EvalReport(
            str(model),
            str(patched) if tmp is None else "(temporary copy)",
            str(delta) if delta else None,
            con.name,
            judge.name,
            opt.seeds,
            preview=preview,
            sheet=sheet,
            **report,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()


@dataclass(frozen=True)
class _Judged:
    """One eval's clips and verdicts, indexed the way every report section reads them."""

    judge: Any
    jobs: list
    before: torch.Tensor
    after: torch.Tensor
    vb: list[dict]  # verdicts on the original's clips
    va: list[dict]  # ... on the patched model's
    twin_clips: torch.Tensor
    vt: list[dict]  # ... on the original's clips of the safe twins
    names: list[str]  # prompt sets, in order
    concept_sets: list[str]
    free_sets: list[str]
    idx: dict[str, list[int]]  # set name -> job indices
    twin_of: dict[int, int]  # job index -> its twin clip's index
    pools: dict[str, list[int]]  # concept sets, and the held-out sets pooled

    @property
    def free_idx(self) -> list[int]:
        return [i for n in self.free_sets for i in self.idx[n]]

    @property
    def concept_idx(self) -> list[int]:
        return [i for n in self.concept_sets for i in self.idx[n]]

    def sides(self):
        return (("before", self.vb), ("after", self.va))


def _assemble(judge, jobs, sets, before, after, vb, va, twin_clips, vt, twin_at) -> dict:
    names = [s.name for s in sets]
    concept_sets = [s.name for s in sets if s.concept]
    idx = {n: [i for i, j in enumerate(jobs) if j.set == n] for n in names}
    held = [i for n in concept_sets if n in HELDOUT for i in idx[n]]
    pools = {n: idx[n] for n in concept_sets} | ({"held-out (all)": held} if held else {})
    d = _Judged(
        judge,
        jobs,
        before,
        after,
        vb,
        va,
        twin_clips,
        vt,
        names,
        concept_sets,
        [s.name for s in sets if not s.concept],
        idx,
        {i: twin_at[(j.twin, j.seed)] for i, j in enumerate(jobs) if j.twin is not None},
        pools,
    )
    fb, fa, ft = (
        judge.features(before, vb),
        judge.features(after, va),
        judge.features(twin_clips, vt),
    )
    expected = {i: judge.expected(jobs[i].prompt) for i in range(len(jobs))}
    acc = _accuracy_summaries(d, expected)
    return {
        "presence": _presence(d),
        "collateral": acc["collateral"],
        "concept_prompt_attributes": acc["concept_prompt_attributes"],
        "distance": _distance(d),
        "per_set": acc["per_set"],
        "outcomes": _outcomes(d),
        "twin_fidelity": _twin_fidelity(d, fb, fa, ft),
        "drift": _drift(d, fb, fa),
        "collateral_kinds": _collateral_kinds(d, expected),
        "concept_shifts": _concept_shifts(d),
        "texture": _texture(d),
        "misses": _misses(d),
    }


def _misses(d: _Judged) -> list[dict]:
    """Each concept prompt that leaks, by name: with a safe twin, a patched clip that does not come
    out as the original's clip of the twin with the same seed; without one (a prompt no pair's
    word edit applies to), a patched clip judged to show the concept or a trace of it. Per prompt:
    the seeds, each clip's name and its twin clip's, and the counts."""
    rows: dict[tuple[str, str], dict] = {}
    for n in d.concept_sets:
        for i in d.idx[n]:
            j = d.jobs[i]
            t = d.twin_of.get(i)
            r = rows.setdefault(
                (n, j.prompt),
                {"set": n, "prompt": j.prompt, "twin": j.twin, "clips": 0, "shown": 0}
                | {"as_twin": 0 if t is not None else None, "seeds": [], "after": []}
                | {"twin_clips": []},
            )
            r["clips"] += 1
            r["seeds"].append(j.seed)
            r["after"].append(d.judge.describe(d.va[i]))
            r["shown"] += int(d.judge.trace(d.va[i]))  # a trace includes shown
            if t is not None:
                r["as_twin"] += int(d.judge.same(d.va[i], d.vt[t]))
                r["twin_clips"].append(d.judge.describe(d.vt[t]))
    return [
        r
        for r in rows.values()
        if (r["as_twin"] < r["clips"] if r["as_twin"] is not None else r["shown"] > 0)
    ]


def _presence(d: _Judged) -> dict:
    presence: dict = {}
    for n in d.names:
        rb = rate([d.judge.shown(d.vb[i]) for i in d.idx[n]])
        ra = rate([d.judge.shown(d.va[i]) for i in d.idx[n]])
        drop = (rb["rate"] - ra["rate"]) / rb["rate"] if rb["rate"] > 0 else float("nan")
        presence[n] = {"before": rb, "after": ra, "relative_drop": drop}
    return presence


def _outcomes(d: _Judged) -> dict:
    """Per concept set: shown, a pale trace, the twin's look, or something else; before and after."""
    judge, twin_of, vb, va, vt = d.judge, d.twin_of, d.vb, d.va, d.vt
    outcomes: dict = {}
    for n, ii in d.pools.items():
        outcomes[n] = {}
        for side, vs in d.sides():
            tw = [i for i in ii if i in twin_of]
            shown = [judge.shown(vs[i]) for i in ii]
            trace = [judge.trace(vs[i]) and not judge.shown(vs[i]) for i in ii]
            twin = [judge.same(vs[i], vt[twin_of[i]]) for i in tw]
            other = [
                not judge.trace(vs[i]) and not (i in twin_of and judge.same(vs[i], vt[twin_of[i]]))
                for i in ii
            ]
            outcomes[n][side] = {
                "shown": rate(shown),
                "trace": rate(trace),
                "twin": rate(twin),
                "other": rate(other),
            }
        tw = [twin_of[i] for i in ii if i in twin_of]
        outcomes[n]["twin_itself_shown"] = rate([judge.shown(vt[k]) for k in tw])
        if "saturation" in judge.continuous:  # "none is as saturated as the original"
            both = [i for i in ii if vb[i]["present"] and va[i]["present"]]
            outcomes[n]["as_saturated"] = rate(
                [va[i]["saturation"] >= vb[i]["saturation"] - 0.05 for i in both]
            )
    return outcomes


def _twin_fidelity(d: _Judged, fb, fa, ft) -> dict:
    """Per concept set and pooled over the held-out sets, in the judge's space and in pixels."""
    tf: dict = {}
    for n, ii in d.pools.items():
        ii = [i for i in ii if i in d.twin_of]
        if not ii:
            continue
        tt = [d.twin_of[i] for i in ii]
        pr = [d.jobs[i].prompt for i in ii]
        tf[n] = {
            "judge": twin_fidelity(fb[ii], fa[ii], ft[tt], pr),
            "pixel": twin_fidelity(d.before[ii], d.after[ii], d.twin_clips[tt], pr),
        }
    return tf


def _drift(d: _Judged, fb, fa) -> dict:
    fi = d.free_idx
    fp, fs = [d.jobs[i].prompt for i in fi], [d.jobs[i].seed for i in fi]
    return {
        "judge": drift(fb[fi], fa[fi], fp, fs),
        "pixel": drift(d.before[fi], d.after[fi], fp, fs),
    }


def _texture_of(d: _Judged, ii: list[int]) -> dict:
    return texture_ratio(
        [_nan(d.vb[i].get("texture")) for i in ii],
        [_nan(d.va[i].get("texture")) for i in ii],
        [d.jobs[i].prompt for i in ii],
    )


def _collateral_kinds(d: _Judged, expected: dict) -> dict:
    """Collateral per kind of concept-free prompt: attribute shifts, accuracy, names, texture."""
    judge, vb, va = d.judge, d.vb, d.va
    kinds: dict[str, list[int]] = {}
    for i in d.free_idx:
        kinds.setdefault(judge.kind(d.jobs[i].prompt), []).append(i)
    ck: dict = {}
    for k, ii in sorted(kinds.items()):
        pr = [d.jobs[i].prompt for i in ii]
        ent = {
            "n": len(ii),
            "shifts": shifts(
                [judge.attributes(vb[i]) for i in ii],
                [judge.attributes(va[i]) for i in ii],
                pr,
                judge.circular,
            ),
        }
        if judge.categorical and expected[ii[0]] is not None:
            ent["accuracy"] = {
                a: {
                    side: rate([bool(vs[i]["present"]) and vs[i][a] == expected[i][a] for i in ii])
                    for side, vs in d.sides()
                }
                for a in judge.categorical
            }
            ent["after_named"] = _counts([va[i].get("colour") for i in ii])
        if "texture" in vb[ii[0]]:
            ent["texture"] = _texture_of(d, ii)
        ck[k] = ent
    return ck


def _concept_shifts(d: _Judged) -> dict:
    ci = d.concept_idx
    if not ci:
        return {}
    cshift = shifts(
        [d.judge.attributes(d.vb[i]) for i in ci],
        [d.judge.attributes(d.va[i]) for i in ci],
        [d.jobs[i].prompt for i in ci],
        d.judge.circular,
    )
    if "colour" in d.vb[ci[0]]:
        cshift["after_named"] = _counts([d.va[i].get("colour") for i in ci])
    return cshift


def _texture(d: _Judged) -> dict:
    if not (d.vb and "texture" in d.vb[0]):
        return {}
    return {
        "concept prompts": _texture_of(d, d.concept_idx),
        "concept-free prompts": _texture_of(d, d.free_idx),
    }


def _accuracy_summaries(d: _Judged, expected: dict) -> dict:
    """The earlier accuracy summaries (kept: push cards and the benchmark read them)."""
    collateral: dict = {}
    concept_attrs: dict = {}
    per_set: dict = {}
    judge, idx, conc_idx = d.judge, d.idx, d.concept_idx

    def acc(ii: list[int], a: str) -> dict:  # a vanished object counts as a miss
        return {
            side: rate([bool(vs[i]["present"]) and vs[i][a] == expected[i][a] for i in ii])
            for side, vs in d.sides()
        }

    def present(ii: list[int]) -> dict:
        return {side: rate([bool(vs[i]["present"]) for i in ii]) for side, vs in d.sides()}

    if judge.categorical and expected[0] is not None:
        attr = getattr(judge, "attr", None)
        fi = idx.get("free", [])
        for a in judge.categorical:
            collateral[a] = {
                side: rate([vs[i][a] == expected[i][a] for i in fi]) for side, vs in d.sides()
            }
        collateral["object_present"] = present(fi)
        for a in [a for a in judge.categorical if a != attr]:
            concept_attrs[a] = acc(conc_idx, a)
        concept_attrs["object_present"] = present(conc_idx)
        for n in d.names:
            per_set[n] = {a: acc(idx[n], a) for a in judge.categorical}
            per_set[n]["object_present"] = present(idx[n])
    return {
        "collateral": collateral,
        "concept_prompt_attributes": concept_attrs,
        "per_set": per_set,
    }


def _distance(d: _Judged) -> dict:
    fi = d.idx.get("free", d.free_idx)
    fb_, fa_ = d.before[fi], d.after[fi]
    rmse = [float(((x - y) ** 2).mean().sqrt()) for x, y in zip(fb_, fa_)]
    m, lo, hi = mean_ci(rmse)
    return {
        "paired_rmse": {"mean": m, "ci95": [lo, hi], "n": len(rmse)},
        "mmd2": _mmd(fb_, fa_),
        "mmd2_same_model_split": _mmd(fb_[0::2], fb_[1::2]),
    }


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def _counts(xs: list) -> dict:
    out: dict = {}
    for x in xs:
        k = str(x) if x is not None else "no object"
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def write_preview(
    path: Path,
    jobs: list[Job],
    clips: dict[str, torch.Tensor],
    per_set: int = 2,
    scale: int = 4,
) -> Path:
    """An animated GIF: one row per chosen prompt, original on the left, patched on the right."""
    from PIL import Image

    from ..output import atomic_file

    rows, seen = [], {}
    for i, j in enumerate(jobs):
        if seen.get(j.set, 0) < per_set and (i == 0 or jobs[i - 1].prompt != j.prompt):
            seen[j.set] = seen.get(j.set, 0) + 1
            rows.append(i)
    b, a = clips["before"][rows], clips["after"][rows]
    F = b.shape[2]
    frames = []
    for f in range(F):
        grid = torch.cat(
            [
                torch.cat([b[r, :, f], torch.full_like(b[r, :, f, :, :2], 1.0), a[r, :, f]], -1)
                for r in range(len(rows))
            ],
            -2,
        )
        img = ((grid.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).numpy()
        im = Image.fromarray(img).resize(
            (img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST
        )
        frames.append(im)
    path = Path(path)
    side = preview_targets(path)
    with atomic_file(path) as tmp:
        frames[0].save(
            tmp, format="GIF", save_all=True, append_images=frames[1:], duration=150, loop=0
        )
    with atomic_file(side) as tmp:
        tmp.write_text(
            "rows (left: original, right: patched):\n"
            + "\n".join(f"{jobs[r].set}: {jobs[r].prompt}" for r in rows)
            + "\n"
        )
    return path


def preview_targets(path: Path) -> Path:
    """The preview and its ``.txt`` sidecar follow the rule of every output: neither may exist. Both
    are checked before either is written. Returns the sidecar's path."""
    from ..errors import OutputError
    from ..output import check_target

    side = path.with_suffix(".txt")
    if side == path:
        raise OutputError(
            f"--preview {path}: the preview is a GIF; name it .gif (its captions go to .txt)"
        )
    for p in (path, side):
        check_target(p, [], False, flag="--preview", can_overwrite=False)
    return side


def _fmt(x: dict) -> str:
    return f"{x['rate']:.0%} [{x['ci95'][0]:.0%}, {x['ci95'][1]:.0%}]"


def _ci(m: float, ci: list, f: str = "{:+.3f}") -> str:
    if m != m:
        return "n/a"
    return f"{f.format(m)} [{f.format(ci[0])}, {f.format(ci[1])}]"


def summary_rows(r: EvalReport) -> list[tuple[str, str, str, str]]:
    """(what, before, after, change) for the table."""
    rows = []
    for name, v in r.presence.items():
        label = (
            f"concept-free prompts ({name}): concept shown"
            if name in ("free", "neutral")
            else f"concept shown: {name}"
        )
        drop = v["relative_drop"]
        rows.append(
            (
                label,
                _fmt(v["before"]),
                _fmt(v["after"]),
                "" if math.isnan(drop) else f"-{drop:.0%} rel.",
            )
        )
    for name, v in r.outcomes.items():
        for what in ("trace", "twin"):
            if v["after"][what]["n"]:
                lab = (
                    "a trace of the concept (e.g. pale)"
                    if what == "trace"
                    else "came out as its safe twin"
                )
                rows.append((f"{name}: {lab}", _fmt(v["before"][what]), _fmt(v["after"][what]), ""))
    for name, v in r.twin_fidelity.items():
        for space, t in v.items():
            rows.append(
                (
                    f"twin fidelity, {name} ({space} space): gap closed",
                    "0",
                    _ci(t["closed"], t["ci95"], "{:.2f}"),
                    "1 = as its twin",
                )
            )
    for space, d in r.drift.items():
        rows.append(
            (
                f"concept-free drift / seed floor ({space} space)",
                "",
                _ci(d["ratio"], d["ci95"], "{:.2f}"),
                f"floor {d['floor']:.3g}",
            )
        )
    for kind, v in r.collateral_kinds.items():
        for a, s in v["shifts"].items():
            if a in ("vx", "vy"):
                continue
            sh = s["shift"]
            fmt = "{:+.1f}°" if a == "hue" else "{:+.3f}"
            b = f"{s['before']:.1f}°" if a == "hue" else f"{s['before']:.3f}"
            aa = f"{s['after']:.1f}°" if a == "hue" else f"{s['after']:.3f}"
            rows.append((f"collateral {kind}: {a}", b, aa, _ci(sh["mean"], sh["ci95"], fmt)))
        for a, acc in v.get("accuracy", {}).items():
            rows.append(
                (
                    f"collateral {kind}: {a} accuracy",
                    _fmt(acc["before"]),
                    _fmt(acc["after"]),
                    f"{(acc['after']['rate'] - acc['before']['rate']) * 100:+.1f} pt",
                )
            )
        if "texture" in v:
            t = v["texture"]
            rows.append(
                (
                    f"collateral {kind}: interior texture (median)",
                    f"{t['before']:.4f}",
                    f"{t['after']:.4f}",
                    _ci(t["ratio"], t["ci95"], "×{:.2f}"),
                )
            )
    for a, s in r.concept_shifts.items():
        if a in ("vx", "vy", "after_named"):
            continue
        fmt = "{:+.1f}°" if a == "hue" else "{:+.3f}"
        rows.append(
            (f"concept prompts: {a}", "", "", _ci(s["shift"]["mean"], s["shift"]["ci95"], fmt))
        )
    for name, t in r.texture.items():
        rows.append(
            (
                f"{name}: interior texture (median)",
                f"{t['before']:.4f}",
                f"{t['after']:.4f}",
                _ci(t["ratio"], t["ci95"], "×{:.2f}"),
            )
        )
    for attr, v in r.concept_prompt_attributes.items():
        rows.append(
            (
                f"concept prompts, other attribute: {attr}",
                _fmt(v["before"]),
                _fmt(v["after"]),
                f"{(v['after']['rate'] - v['before']['rate']) * 100:+.1f} pt",
            )
        )
    d = r.distance["paired_rmse"]
    rows.append(
        (
            "concept-free: paired RMSE orig vs patched",
            "",
            f"{d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]",
            "",
        )
    )
    return rows


def to_json(r: EvalReport) -> str:
    return json.dumps(r.to_dict(), indent=2, default=float)
