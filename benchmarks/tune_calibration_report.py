"""Variants of tune's damage objective against generation, from tune_calibration.py's raw records.

Prints, per concept and candidate, the generation truth T (the eval's drift / seed floor on the
concept-free prompts the objective reads) and each variant's cheap damage; then, per variant, the
pre-registered checks (benchmarks/results/tune_calibration_prereg.md): pooled Spearman ρ (A1) and
the calibration ratio c_blue / c_red (A2). --prompts prints the per-prompt diagnosis (generation
drift over the prompt's own floor, the judge's changes, the cheap per-prompt damage).

  python benchmarks/tune_calibration_report.py [--raw FILE] [--prompts] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def spearman(a, b):
    from tune_bench import spearman as s

    return s(a, b)


def truth(rec: dict, cand: dict, idx: list[int], S: int) -> float:
    """The eval's drift ratio: mean drift over the clips of IDX / mean seed floor of those prompts."""
    drift = [cand["gen_drift"][i * S + s] for i in idx for s in range(S)]
    floor = [f for i in idx for f in rec["original"]["gen_floor"][i]]
    return statistics.fmean(drift) / statistics.fmean(floor)


PAIRS4 = list(itertools.combinations(range(4), 2))


def cheap(rec: dict, cand: dict, idx: list[int], v: dict) -> float:
    """One variant of the cheap damage. v: steps (3|6), est (all|last), seeds (1|2|4), floor
    (global|prompt), agg (mean|median)."""
    st = str(v["steps"])
    sel = slice(None) if v["est"] == "all" else slice(-1, None)
    n = v["seeds"]
    pairs = [p for p in PAIRS4 if p[1] < max(n, 2)]

    def comb(ds):
        return math.sqrt(sum(x * x for x in ds[sel]))

    d = [statistics.fmean(comb(cand["cheap_drift"][st][i][x]) for x in range(n)) for i in idx]
    fl = [
        statistics.fmean(
            comb(rec["original"]["cheap_floor"][st][i][PAIRS4.index(p)]) for p in pairs
        )
        for i in idx
    ]
    agg = statistics.fmean if v["agg"] == "mean" else statistics.median
    if v["floor"] == "global":
        return agg(d) / statistics.fmean(fl)
    return agg([a / b for a, b in zip(d, fl)])


def variants() -> dict[str, dict]:
    out = {}
    for steps, est, seeds, floor, agg in itertools.product(
        (3, 6), ("all", "last"), (1, 2, 4), ("global", "prompt"), ("mean", "median")
    ):
        name = f"s{steps}-{est}-n{seeds}-{floor}-{agg}"
        out[name] = dict(steps=steps, est=est, seeds=seeds, floor=floor, agg=agg)
    return out


CURRENT = "s3-all-n1-global-mean"


def passes(v: dict) -> int:
    return v["steps"] * v["seeds"]  # denoiser passes per prompt and branch (the current: 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--raw", default=str(HERE / "results" / "tune_calibration_raw.json"))
    ap.add_argument("--prompts", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    doc = json.loads(Path(a.raw).read_text())
    S = len(doc["gen_seeds"])
    V = variants()
    rows = []
    for name, rec in doc["concepts"].items():
        nv = len(rec["validation_free"])
        val = list(range(nv))
        allp = list(range(len(rec["prompts"])))
        for c in rec["candidates"]:
            rows.append(
                {
                    "concept": name,
                    "label": c["label"],
                    "T": truth(rec, c, val, S),
                    "T_all": truth(rec, c, allp, S),
                    "cheap": {k: cheap(rec, c, val, v) for k, v in V.items()},
                }
            )
            if a.prompts:
                print(
                    f"\n[{name}] {c['label']}: T {rows[-1]['T']:.3f} (all free {rows[-1]['T_all']:.3f})"
                )
                for i, p in enumerate(rec["prompts"]):
                    fl = statistics.fmean(rec["original"]["gen_floor"][i])
                    dr = statistics.fmean(c["gen_drift"][i * S + s] for s in range(S))
                    r0 = rec["original"]["readings"][i * S : i * S + S]
                    r1 = c["readings"][i * S : i * S + S]
                    dh = [
                        ((y["hue"] - x["hue"] + 180) % 360) - 180
                        for x, y in zip(r0, r1)
                        if x["hue"] is not None and y["hue"] is not None
                    ]
                    dv = [
                        y["value"] - x["value"]
                        for x, y in zip(r0, r1)
                        if x["value"] is not None and y["value"] is not None
                    ]
                    dp = [math.hypot(y["cx"] - x["cx"], y["cy"] - x["cy"]) for x, y in zip(r0, r1)]
                    names = f"{[x['colour'] for x in r0]} -> {[y['colour'] for y in r1]}"
                    cp = cheap(rec, c, [i], V[CURRENT]) if i < nv else float("nan")
                    print(
                        f"  {'V' if i < nv else 'F'} {p!r:<32} gen drift/own floor {dr / fl:5.2f} (floor {fl:5.2f}) "
                        f"cheap(current) {cp:5.2f} | dhue {statistics.fmean(dh) if dh else float('nan'):+6.1f} "
                        f"dval {statistics.fmean(dv) if dv else float('nan'):+.3f} dpos {statistics.fmean(dp):.2f}px | {names}"
                    )
    print(f"\n{'concept':<6} {'candidate':<22} {'T':>6} {'T_all':>6} {CURRENT:>24}")
    for r in rows:
        print(
            f"{r['concept']:<6} {r['label']:<22} {r['T']:6.3f} {r['T_all']:6.3f} {r['cheap'][CURRENT]:24.3f}"
        )
    res = {}
    for k, v in V.items():
        x = [r["cheap"][k] for r in rows]
        rho = spearman(x, [r["T"] for r in rows])
        rho_all = spearman(x, [r["T_all"] for r in rows])
        c = {
            n: statistics.median(r["T"] / r["cheap"][k] for r in rows if r["concept"] == n)
            for n in doc["concepts"]
        }
        ratio = c.get("blue", float("nan")) / c.get("red", float("nan"))
        res[k] = {
            "rho": rho,
            "rho_all": rho_all,
            "c": c,
            "ratio": ratio,
            "passes": passes(v),
            "A1": rho >= 0.9,
            "A2": 0.8 <= ratio <= 1.25,
        }
    print(f"\n{'variant':<26} {'rho(T)':>7} {'rho(T_all)':>10} {'c_blue/c_red':>12} passes A1 A2")
    for k, r in sorted(
        res.items(),
        key=lambda kv: (not (kv[1]["A1"] and kv[1]["A2"]), kv[1]["passes"], -kv[1]["rho"]),
    ):
        print(
            f"{k:<26} {r['rho']:+7.2f} {r['rho_all']:+10.2f} {r['ratio']:12.2f} {r['passes']:6d} {'Y' if r['A1'] else '-'}  {'Y' if r['A2'] else '-'}"
            + ("   <- current" if k == CURRENT else "")
        )
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "variants": res}, indent=1))


if __name__ == "__main__":
    main()
