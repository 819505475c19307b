"""The long fuzz run: the CI fuzz targets (tests/fuzz_cases.py) with many more random cases.

    python benchmarks/fuzz.py --minutes 15            # time-bounded, cycles through the targets
    python benchmarks/fuzz.py --examples 2000 --seed 1

Prints per-target counts and the totals the issue asks for: cases, clean errors, other exceptions
(must be 0), partial outputs (0), inputs modified (0), with the first distinct problems. Exit code
1 when any of the last three is not 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests import fuzz_cases as fc  # noqa: E402

TARGETS = {
    "revert-records": (fc.record_mutations(), fc.revert_record_case),
    "provenance": (fc.provenance_values(), fc.provenance_case),
    "layer-maps": (fc.layer_maps(), fc.layer_map_case),
    "push-inputs": (fc.push_inputs(), fc.push_case),
    "output-paths": (
        st.tuples(fc.output_names, st.booleans()),
        lambda a, tally: fc.output_path_case(a[0], a[1], tally),
    ),
}


def run_target(name: str, examples: int, rng_seed: int, tally: fc.Tally, deadline: float) -> None:
    strategy, case = TARGETS[name]

    @seed(rng_seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # no shrinking: every problem is counted, not minimised
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def body(x):
        if time.monotonic() < deadline:
            case(x, tally)

    body()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--minutes", type=float, default=None, help="run rounds until this much time has passed"
    )
    ap.add_argument("--examples", type=int, default=200, help="examples per target per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--json", type=Path, help="also write the totals here")
    a = ap.parse_args()
    names = [n for n in a.targets.split(",") if n]
    tally = fc.Tally()
    t0 = time.monotonic()
    deadline = t0 + a.minutes * 60 if a.minutes else float("inf")
    rnd = 0
    while True:
        for n in names:
            run_target(n, a.examples, a.seed * 1000 + rnd * 10 + names.index(n), tally, deadline)
        rnd += 1
        print(
            f"round {rnd}: {tally.cases} cases, {time.monotonic() - t0:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        if a.minutes is None or time.monotonic() >= deadline:
            break
    wall = time.monotonic() - t0
    totals = {
        "cases": tally.cases,
        "ok": tally.ok,
        "clean_errors": tally.clean_errors,
        "other_exceptions": len(tally.other_exceptions),
        "partial_outputs": len(tally.partial_outputs),
        "inputs_modified": len(tally.inputs_modified),
        "wall_s": round(wall, 1),
        "per_call": tally.per_target,
    }
    print("per call:              cases      ok   clean   other")
    for k, (n, ok, clean, other) in sorted(tally.per_target.items()):
        print(f"  {k:20s} {n:7d} {ok:7d} {clean:7d} {other:7d}")
    classes = {}
    for label, items in (
        ("other exception", tally.other_exceptions),
        ("partial output", tally.partial_outputs),
        ("input modified", tally.inputs_modified),
    ):
        for i in items:  # "call: Type: message at file:line" -> one class per call, type and place
            call_, rest = i.split(": ", 1)
            kind = rest.split(":", 1)[0] if label == "other exception" else label
            where = i.rsplit(" at ", 1)[-1].replace(str(ROOT) + "/", "") if " at " in i else ""
            key = f"{label}: {call_}: {kind}" + (f" at {where}" if where else "")
            classes.setdefault(key, [0, i])[0] += 1
    if classes:
        print(f"problems by class ({len(classes)}), count and one example:")
        for k, (n, ex) in sorted(classes.items()):
            print(f"  {n:6d}  {k}\n          e.g. {ex[:220]}")
    print(
        f"TOTAL cases {totals['cases']} | ok {totals['ok']} | clean errors {totals['clean_errors']} | "
        f"other exceptions {totals['other_exceptions']} | partial outputs {totals['partial_outputs']} | "
        f"inputs modified {totals['inputs_modified']} | {wall:.0f} s"
    )
    if a.json:
        totals["problem_classes"] = {
            k: {"count": n, "example": ex} for k, (n, ex) in classes.items()
        }
        a.json.write_text(json.dumps(totals, indent=2))
    bad = totals["other_exceptions"] + totals["partial_outputs"] + totals["inputs_modified"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
