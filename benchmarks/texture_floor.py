"""The texture target's noise floor: what the paired texture ratio reads when nothing is edited.

    python benchmarks/texture_floor.py [CONCEPT ...] [--offsets 500,700] [--mix 0.15,0.3] [--seeds 2] [--json OUT]

Issue 16's texture target (per other colour, the median interior texture of the patched clips
within 1.25x of the original's) compares clips with the same prompt and seed. An edit that moves a
clip's trajectory at all changes the noise-made detail inside the object, so part of any measured
ratio is that detail drawn anew. This script measures the extreme of that: the *original* model's
clips of the eval's concept-free prompts (the recipe's held-out free and neutral prompts, the
same jobs and judge as `vpatch eval --seeds 2 --steps 16`) against the original model's clips of
the same prompts with other seeds (the eval's seed plus each offset). It prints, per kind, the
texture ratio with its interval, and the largest ratio over the kinds, which is what the target
reads. Nothing is fitted or tuned here: the judge, the kinds, the prompts and the statistic are
the eval's own (patcher.evaluation).

A seed swap redraws the whole clip; an edit moves it part of the way (the eval's concept-free
drift over the seed floor, pixel space, is 0.16-0.23 for the twin maps). ``--mix`` measures that
middle ground with no edit at all: the second clips start from the mixed noise
cos(θ) n(seed) + sin(θ) n(seed + offset) (unit variance kept), for each θ (radians) given, and the
line also prints their drift over the seed floor, so a texture ratio can be read against a
random move of the same size as the edit's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patcher import organism  # noqa: E402
from patcher.evaluation.core import EvalOptions, plan_jobs  # noqa: E402
from patcher.evaluation.generators import generator_for  # noqa: E402
from patcher.evaluation.judges import JUDGES  # noqa: E402
from patcher.evaluation.metrics import drift, texture_ratio  # noqa: E402
from patcher.evaluation.prompts import RecipePrompts  # noqa: E402
from patcher.families.recipes import load_concept  # noqa: E402

MODEL = ROOT / "examples/organism/model"


def floor(
    concept: str, offsets: list[int], mix: list[float], seeds: int = 2, steps: int = 16
) -> dict:
    con = load_concept(ROOT / f"examples/organism/{concept}.toml")
    opt = EvalOptions(seeds=seeds, steps=steps)
    judge = JUDGES["organism"](con, opt)
    sets = [s for s in RecipePrompts().sets(con) if not s.concept]
    gen = generator_for(MODEL)(MODEL, opt)

    def judged(seed0: int):
        jobs = plan_jobs(sets, seeds, seed0)
        clips = gen([j.prompt for j in jobs], [j.seed for j in jobs])
        return jobs, judge.verdicts(clips), clips

    jobs, vb, before = judged(opt.seed)
    kinds: dict[str, list[int]] = {}
    for i, j in enumerate(jobs):
        kinds.setdefault(judge.kind(j.prompt), []).append(i)
    out: dict = {"concept": concept, "seed": opt.seed, "seeds": seeds, "offsets": {}}
    runs = [(str(off), *judged(opt.seed + off)[1:]) for off in offsets]
    models = organism.load(MODEL) if mix else None
    runs += [
        (f"mix{th}+{off}", *_mixed(judge, jobs, models, th, off, steps, opt.guidance))
        for th in mix
        for off in offsets
    ]
    prompts, seeds_ = [j.prompt for j in jobs], [j.seed for j in jobs]
    for off, va, after in runs:
        per = {}
        for k, ii in sorted(kinds.items()):
            per[k] = texture_ratio(
                [_nan(vb[i].get("texture")) for i in ii],
                [_nan(va[i].get("texture")) for i in ii],
                [jobs[i].prompt for i in ii],
            )
        # the kinds twin_targets.py counts as "other colours" (two-sided: max of r and 1/r)
        colours = {k: v for k, v in per.items() if k not in ("colour-free", concept)}
        worst = max(colours.items(), key=lambda kv: _abs_log(kv[1]["ratio"]))
        dr = drift(before, after, prompts, seeds_)
        out["offsets"][off] = {
            "kinds": per,
            "worst": {"kind": worst[0], **worst[1]},
            "drift_over_floor": dr["ratio"],
        }
    return out


def _mixed(judge, jobs, models, theta: float, offset: int, steps: int, guidance: float):
    """The original model's clips of JOBS from mixed noise (see the module docstring), judged;
    MODELS: the organism's (tokenizer, encoder, transformer)."""
    import math

    from patcher.organism import noise, sample

    seeds = [j.seed for j in jobs]
    start = math.cos(theta) * noise(seeds) + math.sin(theta) * noise([s + offset for s in seeds])
    clips = sample(
        *models,
        [j.prompt for j in jobs],
        seeds,
        steps=steps,
        guidance=guidance,
        batch=len(jobs),
        start=start,
    )
    return judge.verdicts(clips), clips


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def _abs_log(r: float) -> float:
    import math

    return abs(math.log(r)) if r == r and r > 0 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("concepts", nargs="*", default=["red", "blue", "green", "square"])
    ap.add_argument("--offsets", default="500,700", help="seed offsets, comma-separated")
    ap.add_argument("--seeds", type=int, default=2, help="samples per prompt (the eval's --seeds)")
    ap.add_argument("--mix", default="", help="noise-mix angles θ (radians), comma-separated")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()
    offsets = [int(x) for x in a.offsets.split(",")]
    mix = [float(x) for x in a.mix.split(",") if x]
    res = []
    for c in a.concepts:
        r = floor(c, offsets, mix, seeds=a.seeds)
        res.append(r)
        for off, o in r["offsets"].items():
            cells = "  ".join(
                f"{k} x{v['ratio']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}] (n={v['n']})"
                for k, v in o["kinds"].items()
            )
            w = o["worst"]
            tag = off if off.startswith("mix") else f"seed+{off}"
            print(f"{c} {tag}: {cells}")
            print(
                f"{c} {tag}: drift/floor {o['drift_over_floor']:.2f}; furthest from 1 over the "
                f"other kinds (the target's reading): {w['kind']} x{w['ratio']:.2f}"
            )
        sys.stdout.flush()
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
