"""Why the twin map misses synonyms, at the level of what cross-attention reads (no sampling).

    python benchmarks/twin_reach.py [--concept examples/organism/red.toml]

For held-out concept words (the recipe's word and its synonyms, in six templates the pairs do not
use) it prints the fraction of the K/V distance from the word's reading to padding's reading (the
twin of a concept word) that an edit closes, summed over every cross-attention K and V, and how far
the edit moves the tokens of prompts in other colours (relative K/V change). Variants: the twin map
(erasure/twin.py) as the probe builds it, with a whitened null space, at other strengths, and
restricted to the concept's top-k whitened directions (M − I = A Bᵀ with B fixed). Then where the
synonyms' residual lies: along the mean concept direction u or across it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patcher import organism  # noqa: E402
from patcher.erasure.twin import align_tokens, aligned_targets, concept_null_space  # noqa: E402
from patcher.probe import (  # noqa: E402
    CaptureOptions,
    ProbeParams,
    WeightReader,
    build_delta,
    capture,
    open_model,
)
from patcher.probe.build import _with_ids  # noqa: E402

TEMPLATES = [
    "a {c} ball moving up",
    "the box is {c} and it moves up",
    "{c} stick going left",
    "a sphere colored {c} moving left",
    "moving down , the {c} square",
    "a {c} rod moving right",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=ROOT / "examples/organism/model")
    ap.add_argument("--concept", type=Path, default=ROOT / "examples/organism/red.toml")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    from patcher.families.recipes import load_concept

    con = load_concept(a.concept)
    value = con.judge["organism"]["value"]
    words = organism.COLOUR_WORDS[value]
    others = [c for c in organism.COLOUR_WORDS if c != value]
    o = CaptureOptions(sites=("cross_kv",), device="cpu", token_roles=True)
    w = WeightReader(open_model(a.model, o))
    acts = capture(w.source, a.concept, o, w)
    g = acts.groups[0]
    tok, enc, tr = organism.load(a.model)
    te = tr.condition_embedder.text_embedder
    pad = te(torch.zeros(1, 1, organism.TEXT_DIM))[0, 0].double()
    Ws = [w.target(t).double() for t in g.targets]
    H = pad.shape[0]
    eye = torch.eye(H, dtype=torch.float64)

    def readings(c: str, word_only: bool) -> torch.Tensor:
        ps = [t.format(c=c) for t in TEMPLATES]
        t = organism.tokens(tok, ps)
        X = te(organism.encode(tok, enc, ps)).double()
        wid = tok.convert_tokens_to_ids(tok.tokenize(c))[0]
        rows = []
        for i in range(len(ps)):
            for j in range(int(t.attention_mask[i].sum())):
                if not word_only or int(t.input_ids[i, j]) == wid:
                    rows.append(X[i, j])
        return torch.stack(rows)

    concept_rows = {c: readings(c, True) for c in words}
    other_rows = {c: readings(c, False) for c in others}

    def kv(x: torch.Tensor) -> float:
        return sum(float((x @ W.T).norm()) for W in Ws)

    def show(name: str, M: torch.Tensor) -> None:
        cells = [f"{c} {1 - kv(X @ M.T - pad) / kv(X - pad):.3f}" for c, X in concept_rows.items()]
        moved = [f"{c} {kv(X @ M.T - X) / kv(X):.3f}" for c, X in other_rows.items()]
        print(f"{name:28s} closed: {', '.join(cells)} | others moved: {', '.join(moved)}")

    def built(**kw) -> torch.Tensor:
        e = build_delta(acts, ProbeParams(method="twin", **kw), w).entries[0]
        return eye + e.strength * e.P.double() @ e.V.double().T

    # the fit's own rows, as twin_edit builds them, for the restricted variant
    preserve = [c.tokens for r in ("neutral", "safe", "empty") for p in g.roles[r] for c in p]
    padc = g.roles["pad"][0][0].tokens[0].double()
    Xe, Te = [], []
    for (xu, iu), (xs, is_) in zip(_with_ids(g, "unsafe"), _with_ids(g, "safe")):
        X, T = aligned_targets(xu, xs, iu, is_)
        T[torch.tensor([j is None for _, j in align_tokens(iu, is_)], dtype=torch.bool)] = padc
        Xe.append(X)
        Te.append(T)
    Xe_, Te_ = torch.cat(Xe), torch.cat(Te)
    Xp = torch.cat([p.double() for p in preserve])
    Xp = torch.cat([Xp, padc.expand(Xp.shape[0], -1)])

    def restricted(k: int, beta: float = 1.0, ridge: float = 1e-3) -> torch.Tensor:
        B, _ = concept_null_space(Xe_ - Te_, Xp, k)
        Ze, Zp = Xe_ @ B, Xp @ B
        r = ridge * float(torch.trace(Xp.T @ Xp / len(Xp))) / H
        G = Ze.T @ Ze / len(Ze) + beta * Zp.T @ Zp / len(Zp) + r * torch.eye(k, dtype=torch.float64)
        A = ((Te_ - Xe_).T @ Ze / len(Ze)) @ torch.linalg.inv(G)
        return eye + A @ B.T

    print(f"{con.name}: {len(Xe_)} edit rows, {len(Xp)} preservation rows; words {words}")
    show("identity", eye)
    M = built()
    show("twin (probe default)", M)
    for k in (1, 4):
        show(f"twin, null={k}", built(null=k))
    for s in (1.05, 1.1, 1.2):
        show(f"twin, strength {s}", eye + s * (M - eye))
    for k in (1, 16):
        show(f"restricted to k={k} dirs", restricted(k))
    u = (concept_rows[words[0]] - pad).mean(0)
    u = u / u.norm()
    for c, X in concept_rows.items():
        r = X @ M.T - pad
        along = (r @ u)[:, None] * u
        print(
            f"{c}: K/V residual {kv(r):.2f}, of it along u {kv(along):.2f}; "
            f"reading - padding along u: {float(((X - pad) @ u).mean()):.2f}"
        )


if __name__ == "__main__":
    main()
