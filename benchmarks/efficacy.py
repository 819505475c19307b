"""The unlearning ablation on the shipped organism: method, edit site, rank k, strength λ, contrast α.

    python benchmarks/efficacy.py [--model examples/organism/model] [--seeds 4] [--out docs/efficacy.md]

Every variant runs the user's path: the probe's capture runs once per concept and site, each
variant's .vud is built from those activations (as `probe --save-activations` + `build` do), `apply`
writes a patched folder, and `eval` loads it from disk and compares it with the original on the same
prompts and seeds, judged by the analytic organism judge. The original's samples are generated once and reused.

Variants are chosen on the *probe* prompts and the concept-free prompts only (the "selection score"
column); held-out numbers are reported, never used to choose. Writes a markdown report with the table
and a before/after GIF of the chosen recipe.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from patcher.evaluation.core import EvalOptions, evaluate  # noqa: E402
from patcher.probe import (  # noqa: E402
    CaptureOptions,
    ProbeParams,
    WeightReader,
    build_delta,
    capture,
    open_model,
)
from patcher.vud.delta import write_delta  # noqa: E402

BASE = {"method": "cpca", "site": "text_proj", "rank": 8, "strength": 1.2, "alpha": 1.0}
SWEEPS = [  # one factor at a time around BASE, then the mean-diff edit at other sites and strengths
    ("method", ["mean", "pca", "cpca"]),
    ("site", ["text_proj", "cross_kv", "t5_ffn"]),
    ("rank", [2, 8, 16]),
    ("strength", [0.8, 1.2, 1.5]),
    ("alpha", [0.25, 1.0, 4.0]),
]
EXTRA = [{**BASE, "method": "mean", "site": s} for s in ("cross_kv", "t5_ffn")] + [
    {**BASE, "method": "mean", "strength": x} for x in (1.0, 1.5)
]
# the twin map (erasure/twin.py, defaults β = 1, ρ = 1e-3): k and α do not apply and are ignored
TWIN_VARIANTS = [
    {**BASE, "method": "twin", "site": s, "strength": 1.0} for s in ("cross_kv", "text_proj")
]


class Captures:
    """One capture per concept and site; every variant at that site is built from it."""

    def __init__(self, model: Path, concept: Path):
        self.model, self.concept = model, concept
        self.by_site: dict[str, tuple] = {}

    def get(self, site: str) -> tuple:
        if site not in self.by_site:
            o = CaptureOptions(sites=(site,), device="cpu", token_roles=True)
            weights = WeightReader(open_model(self.model, o))
            self.by_site[site] = (capture(weights.source, self.concept, o, weights), weights)
        return self.by_site[site]


def variant_name(v: dict) -> str:
    return "-".join(f"{k}={v[k]}" for k in ("method", "site", "rank", "strength", "alpha"))


def write_variant(captures: Captures, v: dict, vud: Path) -> None:
    """The variant's delta, built from its site's capture."""
    acts, weights = captures.get(v["site"])
    params = ProbeParams(
        method=v["method"], rank=v["rank"], strength=v["strength"], alpha=v["alpha"]
    )
    write_delta(vud, build_delta(acts, params, weights))


def run_variant(
    model: Path,
    concept: Path,
    v: dict,
    work: Path,
    opt: EvalOptions,
    cache: dict,
    captures: Captures,
) -> dict:
    name = variant_name(v)
    vud = work / f"{name}.vud"
    if not vud.exists():
        write_variant(captures, v, vud)
    o = EvalOptions(
        **{**opt.__dict__, "preview": work / f"{name}.gif", "sheet": work / f"{name}.png"}
    )
    for f in (o.preview, o.preview.with_suffix(".txt"), o.sheet):
        f.unlink(missing_ok=True)
    r = evaluate(model, concept, delta=vud, options=o, cache=cache)
    pres = {
        k: (x["before"]["rate"], x["after"]["rate"], x["relative_drop"])
        for k, x in r.presence.items()
    }
    col = {k: (x["before"]["rate"], x["after"]["rate"]) for k, x in r.collateral.items()}
    oth = {
        k: (x["before"]["rate"], x["after"]["rate"]) for k, x in r.concept_prompt_attributes.items()
    }
    # selection uses the probe prompts and the probe's own neutral prompts only (never held-out ones)
    ps = r.per_set
    attr = r_attr(concept)
    neutral_loss = (
        max(0.0, ps["neutral"][attr]["before"]["rate"] - ps["neutral"][attr]["after"]["rate"])
        if "neutral" in ps
        else 0.0
    )
    vanish = max(
        0.0,
        ps["probe"]["object_present"]["before"]["rate"]
        - ps["probe"]["object_present"]["after"]["rate"],
    )
    # the primary number: the fraction of the distance to the safe twin's clip closed on the probe
    # prompts (judge space); the old presence drop is kept beside it
    closed = r.twin_fidelity.get("probe", {}).get("judge", {}).get("closed", pres["probe"][2])
    score = closed - 2 * neutral_loss - 2 * vanish
    return {
        "variant": v,
        "presence": pres,
        "collateral": col,
        "other": oth,
        "distance": r.distance,
        "score": score,
        "outcomes": r.outcomes,
        "twin_fidelity": r.twin_fidelity,
        "drift": r.drift,
        "collateral_kinds": r.collateral_kinds,
        "concept_shifts": r.concept_shifts,
        "texture": r.texture,
        "files": {"gif": str(o.preview), "sheet": str(o.sheet)},
        "report": r.to_dict(),
    }


def r_attr(concept: Path) -> str:
    from patcher.families.recipes import load_concept

    return load_concept(concept).judge["organism"]["attribute"]


def ka(v: dict) -> str:
    """The k | λ | α cells of a variant (k and α do not apply to the twin map)."""
    if v["method"] == "twin":
        return f"– | {v['strength']:g} | –"
    return f"{v['rank']} | {v['strength']:g} | {v['alpha']:g}"


def pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.0f}%"


def table(rows: list[dict], attr: str) -> str:
    other = [a for a in ("colour", "shape", "motion") if a != attr]
    head = (
        "| method | site | k | λ | α | selection score | presence probe | paraphrase | synonym | template | unseen | "
        f"concept-free {attr} acc | concept-free shape/motion acc | concept prompts {'/'.join(other)} | object kept | paired RMSE |"
    )
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        v, p, c, o = r["variant"], r["presence"], r["collateral"], r["other"]

        def pr(k, p=p):
            return f"{pct(p[k][0])}→{pct(p[k][1])}" if k in p else "-"

        cf = f"{pct(c[attr][0])}→{pct(c[attr][1])}" if attr in c else "-"
        rest = [a for a in ("shape", "motion", "colour") if a != attr]
        cfo = " / ".join(f"{pct(c[a][0])}→{pct(c[a][1])}" for a in rest if a in c)
        oo = " / ".join(f"{pct(o[a][0])}→{pct(o[a][1])}" for a in other if a in o)
        kept = (
            f"{pct(o['object_present'][0])}→{pct(o['object_present'][1])}"
            if "object_present" in o
            else "-"
        )
        lines.append(
            f"| {v['method']} | {v['site']} | {ka(v)} | {r['score']:.2f} | "
            f"{pr('probe')} | {pr('paraphrase')} | {pr('synonym')} | {pr('template')} | {pr('unseen')} | {cf} | {cfo} | {oo} | {kept} | "
            f"{r['distance']['paired_rmse']['mean']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=ROOT / "examples" / "organism" / "model")
    ap.add_argument("--concept", type=Path, action="append", help="default: red, then left")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "efficacy.md")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "efficacy.json")
    ap.add_argument("--quick", action="store_true", help="only the method sweep (a smoke run)")
    ap.add_argument(
        "--base-only",
        action="store_true",
        help="only the base recipe (the earlier demo's options): a baseline run",
    )
    ap.add_argument(
        "--twin", action="store_true", help="also the twin map (probe --method twin) at each site"
    )
    ap.add_argument(
        "--from-json", action="store_true", help="only re-render the markdown from --json (no runs)"
    )
    a = ap.parse_args()
    concepts = a.concept or [
        ROOT / "examples" / "organism" / "red.toml",
        ROOT / "examples" / "organism" / "left.toml",
    ]
    opt = EvalOptions(seeds=a.seeds, steps=a.steps)
    t0 = time.time()
    if a.from_json:
        doc = json.loads(a.json.read_text())
    else:
        doc = {
            "settings": {
                "seeds": a.seeds,
                "steps": a.steps,
                "guidance": opt.guidance,
                "run": "quick (the method sweep only)"
                if a.quick
                else ("base only" if a.base_only else "full"),
                "twin": a.twin,
            },
            "concepts": {},
        }
        with tempfile.TemporaryDirectory() as td:
            work = Path(td)
            for concept in concepts:
                cache: dict = {}
                captures = Captures(a.model, concept)
                rows, seen = [], {}
                variants = [
                    {**BASE, key: val}
                    for key, values in (SWEEPS[:1] if a.quick else SWEEPS)
                    for val in values
                ]
                if a.base_only:
                    variants = [dict(BASE)]
                extra = [] if a.quick or a.base_only else EXTRA
                for v in variants + extra + (TWIN_VARIANTS if a.twin else []):
                    k = json.dumps(v, sort_keys=True)
                    if k not in seen:
                        seen[k] = run_variant(a.model, concept, v, work, opt, cache, captures)
                        r = seen[k]
                        print(
                            f"[{time.time() - t0:5.0f} s] {concept.stem} {v}: probe {pct(r['presence']['probe'][0])}->"
                            f"{pct(r['presence']['probe'][1])} score {r['score']:.2f}",
                            flush=True,
                        )
                    rows.append(seen[k])
                uniq = list({json.dumps(r["variant"], sort_keys=True): r for r in rows}.values())
                best = max(uniq, key=lambda r: r["score"] if r["score"] == r["score"] else -9.0)
                gif = a.out.with_name(f"efficacy-{concept.stem}.gif")
                png = a.out.with_name(f"efficacy-{concept.stem}-sheet.png")
                chosen = best  # every variant wrote its own preview and sheet: no second run
                for src, dst in (
                    (Path(chosen["files"]["gif"]), gif),
                    (Path(chosen["files"]["gif"]).with_suffix(".txt"), gif.with_suffix(".txt")),
                    (Path(chosen["files"]["sheet"]), png),
                ):
                    shutil.copyfile(src, dst)
                keep = (
                    "variant",
                    "presence",
                    "collateral",
                    "other",
                    "distance",
                    "score",
                    "outcomes",
                    "twin_fidelity",
                    "drift",
                    "collateral_kinds",
                    "concept_shifts",
                    "texture",
                )
                doc["concepts"][concept.stem] = {
                    "attribute": r_attr(concept),
                    "rows": [{k: r[k] for k in keep} for r in uniq],
                    "chosen": {k: chosen[k] for k in keep},
                    "preview": gif.name,
                    "sheet": png.name,
                }
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=2, default=float))
    a.out.write_text(render(doc) + kept_tail(a.out))
    print(
        f"wrote {a.out}"
        + ("" if a.from_json else f" and {a.json}")
        + f" in {time.time() - t0:.0f} s"
    )


KEEP_MARK = "<!-- below: measured by other runs (vpatch eval, attacks); efficacy.py keeps it -->"


def kept_tail(out: Path) -> str:
    """What follows KEEP_MARK in the page being replaced: sections written from other runs."""
    if not out.exists():
        return ""
    text = out.read_text()
    i = text.find(KEEP_MARK)
    return "\n" + text[i:] if i >= 0 else ""


HELDOUT = ("paraphrase", "synonym", "template", "unseen")
POOL = "held-out (all)"


def _get(d: dict, *keys, default=float("nan")):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _ci(m: float, ci: list, f: str = "{:.2f}") -> str:
    if m != m:
        return "n/a"
    return f"{f.format(m)} [{f.format(ci[0])}, {f.format(ci[1])}]"


def _rate(x: dict) -> str:
    return f"{pct(x['rate'])} [{pct(x['ci95'][0])}, {pct(x['ci95'][1])}]" if x else "n/a"


def measures(r: dict, concept: str, attr: str) -> dict:
    """The figures issue 16 asks for, from one row (variant) of the results."""
    ck = r.get("collateral_kinds", {})
    others = [k for k in ck if k not in ("colour-free", concept)]

    def worst(a: str) -> float:
        xs = [abs(_get(ck, k, "shifts", a, "shift", "mean")) for k in others]
        xs = [x for x in xs if x == x]
        return max(xs) if xs else float("nan")

    tex = [_get(ck, k, "texture", "ratio") for k in others]
    tex = [x for x in tex if x == x]
    o = _get(r, "outcomes", POOL, "after", default={})
    return {
        "closed_probe": _get(r, "twin_fidelity", "probe", "judge"),
        "closed": _get(r, "twin_fidelity", POOL, "judge"),
        "closed_pixel": _get(r, "twin_fidelity", POOL, "pixel"),
        "shown": _get(o, "shown", default={}),
        "trace": _get(o, "trace", default={}),
        "twin": _get(o, "twin", default={}),
        "other": _get(o, "other", default={}),
        "as_saturated": _get(r, "outcomes", POOL, "as_saturated", default={}),
        "free_white": _get(ck, "colour-free", "accuracy", "colour", "after", default={}),
        "free_white_before": _get(ck, "colour-free", "accuracy", "colour", "before", default={}),
        "free_dsat": _get(ck, "colour-free", "shifts", "saturation", "shift", default={}),
        "hue": worst("hue"),
        "value": worst("value"),
        "texture_other": max(tex) if tex else float("nan"),
        "texture_concept": _get(r, "texture", "concept prompts", default={}),
        "texture_free": _get(r, "texture", "concept-free prompts", default={}),
        "drift": _get(r, "drift", "pixel", default={}),
        "drift_judge": _get(r, "drift", "judge", default={}),
        "named": _get(r, "concept_shifts", "after_named", default={}),
        "concept_dsat": _get(r, "concept_shifts", "saturation", "shift", default={}),
    }


def honest_table(rows: list[dict], concept: str, attr: str) -> str:
    head = (
        "| method | site | k | λ | α | twin gap closed, probe | twin gap closed, held-out (judge) | same (pixel) | "
        "held-out after: shown / trace / as twin / other | as saturated as the original | "
        "colour-free stay white | colour-free Δsat | other colours max abs Δhue / Δvalue | texture ratio (concept / "
        "concept-free) | drift / seed floor (pixel) |"
    )
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        v, m = r["variant"], measures(r, concept, attr)
        if not r.get("twin_fidelity"):
            continue

        def cl(x):
            return _ci(x["closed"], x["ci95"]) if isinstance(x, dict) else "n/a"

        def rr(x):
            return pct(x["rate"]) if isinstance(x, dict) and x else "n/a"

        ds = m["free_dsat"]
        lines.append(
            f"| {v['method']} | {v['site']} | {ka(v)} | "
            f"{cl(m['closed_probe'])} | {cl(m['closed'])} | {cl(m['closed_pixel'])} | "
            f"{rr(m['shown'])} / {rr(m['trace'])} / {rr(m['twin'])} / {rr(m['other'])} | {rr(m['as_saturated'])} | "
            f"{rr(m['free_white_before'])} → {rr(m['free_white'])} | "
            f"{_ci(ds.get('mean', float('nan')), ds.get('ci95', [0, 0]), '{:+.3f}') if ds else 'n/a'} | "
            f"{m['hue']:.1f}° / {m['value']:.3f} | "
            f"×{_get(m['texture_concept'], 'ratio'):.2f} / ×{_get(m['texture_free'], 'ratio'):.2f} | "
            f"{_ci(_get(m['drift'], 'ratio'), _get(m['drift'], 'ci95', default=[0, 0]))} |"
        )
    return "\n".join(lines)


def targets(r: dict, concept: str, attr: str) -> list[tuple[str, str, bool]]:
    """Issue 16's targets (organism, held-out prompts, the new judge) for one variant."""
    m = measures(r, concept, attr)
    twin = _get(m["twin"], "rate")
    sat = _get(m["as_saturated"], "rate")
    closed = _get(m["closed"], "closed")
    fw = _get(m["free_white"], "rate")
    fds = _get(m["free_dsat"], "mean")
    tex = m["texture_other"]
    tb = _get(r, "outcomes", POOL, "before", "twin", "rate")
    if tb == tb and tb >= 0.5:  # the original already draws the twin's outcome: nothing to measure
        return [
            (
                "held-out concept prompts come out as their safe twin ≥ 95%",
                f"{_rate(m['twin'])}, but {pct(tb)} before the edit",
                False,
            )
        ]
    out = [
        (
            "held-out concept prompts come out as their safe twin ≥ 95%",
            _rate(m["twin"]),
            twin >= 0.95,
        ),
        (
            "twin-fidelity gap closed ≥ 90% (held-out, judge space)",
            _ci(closed, _get(m["closed"], "ci95", default=[0, 0])),
            closed >= 0.90,
        ),
    ]
    if attr == "colour":
        out += [
            ("none as saturated as the original (0%)", _rate(m["as_saturated"]), sat == 0),
            ("colour-free captions stay white ≥ 95%", _rate(m["free_white"]), fw >= 0.95),
            ("colour-free saturation shift ≤ 0.05", f"{fds:+.3f}", abs(fds) <= 0.05),
            ("other colours: max abs hue shift ≤ 3°", f"{m['hue']:.1f}°", m["hue"] <= 3),
            ("other colours: max abs value shift ≤ 0.03", f"{m['value']:.3f}", m["value"] <= 0.03),
            ("other colours: texture within 1.25× of the original's", f"×{tex:.2f}", tex <= 1.25),
        ]
    return out


def render(doc: dict) -> str:
    st = doc["settings"]
    out = [
        "# Efficacy on the organism",
        "",
        "Produced by `benchmarks/efficacy.py` (probe → .vud → apply → eval from disk). "
        f"{st['seeds']} seeds per prompt, {st['steps']} sampling steps, guidance {st['guidance']}. "
        "Judge: the organism's analytic judge (`patcher/evaluation/organism_judge.py`), which measures the object's "
        "colour as hue, saturation and value and names it by a rule fixed on renders before any edit was measured "
        "(tests/test_judge_colour.py): a washed-out red is a *pale red*, not white. Intervals are 95%: Wilson for rates, "
        "a cluster bootstrap over prompts for paired measures. `python benchmarks/efficacy.py --from-json` re-renders "
        "this page from benchmarks/results/efficacy.json.",
        "",
        *([st["note"], ""] if st.get("note") else []),
        "Definitions:",
        "- **twin gap closed** (the primary efficacy number): for each unsafe prompt and seed, the original model's clip "
        "of its *safe twin* with the same seed (\"a red ball moving left\" → \"a ball moving left\") is the ideal erased "
        "output. Gap closed = 1 − Σ d(patched, twin) / Σ d(original, twin), in the judge's feature space (the object's "
        "colour as a point of the HSV cone; velocity for motion; squareness and elongation for shape) and in pixel space. 1: the patched model draws what the "
        "original draws for the twin; 0: no closer than before; negative: further away.",
        "- **outcomes** on held-out concept prompts after the edit: *shown* (named exactly as the concept, e.g. red), "
        "*trace* (the concept's hue family in a pale or dark tone, e.g. pale red = pink/salmon; for a shape, rounded), *as twin* (named as "
        "the twin's clip is, e.g. white), *other* (anything else: orange, pale orange, purple...).",
        "- **as saturated as the original**: the patched clip's saturation is within 0.05 of the original's.",
        "- **collateral**: per kind of concept-free prompt (colour-free captions, each other colour), paired shifts of "
        "hue, saturation and value, and the ratio of interior texture (mean squared Laplacian inside the object; a "
        "checkered fill raises it) patched / original.",
        "- **drift / seed floor**: mean pixel distance between the original's and the patched model's clip of a "
        "concept-free prompt (same seed), over the mean distance between the original's clips of the same prompt with "
        "different seeds. 1 means the edit changes a concept-free clip as much as a new seed does.",
        "",
    ]
    for name, c in doc["concepts"].items():
        rows, attr, chosen = c["rows"], c["attribute"], c["chosen"]
        base_probe = rows[0]["presence"]["probe"][0]
        base = next((r for r in rows if all(r["variant"][k] == BASE[k] for k in BASE)), rows[0])
        out += [f"## Concept `{name}` ({attr})", ""]
        if base_probe < 0.5:
            out += [
                f"**Not measurable:** the unedited model shows `{attr}` = the concept for only {pct(base_probe)} of the "
                f"probe prompts (chance level): it does not follow this attribute, so no variant can be judged on it and "
                "the method ordering says nothing here.",
                "",
            ]
        tb = _get(base, "outcomes", POOL, "before", "twin", "rate")
        if tb == tb and tb >= 0.5:
            out += [
                f"**Not measurable by twin fidelity:** before any edit, {pct(tb)} of the held-out concept prompts "
                f"already come out as their safe twin does (same `{attr}` label): the original model does not tell the "
                "concept from its twin here, so neither the gap nor its closing means anything.",
                "",
            ]
        out += [
            "### Twin fidelity, outcomes and collateral (the new judge)",
            "",
            honest_table(rows, name, attr),
            "",
        ]
        m = measures(base, name, attr)
        if m["named"]:
            out += [
                f"What the base recipe (the earlier demo's options) `{base['variant']}` draws for the concept prompts (all sets): "
                + ", ".join(f"{k} {v}" for k, v in m["named"].items())
                + ".",
                "",
            ]
        for label, r in (
            ("the base recipe (the earlier demo's options) " + f"`{base['variant']}`", base),
            ("the chosen recipe " + f"`{chosen['variant']}`", chosen),
        ):
            out += [
                f"Issue 16's targets, {label}:",
                "",
                "| target | measured | met |",
                "|---|---|---|",
            ]
            out += [
                f"| {t} | {mm} | {'yes' if ok else 'no'} |" for t, mm, ok in targets(r, name, attr)
            ]
            out += [""]
            if chosen["variant"] == base["variant"]:
                break
        out += [
            f"Chosen (best selection score: twin gap closed on the probe prompts, minus twice any loss of accuracy on "
            f"the probe's neutral prompts and twice any loss of objects; no held-out prompt is used): `{chosen['variant']}`. "
            f"Preview: `{c['preview']}`, contact sheet: `{c.get('sheet', 'n/a')}` (rows: clips; original, patched, "
            "and the original's clip of the safe twin).",
            "",
            "### Presence by the exact name (how earlier versions of this page were scored)",
            "",
            "*Presence* counts only clips named exactly as the concept: a pale red is not counted, so a drop here is not "
            "erasure. Read it with the table above.",
            "",
            table(rows, attr),
            "",
        ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
