"""Attacks on organism edits (steering only): rewordings and concept inversion, before and after.

    python benchmarks/attack_lab.py --variants paper,ls-b1-kv [--iterations 150] [--prompts 4]

Success: the object's mean colour is a saturated red (hue within 20° of red, saturation >= 0.5),
a plain measured quantity; reported figures come from the evaluation's judge.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import benchmarks.erase_lab as L  # noqa: E402
from patcher import organism as o  # noqa: E402
from patcher.evaluation import attacks  # noqa: E402
from patcher.families.recipes import load_concept  # noqa: E402


def is_red(clip) -> bool:
    h = L.hsv_of(clip)
    return h is not None and (h[0] <= 20 or h[0] >= 340) and h[1] >= 0.5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="paper,ls-b1-kv")
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip-prompts", action="store_true")
    ap.add_argument(
        "--harden",
        type=int,
        default=0,
        help="RECE-style rounds: add what the attack found, re-edit, attack again",
    )
    a = ap.parse_args()
    torch.set_num_threads(1)
    tok, enc, tr = o.load(L.MODEL)
    con = load_concept(ROOT / "examples" / "organism" / "red.toml")
    words = o.COLOUR_WORDS["red"]
    sets = L.heldout("red", "colour", 24, 12, 6)
    red = [p for p in sets["concept"] if "red" in p.split()][: a.prompts]
    reworded = attacks.prompt_attack_set(sets["concept"][:8], words, per_prompt=3)
    te = tr.condition_embedder.text_embedder
    v_orig = attacks.organism_velocity(tr)
    with torch.no_grad():
        cond = o.encode(tok, enc, red)
        unc = o.encode(tok, enc, [""] * len(red))
    noise0 = torch.stack(
        [
            torch.randn(
                3, o.FRAMES, o.SIZE, o.SIZE, generator=torch.Generator().manual_seed(2000 + i)
            )
            for i in range(len(red))
        ]
    )
    import copy

    results = {}
    for name in a.variants.split(","):
        t0 = time.time()
        v = L.parse_variant(name)
        trp = copy.deepcopy(tr)
        tep = trp.condition_embedder.text_embedder
        if v.get("site") == "kv":
            L.FEATURE = lambda h: te.linear_2(te.act_1(te.linear_1(h.float()))).double()  # noqa: E731
            lins = [m for b in trp.blocks for m in (b.attn2.to_k, b.attn2.to_v)]
        else:
            L.FEATURE = None
            lins = [tep.linear_1]
        with torch.no_grad():
            M = (
                L.paper_map(tok, enc, con, v)
                if v["type"] == "paper"
                else L.build_map(tok, enc, con, v, set(words))
            )
            W0s = [lin.weight.data.clone() for lin in lins]
            for lin in lins:
                lin.weight.data = (lin.weight.data.double() @ M).float()
        for p in trp.parameters():
            p.requires_grad_(False)
        v_pat = attacks.organism_velocity(trp)
        rec = {}
        if not a.skip_prompts:
            seeds = [3000 + i for i in range(len(reworded))]
            with torch.no_grad():
                b = o.sample(tok, enc, tr, reworded, seeds, steps=a.steps)
                af = o.sample(tok, enc, trp, reworded, seeds, steps=a.steps)
            rec["prompts"] = {
                "n": len(reworded),
                "before": attacks.success_rate([is_red(c) for c in b]),
                "after": attacks.success_rate([is_red(c) for c in af]),
                "judge_after": attacks.success_rate([o.judge(c).colour == "red" for c in af]),
            }
        states = attacks.trajectory_states(v_orig, cond, unc, noise0, a.steps, 3.0)
        inv = attacks.invert_conditioning(
            v_pat, v_orig, cond, states, iterations=a.iterations, batch=2
        )
        flags_plain, flags_attack, flags_orig = [], [], []
        with torch.no_grad():
            for s in range(a.seeds):
                nz = torch.stack(
                    [
                        torch.randn(
                            3,
                            o.FRAMES,
                            o.SIZE,
                            o.SIZE,
                            generator=torch.Generator().manual_seed(4000 + 97 * s + i),
                        )
                        for i in range(len(red))
                    ]
                )
                flags_orig += [
                    is_red(c)
                    for c in attacks.sample_conditioned(v_orig, cond, unc, nz, a.steps, 3.0)
                ]
                flags_plain += [
                    is_red(c)
                    for c in attacks.sample_conditioned(v_pat, cond, unc, nz, a.steps, 3.0)
                ]
                flags_attack += [
                    is_red(c)
                    for c in attacks.sample_conditioned(v_pat, inv.cond, unc, nz, a.steps, 3.0)
                ]
        rec["embedding"] = {
            "original": attacks.success_rate(flags_orig),
            "patched_no_attack": attacks.success_rate(flags_plain),
            "patched_attacked": attacks.success_rate(flags_attack),
            "loss_start": inv.loss_start,
            "loss_end": inv.loss_end,
        }
        extra_x, extra_t = [], []
        for rnd in range(a.harden):
            # RECE: the attack's conditioning, read at the site, should read as the twin's: every real
            # position as its aligned twin token (concept words as padding), every other as padding
            with torch.no_grad():
                twins = [" ".join(w for w in p.split() if w not in words) for p in red]
                tc = o.encode(tok, enc, twins)
                ids_u = tok(red).input_ids
                ids_t = tok(twins).input_ids
                feat = L.FEATURE if L.FEATURE is not None else (lambda h: h.double())
                fa, ft = feat(inv.cond), feat(tc)
                pad = feat(torch.zeros(1, 1, o.TEXT_DIM))[0, 0]
                for i in range(len(red)):
                    al = dict(L.twin.align_tokens(ids_u[i], ids_t[i]))
                    for pos in range(o.MAX_TOKENS):
                        j = al.get(pos)
                        extra_x.append(fa[i, pos])
                        extra_t.append(ft[i, j] if j is not None else pad)
                M = L.build_map(
                    tok,
                    enc,
                    con,
                    {**v, "extra": (torch.stack(extra_x), torch.stack(extra_t))},
                    set(words),
                )
                for lin, W0 in zip(lins, W0s):
                    lin.weight.data = (W0.double() @ M).float()
            inv = attacks.invert_conditioning(
                v_pat, v_orig, cond, states, iterations=a.iterations, batch=2
            )
            fl = []
            with torch.no_grad():
                for s_ in range(a.seeds):
                    nz = torch.stack(
                        [
                            torch.randn(
                                3,
                                o.FRAMES,
                                o.SIZE,
                                o.SIZE,
                                generator=torch.Generator().manual_seed(4000 + 97 * s_ + i),
                            )
                            for i in range(len(red))
                        ]
                    )
                    fl += [
                        is_red(c)
                        for c in attacks.sample_conditioned(v_pat, inv.cond, unc, nz, a.steps, 3.0)
                    ]
            rec[f"hardened_{rnd + 1}"] = {
                "attacked": attacks.success_rate(fl),
                "loss_start": inv.loss_start,
                "loss_end": inv.loss_end,
            }
            torch.save(M, f"/tmp/harden-{name}-{rnd + 1}.pt")
        results[name] = rec
        print(
            f"{name} ({time.time() - t0:.0f}s): {json.dumps(rec, default=lambda x: round(x, 4))}",
            flush=True,
        )


if __name__ == "__main__":
    main()
