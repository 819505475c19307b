"""Contact sheets of the organism's demo edit, to look at what the judge's numbers say.

    python benchmarks/contact_sheets.py [--delta red.vud] [--out docs/]

Writes two PNGs (rows: clips; frames 0, 3 and 7 of the original, the patched model and, for red
prompts, the original's clip of the safe twin, same seed), each column captioned with the judge's
reading: red prompts from every held-out set, and colour-free captions with the other colours.
Without --delta it probes the earlier demo's recipe (cPCA, k = 8, λ = 1.2, α = 1 at text_proj) first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from patcher import organism as W  # noqa: E402
from patcher.evaluation.judges import OrganismJudge  # noqa: E402
from patcher.evaluation.prompts import OrganismTwins  # noqa: E402
from patcher.evaluation.sheets import write_sheet  # noqa: E402
from patcher.families.recipes import load_concept  # noqa: E402
from patcher.merge.engine import apply_delta  # noqa: E402

RED = [
    "a red ball moving left",
    "the ball is red and it moves right",
    "a crimson ball moving up",
    "scarlet rod going right",
    "moving left , the red ball",
    "moving down , the crimson square",
    "a red rod moving up",
    "the sphere is red and it moves left",
]
FREE = [
    "a ball moving up",
    "the stick moves right",
    "square going left",
    "moving down , the box",
    "a ball moving right",
    "the square moves up",
    "a blue ball moving right",
    "a green stick moving left",
    "a yellow square moving down",
    "a purple sphere moving up",
]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=ROOT / "examples" / "organism" / "model")
    ap.add_argument("--concept", type=Path, default=ROOT / "examples" / "organism" / "red.toml")
    ap.add_argument("--delta", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--name", default="demo")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    con = load_concept(a.concept)
    judge = OrganismJudge(con)
    twin = OrganismTwins(con)
    with tempfile.TemporaryDirectory() as td:
        delta = a.delta
        if delta is None:
            from patcher.probe import CaptureOptions, ProbeParams, probe

            delta = Path(td) / "red.vud"
            probe(
                a.model,
                a.concept,
                delta,
                CaptureOptions(sites=("text_proj",), device="cpu"),
                ProbeParams(method="cpca", rank=8, strength=1.2, alpha=1.0),
            )
        patched = Path(td) / "patched"
        apply_delta(a.model, delta, patched)
        seeds = [a.seed + i for i in range(len(RED))]
        fseeds = [a.seed + i for i in range(len(FREE))]
        twins = [twin(p) for p in RED]
        orig = W.load(a.model)
        b_red = W.sample(*orig, RED, seeds)
        b_twin = W.sample(*orig, twins, seeds)
        b_free = W.sample(*orig, FREE, fseeds)
        pat = W.load(patched)
        a_red = W.sample(*pat, RED, seeds)
        a_free = W.sample(*pat, FREE, fseeds)
    d = judge.describe
    vr, vt, va = judge.verdicts(b_red), judge.verdicts(b_twin), judge.verdicts(a_red)
    rows = [
        (
            p,
            [
                ("original", b_red[i], d(vr[i])),
                ("patched", a_red[i], d(va[i])),
                (f"twin: {twins[i]}", b_twin[i], d(vt[i])),
            ],
        )
        for i, p in enumerate(RED)
    ]
    for f in (a.out / f"sheet-{a.name}-red.png", a.out / f"sheet-{a.name}-free.png"):
        f.unlink(missing_ok=True)
    out1 = write_sheet(a.out / f"sheet-{a.name}-red.png", rows)
    vf, vaf = judge.verdicts(b_free), judge.verdicts(a_free)
    rows = [
        (p, [("original", b_free[i], d(vf[i])), ("patched", a_free[i], d(vaf[i]))])
        for i, p in enumerate(FREE)
    ]
    out2 = write_sheet(a.out / f"sheet-{a.name}-free.png", rows)
    for v0, v1, p in [*zip(vr, va, RED), *zip(vf, vaf, FREE)]:

        def hsv(v):
            return (
                f"h {v['hue']:5.1f} s {v['saturation']:.2f} v {v['value']:.2f} tex {v['texture']:.3f}"
                if v["present"]
                else "absent"
            )

        print(f"{p:40s} | {d(v0):28s} {hsv(v0)} | {d(v1):28s} {hsv(v1)}")
    print(out1, out2)


if __name__ == "__main__":
    main()
