"""Stop the concept word spreading into its context: T5 value maps under the recommended twin map.

    python benchmarks/t5_value.py oracle CONCEPT [--seeds 4]    # the cause, no edit of T5
    python benchmarks/t5_value.py run [CONCEPT ...] [--seeds 2]  # build the variant, vpatch eval it

benchmarks/token_trace.py found that red's held-out misses under the recommended delta
(`--method twin --layers cross_kv --scan 64`) sit in context tokens: "," in the never-trained
template and "colored" carry red, which T5's self-attention wrote into them from the colour word.

`oracle`: the concept words (the pairs' words and the scan's picks) are masked as keys of T5's
self-attention, so no other token reads them, with the recommended delta applied; each held-out
prompt is judged seed by seed against the original model's clip of its safe twin (as token_trace
does). Masking is not an edit: it says whether the spread is the cause. A second column sets the
words' values to exactly 0 in every block instead: the target the variant's value maps aim at,
added after the pre-registration (exploratory). Unlike the mask, the words then still take their
share of attention, and each word loses its own value too.

`run` builds the variant "t5_value_scan" as one delta and measures it with `vpatch eval --seeds N
--steps 16` (report benchmarks/results/eval_twin_t5_value_scan_<concept>.json, counted by
`python benchmarks/twin_variants.py table t5_value_scan`):
1. the recommended probe on the original model gives the scan's picks at `cross_kv`;
2. each T5 block's self-attention value weight gets W' = W M, M fitted block by block on what the
   block reads through the blocks already edited: the concept word and the picked words at their
   slot in the pairs' unsafe prompts go to 0 (what a masked key contributes; a word the twin
   replaces, as square -> ball, goes to the twin word's reading), every other token of those
   prompts and every token of the recipe's neutral prompts, safe twins and the empty prompt keeps
   its reading (least squares, β = 1, ridge 10⁻³ of the kept tokens' scale, as the twin map);
3. `vpatch apply` writes that T5 edit to a copy, the recommended probe runs on the copy (its
   `cross_kv` map is fitted on the edited encoder, with the picks of step 1: the concept's words
   are decided once, on the unedited model), and `vpatch merge` unites both deltas.
Deltas, copies and contact sheets go to /tmp/vpatch-twin-variants/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from twin_variants import CONCEPTS, MODEL, WORK, eval_variant  # noqa: E402

from patcher import organism  # noqa: E402
from patcher.erasure.scan import concept_positions, substitute  # noqa: E402
from patcher.erasure.twin import align_tokens  # noqa: E402
from patcher.evaluation.organism_judge import judge  # noqa: E402
from patcher.evaluation.prompts import OrganismTwins  # noqa: E402
from patcher.families.recipes import Concept, load_concept  # noqa: E402
from patcher.probe import CaptureOptions, ProbeParams, probe  # noqa: E402
from patcher.vud.delta import Delta, map_input_entry, read_delta, versions, write_delta  # noqa: E402

VARIANT = "t5_value_scan"
RECOMMENDED = ["--method", "twin", "--layers", "cross_kv", "--scan", "64"]
SETS = ("paraphrase", "synonym", "template", "unseen")
CLI = [sys.executable, "-m", "patcher.cli"]


def _probe(model: Path, recipe: str, out: Path) -> dict:
    subprocess.run(
        [
            *CLI,
            "probe",
            str(model),
            "-c",
            recipe,
            "-o",
            str(out),
            *RECOMMENDED,
            "-q",
            "--overwrite",
        ],
        check=True,
        cwd=ROOT,
    )
    return read_delta(out).method


def _probe_with_picks(model: Path, recipe: str, out: Path, picks: list[str]) -> None:
    """The recommended probe, its scan's picks fixed to PICKS (the original model's): the words
    that are the concept's are decided once, on the unedited model, as a repairing cascade scores
    the original readings. The edited encoder's own scores are kept in the record."""
    from patcher.erasure import scan

    real = scan.scan_scores

    def fixed(*args, **kwargs):
        res = real(*args, **kwargs)
        print(f"  cross_kv on the edited encoder: own picks {list(res.picked)}, kept {picks}")
        return scan.ScanResult(res.scores, tuple(picks), res.unit)

    scan.scan_scores = fixed
    try:
        probe(
            model,
            recipe,
            out,
            CaptureOptions(sites=("cross_kv",)),
            ProbeParams(method="twin", scan=64),
            overwrite=True,
        )
    finally:
        scan.scan_scores = real


def _picks(method: dict) -> list[str]:
    return list(method["scan_picked"]["transformer:cross_kv"]["picked"])


def _slots(tok, pairs: list[tuple[str, str]]) -> list[tuple[list[int], set[int], list]]:
    """Per (unsafe, safe) pair: the unsafe token ids, the concept's positions in them, and the
    token alignment to the safe prompt (``align_tokens``)."""
    out = []
    for u, s in pairs:
        iu = organism.tokens(tok, [u]).input_ids[0].tolist()
        is_ = organism.tokens(tok, [s]).input_ids[0].tolist()
        out.append((iu, set(concept_positions(iu, is_)), align_tokens(iu, is_)))
    return out


@dataclass
class Setup:
    """A concept's recipe, the recommended probe's picks on the original model, and the model."""

    recipe: str
    con: Concept
    scan: Path  # the recommended delta (WORK/scan_<concept>.vud)
    picks: list[str]
    tok: object
    enc: torch.nn.Module
    tr: torch.nn.Module


def setup(c: str) -> Setup:
    """Probe C with the recommended command (its picks decide the concept's words once, on the
    unedited model) and load the organism, gradients off."""
    recipe = str(ROOT / f"examples/organism/{c}.toml")
    WORK.mkdir(exist_ok=True)
    scan = WORK / f"scan_{c}.vud"
    picks = _picks(_probe(MODEL, recipe, scan))
    tok, enc, tr = organism.load(MODEL)
    torch.set_grad_enabled(False)
    return Setup(recipe, load_concept(recipe), scan, picks, tok, enc, tr)


def concept_ids(tok, pairs: list[tuple[str, str]]) -> set[int]:
    """The token ids at the concept's positions of PAIRS (picked words' included)."""
    return {iu[i] for iu, pos, _ in _slots(tok, pairs) for i in pos}


def hits(input_ids: torch.Tensor, ids: set[int]) -> torch.Tensor:
    """Where (P, n) the tokens are one of IDS."""
    hit = torch.zeros_like(input_ids, dtype=torch.bool)
    for i in ids:
        hit |= input_ids == i
    return hit


def mask_keys(valid: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """A 4-D attention mask (P, 1, n, n): every valid token is read, except that no token other
    than itself reads a HIT position (the oracle's mask; each concept word still reads itself)."""
    n = valid.shape[1]
    keys = valid.bool()[:, None, None, :].expand(-1, 1, n, -1).clone()
    return keys & ~(hit[:, None, None, :] & ~torch.eye(n, dtype=torch.bool))


def map_delta(
    diffs: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], concept: dict, method: dict
) -> Delta:
    """Input-side maps W (I + A) of the text encoder, A = DIFFS[key], as one delta (U = W P)."""
    entries = []
    for key, A in diffs.items():
        u, s, vt = torch.linalg.svd(A)
        r = int((s > 1e-9 * s[0]).sum())
        entries.append(
            map_input_entry(f"text_encoder/{key}", weights[key], u[:, :r] * s[:r], vt[:r].T, 1.0)
        )
    return Delta(entries, concept=concept, method=method, versions=versions())


def _fit_prompts(con, tok, picks: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(unsafe, safe) pairs, the picked words substituted for the concept word too; kept prompts."""
    pairs = [(p.unsafe, p.safe) for p in con.pairs]
    words = sorted(
        {tok.convert_ids_to_tokens(iu[i]) for iu, pos, _ in _slots(tok, pairs) for i in pos}
    )
    extra = [(substitute(u, words, w), s) for w in picks for u, s in pairs]
    return pairs + [(u, s) for u, s in extra if u], list(con.neutral) + [s for _, s in pairs] + [""]


def _value_rows(enc, tok, block: int, prompts: list[str]) -> list[torch.Tensor]:
    """What block BLOCK's self-attention value weight reads, per prompt (valid tokens only)."""
    got: list[torch.Tensor] = []
    v = enc.encoder.block[block].layer[0].SelfAttention.v
    h = v.register_forward_hook(lambda _m, i, _o: got.append(i[0]))
    try:
        t = organism.tokens(tok, prompts)
        enc(input_ids=t.input_ids, attention_mask=t.attention_mask)
    finally:
        h.remove()
    m = t.attention_mask.bool()
    return [got[0][k][m[k]].double() for k in range(len(prompts))]


def value_maps(con, tok, enc, picks: list[str]) -> dict[str, torch.Tensor]:
    """Each block's value map M (in, in), fitted on inputs read through the earlier blocks' edits;
    ENC's value weights are left edited (W M)."""
    pairs, kept = _fit_prompts(con, tok, picks)
    slots = _slots(tok, pairs)  # token ids and alignment: the same in every block
    maps: dict[str, torch.Tensor] = {}
    for b in range(len(enc.encoder.block)):
        ur = _value_rows(enc, tok, b, [u for u, _ in pairs])
        sr = _value_rows(enc, tok, b, [s for _, s in pairs])
        xs, ys, keep = [], [], list(_value_rows(enc, tok, b, kept))
        for (_iu, pos, aligned), x, y in zip(slots, ur, sr):
            for i, j in aligned:
                if i in pos:  # a deleted word: 0 (a masked key); a replaced one: the twin word's
                    xs.append(x[i])
                    ys.append(torch.zeros_like(x[i]) if j is None else y[j])
            keep.append(x[[i for i in range(len(x)) if i not in pos]])
        xe, ye, xp = torch.stack(xs), torch.stack(ys), torch.cat(keep)
        d = xp.shape[1]
        ridge = 1e-3 * xp.pow(2).sum(1).mean() / d
        B = xp.T @ xp / len(xp) + ridge * torch.eye(d, dtype=torch.float64)
        # min (1/n_e) Σ‖M x_e − y_e‖² + (1/n_p) Σ‖M x_p − x_p‖² + ridge ‖M − I‖²
        M = (ye.T @ xe / len(xe) + B) @ torch.linalg.inv(xe.T @ xe / len(xe) + B)
        key = f"encoder.block.{b}.layer.0.SelfAttention.v.weight"
        w = enc.encoder.block[b].layer[0].SelfAttention.v.weight
        with torch.no_grad():
            w.copy_((w.double() @ M).float())
        maps[key] = M
        left = (xe @ M.T - ye).norm() / (xe - ye).norm()
        moved = (xp @ M.T - xp).norm() / xp.norm()
        print(
            f"  block {b}: {len(xe)} concept rows: {left:.3f} of their distance to target left; {len(xp)} kept rows move {moved:.3f}"
        )
    return maps


def value_delta(
    maps: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], concept: dict
) -> Delta:
    # M − I is full rank here: two (d, d) factors a block
    diffs = {k: M - torch.eye(len(M), dtype=M.dtype) for k, M in maps.items()}
    method = {"name": "t5_value", "family": "wan", "script": Path(__file__).name}
    return map_delta(diffs, weights, concept, method)


def build(c: str) -> Path:
    s = setup(c)
    recipe, picks = s.recipe, s.picks
    print(f"{c}: scan picks at cross_kv {picks}")
    weights = {k: v.detach().clone() for k, v in s.enc.state_dict().items()}
    maps = value_maps(s.con, s.tok, s.enc, picks)
    t5 = WORK / f"t5_value_{c}.vud"
    write_delta(t5, value_delta(maps, weights, read_delta(s.scan).concept), overwrite=True)
    copy = WORK / f"t5_value_{c}_model"
    shutil.rmtree(copy, ignore_errors=True)
    subprocess.run(
        [*CLI, "apply", str(MODEL), str(t5), "-o", str(copy), "-q"], check=True, cwd=ROOT
    )
    kv = WORK / f"t5_value_kv_{c}.vud"
    _probe_with_picks(copy, recipe, kv, picks)
    out = WORK / f"{VARIANT}_{c}.vud"
    subprocess.run(
        [*CLI, "merge", str(t5), str(kv), "-o", str(out), "--overwrite"],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    shutil.rmtree(copy)
    return out


def run(concepts: list[str], seeds: int) -> None:
    for c in concepts:
        eval_variant(VARIANT, c, build(c), seeds)


def oracle(c: str, seeds: int) -> None:
    s = setup(c)
    con, tok, enc, tr = s.con, s.tok, s.enc, s.tr
    twin_of = OrganismTwins(con)
    entries = read_delta(s.scan).entries
    pairs, _ = _fit_prompts(con, tok, s.picks)
    ids = concept_ids(tok, pairs)
    words = tok.convert_ids_to_tokens(sorted(ids))
    real = organism.encode

    def encode(mode: str):
        def run(tok_, enc_, prompts):
            t = organism.tokens(tok_, prompts)
            hit = hits(t.input_ids, ids)
            keys = t.attention_mask.bool()
            hooks = []
            if mode == "mask":  # no other token reads a concept word; it still reads itself
                keys = mask_keys(t.attention_mask, hit)
            else:  # "zero": the words' values are 0, but they keep their share of attention

                def zero(_m, _i, out):
                    return out * (~hit).unsqueeze(-1).to(out.dtype)

                hooks = [
                    b.layer[0].SelfAttention.v.register_forward_hook(zero)
                    for b in enc_.encoder.block
                ]
            try:
                h = enc_(input_ids=t.input_ids, attention_mask=keys).last_hidden_state
            finally:
                for k in hooks:
                    k.remove()
            return h * t.attention_mask.unsqueeze(-1).to(h.dtype)

        return run

    modes = {"delta": real, "delta + mask": encode("mask"), "delta + value 0": encode("zero")}

    def names(p: str, how) -> list[str]:
        """P's clips: the original model's (HOW None), else the patched one's with HOW encoding."""
        try:
            if how is None:
                out = organism.sample(tok, enc, tr, [p] * seeds, list(range(seeds)))
            else:
                organism.encode = how
                with organism.edited({"transformer": tr}, entries):
                    out = organism.sample(tok, enc, tr, [p] * seeds, list(range(seeds)))
        finally:
            organism.encode = real
        return [f"{v.tone} {v.family}".strip() if v.present else "none" for v in map(judge, out)]

    print(
        f"{c}: recommended delta; words {words} masked as T5 keys, or their values 0; {seeds} seeds"
    )
    hits = dict.fromkeys(modes, 0)
    n = 0
    for s in SETS:
        for p in con.heldout.get(s, []):
            t = twin_of(p)
            if t is None:
                continue
            tw = names(t, None)
            row = []
            for k, how in modes.items():
                got = names(p, how)
                h = sum(x == y for x, y in zip(got, tw))
                hits[k] += h
                row.append(f"{k.replace('delta + ', '+ ')} {h}/{seeds} {got}")
            n += seeds
            print(f"{s:10s} {p!r}: " + "; ".join(row) + f"; twin {tw}", flush=True)
    print(
        "as twin (clip by clip against the twin's clip): "
        + json.dumps({k: f"{v}/{n}" for k, v in hits.items()})
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("oracle")
    o.add_argument("concept", choices=CONCEPTS)
    o.add_argument("--seeds", type=int, default=4)
    r = sub.add_parser("run")
    r.add_argument("concepts", nargs="*", default=list(CONCEPTS))
    r.add_argument("--seeds", type=int, default=2)
    a = ap.parse_args()
    if a.seeds < 1:
        ap.error("--seeds: at least 1")
    if a.cmd == "oracle":
        oracle(a.concept, a.seeds)
    else:
        run(a.concepts, a.seeds)


if __name__ == "__main__":
    main()
