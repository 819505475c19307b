"""Stop the concept word spreading into its context, through T5's keys: a mask as a weight edit.

    python benchmarks/t5_key.py check [CONCEPT ...]            # the mechanism, on the recipe's prompts
    python benchmarks/t5_key.py run [CONCEPT ...] [--seeds 2]  # build the variant, vpatch eval it
    python benchmarks/t5_key.py trace [CONCEPT ...]            # held-out contexts against the mask

benchmarks/t5_value.py showed that masking the concept words as keys of T5's self-attention (no
other token reads them) takes red's held-out clips as twin from 71 to 84 of 88 under the
recommended delta, and that a linear edit of the values cannot stand in for the mask. A key edit
can, in part: softmax is not linear, so a key that every reader scores low is read by none.

The variant "t5_key_scan", per T5 block b (fitted on what the block reads through the blocks
already edited):
1. one key k'_h per head for the concept words (the pairs' words and the scan's picks): the k'
   that minimises the largest attention weight any other token of the pairs' unsafe prompts gives
   the word (a linear programme on the readers' queries and log-sum-exps, position bias
   included), plus the mean change of the word's score on itself (penalised, not held: the
   oracle's mask keeps the word's own reading); padding is neither a reader nor a key;
2. the key weight W' = W + Δ, Δ least squares: the concept rows go to k', every other token of
   those prompts, of the recipe's neutral prompts, safe twins and the empty prompt, and (block 0,
   whose input is the word's embedding) every other word of the vocabulary keep their keys
   (kept rows weighted β = 100, ridge 10⁻³ of the kept rows' scale);
3. the T5 key delta and the recommended `cross_kv` delta (fitted on the original model, as the
   oracle used it) are united by `vpatch merge`.

`check` prints, on the pairs' unsafe prompts (the fit set; nothing held out), the attention weight
the other tokens give the concept words, before and after, and how far the encoder's output moves
towards the oracle's masked output. `run` writes benchmarks/results/eval_twin_t5_key_scan2_<concept>.json
(`vpatch eval --seeds N --steps 16`), counted by `python benchmarks/twin_variants.py table
t5_key_scan2`. Pre-registration: benchmarks/results/t5_key_prereg.md. The first run
(eval_twin_t5_key_scan_<concept>.json) counted the prompts' padding as readers and kept rows, a
bug; "t5_key_scan2" is the same variant without it.

Needs scipy for the linear programmes (`pip install scipy`); vpatch itself does not depend on it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from t5_value import (  # noqa: E402
    CLI,
    _fit_prompts,
    _slots,
    concept_ids,
    hits,
    map_delta,
    mask_keys,
    setup,
)
from twin_variants import CONCEPTS, WORK, eval_variant  # noqa: E402

from patcher import organism  # noqa: E402
from patcher.vud.delta import Delta, read_delta, write_delta  # noqa: E402

VARIANT = "t5_key_scan2"
BETA = 100.0  # the kept rows' weight against the concept rows'
BOUND = 1.0  # |k'| per coordinate, in units of the largest |key| coordinate of the fit prompts


def linprog(*args, **kwargs):
    """scipy's linear programme solver (HiGHS), imported when a programme is solved."""
    try:
        from scipy.optimize import linprog as solve
    except ImportError:
        raise SystemExit(
            "t5_key.py needs scipy for its linear programmes: pip install scipy"
        ) from None
    return solve(*args, **kwargs)


def _attn(enc, b: int):
    return enc.encoder.block[b].layer[0].SelfAttention


def _read(enc, tok, b: int, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Block B's self-attention inputs, queries and keys (P, n, d) on PROMPTS, the position bias
    (H, n, n) that T5 shares across blocks, and the valid tokens (P, n)."""
    got: dict[str, torch.Tensor] = {}
    sa = _attn(enc, b)

    def keep(name):
        def hook(_m, i, o):
            got[name] = o.double()
            if name == "k":
                got["x"] = i[0].double()

        return hook

    hooks = [sa.q.register_forward_hook(keep("q")), sa.k.register_forward_hook(keep("k"))]
    try:
        t = organism.tokens(tok, prompts)
        enc(input_ids=t.input_ids, attention_mask=t.attention_mask)
    finally:
        for h in hooks:
            h.remove()
    n = t.input_ids.shape[1]
    got["bias"] = _attn(enc, 0).compute_bias(n, n)[0].double()
    got["mask"] = t.attention_mask.bool()  # the prompts are padded; padding is never read
    return got


def _key_target(r: dict, slots, heads: int) -> tuple[torch.Tensor, list[str]]:
    """Per head, the k' that minimises the largest weight a reader gives a concept position."""
    dk = r["q"].shape[-1] // heads
    target, notes = [], []
    for h in range(heads):
        cols = slice(h * dk, (h + 1) * dk)
        qs, lses, selfq, selfs = [], [], [], []
        for p, (_iu, pos, _al) in enumerate(slots):
            n = int(r["mask"][p].sum())
            q, k, bias = r["q"][p, :n, cols], r["k"][p, :n, cols], r["bias"][h, :n, :n]
            s = q @ k.T + bias
            for j in pos:
                others = [c for c in range(n) if c != j]
                for i in range(n):
                    if i in pos:
                        if i == j:  # the word's score on itself stays where it was
                            selfq.append(q[i].numpy())
                            selfs.append(float(q[i] @ k[j]))
                        continue
                    qs.append(q[i].numpy())
                    lses.append(float(torch.logsumexp(s[i, others], 0) - bias[i, j]))
        Q, L = np.array(qs), np.array(lses)
        lim = BOUND * float(r["k"][r["mask"]][:, cols].abs().max())
        # min z + mean_j e_j  s.t.  Q k' - L <= z ;  |q_j k' - s_j| <= e_j ;  |k'| <= lim:
        # the largest weight any reader gives the word, its score on itself kept
        S, s0, m, nq = np.array(selfq), np.array(selfs), len(selfq), len(Q)
        a_ub = np.vstack(
            [
                np.hstack([Q, -np.ones((nq, 1)), np.zeros((nq, m))]),
                np.hstack([S, np.zeros((m, 1)), -np.eye(m)]),
                np.hstack([-S, np.zeros((m, 1)), -np.eye(m)]),
            ]
        )
        sol = linprog(
            c=[0.0] * dk + [1.0] + [1.0 / m] * m,
            A_ub=a_ub,
            b_ub=np.concatenate([L, s0, -s0]),
            bounds=[(-lim, lim)] * dk + [(None, None)] + [(0, None)] * m,
        )
        if sol.status != 0:
            raise RuntimeError(f"head {h}: the key programme failed: {sol.message}")
        target.append(torch.tensor(sol.x[:dk], dtype=torch.float64))
        z, e = Q @ sol.x[:dk] - L, sol.x[dk + 1 :]
        w = 1 / (1 + np.exp(-z))
        notes.append(
            f"h{h} weight mean {w.mean():.3f} max {w.max():.3f}, self score moves {e.mean():.2f}"
        )
    return torch.cat(target), notes


def key_maps(con, tok, enc, picks: list[str]) -> dict[str, torch.Tensor]:
    """Each block's key ΔW (out, in), fitted on inputs read through the earlier blocks' edits;
    ENC's key weights are left edited (W + ΔW)."""
    pairs, kept = _fit_prompts(con, tok, picks)
    slots = _slots(tok, pairs)
    heads = enc.config.num_heads
    ids = concept_ids(tok, pairs)
    deltas: dict[str, torch.Tensor] = {}
    for b in range(len(enc.encoder.block)):
        r = _read(enc, tok, b, [u for u, _ in pairs])
        kt, notes = _key_target(r, slots, heads)
        rk = _read(enc, tok, b, kept)
        tk = organism.tokens(tok, kept).attention_mask.bool()
        xe, xp = [], [rk["x"][tk]]
        for p, (_iu, pos, _al) in enumerate(slots):
            xe += [r["x"][p, i] for i in pos]
            n = int(r["mask"][p].sum())
            xp.append(r["x"][p, [i for i in range(n) if i not in pos]])
        if b == 0:  # block 0 reads the normed embedding: every other word keeps its key
            words = [v for v in range(enc.config.vocab_size) if v not in ids]
            emb = enc.encoder.block[0].layer[0].layer_norm(enc.shared.weight[words])
            xp.append(emb.double())
        xe_, xp_ = torch.stack(xe), torch.cat(xp)
        sa = _attn(enc, b)
        W = sa.k.weight.double()
        re = kt[None, :] - xe_ @ W.T  # what the concept rows' keys must gain
        d = xp_.shape[1]
        ridge = 1e-3 * xp_.pow(2).sum(1).mean() / d
        A = (
            xe_.T @ xe_ / len(xe_)
            + BETA * xp_.T @ xp_ / len(xp_)
            + ridge * torch.eye(d, dtype=torch.float64)
        )
        # min (1/n_e) Σ‖(W + Δ) x_e − k'‖² + β (1/n_p) Σ‖Δ x_p‖² + ridge ‖Δ‖²
        D = (re.T @ xe_ / len(xe_)) @ torch.linalg.inv(A)
        with torch.no_grad():
            sa.k.weight.copy_((W + D).float())
        deltas[f"encoder.block.{b}.layer.0.SelfAttention.k.weight"] = D
        left = (xe_ @ (W + D).T - kt).norm() / re.norm()
        moved = (xp_ @ D.T).norm() / (xp_ @ W.T).norm()
        print(
            f"  block {b}: {'; '.join(notes)}; {len(xe_)} concept rows: {left:.3f} of their "
            f"distance to k' left; {len(xp_)} kept rows' keys move {moved:.3f}"
        )
    return deltas


def key_delta(
    deltas: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], concept: dict
) -> Delta:
    """W + ΔW as the input-side map W (I + W⁻¹ΔW): the key weight is square and invertible here."""
    diffs = {k: torch.linalg.solve(weights[k].double(), D) for k, D in deltas.items()}
    method = {"name": "t5_key", "family": "wan", "script": Path(__file__).name}
    return map_delta(diffs, weights, concept, method)


def build(c: str) -> Path:
    s = setup(c)
    print(f"{c}: scan picks at cross_kv {s.picks}")
    weights = {k: v.detach().clone() for k, v in s.enc.state_dict().items()}
    deltas = key_maps(s.con, s.tok, s.enc, s.picks)
    t5 = WORK / f"t5_key_{c}.vud"
    write_delta(t5, key_delta(deltas, weights, read_delta(s.scan).concept), overwrite=True)
    out = WORK / f"{VARIANT}_{c}.vud"
    subprocess.run(
        [*CLI, "merge", str(t5), str(s.scan), "-o", str(out), "--overwrite"],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    return out


def check(c: str) -> None:
    """The mechanism on the fit prompts: weights on the concept words, and the encoder's output
    against the oracle's mask, before and after the key edit."""
    st = setup(c)
    con, picks, tok, enc = st.con, st.picks, st.tok, st.enc
    pairs, kept = _fit_prompts(con, tok, picks)
    slots = _slots(tok, pairs)
    unsafe = [u for u, _ in pairs]
    t = organism.tokens(tok, unsafe)
    hit = torch.zeros_like(t.attention_mask, dtype=torch.bool)
    for p, (_iu, pos, _al) in enumerate(slots):
        hit[p, list(pos)] = True

    def out(mask: bool, prompts=unsafe) -> torch.Tensor:
        tt = organism.tokens(tok, prompts)
        keys = mask_keys(tt.attention_mask, hit) if mask else tt.attention_mask.bool()
        h = enc(input_ids=tt.input_ids, attention_mask=keys).last_hidden_state.double()
        return h * tt.attention_mask.unsqueeze(-1)

    def weights_on_concept() -> list[str]:
        got = []
        for b in range(len(enc.encoder.block)):
            r = _read(enc, tok, b, unsafe)
            H = enc.config.num_heads
            dk = r["q"].shape[-1] // H
            w_o, w_s = [], []
            for p, (_iu, pos, _al) in enumerate(slots):
                L = int(r["mask"][p].sum())
                for h in range(H):
                    cols = slice(h * dk, (h + 1) * dk)
                    s = r["q"][p, :L, cols] @ r["k"][p, :L, cols].T + r["bias"][h, :L, :L]
                    a = torch.softmax(s, -1)
                    for j in pos:
                        w_o += [float(a[i, j]) for i in range(L) if i not in pos]
                        w_s.append(float(a[j, j]))
            got.append(
                f"block {b}: others' weight on the word median {np.median(w_o):.3f}, "
                f"mean {np.mean(w_o):.3f}, max {np.max(w_o):.3f}; its own {np.median(w_s):.3f}"
            )
        return got

    def offset_margins() -> list[str]:
        """Per block and head: the largest margin m with q·δ <= -m for every reader's query q
        (|δ| <= 1 a coordinate). m <= 0: no key *offset* lowers every reader's score."""
        got = []
        for b in range(len(enc.encoder.block)):
            r = _read(enc, tok, b, unsafe)
            H = enc.config.num_heads
            dk = r["q"].shape[-1] // H
            readers = r["mask"] & ~hit
            ms = []
            for h in range(H):
                Q = r["q"][readers][:, h * dk : (h + 1) * dk].numpy()
                sol = linprog(
                    c=[0.0] * dk + [-1.0],
                    A_ub=np.hstack([Q, np.ones((len(Q), 1))]),
                    b_ub=np.zeros(len(Q)),
                    bounds=[(-1, 1)] * dk + [(None, None)],
                )
                ms.append(f"{-sol.fun:.2f}")
            got.append(f"block {b}: key offset margin per head {', '.join(ms)}")
        return got

    base, orac, base_k = out(False), out(True), out(False, kept)
    margins = offset_margins()
    before = weights_on_concept()
    key_maps(con, tok, enc, picks)
    edit, edit_k = out(False), out(False, kept)
    after = weights_on_concept()
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    print(f"{c}: words at the concept's slots, picks {picks}")
    for m in margins:
        print(f"  {m}")
    for x, y in zip(before, after):
        print(f"  before {x}\n  after  {y}")
    print(
        f"  unsafe prompts' output, distance to the oracle's masked output: {rel(base, orac):.3f} "
        f"before, {rel(edit, orac):.3f} after; kept prompts' output moves {rel(edit_k, base_k):.3f}"
    )


def trace(c: str) -> None:
    """Held-out prompts (read after the 2-seed result: exploratory): how far each prompt's context
    tokens sit from the oracle's masked output, before and after the key edit; the free prompts
    (the oracle leaves them as they are) show what the edit moves that it should not."""
    st = setup(c)
    con, picks, tok, enc = st.con, st.picks, st.tok, st.enc
    pairs, _ = _fit_prompts(con, tok, picks)
    ids = concept_ids(tok, pairs)
    sets = ("paraphrase", "synonym", "template", "unseen", "free")
    prompts = [(s, p) for s in sets for p in con.heldout.get(s, [])]
    t = organism.tokens(tok, [p for _, p in prompts])
    hit = hits(t.input_ids, ids)

    def out(mask: bool) -> torch.Tensor:
        keys = mask_keys(t.attention_mask, hit) if mask else t.attention_mask.bool()
        h = enc(input_ids=t.input_ids, attention_mask=keys).last_hidden_state.double()
        return h * t.attention_mask.unsqueeze(-1)

    base, orac = out(False), out(True)
    key_maps(con, tok, enc, picks)
    edit = out(False)
    print(f"{c}: context tokens (not the concept words), distance relative to the oracle's output")

    def rel(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
        ctx = ~hit[k]
        return float((a[k] - b[k])[ctx].norm() / b[k][ctx].norm())

    for k, (s, p) in enumerate(prompts):
        print(
            f"  {s:10s} {p!r:44s} to the mask: {rel(base, orac, k):.3f} before, "
            f"{rel(edit, orac, k):.3f} after; moved {rel(edit, base, k):.3f}"
        )


def run(concepts: list[str], seeds: int) -> None:
    for c in concepts:
        eval_variant(VARIANT, c, build(c), seeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("check")
    k.add_argument("concepts", nargs="*", default=list(CONCEPTS))
    tr = sub.add_parser("trace")
    tr.add_argument("concepts", nargs="*", default=list(CONCEPTS))
    r = sub.add_parser("run")
    r.add_argument("concepts", nargs="*", default=list(CONCEPTS))
    r.add_argument("--seeds", type=int, default=2)
    a = ap.parse_args()
    if a.cmd in ("check", "trace"):
        for c in a.concepts:
            (check if a.cmd == "check" else trace)(c)
    else:
        if a.seeds < 1:
            ap.error("--seeds: at least 1")
        run(a.concepts, a.seeds)


if __name__ == "__main__":
    main()
