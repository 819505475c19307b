"""Issue 16's targets, read from `vpatch eval --json` reports (no runs here).

    python benchmarks/twin_targets.py benchmarks/results/eval_twin_blue.json [...]

For each report: held-out concept prompts that come out as their safe twin (pooled and per set),
twin gap closed, how many are as saturated as the original, colour-free captions, and per other
colour the hue / value shifts and the texture ratio; each with its 95% interval. A line per target
says met / missed. A shape concept has no colour target of its own: its other colours are all kinds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

POOL = "held-out (all)"
COLOURS = ("red", "green", "blue", "yellow", "purple")  # the organism's colour concepts
SETS = ("paraphrase", "synonym", "template", "unseen")


def pct(x: dict) -> str:
    return (
        f"{100 * x['rate']:.0f}% [{100 * x['ci95'][0]:.0f}, {100 * x['ci95'][1]:.0f}] (n={x['n']})"
    )


def ci(x: dict, f: str = "{:+.3f}") -> str:
    return f"{f.format(x['mean'])} [{f.format(x['ci95'][0])}, {f.format(x['ci95'][1])}]"


def figures(d: dict, exclude: tuple[str, ...] = ()) -> dict:
    """The measured figures of one report. EXCLUDE: concept-free kinds that are erased on purpose
    (another concept of a merged delta), left out of 'other colours'."""
    oc, tf, ck = d["outcomes"], d["twin_fidelity"], d["collateral_kinds"]
    pool = oc[POOL]
    others = [k for k in ck if k not in ("colour-free", d["concept"], *exclude)]
    rows = {}
    for k in others:
        s = ck[k]["shifts"]
        rows[k] = {
            "n": ck[k]["n"],
            "hue": s["hue"]["shift"],
            "value": s["value"]["shift"],
            "saturation": s["saturation"]["shift"],
            "texture": ck[k].get("texture", {}),
            "named_after": ck[k].get("after_named", {}),
        }
    free = ck.get("colour-free", {})
    return {
        "concept": d["concept"],
        "as_twin": pool["after"]["twin"],
        "as_twin_before": pool["before"]["twin"],
        "shown_after": pool["after"]["shown"],
        "trace_after": pool["after"]["trace"],
        "other_after": pool["after"]["other"],
        "per_set_as_twin": {k: oc[k]["after"]["twin"] for k in SETS if k in oc},
        "per_set_as_twin_before": {k: oc[k]["before"]["twin"] for k in SETS if k in oc},
        "as_saturated": pool.get("as_saturated"),
        "closed": tf[POOL]["judge"],
        "closed_pixel": tf[POOL]["pixel"],
        "closed_per_set": {k: tf[k]["judge"]["closed"] for k in SETS if k in tf},
        "free_colour": free.get("accuracy", {}).get("colour"),
        "free_dsat": free.get("shifts", {}).get("saturation", {}).get("shift"),
        "free_texture": free.get("texture", {}),
        "others": rows,
        "named_after": d.get("concept_shifts", {}).get("after_named", {}),
        "squareness": d.get("concept_shifts", {}).get("squareness"),
        "free_squareness": free.get("shifts", {}).get("squareness"),
    }


def lines(f: dict) -> list[str]:
    out = [f"== {f['concept']}"]
    t = f["as_twin"]
    out.append(
        f"held-out as twin: {pct(t)} (before {pct(f['as_twin_before'])}); "
        + ", ".join(f"{k} {100 * v['rate']:.0f}%" for k, v in f["per_set_as_twin"].items())
        + f"  -> target >= 95%: {'met' if t['rate'] >= 0.95 else 'missed'}"
    )
    out.append(
        f"after: shown {pct(f['shown_after'])}, trace {pct(f['trace_after'])}, other {pct(f['other_after'])}"
    )
    if f["concept"] not in COLOURS:  # a shape or motion: the colour lines below do not apply
        out.append("(not a colour: as-saturated and the colours named do not apply)")
    if f["squareness"]:  # a shape concept: its continuous measure, concept prompts and colour-free
        sq = f["squareness"]
        out.append(
            f"squareness, concept prompts: {sq['before']:.2f} -> {sq['after']:.2f} "
            f"(shift {ci(sq['shift'], '{:+.2f}')})"
            + (
                f"; colour-free captions shift {ci(f['free_squareness']['shift'], '{:+.2f}')}"
                if f["free_squareness"]
                else ""
            )
        )
    elif f["concept"] in COLOURS:
        out.append(f"named after (concept prompts, all sets): {f['named_after']}")
    if f["as_saturated"] and f["concept"] in COLOURS:
        out.append(f"as saturated as the original: {pct(f['as_saturated'])}")
    c = f["closed"]
    out.append(
        f"gap closed (judge): {c['closed']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]; pixel "
        f"{f['closed_pixel']['closed']:.2f}; per set "
        + ", ".join(f"{k} {v:.2f}" for k, v in f["closed_per_set"].items())
        + f"  -> target >= 0.90: {'met' if c['closed'] >= 0.9 else 'missed'}"
    )
    if f["free_colour"]:
        fc = f["free_colour"]
        out.append(
            f"colour-free white: {pct(fc['before'])} -> {pct(fc['after'])}; dsat {ci(f['free_dsat'])}"
            f"; texture x{f['free_texture'].get('ratio', float('nan')):.2f}"
        )
    worst_h = worst_v = worst_t = 0.0
    for k, r in f["others"].items():
        tx = r["texture"]
        out.append(
            f"  {k:8s} n={r['n']:2d} dhue {ci(r['hue'], '{:+.1f}')} deg, dval {ci(r['value'])}, "
            f"texture x{tx.get('ratio', float('nan')):.2f} [{tx.get('ci95', [0, 0])[0]:.2f}, {tx.get('ci95', [0, 0])[1]:.2f}], named {r['named_after']}"
        )
        worst_h = max(worst_h, abs(r["hue"]["mean"]))
        worst_v = max(worst_v, abs(r["value"]["mean"]))
        if tx.get("ratio") == tx.get("ratio") and tx.get("ratio") is not None:
            worst_t = max(worst_t, tx["ratio"], 1 / tx["ratio"] if tx["ratio"] > 0 else 0)
    out.append(
        f"other kinds: max |dhue| {worst_h:.1f} deg ({'met' if worst_h <= 3 else 'missed'}), max |dval| "
        f"{worst_v:.3f} ({'met' if worst_v <= 0.03 else 'missed'}), texture within x{worst_t:.2f} "
        f"({'met' if worst_t <= 1.25 else 'missed'})"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--exclude", action="append", default=[], help="concept-free kind to leave out")
    a = ap.parse_args()
    for p in a.reports:
        print("\n".join(lines(figures(json.loads(p.read_text()), tuple(a.exclude)))))


if __name__ == "__main__":
    main()
