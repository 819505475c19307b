"""Two concepts in one delta, each map holding the other concept's prompts (pre-registered).

    python benchmarks/two_concepts.py run [--seeds 8]   # build, vpatch eval on both recipes
    python benchmarks/two_concepts.py run --form scan   # the earlier merge of two scan deltas
    python benchmarks/two_concepts.py table [--seeds 8] # the targets, this and earlier merges

`vpatch merge red.vud blue.vud` writes W M_red M_blue: blue's map acts on the input first, and the
earlier merges lost red because each map moves the other's synonyms (docs/erasure.md, "Two
concepts"). Here each concept's probe also holds the other concept's unsafe prompts, its scan's
picks substituted (red: the pairs with red, crimson, scarlet), through `--preserve`:
- red: tune's red choice (the `tuned_red` options of twin_variants.py: `--layers cross_kv
  --preserve captions.txt --null 2 --beta 4.5749 --strength 1.0712`), its preserve file
  captions.txt plus blue's prompts;
- blue: the recommended command (`--layers cross_kv --scan 64`) with `--preserve` of red's prompts;
- `vpatch merge` of the two, red first (as the earlier merges);
- `vpatch eval --seeds N --steps 16` on red's and blue's recipes: reports
  benchmarks/results/eval_twin_crossheld_merged_red+blue_on_<concept>[_seedsN].json; the table
  leaves the other concept's prompts out of "other colours" (erased on purpose).
Pre-registration: benchmarks/results/two_concepts_prereg.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from t5_value import CLI, _fit_prompts, _probe, setup  # noqa: E402
from twin_targets import figures  # noqa: E402
from twin_variants import CAPTIONS, MODEL, RESULTS, VARIANTS, WORK, _eval, targets  # noqa: E402

PAIR = ("red", "blue")
NAME = "crossheld"
OPTIONS = {
    "red": [a if a != CAPTIONS else "{preserve}" for a in VARIANTS["tuned_red"]],
    "blue": [*VARIANTS["scan"], "--preserve", "{preserve}"],
}
# earlier merges of the same pair, for the table: (label, report name pattern)
EARLIER = [
    ("scan merged (2 seeds)", "eval_twin_scan_merged_red+blue_on_{c}.json"),
    (
        "tune's choices merged (8 seeds)",
        "tune/eval_merged_red+blue-preserve-judge-organism_on_{c}_seeds8.json",
    ),
]


def _recipe(c: str) -> str:
    return str(ROOT / f"examples/organism/{c}.toml")


def unsafe_prompts(c: str) -> list[str]:
    """C's unsafe prompts, the scan's picks (on the original model) substituted for its word."""
    s = setup(c)
    pairs, _kept = _fit_prompts(s.con, s.tok, s.picks)
    return [u for u, _ in pairs]


def build_scan() -> Path:
    """The earlier merge: both concepts probed with the recommended command, merged red first."""
    deltas = [str(WORK / f"scan_{c}.vud") for c in PAIR]
    for c, d in zip(PAIR, deltas):
        _probe(MODEL, _recipe(c), Path(d))
    merged = WORK / "scan_merged_red+blue.vud"
    merge = [*CLI, "merge", *deltas, "-o", str(merged), "--overwrite"]
    subprocess.run(merge, check=True, cwd=ROOT, capture_output=True)
    return merged


def build() -> Path:
    WORK.mkdir(exist_ok=True)
    held = {c: unsafe_prompts(c) for c in PAIR}
    deltas = []
    for c, other in (PAIR, PAIR[::-1]):
        lines = list(held[other])
        if c == "red":  # tune's choice preserves the captions already
            lines = Path(CAPTIONS).read_text().splitlines() + lines
        pf = WORK / f"{NAME}_{c}_preserve.txt"
        pf.write_text("\n".join(lines) + "\n")
        print(f"{c}: holds {len(held[other])} of {other}'s prompts, e.g. {held[other][-1]!r}")
        out = WORK / f"{NAME}_{c}.vud"
        opts = [a.replace("{preserve}", str(pf)) for a in OPTIONS[c]]
        probe = [*CLI, "probe", str(MODEL), "-c", _recipe(c), "-o", str(out), "--method", "twin"]
        subprocess.run([*probe, *opts, "--overwrite", "-q"], check=True, cwd=ROOT)
        deltas.append(str(out))
    merged = WORK / f"{NAME}_merged_red+blue.vud"
    merge = [*CLI, "merge", *deltas, "-o", str(merged), "--overwrite"]
    subprocess.run(merge, check=True, cwd=ROOT, capture_output=True)
    return merged


def report(c: str, seeds: int, form: str = NAME) -> Path:
    tail = "" if seeds == 2 else f"_seeds{seeds}"
    return RESULTS / f"eval_twin_{form}_merged_red+blue_on_{c}{tail}.json"


def run(seeds: int, form: str) -> None:
    merged = build() if form == NAME else build_scan()
    for c in PAIR:
        sheet = WORK / f"sheet_{form}_merged_on_{c}_seeds{seeds}.png"
        report(c, seeds, form).write_text(_eval(_recipe(c), merged, sheet, seeds))
        print(f"{form} on {c}: {report(c, seeds, form).name}", flush=True)


def table(seeds: int) -> None:
    rows = [
        (f"{form} ({seeds} seeds)", report(c, seeds, form)) for form in (NAME, "scan") for c in PAIR
    ]
    rows += [(label, RESULTS / pat.format(c=c)) for label, pat in EARLIER for c in PAIR]
    print(
        "| merge | on | as twin | synonym set | gap | colour-free | hue | value | texture | met |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, p in rows:
        if not p.exists():
            print(f"| {label} | {p.name} | not measured | | | | | | | |")
            continue
        d = json.loads(p.read_text())
        c = d["concept"]
        f = figures(d, exclude=tuple(x for x in PAIR if x != c))
        t = targets(f)
        syn = f["per_set_as_twin"].get("synonym", {}).get("rate")
        cells = [t["as twin"][1], "–" if syn is None else f"{100 * syn:.0f}%"]
        cells += [
            t[k][1] if k in t else "–" for k in ("gap", "colour-free", "hue", "value", "texture")
        ]
        met = sum(ok for ok, _ in t.values())
        print(f"| {label} | {c} | " + " | ".join(cells) + f" | {met}/{len(t)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=("run", "table"))
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--form", choices=(NAME, "scan"), default=NAME)
    a = ap.parse_args()
    if a.seeds < 1:
        ap.error("--seeds: at least 1")
    if a.cmd == "run":
        run(a.seeds, a.form)
    else:
        table(a.seeds)


if __name__ == "__main__":
    main()
