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


class Captures:
    """One capture per concept and site; every variant at that site is built from it."""

    def __init__(self, model: Path, concept: Path):
        self.model, self.concept = model, concept
        self.by_site: dict[str, tuple] = {}

    def get(self, site: str) -> tuple:
        if site not in self.by_site:
            o = CaptureOptions(sites=(site,), device="cpu")
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
    preview: Path | None = None,
) -> dict:
    vud = work / f"{variant_name(v)}.vud"
    if not vud.exists():
        write_variant(captures, v, vud)
    o = EvalOptions(**{**opt.__dict__, "preview": preview})
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
    score = pres["probe"][2] - 2 * neutral_loss - 2 * vanish
    return {
        "variant": v,
        "presence": pres,
        "collateral": col,
        "other": oth,
        "distance": r.distance,
        "score": score,
        "report": r.to_dict(),
    }


def r_attr(concept: Path) -> str:
    from patcher.families.recipes import load_concept

    return load_concept(concept).judge["organism"]["attribute"]


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
            f"| {v['method']} | {v['site']} | {v['rank']} | {v['strength']:g} | {v['alpha']:g} | {r['score']:.2f} | "
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
            "settings": {"seeds": a.seeds, "steps": a.steps, "guidance": opt.guidance},
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
                for v in variants + ([] if a.quick else EXTRA):
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
                gif.unlink(missing_ok=True)
                chosen = run_variant(
                    a.model, concept, best["variant"], work, opt, cache, captures, preview=gif
                )
                keep = ("variant", "presence", "collateral", "other", "distance", "score")
                doc["concepts"][concept.stem] = {
                    "attribute": r_attr(concept),
                    "rows": [{k: r[k] for k in keep} for r in uniq],
                    "chosen": {k: chosen[k] for k in keep},
                    "preview": gif.name,
                }
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=2, default=float))
    a.out.write_text(render(doc))
    print(f"wrote {a.out} and {a.json} in {time.time() - t0:.0f} s")


HELDOUT = ("paraphrase", "synonym", "template", "unseen")


def render(doc: dict) -> str:
    st = doc["settings"]
    out = [
        "# Efficacy on the organism",
        "",
        "Produced by `benchmarks/efficacy.py` (probe → .vud → apply → eval from disk, analytic judge). "
        f"{st['seeds']} seeds per prompt, {st['steps']} sampling steps, guidance {st['guidance']}. Cells read original→patched. "
        "The selection score (relative drop of presence on the probe prompts, minus twice any loss of accuracy on the "
        "probe's neutral prompts and twice any loss of objects on the probe prompts) uses no held-out prompt; the "
        "chosen recipe is the best score. Held-out columns: paraphrase, synonym, the never-trained template, unseen "
        "combinations; concept-free columns use the held-out `free` prompts. `python benchmarks/efficacy.py "
        "--from-json` re-renders this page from benchmarks/results/efficacy.json.",
        "",
    ]
    for name, c in doc["concepts"].items():
        rows, attr, chosen = c["rows"], c["attribute"], c["chosen"]
        base_probe = rows[0]["presence"]["probe"][0]
        out += [
            f"## Concept `{name}` ({attr})",
            "",
            table(rows, attr),
            "",
            f"Chosen (best selection score): `{chosen['variant']}`. Preview: `{c['preview']}` (rows: prompts; left "
            f"original, right patched; the prompts are listed in the .txt beside it).",
            "",
        ]
        if base_probe < 0.5:
            out += [
                f"**Not measurable:** the unedited model shows `{attr}` = the concept for only {pct(base_probe)} of the "
                f"probe prompts (chance level): it does not follow this attribute, so no variant can be judged on it and "
                "the method ordering says nothing here.",
                "",
            ]
            continue
        same = [
            r
            for r in rows
            if {k: r["variant"][k] for k in BASE if k != "method"}
            == {k: BASE[k] for k in BASE if k != "method"}
        ]

        def held(r):
            p = r["presence"]
            return sum(p[k][1] for k in HELDOUT if k in p) / max(
                1, sum(1 for k in HELDOUT if k in p)
            )

        p, col, oth = chosen["presence"], chosen["collateral"], chosen["other"]

        def drop(keys, p=p):
            b = sum(p[k][0] for k in keys if k in p)
            a = sum(p[k][1] for k in keys if k in p)
            return 1 - a / b if b else float("nan")

        others = [x for x in ("colour", "shape", "motion") if x != attr]
        checks = [
            (
                "held-out presence down >= 95% (relative)",
                f"{pct(drop(HELDOUT))}",
                drop(HELDOUT) >= 0.95,
            ),
            ("synonyms down >= 90%", pct(drop(["synonym"])), drop(["synonym"]) >= 0.90),
            ("held-out template down >= 90%", pct(drop(["template"])), drop(["template"]) >= 0.90),
            (
                f"concept-free {attr} accuracy within 1 point",
                f"{pct(col[attr][0])} → {pct(col[attr][1])}",
                col[attr][1] >= col[attr][0] - 0.01,
            ),
            *[
                (
                    f"concept prompts' {o} >= 95% of baseline (vanished = miss)",
                    f"{pct(oth[o][0])} → {pct(oth[o][1])}",
                    oth[o][1] >= 0.95 * oth[o][0],
                )
                for o in others
            ],
            (
                "objects kept on concept prompts",
                f"{pct(oth['object_present'][0])} → {pct(oth['object_present'][1])}",
                oth["object_present"][1] >= 0.95 * oth["object_present"][0],
            ),
        ]
        out += [
            "Targets (chosen recipe, held-out prompts):",
            "",
            "| target | measured | met |",
            "|---|---|---|",
        ]
        out += [f"| {t} | {m} | {'yes' if ok else 'no'} |" for t, m, ok in checks] + [""]
        out += [
            "Method ablation (same site, k, λ, α): "
            + "; ".join(
                f"{r['variant']['method']}: held-out presence {pct(held(r))}, objects kept {pct(r['other']['object_present'][1])}, "
                f"concept-free {attr} accuracy {pct(r['collateral'][attr][1])}"
                for r in same
            )
            + ".",
            "",
        ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
