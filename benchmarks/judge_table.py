"""The organism judge's validation tables (docs/judge.md): every painted case of
tests/test_judge_colour.py, and every drawn shape of tests/test_judge_shape.py, with the names the
judge gives it under blur and noise.

    python benchmarks/judge_table.py > table.md           # colour
    python benchmarks/judge_table.py --shape > table.md   # shape
"""

from __future__ import annotations

import colorsys
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_judge_colour import CASES, TRANSFORMS, verdicts  # noqa: E402


def geometric(inside, reach: float = 6.0, n: int = 1200) -> tuple[float, float]:
    """(squareness, elongation) of the shape itself: the judge's formulas on a 1200 x 1200 grid
    with no blur, no noise and no pixels, so the drawn shape's place on the scale is known."""
    import torch

    from patcher.evaluation.organism_judge import _SQUARE_C4

    o = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 * reach - reach
    v, u = torch.meshgrid(o, o, indexing="ij")
    m = inside(u, v).double()
    mass = m.sum()
    area = float(mass) * (2 * reach / n) ** 2
    z = torch.complex(u - (m * u).sum() / mass, v - (m * v).sum() / mass)
    m2 = complex((m * z**2).sum() / mass)
    m4 = complex((m * z**4).sum() / mass)
    return abs(m4 - 2 * m2 * m2) / area**2 / _SQUARE_C4, abs(m2) / area


def shape_table() -> None:
    from tests.test_judge_shape import CASES as SHAPES
    from tests.test_judge_shape import verdicts as shape_verdicts

    print(
        "| drawn shape | geometric squareness / elongation | allowed names | the judge's names "
        f"(clips: colours × 4 motions × {', '.join(TRANSFORMS)}) | measured squareness |"
    )
    print("|---|---|---|---|---|")
    for case, (inside, _reach, want, _every) in SHAPES.items():
        vs = [v for _w, v in shape_verdicts(case)]
        c = Counter(v.shape or "no object" for v in vs)
        qs = [v.squareness for v in vs if v.present]
        gq, ge = geometric(inside)
        print(
            f"| {case} | {gq:.2f} / {ge:.2f} | {' or '.join(want)} | "
            f"{', '.join(f'{k} {n}' for k, n in c.most_common())} | "
            f"{min(qs):.2f}–{max(qs):.2f} |"
        )


def main() -> None:
    if "--shape" in sys.argv[1:]:
        shape_table()
        return
    print(
        f"| painted colour | RGB | true hue / s / v | the judge's names ({3 * 4 * len(TRANSFORMS)} clips: "
        f"3 shapes × 4 motions × {', '.join(TRANSFORMS)}) | measured saturation |"
    )
    print("|---|---|---|---|---|")
    for case, (rgb, _want) in CASES.items():
        vs = [v for _w, v in verdicts(rgb)]
        c = Counter(v.colour or "no object" for v in vs)
        ss = [v.saturation for v in vs if v.present]
        h, s, val = colorsys.rgb_to_hsv(*rgb)
        print(
            f"| {case} | ({', '.join(f'{x:.2f}' for x in rgb)}) | {360 * h:.0f}° / {s:.2f} / {val:.2f} | "
            f"{', '.join(f'{k} {n}' for k, n in c.items())} | {min(ss):.2f}–{max(ss):.2f} |"
        )


if __name__ == "__main__":
    main()
