"""The twin map fitted on more contexts: the recipe's concept, put into random word sequences.

    python benchmarks/context_pairs.py recipe CONCEPT          # print the augmented recipe
    python benchmarks/context_pairs.py check [CONCEPT ...]     # token level, no sampling
    python benchmarks/context_pairs.py run [CONCEPT ...] [--seeds 2]
    python benchmarks/context_pairs.py moves [CONCEPT ...]     # after the run: concept-free moves

The recommended edit's held-out residual at `cross_kv` is four to five times its residual on the
recipe's own five pairs (benchmarks/gap_floor.py), and red's misses sit in context words the fit
never saw ("colored", and "," in the new template; benchmarks/token_trace.py). This variant gives
the fit more contexts without naming any held-out prompt:
1. the recommended probe (`--method twin --layers cross_kv --scan 64`) on the recipe scores every
   scanned word at `cross_kv`; the **context words** are the scanned words (alphabetic whole words
   of the tokenizer) that the rule does not pick and that read less like the concept than the
   average scanned word (score < 0), less the concept's own words;
2. N random pairs (N = 40, seed 0): pair k takes the recipe pair k mod 5, its concept span (the
   words where unsafe and safe differ: "red" → nothing, "square" → "ball"), and puts it at a
   uniform position in a sequence of 2-5 context words drawn uniformly, on both sides;
3. the recommended probe with `--anchor-empty` runs on the recipe with those pairs added (the
   added safe sides join the preservation set as every twin does); eval runs on the unchanged
   recipe's held-out prompts.
On the organism the context words come from a 38-token vocabulary, so they include words of the
held-out prompts (for red and blue "colored", "is", "and", "it"; not ",", which is not
alphabetic): a pass would show
what context variety buys here, not that random words of a 32k vocabulary would carry it.
Pre-registration: benchmarks/results/context_pairs_prereg.md. Reports:
benchmarks/results/eval_twin_ctx_<concept>[_seedsN].json, counted by
`python benchmarks/twin_variants.py table ctx`.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from twin_variants import CONCEPTS, MODEL, WORK, eval_variant  # noqa: E402

from patcher.families.recipes import load_concept  # noqa: E402
from patcher.probe import CaptureOptions, ProbeParams, probe  # noqa: E402
from patcher.vud.delta import read_delta  # noqa: E402

N_PAIRS, SEED, LENGTHS = 40, 0, (2, 5)
OPTIONS = ["--layers", "cross_kv", "--scan", "64", "--anchor-empty"]


def span(unsafe: str, safe: str) -> tuple[list[str], list[str]]:
    """The one run of words where UNSAFE and SAFE differ (the concept, and what the twin has)."""
    a, b = unsafe.split(), safe.split()
    ops = [o for o in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()]
    ops = [o for o in ops if o[0] != "equal"]
    if len(ops) != 1:
        raise SystemExit(f"{unsafe!r} / {safe!r}: not one differing run of words")
    _, i1, i2, j1, j2 = ops[0]
    return a[i1:i2], b[j1:j2]


@functools.cache  # check and moves ask twice (the context words, then the recipe)
def scan_scores(c: str) -> dict[str, float]:
    """Every scanned word's score at `cross_kv` under the recommended probe (the delta's record
    keeps only the top 8, so the record is widened for this call)."""
    from patcher.erasure import scan

    real = scan.ScanResult.record
    scan.ScanResult.record = lambda self, top=8: real(self, top=len(self.scores))
    out = WORK / f"ctx_scores_{c}.vud"
    try:
        probe(
            MODEL,
            str(ROOT / f"examples/organism/{c}.toml"),
            out,
            CaptureOptions(sites=("cross_kv",)),
            ProbeParams(method="twin", scan=64),
            overwrite=True,
        )
    finally:
        scan.ScanResult.record = real
    rec = read_delta(out).method["scan_picked"]["transformer:cross_kv"]
    return {w: s for w, s in rec["scores"].items() if w not in rec["picked"]}


def context_pairs(c: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The N added (unsafe, safe) pairs of concept C, and the context words they draw from."""
    con = load_concept(ROOT / f"examples/organism/{c}.toml")
    spans = [span(p.unsafe, p.safe) for p in con.pairs]
    own = {w for su, _ in spans for w in su}
    words = sorted(w for w, s in scan_scores(c).items() if s < 0 and w not in own)
    rng = random.Random(SEED)
    pairs = []
    for k in range(N_PAIRS):
        su, ss = spans[k % len(spans)]
        ctx = [rng.choice(words) for _ in range(rng.randint(*LENGTHS))]
        i = rng.randint(0, len(ctx))
        pairs.append((" ".join(ctx[:i] + su + ctx[i:]), " ".join(ctx[:i] + ss + ctx[i:])))
    return pairs, words


def recipe(c: str) -> Path:
    """Concept C's recipe with the added pairs written into its `pairs` array (WORK/ctx_<c>.toml)."""
    text = (ROOT / f"examples/organism/{c}.toml").read_text()
    pairs, _ = context_pairs(c)
    m = re.search(r"^pairs = \[\n(.*?)^\]", text, flags=re.S | re.M)
    if m is None:
        raise SystemExit(f"{c}: no multi-line pairs array in the recipe")
    rows = "".join(f'  {{ unsafe = "{u}", safe = "{s}" }},\n' for u, s in pairs)
    out = WORK / f"ctx_{c}.toml"
    out.write_text(text[: m.end(1)] + rows + text[m.end(1) :])
    if len(load_concept(out).pairs) != len(
        load_concept(ROOT / f"examples/organism/{c}.toml").pairs
    ) + len(pairs):
        raise SystemExit(f"{out}: the added pairs did not all load")
    return out


def _probe(c: str) -> Path:
    delta = WORK / f"ctx_{c}.vud"
    cli = [sys.executable, "-m", "patcher.cli", "probe", str(MODEL), "-c", str(recipe(c))]
    subprocess.run(
        [*cli, "-o", str(delta), "--method", "twin", *OPTIONS, "--overwrite", "-q"],
        check=True,
        cwd=ROOT,
    )
    return delta


def _moved(e, M) -> float:
    """How far the map M moves readings E, relative to their size."""
    return float((e @ M.T - e).norm() / e.norm())


def check(c: str) -> None:
    """The held-out residual at `cross_kv` (as gap_floor measures it), how far concept-free
    prompts and the empty prompt move, for the recommended delta and this variant."""
    from gap_floor import _Site, _site_map
    from t5_value import SETS

    from patcher.evaluation.prompts import OrganismTwins

    site = _Site(c)
    twin_of = OrganismTwins(site.s.con)
    _, words = context_pairs(c)
    print(f"{c}: context words ({len(words)}): {' '.join(words)}")
    for name, delta in (("scan", site.s.scan), ("ctx", _probe(c))):
        site.M = _site_map(read_delta(delta).entries)
        by_set = {
            s: [site.residual(p, twin_of(p))[0] for p in site.s.con.heldout.get(s, [])]
            for s in SETS
        }
        r = [x for v in by_set.values() for x in v]
        moved = []
        for p in [*site.s.con.heldout.get("free", []), ""]:
            e, _ = site.embed(p)
            moved.append(_moved(e, site.M))
        print(
            f"  {name}: held-out residual median {statistics.median(r):.3f}; "
            + ", ".join(f"{s} {statistics.fmean(v):.3f}" for s, v in by_set.items())
            + f"; concept-free prompts moved median {statistics.median(moved[:-1]):.3f}, "
            f"max {max(moved[:-1]):.3f}; empty prompt {moved[-1]:.3f}",
            flush=True,
        )


def moves(c: str) -> None:
    """Exploratory, after the run: how far each concept-free eval prompt's `cross_kv` input moves
    under scan, scan_anchor (the variant without the added pairs) and ctx (relative distance)."""
    from gap_floor import _Site, _site_map
    from twin_variants import probe_variant

    site = _Site(c)
    maps = {}
    for v in ("scan", "scan_anchor", "ctx"):
        d = WORK / f"{v}_{c}.vud"
        if v == "ctx":
            d = _probe(c)
        elif not d.exists():
            d = probe_variant(v, c)
        maps[v] = _site_map(read_delta(d).entries)
    print(f"{c}: concept-free prompt, moved under " + " / ".join(maps), flush=True)
    for p in site.s.con.heldout.get("free", []):
        e, _ = site.embed(p)
        r = [_moved(e, M) for M in maps.values()]
        print(f"  {p:<40} " + " / ".join(f"{x:.3f}" for x in r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recipe")
    r.add_argument("concept", choices=CONCEPTS)
    for name in ("check", "run", "moves"):
        p = sub.add_parser(name)
        p.add_argument("concepts", nargs="*", default=list(CONCEPTS))
        if name == "run":
            p.add_argument("--seeds", type=int, default=2)
    a = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    if a.cmd == "recipe":
        print(recipe(a.concept).read_text())
        return
    for c in a.concepts:
        if c not in CONCEPTS:
            ap.error(f"{c}: one of {', '.join(CONCEPTS)}")
    for c in a.concepts:
        if a.cmd == "check":
            check(c)
        elif a.cmd == "moves":
            moves(c)
        else:
            eval_variant("ctx", c, _probe(c), a.seeds)


if __name__ == "__main__":
    main()
