"""The twin map's pull toward the identity (`--ridge`), chosen without held-out prompts.

    python benchmarks/twin_ridge.py select [CONCEPT ...]   # leave one recipe pair out, no sampling
    python benchmarks/twin_ridge.py check [CONCEPT ...]    # held-out prompts at token level (after)

The recommended edit leaves four to five times more of the twin distance on held-out prompts than
on its own five pairs (benchmarks/gap_floor.py): a least-squares map fitted on few rows, with a
ridge of 10⁻³ of the preserved tokens' scale. `select` reads, for each concept and each ridge of
GRID (with `--anchor-empty`, which keeps guidance's unconditional branch in place whatever the
ridge), what a map fitted without one recipe pair leaves of that pair's distance to its twin at the
`cross_kv` input, the pair's own prompt and its substitutions by the words the scan picks
(residual as gap_floor measures it), five folds. The chosen ridge is the one with the lowest mean
over the four concepts of their median fold residual (ties to the smaller). No held-out prompt is
read. `check` then prints the held-out residual and the concept-free moves at token level, for the
record. The sampled variant is `scan_ridge` in twin_variants.py (pre-registration:
benchmarks/results/scan_ridge_prereg.md).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from context_pairs import _moved  # noqa: E402
from gap_floor import _Site, _site_map  # noqa: E402
from twin_variants import CONCEPTS, MODEL, WORK  # noqa: E402

from patcher.evaluation.prompts import OrganismTwins  # noqa: E402
from patcher.families.recipes import load_concept  # noqa: E402
from patcher.probe import CaptureOptions, ProbeParams, probe  # noqa: E402
from patcher.probe.activations import read_activations  # noqa: E402
from patcher.probe.build import build  # noqa: E402
from patcher.probe.sources import WeightReader  # noqa: E402

GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SCAN = 64


def _params(ridge: float) -> ProbeParams:
    return ProbeParams(method="twin", scan=SCAN, anchor_empty=True, ridge=ridge)


def _without(c: str, k: int) -> Path:
    """Concept C's recipe without its pair K (WORK/ridge_<c>_fold<k>.toml)."""
    text = (ROOT / f"examples/organism/{c}.toml").read_text()
    rows = re.findall(r"^  \{ unsafe = .*\},\n", text, flags=re.M)
    if len(rows) != len(load_concept(ROOT / f"examples/organism/{c}.toml").pairs):
        raise SystemExit(f"{c}: the recipe's pairs are not one per line")
    out = WORK / f"ridge_{c}_fold{k}.toml"
    out.write_text(text.replace(rows[k], "", 1))
    return out


def _acts(recipe: Path | str, name: str):
    """The recommended probe's activations (with the scan) of RECIPE, captured once."""
    path = WORK / f"ridge_acts_{name}.safetensors"
    if not path.exists():
        probe(
            MODEL,
            str(recipe),
            None,
            CaptureOptions(sites=("cross_kv",)),
            _params(GRID[0]),
            save_activations=path,
        )
    return read_activations(path)


def _maps(acts) -> dict[float, object]:
    reader = WeightReader.for_activations(acts)
    return {r: _site_map(build(acts, _params(r), reader).delta.entries) for r in GRID}


def _picked(acts) -> list[str]:
    """The words the scan picked at `cross_kv` (the same rule as the recommended probe)."""
    d = build(acts, _params(GRID[0]), WeightReader.for_activations(acts)).delta
    return list(d.method["scan_picked"]["transformer:cross_kv"]["picked"])


def select(concepts: list[str]) -> None:
    per: dict[float, list[float]] = {r: [] for r in GRID}
    for c in concepts:
        site = _Site(c)
        con = site.s.con
        picked = _picked(_acts(ROOT / f"examples/organism/{c}.toml", c))
        folds: dict[float, list[float]] = {r: [] for r in GRID}
        for k, pair in enumerate(con.pairs):
            word = [w for w in pair.unsafe.split() if w not in pair.safe.split()]
            tests = [(pair.unsafe, pair.safe)] + [
                (pair.unsafe.replace(word[0], w, 1), pair.safe) for w in picked if len(word) == 1
            ]
            for r, M in _maps(_acts(_without(c, k), f"{c}_fold{k}")).items():
                site.M = M
                folds[r].append(statistics.median(site.residual(u, s)[0] for u, s in tests))
        for r in GRID:
            per[r].append(statistics.median(folds[r]))
            print(
                f"{c} ridge {r:g}: left-out pair residual median {per[r][-1]:.3f} "
                f"(folds {' '.join(f'{x:.3f}' for x in folds[r])})",
                flush=True,
            )
    means = {r: statistics.fmean(v) for r, v in per.items()}
    best = min(GRID, key=lambda r: (round(means[r], 3), r))
    print("mean over concepts: " + ", ".join(f"{r:g} {m:.3f}" for r, m in means.items()))
    print(f"chosen ridge: {best:g}")


def check(concepts: list[str]) -> None:
    from t5_value import SETS

    for c in concepts:
        site = _Site(c)
        twin_of = OrganismTwins(site.s.con)
        maps = _maps(_acts(ROOT / f"examples/organism/{c}.toml", c))
        free = [site.embed(p)[0] for p in site.s.con.heldout.get("free", [])]
        empty = site.embed("")[0]
        for r, M in maps.items():
            site.M = M
            held = [
                site.residual(p, twin_of(p))[0] for s in SETS for p in site.s.con.heldout.get(s, [])
            ]
            moved = [_moved(e, M) for e in free]
            print(
                f"{c} ridge {r:g}: held-out residual median {statistics.median(held):.3f}; "
                f"concept-free moved median {statistics.median(moved):.3f}, max {max(moved):.3f}; "
                f"empty prompt {_moved(empty, M):.3f}",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("cmd", choices=("select", "check"))
    ap.add_argument("concepts", nargs="*", default=list(CONCEPTS))
    a = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    (select if a.cmd == "select" else check)(a.concepts)


if __name__ == "__main__":
    main()
