"""Non-invertible and hardened twin edits against the real embedding attack, and what they cost.

    python benchmarks/attack_hardening.py [--variants twin,null1,null2,null4,null8,rece] [--rounds 3]
        [--out-dir benchmarks/results] [--no-collateral]

One capture of red's recipe at ``cross_kv`` (``vpatch probe --method twin``), then per variant a
delta built from it and, for each delta:

- the embedding attack of ``vpatch eval --attack embedding`` (``attacks.attack_eval``: 150 Adam
  steps on the whole conditioning, 4 prompts × 2 seeds, 16 steps; success = judged exactly red);
- ``vpatch eval --seeds 2 --steps 16`` (``evaluate``): red's held-out prompts as twin, colour-free
  captions, the other colours' |Δhue| / |Δvalue| and texture.

Variants: ``twin`` (the probe's default), ``nullQ`` (the twin map followed by I − NNᵀ, Q concept
null-space directions: no input reaches them), ``rece`` (RECE-style hardening with the real attack:
read the attack's optimised conditioning at the site, add every position as an edit row whose target
is what the safe twin reads there (padding's reading for the concept word and the padding
positions), re-solve, attack again from scratch; ``--rounds`` rounds, rows accumulate),
``rece-nullQ`` (the same rows also feed a Q-direction null space). Prints one table; with
``--out-dir`` writes each attack and eval report as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.twin_targets import figures  # noqa: E402
from patcher import organism as o  # noqa: E402
from patcher.erasure.twin import align_tokens  # noqa: E402
from patcher.evaluation.attacks import attack_eval, concept_vocabulary  # noqa: E402
from patcher.evaluation.core import EvalOptions, evaluate, to_json  # noqa: E402
from patcher.families.recipes import load_concept  # noqa: E402
from patcher.probe import probe, read_activations  # noqa: E402
from patcher.probe.build import build  # noqa: E402
from patcher.probe.capture import CaptureOptions  # noqa: E402
from patcher.probe.params import ProbeParams  # noqa: E402
from patcher.vud.delta import write_delta  # noqa: E402

MODEL = ROOT / "examples" / "organism" / "model"
RECIPE = ROOT / "examples" / "organism" / "red.toml"
SITE = "cross_kv"


def attack_rows(tok, enc, tr, prompts: list[str], cond: torch.Tensor, vocab: list[str]):
    """(X, T): the attack's conditioning read at the cross_kv input (the text embedder's output,
    which the edit leaves alone), every position, and what the safe twin reads at the aligned
    position; the concept word and every padding position get the padding reading."""
    te = tr.condition_embedder.text_embedder
    twins = [" ".join(w for w in p.split() if w not in vocab) for p in prompts]
    with torch.no_grad():
        X = te(cond).double()
        Tt = te(o.encode(tok, enc, twins)).double()
        pad = te(torch.zeros(1, 1, o.TEXT_DIM))[0, 0].double()
    ids_u = tok(prompts).input_ids
    ids_t = tok(twins).input_ids
    xs, ts = [], []
    for i in range(len(prompts)):
        al = dict(align_tokens(ids_u[i], ids_t[i]))
        for pos in range(X.shape[1]):
            j = al.get(pos)
            xs.append(X[i, pos])
            ts.append(Tt[i, j] if j is not None else pad)
    return torch.stack(xs), torch.stack(ts)


def pct(r: dict) -> str:
    return f"{100 * r['rate']:.0f}% [{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}]"


def collateral(f: dict) -> dict:
    oth = f["others"].values()
    tex = [r["texture"].get("ratio") for r in oth if r["texture"].get("ratio")]
    return {
        "as_twin": f["as_twin"],
        "shown_after": f["shown_after"],
        "trace_after": f["trace_after"],
        "free_white": f["free_colour"]["after"] if f["free_colour"] else None,
        "free_dsat": f["free_dsat"]["mean"] if f["free_dsat"] else None,
        "max_dhue": max(abs(r["hue"]["mean"]) for r in oth),
        "max_dvalue": max(abs(r["value"]["mean"]) for r in oth),
        "texture": [min(tex), max(tex)] if tex else None,
    }


def render(table: list[dict]) -> None:
    print(
        "\n| variant | extra edit rows | embedding attack: patched, attacked (red) | trace | not attacked "
        "| velocity MSE start → end | red held-out as twin | colour-free white, Δsat "
        "| other colours max |Δhue| / |Δvalue| | texture, other colours |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        at = r["attack"]
        c = r.get("collateral")
        coll = (
            f"{pct(c['as_twin'])} | {pct(c['free_white'])}, {c['free_dsat']:+.3f} "
            f"| {c['max_dhue']:.1f}° / {c['max_dvalue']:.3f} "
            f"| ×{c['texture'][0]:.2f}–{c['texture'][1]:.2f}"
            if c
            else "– | – | – | –"
        )
        print(
            f"| {r['variant']} | {r['extra_rows']} | {pct(at['after'])} | {pct(at['notes']['after']['trace'])} "
            f"| {pct(at['notes']['patched_without_attack'])} "
            f"| {at['notes']['velocity_mse_start']:.4f} → {at['notes']['velocity_mse_end']:.5f} | {coll} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variants", default="twin,null1,null2,null4,null8,rece")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--no-collateral", action="store_true")
    ap.add_argument("--out-dir", type=Path)
    ap.add_argument(
        "--table", default="attack_hardening_red.jsonl", help="rows appended here (in --out-dir)"
    )
    ap.add_argument(
        "--collateral-from-round",
        type=int,
        default=1,
        help="RECE: evaluate the cost from this round on (earlier rounds: the attack only)",
    )
    ap.add_argument(
        "--rece-base-collateral",
        action="store_true",
        help="also evaluate a RECE variant's round 0 (the unhardened edit, the same as its own row)",
    )
    ap.add_argument(
        "--render",
        nargs="+",
        type=Path,
        help="only print the table from saved rows (JSON lines: this script's stdout or --table files)",
    )
    a = ap.parse_args()
    if a.render:
        rows = [
            json.loads(line)
            for f in a.render
            for line in f.read_text().splitlines()
            if line.startswith('{"variant"')
        ]
        render(rows)
        return
    torch.set_num_threads(1)
    t_all = time.time()
    con = load_concept(RECIPE)
    vocab = concept_vocabulary(con)
    opt = EvalOptions(seeds=a.seeds, steps=a.steps)
    tok, enc, tr = o.load(MODEL)
    cache: dict = {}
    table = []
    with tempfile.TemporaryDirectory(prefix="vpatch-harden-") as td:
        acts_path = Path(td) / "acts.safetensors"
        probe(
            MODEL,
            RECIPE,
            None,
            CaptureOptions(sites=(SITE,), token_roles=True),
            ProbeParams(method="twin"),
            save_activations=acts_path,
        )
        acts = read_activations(acts_path)

        def measure(
            name: str, params: ProbeParams, extra=None, collateral_too: bool = True
        ) -> tuple[dict, torch.Tensor]:
            t0 = time.time()
            built = build(acts, params, extra={SITE: extra} if extra is not None else None)
            dpath = Path(td) / f"{name}.vud"
            write_delta(dpath, built.delta, overwrite=True)
            rep = attack_eval(
                MODEL, con, delta=dpath, attack="embedding", options=opt, iterations=a.iterations
            )
            t_attack = time.time() - t0
            row = {
                "variant": name,
                "null": params.null,
                "extra_rows": 0 if extra is None else int(extra[0].shape[0]),
                "kept": built.groups[0].kept,
                "attack": rep.to_dict(),
                "attack_seconds": round(t_attack, 1),
            }
            if a.out_dir:
                (a.out_dir / f"attack_embedding_{name}_red.json").write_text(
                    json.dumps(rep.to_dict(), indent=2) + "\n"
                )
            if collateral_too and not a.no_collateral:
                t1 = time.time()
                ev = json.loads(
                    to_json(evaluate(MODEL, con, delta=dpath, options=opt, cache=cache))
                )
                row["collateral"] = collateral(figures(ev))
                row["eval_seconds"] = round(time.time() - t1, 1)
                if a.out_dir:
                    (a.out_dir / f"eval_{name}_red.json").write_text(
                        json.dumps(ev, indent=2) + "\n"
                    )
            line = json.dumps(row, default=str)
            print(line, flush=True)
            table.append(row)
            if a.out_dir:  # one JSON line per row, as it comes
                with open(a.out_dir / a.table, "a") as fh:
                    fh.write(line + "\n")
            return row, rep

        for v in a.variants.split(","):
            null = int(v.split("null")[1]) if "null" in v else 0
            params = ProbeParams(method="twin", null=null)
            name = "twin_baseline" if v == "twin" else f"twin_{v.replace('-', '_')}"
            rece = v.startswith("rece")
            _, rep = measure(name, params, collateral_too=a.rece_base_collateral or not rece)
            if not rece:
                continue
            xs, ts = [], []
            for r in range(1, a.rounds + 1):
                x, t = attack_rows(tok, enc, tr, rep.notes["prompts"], rep.conditioning, vocab)
                xs.append(x)
                ts.append(t)
                _, rep = measure(
                    f"{name}{r}",
                    params,
                    (torch.cat(xs), torch.cat(ts)),
                    collateral_too=r >= a.collateral_from_round,
                )

    render(table)
    print(f"wall time {time.time() - t_all:.0f} s (attack ≈ {table[0]['attack_seconds']} s each)")


if __name__ == "__main__":
    main()
