"""The organism judge's validation table (docs/judge.md): every painted case of
tests/test_judge_colour.py with the names the judge gives it under blur and noise.

    python benchmarks/judge_table.py > table.md
"""

from __future__ import annotations

import colorsys
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_judge_colour import CASES, TRANSFORMS, verdicts  # noqa: E402


def main() -> None:
    print(
        f"| painted colour | RGB | true hue / s / v | the judge's names ({3 * 4 * len(TRANSFORMS)} clips: "
        f"3 shapes × 4 motions × {', '.join(TRANSFORMS)}) | measured saturation |"
    )
    print("|---|---|---|---|---|")
    for case, (rgb, _want) in CASES.items():
        vs = [v for _w, v in verdicts(rgb)]
        c: dict = {}
        for v in vs:
            k = v.colour or "no object"
            c[k] = c.get(k, 0) + 1
        ss = [v.saturation for v in vs if v.present]
        h, s, val = colorsys.rgb_to_hsv(*rgb)
        print(
            f"| {case} | ({', '.join(f'{x:.2f}' for x in rgb)}) | {360 * h:.0f}° / {s:.2f} / {val:.2f} | "
            f"{', '.join(f'{k} {n}' for k, n in c.items())} | {min(ss):.2f}–{max(ss):.2f} |"
        )


if __name__ == "__main__":
    main()
