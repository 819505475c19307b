"""Which token carries a held-out miss: a token-level trace of a twin delta on the organism.

    python benchmarks/token_trace.py CONCEPT DELTA.vud [--seeds N]

For each held-out prompt of examples/organism/CONCEPT.toml, the patched clips (N seeds) are judged
and compared, seed by seed, with the original model's clip of the prompt's safe twin: a clip
whose colour name differs from its twin clip's is a miss. For a prompt with a miss, one token at a
time of the patched model's `cross_kv` input (the text embedder's output, which every
cross-attention K/V reads) is set to what the twin gives there (the aligned twin token's reading
in the original model; padding's reading for a removed word), and the clips are judged again. A
token whose fix alone makes every clip match its twin clip carries the miss. Two checks follow for
such a token: a **control**, the same token moved as far (the fix's norm) in a random direction
(if that also makes every clip match, the prompt was borderline and the token is not singled
out); and its **unedited** reading (the original model's reading of the unsafe prompt there,
passed through the inverse of the edit so that the patched weights read it as the original ones
did): if that also matches, the edit itself moved the token into the miss; if not, the token
carried the concept before the edit and the edit did not remove it.

Only the conditional branch of guidance is intervened on. The delta must hold only `map_input`
entries at `cross_kv` (every attn2 K/V sharing one map), as `--layers cross_kv` twin deltas do.
Used for docs/erasure.md ("Keeping the words the scan does not pick"); output in
benchmarks/results/token_trace_<name>.txt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patcher import organism  # noqa: E402
from patcher.erasure.twin import align_tokens  # noqa: E402
from patcher.evaluation.organism_judge import judge  # noqa: E402
from patcher.evaluation.prompts import OrganismTwins  # noqa: E402
from patcher.families.recipes import load_concept  # noqa: E402
from patcher.vud.delta import read_delta  # noqa: E402

SETS = ("paraphrase", "synonym", "template", "unseen")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("concept")
    ap.add_argument("delta", type=Path)
    ap.add_argument("--seeds", type=int, default=4)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    con = load_concept(ROOT / f"examples/organism/{a.concept}.toml")
    twin_of = OrganismTwins(con)
    tok, enc, tr = organism.load(ROOT / "examples/organism/model")
    te = tr.condition_embedder.text_embedder
    delta = read_delta(a.delta)
    kv = ("attn2.to_k.weight", "attn2.to_v.weight")
    if not delta.entries or any(
        e.kind != "map_input" or not e.key.endswith(kv) for e in delta.entries
    ):
        sys.exit("token_trace: needs a twin delta with map_input entries at cross_kv only")
    # every entry is W' = W (I + λ P Qᵀ) with the same map
    e = delta.entries[0]
    M = torch.eye(e.P.shape[0], dtype=torch.float64) + e.strength * e.P.double() @ e.V.double().T
    if any(
        not torch.allclose(x.strength * x.P.double() @ x.V.double().T, M - torch.eye(len(M)))
        for x in delta.entries
    ):
        sys.exit("token_trace: the entries do not share one map")
    M_inv = torch.linalg.inv(M)
    rng = torch.Generator().manual_seed(0)
    seeds = list(range(a.seeds))
    wanted = con.judge["organism"]
    if wanted.get("attribute") != "colour":
        sys.exit("token_trace: a colour concept (the judge's colour names tell a miss)")
    state: dict = {}

    def hook(_mod, _inp, out):
        if not state.get("rows"):
            return out
        out = out.clone()
        for i, v in state["rows"]:
            out[: out.shape[0] // 2, i] = v  # the conditional half of [cond, uncond]
        return out

    handle = te.register_forward_hook(hook)

    def clips(prompt: str, rows: list | None = None) -> list:
        state["rows"] = rows
        try:
            with organism.edited({"transformer": tr}, delta.entries):
                out = organism.sample(tok, enc, tr, [prompt] * len(seeds), seeds)
        finally:
            state["rows"] = None
        return [judge(c) for c in out]

    def name(v) -> str:
        return f"{v.tone} {v.family}".strip() if v.present else "none"

    pad = te(organism.encode(tok, enc, [""]))[0, -1]  # padding's reading: a removed word's twin
    twin_names: dict[str, list[str]] = {}
    print(f"{a.concept} with {a.delta.name}, {a.seeds} seeds; concept {wanted}")

    def matches(got: list[str], t: str) -> bool:
        return all(g == w for g, w in zip(got, twin_names[t]))

    try:
        for s in SETS:
            for p in con.heldout.get(s, []):
                t = twin_of(p)
                if t is None:
                    continue
                if t not in twin_names:
                    twin = organism.sample(tok, enc, tr, [t] * len(seeds), seeds)
                    twin_names[t] = [name(v) for v in map(judge, twin)]
                got = [name(v) for v in clips(p)]
                miss = not matches(got, t)
                print(
                    f"{s:10s} {p!r}: {', '.join(got)}"
                    + (f"  <- miss (twin: {', '.join(twin_names[t])})" if miss else "")
                )
                if not miss:
                    continue
                tu, tt = organism.tokens(tok, [p]), organism.tokens(tok, [t])
                iu = tu.input_ids[0][tu.attention_mask[0].bool()].tolist()
                it = tt.input_ids[0][tt.attention_mask[0].bool()].tolist()
                words = tok.convert_ids_to_tokens(iu)
                orig_t = te(organism.encode(tok, enc, [t]))[0]
                orig_u = te(organism.encode(tok, enc, [p]))[0]
                # what K/V should read at each token (the edit sits in K/V, after the hooked
                # output, so a row fed there is read as M row: feed M⁻¹ of what is wanted)
                target = {i: (orig_t[j] if j is not None else pad) for i, j in align_tokens(iu, it)}
                for i, v in target.items():
                    fix = (M_inv @ v.double()).float()
                    if not matches([name(x) for x in clips(p, [(i, fix)])], t):
                        continue
                    # the fix's size, in a random direction, from where the edit puts the token
                    at = M @ orig_u[i].double()
                    step = (at - v.double()).norm()
                    d = torch.randn(len(at), generator=rng, dtype=torch.float64)
                    ctrl = (M_inv @ (at + step * d / d.norm())).float()
                    control = [name(x) for x in clips(p, [(i, ctrl)])]
                    unedited = (M_inv @ orig_u[i].double()).float()
                    left = [name(x) for x in clips(p, [(i, unedited)])]
                    why = (
                        "the edit moved it"
                        if matches(left, t)
                        else "it carried the concept before the edit"
                    )
                    flag = (
                        "  (borderline: a random move as large also matches)"
                        if matches(control, t)
                        else ""
                    )
                    print(
                        f"    token {i} {words[i]!r}: fixed alone -> twin; random move -> "
                        f"{', '.join(control)}; unedited -> {', '.join(left)} ({why}){flag}"
                    )
    finally:
        handle.remove()


if __name__ == "__main__":
    main()
