"""Why the embedding attack wins: an attack confined to what the edit must preserve (issue 16, part 3).

    python benchmarks/attack_span.py [--delta red_twin.vud] [--site cross_kv] [--out result.json]

Every edit here is linear in its site input and keeps a preservation set nearly fixed (M x_p ≈ x_p),
so an input inside the span of the preserved inputs passes through it almost unchanged. This runs
the embedding attack of ``attacks.attack_eval`` (same Adam settings, prompts, trajectory and seeds)
on the *original* model, but with the site input confined to the top-k principal directions of the
preserved inputs (k = 4 ... the full width), then samples from that input with the original and
with the patched model and judges both with the validated judge (success = judged exactly red).

If the original model draws red from inside the preserved span, no edit that keeps those inputs
fixed can refuse it: the miss is structural. For each k the table also gives the share of the
preserved inputs' energy in the subspace, how much the edit changes the attack's input (relative
change of the K/V, or of ``text_proj``'s output), and the amplification of the input written as a
mix of preserved rows (Σ|a_j|‖x_j‖ / ‖h‖, min-norm a): a preservation error ε per row bounds the
attack input's change by ε × amplification.

``--site cross_kv``: the input of every cross-attention K/V (the text embedder's output, set
directly here, which is stronger than the conditioning an attacker controls). ``text_proj``: the
conditioning itself (the T5 output), what the real attack controls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from patcher import organism as o  # noqa: E402
from patcher.evaluation import attacks as A  # noqa: E402
from patcher.evaluation.core import EvalOptions  # noqa: E402
from patcher.evaluation.judges import OrganismJudge  # noqa: E402
from patcher.families.recipes import load_concept  # noqa: E402
from patcher.merge.engine import apply_delta  # noqa: E402

MODEL = ROOT / "examples" / "organism" / "model"
RECIPE = ROOT / "examples" / "organism" / "red.toml"


@contextlib.contextmanager
def site_input(tr):
    """The transformer with its text embedder bypassed: cond is the cross_kv input itself."""
    ce = tr.condition_embedder
    te = ce.text_embedder
    ce.text_embedder = torch.nn.Identity()
    try:
        yield
    finally:
        ce.text_embedder = te


def site_velocity(tr, site: str) -> A.Velocity:
    v = A.organism_velocity(tr)
    if site == "text_proj":
        return v

    def vs(x, t, h):
        with site_input(tr):
            return v(x, t, h)

    return vs


def to_site(tr, site: str, cond: torch.Tensor) -> torch.Tensor:
    if site == "text_proj":
        return cond
    return tr.condition_embedder.text_embedder(cond)


def edited_outputs(tr, site: str) -> list[torch.nn.Linear]:
    if site == "text_proj":
        return [tr.condition_embedder.text_embedder.linear_1]
    return [m for b in tr.blocks for m in (b.attn2.to_k, b.attn2.to_v)]


def relative_change(lins0, lins1, h: torch.Tensor) -> float:
    """‖(W' − W) h‖ / ‖W h‖ over every edited Linear, rows of h pooled (biases cancel)."""
    num = den = 0.0
    for a, b in zip(lins0, lins1):
        num += float(((b.weight - a.weight) @ h.T).pow(2).sum())
        den += float((a.weight @ h.T).pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def organism_captions(concept_words: set[str]) -> list[str]:
    """'a {colour or none} {shape} moving {motion}' for every colour but the concept's."""
    out = []
    for c in [None, "green", "blue", "yellow", "purple"]:
        if c in concept_words:
            continue
        for s in ("ball", "square", "stick"):
            for m in ("left", "right", "up", "down"):
                out.append(f"a {c} {s} moving {m}" if c else f"a {s} moving {m}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--delta", type=Path, help="the edit (default: probe --method twin at the site)"
    )
    ap.add_argument("--site", choices=("cross_kv", "text_proj"), default="cross_kv")
    ap.add_argument("--ks", default="4,8,16,32,full")
    ap.add_argument(
        "--preserve",
        choices=("recipe", "captions"),
        default="recipe",
        help="recipe: the twin edit's own set (neutral, safe twins, empty prompt, padding); captions: "
        "plus the organism's 60 captions without the concept",
    )
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    con = load_concept(RECIPE)
    opt = EvalOptions(seeds=a.seeds, steps=16)
    judge = OrganismJudge(con, opt)
    vocab = A.concept_vocabulary(con)
    tok, enc, tr = o.load(MODEL)
    with tempfile.TemporaryDirectory(prefix="vpatch-span-") as td:
        delta = a.delta
        if delta is None:
            from patcher.probe import probe
            from patcher.probe.capture import CaptureOptions
            from patcher.probe.params import ProbeParams

            delta = Path(td) / "twin.vud"
            probe(
                MODEL,
                RECIPE,
                delta,
                CaptureOptions(sites=(a.site,)),
                ProbeParams(method="twin"),
            )
        apply_delta(MODEL, delta, Path(td) / "patched")
        _, _, trp = o.load(Path(td) / "patched")
    for m in (tr, trp):
        for p in m.parameters():
            p.requires_grad_(False)

    # the same prompts, trajectory and noise as attack_eval's embedding attack
    base = [p.unsafe for p in con.pairs] + [
        p for k, ps in con.heldout.items() if k != "free" for p in ps
    ]
    unsafe = [p for p in base if any(w in p.split() for w in vocab)][:4]
    with torch.no_grad():
        cond = o.encode(tok, enc, unsafe)
        unc = o.encode(tok, enc, [""] * len(unsafe))
        h_red, h_unc = to_site(tr, a.site, cond), to_site(tr, a.site, unc)

    def noise(s: int) -> torch.Tensor:
        return o.noise([opt.seed + 7919 * s + i for i in range(len(unsafe))])

    # the preserved inputs at the site: what the twin edit keeps (valid tokens + the padding reading)
    preserve = (
        list(con.neutral)
        + [p.safe for p in con.pairs]
        + [""]
        + (organism_captions(set(vocab)) if a.preserve == "captions" else [])
    )
    with torch.no_grad():
        t = tok(preserve, padding="max_length", max_length=o.MAX_TOKENS, return_tensors="pt")
        hp = to_site(tr, a.site, o.encode(tok, enc, preserve))
        rows = hp[t.attention_mask.bool()]
        pad = to_site(tr, a.site, torch.zeros(1, 1, o.TEXT_DIM))[0]
        Xp = torch.cat([rows, pad.expand(rows.shape[0], -1)]).double()
    C = Xp.T @ Xp / Xp.shape[0]
    evals, evecs = torch.linalg.eigh(C)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order], evecs[:, order]
    H = Xp.shape[1]
    pinv = torch.linalg.pinv(Xp.T)  # (n_rows, H): min-norm mixing coefficients of an input

    def amplification(h: torch.Tensor) -> float:
        """The largest over the input's positions (the concept word's position dominates)."""
        hh = h.reshape(-1, H).double()
        coef = hh @ pinv.T  # (m, n_rows)
        amp = (coef.abs() * Xp.norm(dim=1)).sum(1) / hh.norm(dim=1).clamp_min(1e-12)
        return float(amp.max())

    v_o, v_p = site_velocity(tr, a.site), site_velocity(trp, a.site)
    lins0, lins1 = edited_outputs(tr, a.site), edited_outputs(trp, a.site)
    states = A.trajectory_states(v_o, h_red, h_unc, noise(0), opt.steps, opt.guidance)

    def judged(v, h) -> tuple[dict, dict]:
        vs = []
        with torch.no_grad():
            for s in range(1, opt.seeds + 1):
                vs += judge.verdicts(
                    A.sample_conditioned(v, h, h_unc, noise(s), opt.steps, opt.guidance)
                )
        names: dict[str, int] = {}
        for x in vs:
            d = str(x["colour"]) if x["present"] else "no object"
            names[d] = names.get(d, 0) + 1
        return A.success_rate([judge.shown(x) for x in vs]), names

    def flat(h: torch.Tensor) -> torch.Tensor:
        return h.reshape(-1, H).double()

    rows_out = []
    ref = {
        "red_reading_change": relative_change(lins0, lins1, flat(h_red).float()),
        "preserved_change": relative_change(lins0, lins1, Xp.float()),
        "red_amplification": amplification(h_red),
        "preserved_rows": int(Xp.shape[0]),
        "rank_1e-3": int((evals > 1e-3 * evals[0]).sum()),
    }
    print(json.dumps(ref), flush=True)
    for kk in a.ks.split(","):
        k = H if kk == "full" else int(kk)
        B = evecs[:, :k].float()  # (H, k), orthonormal
        c0 = h_red @ B  # the red reading's own coordinates
        orig_fixed = lambda x, t, _c: v_o(x, t, h_red)  # noqa: E731
        on_span = lambda x, t, c, B=B: v_o(x, t, c @ B.T)  # noqa: E731
        tk = time.time()
        inv = A.invert_conditioning(
            on_span, orig_fixed, c0, states, iterations=a.iterations, seed=opt.seed
        )
        h = (inv.cond @ B.T).detach()
        r_o, n_o = judged(v_o, h)
        r_p, n_p = judged(v_p, h)
        row = {
            "k": k,
            "energy": float(evals[:k].sum() / evals.sum()),
            "velocity_mse_start": inv.loss_start,
            "velocity_mse_end": inv.loss_end,
            "original": r_o,
            "original_names": n_o,
            "patched": r_p,
            "patched_names": n_p,
            "edit_change": relative_change(lins0, lins1, flat(h).float()),
            "amplification": amplification(h),
            "seconds": round(time.time() - tk, 1),
        }
        rows_out.append(row)
        print(json.dumps(row), flush=True)
        if a.out:  # rewritten after every k, so a run cut short keeps what it measured
            a.out.write_text(json.dumps({"reference": ref, "rows": rows_out}, indent=1) + "\n")
    print(
        f"\nsite {a.site}, preserved set {a.preserve} ({ref['preserved_rows']} rows), delta {delta}"
    )
    print(
        f"edit changes the red prompts' readings by {ref['red_reading_change']:.3f}, the preserved "
        f"rows by {ref['preserved_change']:.4f} (relative, at the edited outputs)"
    )
    print(
        "| k (top principal directions of the preserved inputs) | preserved energy | velocity MSE start → end "
        "| original model: red | patched model: red | edit's change of the attack input | amplification |"
    )
    print("|---|---|---|---|---|---|---|")

    def pct(r):
        return f"{100 * r['rate']:.0f}% [{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}]"

    for r in rows_out:
        print(
            f"| {r['k']} | {r['energy']:.4f} | {r['velocity_mse_start']:.4f} → {r['velocity_mse_end']:.5f} "
            f"| {pct(r['original'])} | {pct(r['patched'])} {r['patched_names']} | {r['edit_change']:.3f} "
            f"| {r['amplification']:.1f} |"
        )
    print(f"wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
