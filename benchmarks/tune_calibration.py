"""Is tune's cheap damage objective calibrated across concepts? Generation against the cheap estimate.

For each concept (default red, blue) and a fixed candidate list (the plain twin maps and some tune
trials of each study's search space), each built on the tune split's *fit* prompts as a tune trial is,
this script samples (patcher.organism.sample, the eval's settings: 16 steps, guidance 3) every
concept-free prompt tune may use (validation neutral + validation twins + the empty prompt, and the
fit neutral prompts) with the original and the edited model, several seeds, and records per prompt:

- generation: pixel drift (same seed, original vs edited) and the prompt's own seed floor (the
  original between seeds); the judge's readings (hue, saturation, value, texture, centroid,
  velocity, colour name) before and after;
- cheap: the coarse clean-clip estimates x - t v of tune's denoiser objective after each of S steps
  (S = 3 and 6) from seeds 1000-1003, their distance to the original's at the same seed, and the
  original's distance between seeds.

The recipe's [heldout] sets are never read. Raw per-prompt records go to --out (JSON); a contact
sheet per concept to --sheets. Variants of the damage objective are computed from the raw records by
benchmarks/tune_calibration_report.py.

  OMP_NUM_THREADS=1 nice -n 10 python benchmarks/tune_calibration.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
ORG = ROOT / "examples" / "organism"

# (label, site, params): fixed before any variant of the objective was compared
CANDIDATES = {
    "red": [
        ("plain twin cross_kv", "cross_kv", dict(method="twin", strength=1.0, beta=1.0, null=0)),
        ("trial 48 (chosen)", "cross_kv", dict(method="twin", strength=0.958, beta=0.1168, null=1)),
        ("trial 13", "text_proj", dict(method="twin", strength=1.013, beta=0.2947, null=4)),
        ("trial 20", "text_proj", dict(method="twin", strength=1.493, beta=0.0798, null=4)),
        ("trial 59", "t5_ffn", dict(method="twin", strength=1.403, beta=0.360, null=0)),
        ("trial 39", "cross_kv", dict(method="cpca", strength=0.928, rank=3, alpha=2.035)),
        ("trial 0", "cross_kv", dict(method="mean", strength=1.392, directions=4)),
        ("trial 29", "text_proj", dict(method="mean", strength=1.292, directions=2)),
    ],
    "blue": [
        ("plain twin cross_kv", "cross_kv", dict(method="twin", strength=1.0, beta=1.0, null=0)),
        ("plain twin text_proj", "text_proj", dict(method="twin", strength=1.0, beta=1.0, null=0)),
        ("trial 33 (chosen)", "t5_ffn", dict(method="twin", strength=1.255, beta=0.1118, null=3)),
        ("trial 25", "text_proj", dict(method="twin", strength=1.098, beta=0.0421, null=2)),
        ("trial 37", "cross_kv", dict(method="twin", strength=1.060, beta=0.0780, null=3)),
        ("trial 44", "cross_kv", dict(method="twin", strength=0.693, beta=0.321, null=3)),
        ("trial 0", "cross_kv", dict(method="mean", strength=1.392, directions=4)),
        ("trial 7", "t5_ffn", dict(method="pca", strength=0.620, rank=3)),
    ],
}


@torch.no_grad()
def estimates(tok, enc, tr, prompts: list[str], seed: int, steps: int) -> torch.Tensor:
    """(n, steps, clip): tune's coarse clean-clip estimates (as OrganismObjectives._features)."""
    from patcher.organism import encode, guided_velocity, noise

    n = len(prompts)
    cond = encode(tok, enc, prompts)
    unc = encode(tok, enc, [""]).expand(n, -1, -1)
    x = noise([seed]).expand(n, -1, -1, -1, -1).clone()
    ts = torch.linspace(1.0, 0.0, steps + 1)
    out = []
    for a, b in zip(ts[:-1], ts[1:]):
        vg = guided_velocity(tr, x, float(a), cond, unc, 3.0)
        out.append((x - float(a) * vg).clamp(-1, 1).flatten(1))
        x = x + (b - a) * vg
    return torch.stack(out, 1)


def reading(clip: torch.Tensor) -> dict:
    from patcher.evaluation.organism_judge import FG_THRESHOLD, judge, velocity

    v = judge(clip)
    x = (clip.float().clamp(-1, 1) + 1) / 2
    bright = x.max(0).values
    w = bright * (bright > FG_THRESHOLD)
    F, H, W = bright.shape
    m = w.sum().clamp_min(1e-6)
    cx = float((w * torch.arange(W).view(1, 1, W)).sum() / m)
    cy = float((w * torch.arange(H).view(1, H, 1)).sum() / m)
    vx, vy = velocity(clip)
    return {
        "present": v.present,
        "colour": v.colour,
        "shape": v.shape,
        "motion": v.motion,
        "hue": v.hue,
        "saturation": v.saturation,
        "value": v.value,
        "texture": v.texture,
        "cx": cx,
        "cy": cy,
        "vx": vx,
        "vy": vy,
    }


def main() -> None:
    from patcher.evaluation.sheets import write_sheet
    from patcher.families.recipes import load_concept
    from patcher.organism import edited, load, sample
    from patcher.probe import CaptureOptions, ProbeParams, WeightReader, build_delta, capture
    from patcher.probe.sources import open_model
    from patcher.tune.split import Split, subset

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--concepts", default="red,blue")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--out", default=str(HERE / "results" / "tune_calibration_raw.json"))
    ap.add_argument("--sheets", default=str(HERE / "results" / "tune_calibration"))
    ap.add_argument(
        "--coverage",
        action="store_true",
        help="instead: the plain twin built on the fit prompts vs on every recipe prompt, on "
        "red / green prompts that are in no recipe",
    )
    a = ap.parse_args()
    if a.coverage:
        return coverage(a)
    model = ORG / "model"
    Path(a.sheets).mkdir(parents=True, exist_ok=True)
    tok, enc, tr = load(model)
    modules = {"transformer": tr, "text_encoder": enc}
    gen_seeds = [2000 + s for s in range(a.seeds)]
    cheap_seeds = [1000 + s for s in range(4)]
    doc = {"settings": vars(a), "gen_seeds": gen_seeds, "cheap_seeds": cheap_seeds, "concepts": {}}
    for name in a.concepts.split(","):
        t0 = time.perf_counter()
        con = load_concept(ORG / f"{name}.toml")
        sp = Split.of([p.unsafe for p in con.pairs], list(con.neutral), 0.4)
        opt = CaptureOptions(sites=("text_proj", "cross_kv", "t5_ffn"), token_roles=True)
        src = open_model(model, opt)
        w = WeightReader(src)
        acts = capture(src, con, replace(opt), w)
        val_free = list(
            dict.fromkeys(
                [con.neutral[i] for i in sp.val_neutral]
                + [con.pairs[i].safe for i in sp.val_pairs]
                + [""]
            )
        )
        fit_free = [con.neutral[i] for i in sp.fit_neutral if con.neutral[i] not in val_free]
        prompts = val_free + fit_free
        gp = [p for p in prompts for _ in gen_seeds]
        gs = [s for _ in prompts for s in gen_seeds]

        def measure(delta, gp=gp, gs=gs, prompts=prompts):
            ctx = edited(modules, delta.entries) if delta is not None else contextlib.nullcontext()
            with ctx:
                clips = sample(tok, enc, tr, gp, gs, steps=16, guidance=3.0)
                est = {
                    st: torch.stack(
                        [estimates(tok, enc, tr, prompts, s, st) for s in cheap_seeds], 1
                    )
                    for st in (3, 6)
                }  # (n_prompts, n_seeds, steps, clip)
            return clips, est

        c0, e0 = measure(None)
        r0 = [reading(c) for c in c0]
        S = len(gen_seeds)
        rec = {
            "prompts": prompts,
            "validation_free": val_free,
            "fit_free": fit_free,
            "original": {
                "readings": r0,
                # per prompt: distances between the original's clips of different seeds
                "gen_floor": [
                    [
                        float((c0[i * S + x] - c0[i * S + y]).norm())
                        for x in range(S)
                        for y in range(x + 1, S)
                    ]
                    for i in range(len(prompts))
                ],
                "cheap_floor": {
                    st: [
                        [
                            [float((e[i, x, k] - e[i, y, k]).norm()) for k in range(st)]
                            for x in range(len(cheap_seeds))
                            for y in range(x + 1, len(cheap_seeds))
                        ]
                        for i in range(len(prompts))
                    ]
                    for st, e in e0.items()
                },
            },
            "candidates": [],
        }
        sheet_rows = {p: [("original", c0[i * S], r0[i * S])] for i, p in enumerate(prompts)}
        for label, site, params in CANDIDATES[name]:
            pp = ProbeParams(pooling="tokens", **{"directions": 1, **params})
            d = build_delta(subset(acts, (site,), sp.fit_pairs, sp.fit_neutral), pp, w)
            c1, e1 = measure(d)
            r1 = [reading(c) for c in c1]
            rec["candidates"].append(
                {
                    "label": label,
                    "site": site,
                    "params": params,
                    "readings": r1,
                    "gen_drift": [float((c1[j] - c0[j]).norm()) for j in range(len(gp))],
                    "cheap_drift": {
                        st: [
                            [
                                [float((e1[i, x, k] - e0[st][i, x, k]).norm()) for k in range(st)]
                                for x in range(len(cheap_seeds))
                            ]
                            for i in range(len(prompts))
                        ]
                        for st, e1 in e1.items()
                    },
                }
            )
            for i, p in enumerate(prompts):
                sheet_rows[p].append((label[:22], c1[i * S], r1[i * S]))
            print(f"{name}: {label} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        doc["concepts"][name] = rec

        def desc(r):
            return "no object" if not r["present"] else f"{r['colour']} {r['motion']}"

        rows = [
            (f"[{name}] {p!r} (seed {gen_seeds[0]})", [(lb, c, desc(r)) for lb, c, r in cols])
            for p, cols in sheet_rows.items()
        ]
        write_sheet(Path(a.sheets) / f"{name}.png", rows, frames=(0, 3, 7), scale=4)
        Path(a.out).write_text(json.dumps(doc))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)


COVERAGE = [  # in no recipe of examples/organism (neither prompts nor [heldout])
    "a red stick moving up",
    "the square is red and it moves down",
    "a green stick moving up",
    "the rod is green and it moves left",
]


def coverage(a) -> None:
    """Does the twin's preservation reach colours it was not shown? The plain twin at cross_kv for
    each concept, built on the tune split's fit prompts (a tune trial) and on every recipe prompt
    (what `vpatch probe` and tune's refit write), on prompts of colours in no recipe prompt list."""
    from patcher.families.recipes import load_concept
    from patcher.organism import edited, load, sample
    from patcher.probe import CaptureOptions, ProbeParams, WeightReader, build_delta, capture
    from patcher.probe.sources import open_model
    from patcher.tune.split import Split, subset

    model = ORG / "model"
    tok, enc, tr = load(model)
    modules = {"transformer": tr, "text_encoder": enc}
    seeds = [2000 + s for s in range(a.seeds)]
    gp = [p for p in COVERAGE for _ in seeds]
    gs = [s for _ in COVERAGE for s in seeds]
    c0 = sample(tok, enc, tr, gp, gs, steps=16, guidance=3.0)
    r0 = [reading(c) for c in c0]
    S = len(seeds)
    floor = [
        sum(
            float((c0[i * S + x] - c0[i * S + y]).norm()) for x in range(S) for y in range(x + 1, S)
        )
        / (S * (S - 1) / 2)
        for i in range(len(COVERAGE))
    ]
    out = {"prompts": COVERAGE, "seeds": seeds, "original": r0, "floor": floor, "rows": []}
    for name in a.concepts.split(","):
        con = load_concept(ORG / f"{name}.toml")
        sp = Split.of([p.unsafe for p in con.pairs], list(con.neutral), 0.4)
        opt = CaptureOptions(sites=("cross_kv",), token_roles=True)
        src = open_model(model, opt)
        w = WeightReader(src)
        acts = capture(src, con, opt, w)
        pp = ProbeParams("twin", 1, 0.0, 1.0, 1, "tokens")
        for label, sub in (
            ("fit prompts", subset(acts, ("cross_kv",), sp.fit_pairs, sp.fit_neutral)),
            ("every prompt", acts),
        ):
            with edited(modules, build_delta(sub, pp, w).entries):
                c1 = sample(tok, enc, tr, gp, gs, steps=16, guidance=3.0)
            r1 = [reading(c) for c in c1]
            for i, p in enumerate(COVERAGE):
                ii = range(i * S, i * S + S)
                dh = [
                    ((r1[j]["hue"] - r0[j]["hue"] + 180) % 360) - 180
                    for j in ii
                    if r0[j]["hue"] is not None and r1[j]["hue"] is not None
                ]
                row = {
                    "concept": name,
                    "built_on": label,
                    "prompt": p,
                    "drift_over_floor": sum(float((c1[j] - c0[j]).norm()) for j in ii)
                    / S
                    / floor[i],
                    "dhue": sum(dh) / len(dh) if dh else None,
                    "before": [r0[j]["colour"] for j in ii],
                    "after": [r1[j]["colour"] for j in ii],
                }
                out["rows"].append(row)
                print(
                    f"{name} twin cross_kv on {label:<12} {p!r:<38} drift/floor "
                    f"{row['drift_over_floor']:.2f} dhue {row['dhue'] if row['dhue'] is None else round(row['dhue'], 1)} "
                    f"{row['before']} -> {row['after']}",
                    flush=True,
                )
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
