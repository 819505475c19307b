"""The clips behind a texture ratio: which concept-free clips of one kind move most, and a sheet.

    python benchmarks/texture_clips.py CONCEPT KIND DELTA OUT.png [--seeds 8] [--top 8]

Regenerates the kind's clips exactly as `vpatch eval --seeds N --steps 16` plans them (the same
jobs, seeds and sampler; the delta applied in memory), prints the kind's median interior texture
before and after (the eval's statistic: organism_judge.texture_energy) and the clips with the
largest after / before ratio, and writes a sheet: one row per clip, frames 2 and 5, before then
after. It looks at what the statistic saw; it changes nothing about it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import numpy as np
    import torch
    from PIL import Image

    from patcher import organism
    from patcher.evaluation.core import EvalOptions, plan_jobs
    from patcher.evaluation.judges import JUDGES
    from patcher.evaluation.organism_judge import judge
    from patcher.evaluation.prompts import RecipePrompts
    from patcher.families.recipes import load_concept
    from patcher.vud.delta import read_delta

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("concept")
    ap.add_argument("kind")
    ap.add_argument("delta", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--top", type=int, default=8)
    a = ap.parse_args()
    model = ROOT / "examples/organism/model"
    con = load_concept(ROOT / f"examples/organism/{a.concept}.toml")
    opt = EvalOptions(seeds=a.seeds)
    kind_of = JUDGES["organism"](con, opt).kind
    jobs = [
        j
        for j in plan_jobs(RecipePrompts().sets(con), a.seeds, opt.seed)
        if not j.concept and kind_of(j.prompt) == a.kind
    ]
    tok, enc, tr = organism.load(model)
    prompts, seeds = [j.prompt for j in jobs], [j.seed for j in jobs]

    def clips(delta: Path | None) -> torch.Tensor:
        entries = read_delta(delta).entries if delta else []
        with organism.edited({"transformer": tr, "text_encoder": enc}, entries):
            return organism.sample(tok, enc, tr, prompts, seeds, steps=opt.steps)

    before, after = clips(None), clips(a.delta)
    nan = float("nan")

    def tex(x: torch.Tensor) -> float:
        t = judge(x).texture
        return nan if t is None else t

    tb, ta = [tex(x) for x in before], [tex(x) for x in after]
    ratio = [y / x if x == x and y == y and x > 0 else nan for x, y in zip(tb, ta)]
    ok = [i for i, r in enumerate(ratio) if r == r]
    print(
        f"{a.concept} / {a.kind}: {len(jobs)} clips, {len(ok)} with an interior on both sides; "
        f"median texture {np.nanmedian([tb[i] for i in ok]):.4f} -> "
        f"{np.nanmedian([ta[i] for i in ok]):.4f}"
    )
    top = sorted(ok, key=lambda i: -ratio[i])[: a.top]
    for i in top:
        print(f"  {prompts[i]!r} seed {seeds[i]}: {tb[i]:.4f} -> {ta[i]:.4f} (x{ratio[i]:.2f})")
    rows = []
    for i in top:
        frames = [
            ((x[i][:, f].permute(1, 2, 0) + 1) / 2 * 255).clamp(0, 255).byte().numpy()
            for x in (before, after)
            for f in (2, 5)
        ]
        pad = [np.pad(t, ((1, 1), (1, 1), (0, 0)), constant_values=80) for t in frames]
        rows.append(np.concatenate(pad, 1))
    grid = np.concatenate(rows, 0)
    Image.fromarray(grid).resize((grid.shape[1] * 8, grid.shape[0] * 8), Image.NEAREST).save(a.out)


if __name__ == "__main__":
    main()
