"""The twin edit's reach variants (docs/erasure.md, "Reach"): probe, eval and count issue 16's targets.

    python benchmarks/twin_variants.py run VARIANT [CONCEPT ...] [--seeds 8]   # probe + eval
    python benchmarks/twin_variants.py table [VARIANT ...] [--seeds 8]         # targets met
    python benchmarks/twin_variants.py pair VARIANT red blue        # two concepts, one merged delta

Every variant is the same command for every concept (no per-concept option). `run` writes
benchmarks/results/eval_twin_<variant>_<concept>[_seedsN].json (`vpatch eval --seeds N --steps 16
--json`, N = 2 unless --seeds; the suffix only when N is not 2)
and the delta and contact sheet to /tmp/vpatch-twin-variants/. `table` counts, per concept, the six targets of the
pre-registered selection rule: as twin >= 95%, gap closed >= 0.90, colour-free white >= 95% with
|dsat| <= 0.05, other colours max |dhue| <= 3 deg, max |dvalue| <= 0.03, texture within 1.25x.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from twin_targets import figures  # noqa: E402

MODEL = ROOT / "examples/organism/model"
RESULTS = ROOT / "benchmarks/results"
WORK = Path("/tmp/vpatch-twin-variants")
CONCEPTS = ("red", "blue", "green", "square")
CAPTIONS = str(ROOT / "examples/organism/captions.txt")
VARIANTS: dict[str, list[str]] = {
    "default": ["--layers", "cross_kv"],  # reports: eval_twin_{red_crosskv,blue,green,square}.json
    "scan": ["--layers", "cross_kv", "--scan", "64"],
    "cascade": ["--layers", "text_proj,cross_kv", "--cascade"],
    "cascade_scan": ["--layers", "text_proj,cross_kv", "--cascade", "--scan", "64"],
    "scan_preserve": ["--layers", "cross_kv", "--scan", "64", "--preserve", CAPTIONS],
    "scan_preserve_anchor": [
        *("--layers", "cross_kv", "--scan", "64", "--preserve", CAPTIONS, "--anchor-empty")
    ],
    "scan_anchor": ["--layers", "cross_kv", "--scan", "64", "--anchor-empty"],
    "cascade_scan_preserve": [
        *("--layers", "text_proj,cross_kv", "--cascade", "--scan", "64"),
        *("--preserve", CAPTIONS),
    ],
    # tune --preserve's choice for red (trial 36, benchmarks/results/tune/red-preserve.vud; probe
    # with these options writes identical factors), as one fixed command for every concept
    "tuned_red": [
        *("--layers", "cross_kv", "--preserve", CAPTIONS, "--null", "2"),
        *("--beta", "4.574851367929032", "--strength", "1.0712366293225275"),
    ],
    "cascade_repair": ["--layers", "text_proj,cross_kv", "--cascade", "--cascade-repair"],
    "cascade_repair_scan": [
        *("--layers", "text_proj,cross_kv", "--cascade", "--cascade-repair", "--scan", "64")
    ],
    # benchmarks/results/scan_keep_prereg.md
    "scan_keep": ["--layers", "cross_kv", "--scan", "64", "--scan-keep"],
    "scan_keep_anchor": ["--layers", "cross_kv", "--scan", "64", "--scan-keep", "--anchor-empty"],
    # the amendment in the same file: hold only the words that read less like the concept than
    # the average scanned word
    "scan_keep_far_anchor": [
        *("--layers", "cross_kv", "--scan", "64", "--scan-keep", "--scan-keep-max", "0"),
        "--anchor-empty",
    ],
    "scan_keep_far": [
        *("--layers", "cross_kv", "--scan", "64", "--scan-keep", "--scan-keep-max", "0")
    ],
    # the second amendment: every token of the unpicked words' substituted prompts
    "scan_keep_whole_anchor": [
        *("--layers", "cross_kv", "--scan", "64", "--scan-keep", "--scan-keep-whole"),
        "--anchor-empty",
    ],
}
DEFAULT_REPORTS = {
    "red": "eval_twin_red_crosskv.json",
    "blue": "eval_twin_blue.json",
    "green": "eval_twin_green.json",
    "square": "eval_twin_square.json",
}


def report_path(variant: str, concept: str, seeds: int = 2) -> Path:
    tail = "" if seeds == 2 else f"_seeds{seeds}"
    if variant == "default" and seeds == 2:
        return RESULTS / DEFAULT_REPORTS[concept]
    return RESULTS / f"eval_twin_{variant}_{concept}{tail}.json"


def _eval(recipe: str, delta: Path, sheet: Path, seeds: int = 2) -> str:
    """`vpatch eval --seeds SEEDS --steps 16 --json` of DELTA on RECIPE's prompts, with a contact
    sheet; the report's JSON."""
    sheet.unlink(missing_ok=True)  # eval never overwrites a sheet
    ev = [sys.executable, "-m", "patcher.cli", "eval", str(MODEL), "-c", recipe]
    return subprocess.run(
        [*ev, "--delta", str(delta), "--seeds", str(seeds), "--steps", "16", "--json"]
        + ["--sheet", str(sheet)],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout


def eval_variant(variant: str, c: str, delta: Path, seeds: int) -> None:
    """`vpatch eval` of VARIANT's DELTA on concept C's recipe: its report and contact sheet."""
    tail = "" if seeds == 2 else f"_seeds{seeds}"
    recipe = str(ROOT / f"examples/organism/{c}.toml")
    out = _eval(recipe, delta, WORK / f"sheet_{variant}_{c}{tail}.png", seeds)
    report_path(variant, c, seeds).write_text(out)
    print(f"{variant} {c}: {report_path(variant, c, seeds).name}", flush=True)


def probe_variant(variant: str, c: str) -> Path:
    """`vpatch probe --method twin` with VARIANT's options on concept C: WORK/<variant>_<c>.vud."""
    WORK.mkdir(exist_ok=True)
    recipe = str(ROOT / f"examples/organism/{c}.toml")
    delta = WORK / f"{variant}_{c}.vud"
    probe = [sys.executable, "-m", "patcher.cli", "probe", str(MODEL), "-c", recipe]
    probe += ["-o", str(delta), "--method", "twin", *VARIANTS[variant], "--overwrite", "-q"]
    subprocess.run(probe, check=True, cwd=ROOT)
    return delta


def run(variant: str, concepts: list[str], seeds: int = 2) -> None:
    for c in concepts:
        eval_variant(variant, c, probe_variant(variant, c), seeds)


def pair(variant: str, a: str, b: str) -> None:
    """Two concepts together: each probed with VARIANT's options, composed by `vpatch merge`
    (W M_a M_b), measured on both recipes (eval_twin_<variant>_merged_<a>+<b>_on_<c>.json)."""
    cli = [sys.executable, "-m", "patcher.cli"]
    deltas = []
    for c in (a, b):
        d = WORK / f"{variant}_{c}.vud"
        if not d.exists():
            recipe = str(ROOT / f"examples/organism/{c}.toml")
            probe = [*cli, "probe", str(MODEL), "-c", recipe, "-o", str(d)]
            subprocess.run([*probe, "--method", "twin", *VARIANTS[variant], "-q"], check=True)
        deltas.append(str(d))
    merged = WORK / f"{variant}_merged_{a}+{b}.vud"
    merge = [*cli, "merge", *deltas, "-o", str(merged), "--overwrite"]
    subprocess.run(merge, check=True, cwd=ROOT, capture_output=True)
    for c in (a, b):
        recipe = str(ROOT / f"examples/organism/{c}.toml")
        out = _eval(recipe, merged, WORK / f"sheet_{variant}_merged_{a}+{b}_on_{c}.png")
        dest = RESULTS / f"eval_twin_{variant}_merged_{a}+{b}_on_{c}.json"
        dest.write_text(out)
        print(f"{variant} merged {a}+{b} on {c}: {dest.name}", flush=True)


def targets(f: dict) -> dict[str, tuple[bool, str]]:
    """The six targets of the selection rule, each (met, the figure)."""
    t, c = f["as_twin"]["rate"], f["closed"]["closed"]
    out = {
        "as twin": (t >= 0.95, f"{100 * t:.0f}%"),
        "gap": (c >= 0.90, f"{c:.2f}"),
    }
    fc, ds = f["free_colour"], f["free_dsat"]
    if fc is not None and ds is not None:
        out["colour-free"] = (
            fc["after"]["rate"] >= 0.95 and abs(ds["mean"]) <= 0.05,
            f"{100 * fc['after']['rate']:.0f}%, {ds['mean']:+.3f}",
        )
    hue = max((abs(r["hue"]["mean"]) for r in f["others"].values()), default=0.0)
    val = max((abs(r["value"]["mean"]) for r in f["others"].values()), default=0.0)
    tex = 0.0
    worst = ""
    for k, r in f["others"].items():
        x = r["texture"].get("ratio")
        if x is not None and x == x and x > tex:  # the target bounds an increase (artefacts)
            tex, worst = x, k
    out["hue"] = (hue <= 3.0, f"{hue:.1f}°")
    out["value"] = (val <= 0.03, f"{val:.3f}")
    out["texture"] = (tex <= 1.25, f"×{tex:.2f} ({worst})")
    return out


def table(variants: list[str], seeds: int = 2) -> None:
    print(
        "| variant | concept | as twin | synonym set | gap | colour-free | hue | value | texture | met |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        total = 0
        for c in CONCEPTS:
            p = report_path(v, c, seeds)
            if not p.exists():
                print(f"| {v} | {c} | not measured | | | | | | | |")
                continue
            f = figures(json.loads(p.read_text()))
            t = targets(f)
            met = sum(ok for ok, _ in t.values())
            total += met
            syn = f["per_set_as_twin"].get("synonym", {}).get("rate")
            cells = [t[k][1] if k in t else "–" for k in ("as twin",)]
            cells.append("–" if syn is None else f"{100 * syn:.0f}%")
            cells += [
                t[k][1] if k in t else "–"
                for k in ("gap", "colour-free", "hue", "value", "texture")
            ]
            print(f"| {v} | {c} | " + " | ".join(cells) + f" | {met}/{len(t)} |")
        print(f"| {v} | **total** | | | | | | | | **{total}** |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("variant", choices=sorted(VARIANTS))
    r.add_argument("concepts", nargs="*", default=list(CONCEPTS))
    r.add_argument("--seeds", type=int, default=2, help="eval seeds (reports get _seedsN unless 2)")
    pr = sub.add_parser("pair")
    pr.add_argument("variant", choices=sorted(VARIANTS))
    pr.add_argument("a")
    pr.add_argument("b")
    t = sub.add_parser("table")
    t.add_argument("variants", nargs="*", default=list(VARIANTS))
    t.add_argument("--seeds", type=int, default=2, help="read the reports of this many seeds")
    a = ap.parse_args()
    if getattr(a, "seeds", 2) < 1:
        ap.error("--seeds: at least 1")
    if a.cmd == "run":
        run(a.variant, a.concepts, a.seeds)
    elif a.cmd == "pair":
        pair(a.variant, a.a, a.b)
    else:
        table(a.variants, a.seeds)


if __name__ == "__main__":
    main()
