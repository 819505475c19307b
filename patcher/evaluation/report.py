"""The report of a `vpatch eval --out DIR` run: rates per category with Wilson intervals, quality on
concept-free prompts, a markdown page and a before/after contact sheet of the worst categories.

The JSON keeps the shape of the in-memory report (``presence``: category -> before/after rate and
relative drop; ``collateral``; ``distance``), so ``vpatch push --eval-report`` takes either; the
markdown page goes into the model card as it is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .core import _mmd
from .scale import MODELS, manifest, read_rows, results_path
from .stats import mean_ci, rate

ATTRS = ("colour", "shape", "motion")


def _pairs(rows: list[dict]) -> dict[tuple[int, int], dict[str, dict]]:
    by: dict[tuple[int, int], dict[str, dict]] = {}
    for r in rows:
        by.setdefault((r["index"], r["seed"]), {})[r["model"]] = r
    return by


def _presence(rows: list[dict]) -> dict:
    b = [r["concept"] for r in rows if r["model"] == "original"]
    a = [r["concept"] for r in rows if r["model"] == "patched"]
    rb, ra = rate(b), rate(a)
    drop = (rb["rate"] - ra["rate"]) / rb["rate"] if rb["n"] and rb["rate"] > 0 else float("nan")
    return {"before": rb, "after": ra, "relative_drop": drop}


def _misses(rows: list[dict]) -> list[dict]:
    """Each concept prompt whose patched clips the judge still flags, by name, most flagged first:
    the seeds and kept videos of those clips, and how many of the original's clips it flagged."""
    by: dict[tuple[str, int], dict] = {}
    for r in rows:
        e = by.setdefault(
            (r["category"], r["index"]),
            {"category": r["category"], "prompt": r["prompt"], "clips": 0, "shown": 0}
            | {"clips_before": 0, "shown_before": 0, "seeds": [], "videos": []},
        )
        if r["model"] == "patched":
            e["clips"] += 1
            if r["concept"]:
                e["shown"] += 1
                e["seeds"].append(r["seed"])
                e["videos"].append(r["video"])
        else:
            e["clips_before"] += 1
            e["shown_before"] += int(bool(r["concept"]))
    return sorted(
        (e for e in by.values() if e["shown"]),
        key=lambda e: (-e["shown"], e["category"], e["prompt"]),
    )


def summarize(out: str | Path, judge: str | None = None, distances: bool = True) -> dict:
    """The report of a finished run folder, from ``results.<judge>.jsonl`` and the kept clips."""
    from .videos import read_mp4

    out = Path(out)
    man = manifest(out)
    judge = judge or man["judge"]
    rows = read_rows(results_path(out, judge))
    free = set(man["free_categories"])
    cats = list(dict.fromkeys(r["category"] for r in rows))
    presence = {c: _presence([r for r in rows if r["category"] == c]) for c in cats}
    concept_rows = [r for r in rows if r["category"] not in free]
    free_rows = [r for r in rows if r["category"] in free]
    pairs = _pairs(rows)
    complete = sum(len(v) == len(MODELS) for v in pairs.values())
    rep: dict = {
        "model": man["models"]["original"],
        "patched": man["models"]["patched"],
        "delta": man["models"]["patched"][6:]
        if man["models"]["patched"].startswith("delta:")
        else None,
        "concept": man.get("concept"),
        "judge": judge,
        "seeds": man["generation"]["seeds"],
        "prompts": man["prompts"],
        "jobs": {
            "rows": len(rows),
            "complete_pairs": complete,
            "expected_pairs": man["prompts"]["n"] * man["generation"]["seeds"],
        },
        "overall": _presence(concept_rows) if concept_rows else None,
        "presence": presence,
        "free_categories": sorted(free & set(cats)),
        "collateral": {},
        "distance": {},
        "misses": _misses(concept_rows),
    }
    if rows and rows[0]["judge"] == "organism":  # attribute accuracy on concept-free prompts
        from .. import organism

        for attr in ATTRS:
            rep["collateral"][attr] = {
                side: rate(
                    [
                        bool(r["verdict"]["present"])
                        and r["verdict"][attr] == getattr(organism.parse(r["prompt"]), attr)
                        for r in free_rows
                        if r["model"] == m
                    ]
                )
                for side, m in (("before", "original"), ("after", "patched"))
            }
    proto = out / f"judge.{judge}.json"
    if proto.exists():
        rep["protocol"] = json.loads(proto.read_text())
    if distances:
        fp = [
            v
            for (i, s), v in sorted(pairs.items())
            if len(v) == 2 and v["original"]["category"] in free
        ]
        if len(fp) >= 2:
            fb = torch.stack([read_mp4(out / v["original"]["video"]) for v in fp])
            fa = torch.stack([read_mp4(out / v["patched"]["video"]) for v in fp])
            rmse = [float(((x - y) ** 2).mean().sqrt()) for x, y in zip(fb, fa)]
            m, lo, hi = mean_ci(rmse)
            rep["distance"] = {
                "paired_rmse": {"mean": m, "ci95": [lo, hi], "n": len(rmse)},
                "mmd2": _mmd(fb, fa),
                "mmd2_same_model_split": _mmd(fb[0::2], fb[1::2]),
                "on": "decoded MP4 clips",
            }
    return rep


def _fmt(x: dict) -> str:
    if not x["n"]:
        return "–"
    return f"{x['rate']:.1%} [{x['ci95'][0]:.1%}, {x['ci95'][1]:.1%}] (n={x['n']})"


def table_rows(rep: dict) -> list[tuple[str, str, str, str]]:
    """(what, original, patched, change) for the rich table and the markdown page."""
    rows = []
    if rep.get("overall"):
        v = rep["overall"]
        d = v["relative_drop"]
        rows.append(
            (
                "all concept prompts",
                _fmt(v["before"]),
                _fmt(v["after"]),
                "" if math.isnan(d) else f"-{d:.0%} rel.",
            )
        )
    free = set(rep["free_categories"])
    for c, v in rep["presence"].items():
        d = v["relative_drop"]
        label = f"{c} (concept-free): concept shown" if c in free else c
        rows.append(
            (label, _fmt(v["before"]), _fmt(v["after"]), "" if math.isnan(d) else f"-{d:.0%} rel.")
        )
    for attr, v in rep["collateral"].items():
        rows.append(
            (
                f"concept-free accuracy: {attr}",
                _fmt(v["before"]),
                _fmt(v["after"]),
                f"{(v['after']['rate'] - v['before']['rate']) * 100:+.1f} pt",
            )
        )
    if rep["distance"]:
        d = rep["distance"]["paired_rmse"]
        rows.append(
            (
                "concept-free: paired RMSE original vs patched",
                "",
                f"{d['mean']:.4f} [{d['ci95'][0]:.4f}, {d['ci95'][1]:.4f}]",
                "",
            )
        )
        rows.append(
            (
                "concept-free: MMD² original vs patched (same-model split)",
                f"{rep['distance']['mmd2_same_model_split']:.4f}",
                f"{rep['distance']['mmd2']:.4f}",
                "",
            )
        )
    return rows


def markdown(rep: dict, sheet: str | None = None) -> str:
    lines = [
        f"### vpatch eval: {rep['judge']} judge",
        "",
        f"Prompts: `{rep['prompts']['source']}` ({rep['prompts']['n']} prompts, sha256 `{rep['prompts']['sha256'][:12]}`), "
        f"{rep['seeds']} seeds each; original and patched model on the same prompts and seeds; "
        f"{rep['jobs']['complete_pairs']} of {rep['jobs']['expected_pairs']} (prompt, seed) pairs judged on both. "
        "Rates: share of clips the judge flags, with Wilson 95% intervals.",
        "",
    ]
    if rep.get("protocol"):
        lines += [f"Judge protocol: {json.dumps(rep['protocol'])}", ""]
    lines += ["| category | original | patched | change |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table_rows(rep)]
    misses = rep.get("misses") or []
    if misses:  # counted, not named: this page goes into the public model card (`vpatch push`)
        n = len(misses)
        lines += [
            "",
            f"{n} concept prompt{'s' if n != 1 else ''} still flagged after the edit on at least one "
            "seed (listed by name in the run's report JSON, `misses`).",
        ]
    if sheet:
        lines += ["", f"Before/after contact sheet of the worst categories: `{sheet}`"]
    return "\n".join(lines) + "\n"


def worst_categories(rep: dict, n: int = 3) -> list[str]:
    """Concept categories where the patched model still shows the concept most."""
    free = set(rep["free_categories"])
    cats = [c for c in rep["presence"] if c not in free and rep["presence"][c]["after"]["n"]]
    return sorted(cats, key=lambda c: (-rep["presence"][c]["after"]["rate"], c))[:n]


def contact_sheet(
    out: str | Path,
    rep: dict,
    path: str | Path,
    categories: int = 3,
    per_category: int = 2,
    frames: int = 4,
    cell: int = 64,
) -> Path:
    """A PNG: for each of the worst categories, a few (prompt, seed) pairs; per pair, ``frames``
    evenly spaced frames of the original clip, then of the patched one. A text file beside it lists
    the rows."""
    from PIL import Image, ImageDraw

    from ..output import atomic_file
    from .videos import read_mp4, to_uint8

    out = Path(out)
    rows = read_rows(results_path(out, rep["judge"]))
    pairs = _pairs(rows)
    chosen = []
    for c in worst_categories(rep, categories):
        ps = [
            v for _k, v in sorted(pairs.items()) if len(v) == 2 and v["original"]["category"] == c
        ]
        ps.sort(key=lambda v: (not v["patched"]["concept"], not v["original"]["concept"]))
        chosen += [(c, v) for v in ps[:per_category]]
    label_w, gap = 8 * 28, 6
    W = label_w + 2 * frames * cell + gap
    H = max(1, len(chosen)) * cell
    sheet = Image.new("RGB", (W, H + 16), (32, 32, 32))
    dr = ImageDraw.Draw(sheet)
    dr.text((label_w, 2), "original", fill=(255, 255, 255))
    dr.text((label_w + frames * cell + gap, 2), "patched", fill=(255, 255, 255))
    lines = ["rows (left: original, right: patched):"]
    for row, (c, v) in enumerate(chosen):
        y = 16 + row * cell
        dr.text((4, y + 4), f"{c}"[:27], fill=(255, 255, 255))
        dr.text((4, y + 18), f"seed {v['original']['seed']}", fill=(200, 200, 200))
        dr.text(
            (4, y + 32),
            f"flag: {int(v['original']['concept'])} -> {int(v['patched']['concept'])}",
            fill=(200, 200, 200),
        )
        lines.append(f"{c}: {v['original']['prompt']} (seed {v['original']['seed']})")
        for side, x0 in (("original", label_w), ("patched", label_w + frames * cell + gap)):
            clip = to_uint8(read_mp4(out / v[side]["video"])).numpy()
            F = clip.shape[0]
            idx = [round(i * (F - 1) / max(1, frames - 1)) for i in range(frames)]
            for k, f in enumerate(idx):
                im = Image.fromarray(clip[f]).resize((cell, cell), Image.NEAREST)
                sheet.paste(im, (x0 + k * cell, y))
    path = Path(path)
    with atomic_file(path, overwrite=True) as tmp:
        sheet.save(tmp, format="PNG")
    path.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return path


def write_reports(out: str | Path, rep: dict, sheet: bool = True) -> dict[str, str]:
    """report.<judge>.json, report.<judge>.md and contact-sheet.<judge>.png in the run folder."""
    from ..output import atomic_file

    out = Path(out)
    j = rep["judge"]
    files = {}
    if sheet and worst_categories(rep):
        files["sheet"] = str(contact_sheet(out, rep, out / f"contact-sheet.{j}.png"))
    md = markdown(rep, Path(files["sheet"]).name if "sheet" in files else None)
    rep = {**rep, "markdown": md}
    for name, text in (
        (f"report.{j}.json", json.dumps(rep, indent=2, default=float) + "\n"),
        (f"report.{j}.md", md),
    ):
        with atomic_file(out / name, overwrite=True) as tmp:
            tmp.write_text(text)
        files[name.split(".")[-1]] = str(out / name)
    return files
