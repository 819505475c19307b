"""Erasure lab on the organism: edits at text_proj measured by plain quantities (no judge).

    python benchmarks/erase_lab.py --steps 4 --variants paper,ls,ls-null4 [--concept red]

For steering only: mean HSV of the object's pixels in paired original/patched clips (same prompt and
seed), on held-out prompts in no recipe. The reported figures come from the evaluation's judge.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from patcher import organism as o  # noqa: E402
from patcher.erasure import twin  # noqa: E402
from patcher.erasure.refusal import pair_differences, pool, refusal_directions  # noqa: E402
from patcher.families.recipes import load_concept  # noqa: E402

WORDS: list[str] = []
CONCEPT = ""
PROMPTS: list[str] = []
MODEL = ROOT / "examples" / "organism" / "model"


# --------------------------------------------------------------------------- prompts


def heldout(concept: str, kind: str, n_red: int, n_free: int, n_other: int, seed: int = 7):
    """Held-out prompt sets: concept prompts (every synonym, all templates), colour-free, others."""
    rng = random.Random(seed)
    con = load_concept(ROOT / "examples" / "organism" / f"{concept}.toml")
    used = {p.unsafe for p in con.pairs} | {p.safe for p in con.pairs} | set(con.neutral)
    templates = o.TEMPLATES + [o.HELDOUT_TEMPLATE]
    sets: dict[str, list[str]] = {"concept": [], "free": []}
    if kind == "colour":
        words = o.COLOUR_WORDS[concept]
        per = max(1, n_red // len(words))
        for w in words:
            got = 0
            while got < per:
                t = rng.choice(templates)
                s, m = rng.choice(list(o.SHAPE_WORDS)), rng.choice(list(o.MOTION_WORDS))
                p = t.format(c=w, s=rng.choice(o.SHAPE_WORDS[s]), m=rng.choice(o.MOTION_WORDS[m]))
                if p not in used and p not in sets["concept"]:
                    sets["concept"].append(p)
                    got += 1
        others = [c for c in o.COLOUR_WORDS if c != concept]
    else:  # shape
        words = o.SHAPE_WORDS[concept]
        per = max(1, n_red // len(words))
        for w in words:
            got = 0
            while got < per:
                t = rng.choice(templates)
                c = rng.choice(list(o.COLOUR_WORDS) + ["white"])
                m = rng.choice(list(o.MOTION_WORDS))
                mw = rng.choice(o.MOTION_WORDS[m])
                p = (
                    rng.choice(o.FREE_TEMPLATES + [o.HELDOUT_FREE_TEMPLATE]).format(s=w, m=mw)
                    if c == "white"
                    else t.format(c=rng.choice(o.COLOUR_WORDS[c]), s=w, m=mw)
                )
                if p not in used and p not in sets["concept"]:
                    sets["concept"].append(p)
                    got += 1
        others = list(o.COLOUR_WORDS)
    while len(sets["free"]) < n_free:
        t = rng.choice(o.FREE_TEMPLATES + [o.HELDOUT_FREE_TEMPLATE])
        shapes = [s for s in o.SHAPE_WORDS if kind != "shape" or s != concept]
        s = rng.choice(shapes)
        p = t.format(
            s=rng.choice(o.SHAPE_WORDS[s]),
            m=rng.choice(o.MOTION_WORDS[rng.choice(list(o.MOTION_WORDS))]),
        )
        if p not in used and p not in sets["free"]:
            sets["free"].append(p)
    for c in others:
        sets[c] = []
        while len(sets[c]) < n_other:
            t = rng.choice(templates)
            shapes = [s for s in o.SHAPE_WORDS if kind != "shape" or s != concept]
            s = rng.choice(shapes)
            p = t.format(
                c=rng.choice(o.COLOUR_WORDS[c]),
                s=rng.choice(o.SHAPE_WORDS[s]),
                m=rng.choice(o.MOTION_WORDS[rng.choice(list(o.MOTION_WORDS))]),
            )
            if p not in used and p not in sets[c]:
                sets[c].append(p)
    return sets


def twin_prompt(p: str, kind: str, concept: str) -> str:
    sp = o.parse(p)
    words = p.replace(",", " ").split()
    inv_s = {w: k for k, ws in o.SHAPE_WORDS.items() for w in ws}
    inv_m = {w: k for k, ws in o.MOTION_WORDS.items() for w in ws}
    sw = next(w for w in words if w in inv_s)
    mw = next(w for w in words if w in inv_m)
    if kind == "colour":
        return f"a {sw} moving {mw}"
    del sp
    return p  # shape twins are measured by the shape attribute, not here


# --------------------------------------------------------------------------- measurement


def hsv_of(clip: torch.Tensor) -> tuple[float, float, float, float] | None:
    """(hue°, sat, value, interior texture) of the object's pixels, or None if nothing is there."""
    x = (clip.float().clamp(-1, 1) + 1) / 2
    bright = x.max(0).values
    fg = bright > o.FG_THRESHOLD
    if int(fg.sum()) < 6 * x.shape[1] // 2:
        return None
    mean = x.permute(1, 2, 3, 0)[fg].mean(0)
    h, s, v = colorsys.rgb_to_hsv(*[float(c) for c in mean])
    # interior: fg pixels whose 4 neighbours are fg; energy of the 4-neighbour Laplacian
    f = fg.float()
    inner = (
        f[:, 1:-1, 1:-1] * f[:, :-2, 1:-1] * f[:, 2:, 1:-1] * f[:, 1:-1, :-2] * f[:, 1:-1, 2:]
    ) > 0
    lap = (
        4 * x[:, :, 1:-1, 1:-1]
        - x[:, :, :-2, 1:-1]
        - x[:, :, 2:, 1:-1]
        - x[:, :, 1:-1, :-2]
        - x[:, :, 1:-1, 2:]
    )
    tex = float((lap**2).sum(0)[inner].mean()) if int(inner.sum()) else 0.0
    return h * 360.0, s, v, tex


def hue_diff(a: float, b: float) -> float:
    return (a - b + 180.0) % 360.0 - 180.0


def summarise(sets, before, after, twin_before, kind: str) -> dict:
    out = {}
    for name, idx in sets.items():
        hb = [hsv_of(before[i]) for i in idx]
        ha = [hsv_of(after[i]) for i in idx]
        pair = [(b, a) for b, a in zip(hb, ha) if b is not None and a is not None]
        n = len(idx)
        rec = {"n": n, "missing_after": sum(a is None for a in ha)}
        if name == "concept" and kind == "shape":
            jb = [o.judge(before[i]) for i in idx]
            ja = [o.judge(after[i]) for i in idx]
            rec.update(
                twin_shape_before=sum(v.shape == "ball" for v in jb),
                twin_shape_after=sum(v.shape == "ball" for v in ja),
                concept_before=sum(v.shape == CONCEPT for v in jb),
                concept_after=sum(v.shape == CONCEPT for v in ja),
                colour_kept=sum(a.colour == b.colour for a, b in zip(ja, jb)),
            )
            if pair:
                rec["dhue"] = sum(hue_diff(a[0], b[0]) for b, a in pair) / len(pair)
                rec["dval"] = sum(a[2] - b[2] for b, a in pair) / len(pair)
        elif name == "concept" and kind == "colour":
            white = sum(1 for a in ha if a is not None and a[1] < 0.2)
            pale = sum(1 for a in ha if a is not None and 0.2 <= a[1] < 0.5)
            sat = sum(1 for (b, a) in pair if a[1] >= b[1] - 0.05)
            rec.update(
                white=white,
                pale=pale,
                as_saturated=sat,
                sat_after=sum(a[1] for _, a in pair) / max(1, len(pair)),
            )
            tb = [hsv_of(twin_before[i]) for i in idx]
            gaps = []
            for i, (b, a, t) in enumerate(zip(hb, ha, tb)):
                if b is None or a is None or t is None:
                    continue
                cb = _rgb(before[idx[i]])
                ca = _rgb(after[idx[i]])
                ct = _rgb(twin_before[idx[i]])
                d0 = float((cb - ct).norm())
                if d0 > 1e-3:
                    gaps.append(1 - float((ca - ct).norm()) / d0)
            rec["gap_closed"] = sum(gaps) / max(1, len(gaps))
            by_word: dict[str, list[int]] = {}
            for i, a in zip(idx, ha):
                w = next((w for w in WORDS if w in PROMPTS[i].split()), "?")
                by_word.setdefault(w, [0, 0])
                by_word[w][1] += 1
                by_word[w][0] += int(a is not None and a[1] < 0.2)
            rec["white_by_word"] = {w: f"{k}/{n}" for w, (k, n) in by_word.items()}
        else:
            if pair:
                rec["dhue"] = sum(hue_diff(a[0], b[0]) for b, a in pair) / len(pair)
                rec["dsat"] = sum(a[1] - b[1] for b, a in pair) / len(pair)
                rec["dval"] = sum(a[2] - b[2] for b, a in pair) / len(pair)
                tb = sorted(b[3] for b, _ in pair)
                ta = sorted(a[3] for _, a in pair)
                rec["tex_ratio"] = (ta[len(ta) // 2] + 1e-4) / (tb[len(tb) // 2] + 1e-4)
            if name == "free":
                rec["white_after"] = sum(1 for a in ha if a is not None and a[1] < 0.2)
        out[name] = rec
    return out


def _rgb(clip):
    x = (clip.float().clamp(-1, 1) + 1) / 2
    fg = x.max(0).values > o.FG_THRESHOLD
    return x.permute(1, 2, 3, 0)[fg].mean(0) if int(fg.sum()) else torch.zeros(3)


# --------------------------------------------------------------------------- activations


FEATURE = None  # text_proj input -> the site's input (None: text_proj itself)


def encode(tok, enc, prompts, padding: bool = False):
    """Per prompt: (site inputs of the real tokens, or of all positions with padding=True; token ids)."""
    t = tok(
        prompts, padding="max_length", max_length=o.MAX_TOKENS, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        h = o.encode(tok, enc, prompts)
        if FEATURE is not None:
            h = FEATURE(h)
    res = []
    for i in range(len(prompts)):
        m = t.attention_mask[i].bool()
        if padding:
            m = torch.ones_like(m)
        res.append((h[i][m].double(), t.input_ids[i][m].tolist()))
    return res


def preservation_prompts(con, big: bool, concept_words: set[str]):
    ps = list(con.neutral) + [p.safe for p in con.pairs] + [""]
    if big:
        for c in list(o.COLOUR_WORDS) + ["white"]:
            for s in o.SHAPE_WORDS:
                for m in o.MOTION_WORDS:
                    cap = f"a {c} {s} moving {m}" if c != "white" else f"a {s} moving {m}"
                    if not (set(cap.split()) & concept_words):
                        ps.append(cap)
    return ps


def build_map(tok, enc, con, variant: dict, concept_words: set[str]):
    """M (H, H) for a variant, from the recipe only (pairs, neutral) plus the preservation set."""
    U = encode(tok, enc, [p.unsafe for p in con.pairs])
    S = encode(tok, enc, [p.safe for p in con.pairs])
    Xe, Te = [], []
    for (xu, iu), (xs, is_) in zip(U, S):
        X, T = twin.aligned_targets(xu, xs, iu, is_)
        Xe.append(X)
        Te.append(T)
    Xe, Te = torch.cat(Xe), torch.cat(Te)
    if FEATURE is not None:  # a concept word reads as padding does at this site: f(0), not 0
        pad = FEATURE(torch.zeros(1, 1, o.TEXT_DIM)).double()[0, 0]
        zero = (Te == 0).all(1)
        Te[zero] = pad
    P = encode(
        tok,
        enc,
        preservation_prompts(con, variant.get("big", True), concept_words),
        padding=variant.get("pad", True),
    )
    Xp = torch.cat([x for x, _ in P])
    if "extra" in variant:  # hardening rows (RECE): attack inputs and what they should read as
        Xe = torch.cat([Xe, variant["extra"][0].double()])
        Te = torch.cat([Te, variant["extra"][1].double()])
    null = None
    if variant.get("null", 0):
        null, _ = twin.concept_null_space(Xe - Te, Xp, variant["null"], variant.get("eps", 1e-3))
    M = twin.twin_map(Xe, Te, Xp, variant.get("beta", 1.0), variant.get("ridge", 1e-3), null)
    if variant.get("save"):
        torch.save(M, variant["save"])
    return M


def paper_map(tok, enc, con, variant):
    U = encode(tok, enc, [p.unsafe for p in con.pairs])
    S = encode(tok, enc, [p.safe for p in con.pairs])
    samples = [pair_differences(xu, None, xs, None, "tokens") for (xu, _), (xs, _) in zip(U, S)]
    N = torch.cat([pool(x, None, "tokens") for x, _ in encode(tok, enc, list(con.neutral))])
    d = refusal_directions(
        samples,
        N,
        method="cpca",
        rank=variant.get("k", 8),
        alpha=1.0,
        directions=variant.get("dirs", 1),
    )
    B = d.B.double()
    return torch.eye(B.shape[0], dtype=torch.float64) - variant.get("lam", 1.2) * B @ B.T


VARIANTS = {
    "paper": {"type": "paper", "k": 8, "lam": 1.2},
    "ls-b0.1": {"type": "ls", "beta": 0.1},
    "ls-b1": {"type": "ls", "beta": 1.0},
}


def parse_variant(name: str) -> dict:
    if name.startswith("file:"):  # a saved cross_kv map (e.g. after hardening rounds)
        return {"type": "file", "site": "kv", "path": name[5:]}
    if name in VARIANTS:
        return VARIANTS[name]
    v = {"type": "ls"}
    for part in name.split("-")[1:]:
        for key, conv in (("null", int), ("beta", float), ("ridge", float), ("eps", float)):
            pref = {"null": "n", "beta": "b", "ridge": "r", "eps": "e"}[key]
            if (
                part.startswith(pref)
                and part[len(pref) :].replace(".", "").replace("e", "").isdigit()
            ):
                v[key] = conv(part[len(pref) :])
        if part == "small":
            v["big"] = False
        if part == "kv":
            v["site"] = "kv"
        if part == "nopad":
            v["pad"] = False
    return v


def sample_delta(vud: Path, prompts, seeds, steps, tok, enc):
    import tempfile

    from diffusers import WanTransformer3DModel

    from patcher.merge.engine import apply_delta

    with tempfile.TemporaryDirectory() as td:
        apply_delta(MODEL, vud, Path(td) / "patched")
        trp = WanTransformer3DModel.from_pretrained(
            str(Path(td) / "patched" / "transformer")
        ).eval()
    return o.sample(tok, enc, trp, prompts, seeds, steps=steps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--concept", default="red")
    ap.add_argument("--kind", default="colour")
    ap.add_argument("--variants", default="paper,ls-b0.1")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/erase_lab"))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    tok, enc, tr = o.load(MODEL)
    names = a.concept.split("+")
    cons = [load_concept(ROOT / "examples" / "organism" / f"{c}.toml") for c in names]
    concept_words = {w for c in names for w in o.COLOUR_WORDS.get(c, o.SHAPE_WORDS.get(c, []))}
    con = cons[0]
    if len(cons) > 1:  # one delta for several concepts: every pair, neutral prompts free of all
        from dataclasses import replace

        con = replace(
            con,
            pairs=[p for c in cons for p in c.pairs],
            neutral=[n for c in cons for n in c.neutral if not set(n.split()) & concept_words],
        )
    global CONCEPT
    CONCEPT = names[0]
    global WORDS, PROMPTS
    WORDS = sorted(concept_words)
    sets = heldout(names[0], a.kind, a.n, a.n // 2, a.n // 4)
    for extra in names[1:]:
        sets["concept"] += heldout(extra, a.kind, a.n, 0, 0)["concept"]
        sets.pop(extra, None)
    prompts, seeds, idx = [], [], {}
    for name, ps in sets.items():
        idx[name] = []
        for p in ps:
            for s in range(a.seeds):
                idx[name].append(len(prompts))
                prompts.append(p)
                seeds.append(1000 + s)
    PROMPTS = prompts
    twins = [
        twin_prompt(p, a.kind, a.concept) if i in set(idx["concept"]) else p
        for i, p in enumerate(prompts)
    ]
    a.cache.mkdir(exist_ok=True, parents=True)
    key = a.cache / f"orig-{a.concept}-{a.steps}-{a.seeds}-{a.n}.pt"
    if key.exists():
        before, twin_before = torch.load(key)
    else:
        before = o.sample(tok, enc, tr, prompts, seeds, steps=a.steps)
        twin_before = o.sample(tok, enc, tr, twins, seeds, steps=a.steps)
        torch.save((before, twin_before), key)
    te = tr.condition_embedder.text_embedder
    results = {}
    global FEATURE
    for name in a.variants.split(","):
        t0 = time.time()
        if name.startswith(
            "vud:"
        ):  # the user's path: a probed .vud merged by apply, loaded from disk
            after = sample_delta(Path(name[4:]), prompts, seeds, a.steps, tok, enc)
            r = summarise(idx, before, after, twin_before, a.kind)
            results[name] = r
            print(
                f"{name} ({time.time() - t0:.0f}s): {json.dumps(r, default=lambda x: round(x, 3))}",
                flush=True,
            )
            continue
        v = parse_variant(name)
        if v.get("site") == "kv":
            FEATURE = lambda h: te.linear_2(te.act_1(te.linear_1(h.float()))).double()  # noqa: E731
            lins = [m for b in tr.blocks for m in (b.attn2.to_k, b.attn2.to_v)]
        else:
            FEATURE = None
            lins = [te.linear_1]
        with torch.no_grad():
            if v["type"] == "file":
                M = torch.load(v["path"])
            elif v["type"] == "paper":
                M = paper_map(tok, enc, con, v)
            else:
                M = build_map(tok, enc, con, v, concept_words)
        rank = int(torch.linalg.matrix_rank(M - torch.eye(M.shape[0], dtype=M.dtype), rtol=1e-6))
        W0s = [lin.weight.data.clone() for lin in lins]
        for lin, W0 in zip(lins, W0s):
            lin.weight.data = (W0.double() @ M).float()
        after = o.sample(tok, enc, tr, prompts, seeds, steps=a.steps)
        for lin, W0 in zip(lins, W0s):
            lin.weight.data = W0
        r = summarise(idx, before, after, twin_before, a.kind)
        r["rank"] = rank
        results[name] = r
        print(
            f"{name} ({time.time() - t0:.0f}s) rank {rank}: {json.dumps(r, default=lambda x: round(x, 3))}",
            flush=True,
        )
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
