"""benchmarks/twin_targets.py reads issue 16's targets from stored eval reports; the colour lines
are printed for colour concepts only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from twin_targets import figures, lines  # noqa: E402

RES = ROOT / "benchmarks" / "results"


def test_a_colour_report_reads_its_named_colours_and_two_sided_texture():
    d = json.loads((RES / "eval_twin_scan_red.json").read_text())
    out = "\n".join(lines(figures(d)))
    assert "named after (concept prompts, all sets)" in out
    # the texture target reads the largest of r and 1/r over the other colours
    ratios = [
        v["texture"]["ratio"]
        for k, v in d["collateral_kinds"].items()
        if k not in ("colour-free", "red")
    ]
    worst = max(max(r, 1 / r) for r in ratios)
    assert f"texture within x{worst:.2f} ({'met' if worst <= 1.25 else 'missed'})" in out


def test_a_motion_report_prints_no_colour_name_line():
    d = json.loads((RES / "eval_twin_scan_red.json").read_text())
    d["concept"] = "left"  # the organism's motion concept: no colour is its value
    out = "\n".join(lines(figures(d)))
    assert "not a colour" in out
    assert "named after" not in out and "as saturated" not in out
