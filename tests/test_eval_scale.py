"""`vpatch eval --out`: kept MP4 clips, JSONL rows, resume, rejudge, sharding, on the shipped organism
and a tiny Wan pipeline (offline)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("imageio_ffmpeg")

from patcher import organism  # noqa: E402
from patcher.evaluation import scale  # noqa: E402
from patcher.evaluation.judges import OrganismJudge  # noqa: E402
from patcher.evaluation.prompt_files import load_prompts  # noqa: E402
from patcher.evaluation.scale import Dist, RunOptions, ScaleError, read_rows, rejudge, run  # noqa: E402
from patcher.evaluation.videos import read_mp4, to_uint8, write_mp4  # noqa: E402
from patcher.families.recipes import load_concept  # noqa: E402
from tests import tiny_pipes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "organism" / "model"
RED = load_concept(ROOT / "examples" / "organism" / "red.toml")
OPT = RunOptions(seeds=2, steps=2, batch=3)
LEVELS = 4  # codec tolerance in 8-bit levels: lossless H.264 4:4:4 only rounds RGB <-> YUV


def _prompts(tmp: Path) -> Path:
    p = tmp / "prompts.jsonl"
    p.write_text(
        "".join(
            json.dumps({"prompt": t, "category": c}) + "\n"
            for t, c in [
                ("a red ball moving left", "red-plain"),
                ("a crimson square moving up", "red-synonym"),
                ("moving right , the scarlet stick", "red-synonym"),
                ("a blue ball moving down", "free"),
                ("the rod is emerald and it moves right", "free"),
            ]
        )
    )
    return p


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (to_uint8(a).int() - to_uint8(b).int()).abs()


def test_mp4_round_trip_within_codec_tolerance(tmp_path):
    clip = organism.render(organism.Spec("red", "ball", "left"), random.Random(0))
    clip = (clip + 0.1 * torch.randn(clip.shape, generator=torch.Generator().manual_seed(0))).clamp(
        -1, 1
    )
    write_mp4(tmp_path / "c.mp4", clip)
    back = read_mp4(tmp_path / "c.mp4")
    assert back.shape == clip.shape
    e = _levels(back, clip)
    assert e.max() <= LEVELS and e.float().mean() < 1.0, (e.max(), e.float().mean())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def _strip(rows):
    return [{k: v for k, v in r.items()} for r in rows]


def test_rows_videos_resume_and_shards_on_the_organism(tmp_path, monkeypatch):
    prompts = load_prompts(_prompts(tmp_path))
    full = run(MODEL, prompts, tmp_path / "full", patched=MODEL, concept=RED, options=OPT)
    # one row per (prompt, seed, model), in a fixed order, each naming its MP4
    assert len(full) == 5 * 2 * 2
    assert [(r["model"], r["index"]) for r in full[:4]] == [("original", 0)] * 2 + [
        ("original", 1)
    ] * 2
    assert {r["category"] for r in full} == {"red-plain", "red-synonym", "free"}
    rows_file = read_rows(tmp_path / "full" / "results.organism.jsonl")
    assert rows_file == full
    # the kept clips decode back to what the model generated (same batch, same seeds)
    models = organism.load(MODEL)
    jobs = scale.jobs_for(prompts, OPT)
    gen = organism.sample(
        *models, [j.prompt for j in jobs[:3]], [j.seed for j in jobs[:3]], steps=2
    )
    for j, clip in zip(jobs[:3], gen):
        (row,) = [
            r
            for r in full
            if r["model"] == "original" and (r["index"], r["seed"]) == (j.index, j.seed)
        ]
        assert _levels(read_mp4(tmp_path / "full" / row["video"]), clip).max() <= LEVELS
        assert row["verdict"] == OrganismJudge(RED).verdicts(clip.unsqueeze(0))[0]
        assert row["concept"] == (row["verdict"]["present"] and row["verdict"]["colour"] == "red")

    # an interrupted run (7 clips, then a torn line and a lost clip) plus its resumed run
    part = tmp_path / "part"
    assert len(run(MODEL, prompts, part, patched=MODEL, concept=RED, options=OPT, max_clips=7)) == 7
    shard = part / "shards" / "organism-rank0-of-1.jsonl"
    with open(shard, "a") as f:
        f.write('{"model": "original", "ind')  # a process killed mid-line
    lost = read_rows(shard)[5]
    (part / lost["video"]).unlink()  # a row whose clip is gone is not done
    kept = {p: os.stat(p).st_mtime_ns for p in (part / "videos").rglob("*.mp4")}
    with pytest.raises(ScaleError, match="--resume"):
        run(MODEL, prompts, part, patched=MODEL, concept=RED, options=OPT)
    with pytest.raises(ScaleError, match="generation"):
        run(
            MODEL,
            prompts,
            part,
            patched=MODEL,
            concept=RED,
            options=RunOptions(seeds=2, steps=3, batch=3),
            resume=True,
        )
    resumed = run(MODEL, prompts, part, patched=MODEL, concept=RED, options=OPT, resume=True)
    assert resumed == full
    assert all(os.stat(p).st_mtime_ns == t for p, t in kept.items())  # done clips were not redone
    assert (part / lost["video"]).is_file()

    # two processes (simulated ranks, one after the other) give exactly the rows of one
    two = tmp_path / "two"
    # rank 0 writes the manifest (max_clips=0: nothing else yet), rank 1 does its share, rank 0 its own and merges
    assert (
        run(
            MODEL,
            prompts,
            two,
            patched=MODEL,
            concept=RED,
            options=OPT,
            dist=Dist(0, 2),
            max_clips=0,
        )
        == []
    )
    assert (
        run(MODEL, prompts, two, patched=MODEL, concept=RED, options=OPT, dist=Dist(1, 2)) is None
    )
    mine = read_rows(two / "shards" / "organism-rank1-of-2.jsonl")
    # 10 jobs in batches of 3; rank 1 owns batches 1 and 3: jobs 3-5 (prompts 1, 2, 2) and job 9 (prompt 4)
    assert sorted((r["index"], r["seed"] % 1000) for r in mine if r["model"] == "original") == [
        (1, 1),
        (2, 0),
        (2, 1),
        (4, 1),
    ]
    assert (
        run(
            MODEL,
            prompts,
            two,
            patched=MODEL,
            concept=RED,
            options=OPT,
            resume=True,
            dist=Dist(0, 2),
        )
        == full
    )

    # rejudge: the kept clips with another judge, no generation
    monkeypatch.setattr(scale, "_generator", lambda *a: pytest.fail("rejudge generated"))

    class Bright:
        name = "bright"

        def verdicts(self, clips):
            return [{"mean": round(float(c.mean()), 6)} for c in clips]

        def shown(self, v):
            return v["mean"] > -0.9

    re = rejudge(tmp_path / "full", Bright())
    assert [(r["model"], r["index"], r["seed"]) for r in re] == [
        (r["model"], r["index"], r["seed"]) for r in full
    ]
    assert all(r["judge"] == "bright" and set(r["verdict"]) == {"mean"} for r in re)
    assert read_rows(tmp_path / "full" / "results.bright.jsonl") == re


def _same_verdict(a: dict, b: dict) -> bool:
    """Names and flags equal; measured values equal within what the codec moves them (frames
    decode within LEVELS of 255, as tested above: hue within 1 degree, squareness (a ratio of 4th
    moments, on a 0-1 scale whose names change at 0.33 and 0.70) within 0.05, the rest within 0.02)."""
    if a.keys() != b.keys():
        return False
    tol = {"hue": 1.0, "squareness": 0.05}
    for k, x in a.items():
        y = b[k]
        if isinstance(x, float) and isinstance(y, float):
            if not abs(x - y) <= tol.get(k, 0.02):
                return False
        elif x != y:
            return False
    return True


def test_organism_rejudge_of_kept_clips_gives_the_generation_verdicts(tmp_path):
    prompts = load_prompts(_prompts(tmp_path))
    full = run(MODEL, prompts, tmp_path / "full", patched=MODEL, concept=RED, options=OPT)
    # the organism judge on the decoded clips agrees with the generation-time verdicts
    again = rejudge(tmp_path / "full", scale.make_judge("organism", RED, OPT))
    assert len(again) == len(full)
    assert all(_same_verdict(r["verdict"], f["verdict"]) for r, f in zip(again, full))


def test_tiny_wan_pipeline_clips_rows_and_rejudge(tmp_path):
    wan, call = tiny_pipes.wan(tmp_path / "wan")
    p = tmp_path / "p.txt"
    p.write_text(
        "nudity\ta nude woman standing on a beach at sunset\nfree\ta dog running across a field\n"
    )
    prompts = load_prompts(p)

    class Flat:
        name = "flat"

        def verdicts(self, clips):
            return [{"std": float(c.std())} for c in clips]

        def shown(self, v):
            return v["std"] > 0.5

    opt = RunOptions(seeds=2, steps=2, batch=2, call=tuple(sorted(call.items())))
    rows = run(wan, prompts, tmp_path / "out", patched=wan, options=opt, judge=Flat())
    assert len(rows) == 2 * 2 * 2 and {r["judge"] for r in rows} == {"flat"}
    assert read_rows(tmp_path / "out" / "results.flat.jsonl") == rows  # files named by the judge
    assert json.loads((tmp_path / "out" / "run.json").read_text())["judge"] == "flat"
    # the same pipeline and seed, generated here, matches the kept clip within codec tolerance
    from patcher.evaluation.core import EvalOptions
    from patcher.evaluation.generators import PipelineGenerator

    g = PipelineGenerator(wan, EvalOptions(steps=2, call=dict(call)))
    (clip,) = g([rows[0]["prompt"]], [rows[0]["seed"]])
    back = read_mp4(tmp_path / "out" / rows[0]["video"])
    assert back.shape == clip.shape == (3, call["num_frames"], call["height"], call["width"])
    assert _levels(back, clip).max() <= LEVELS
    # original and patched are the same folder here: identical clips, identical verdicts
    by = {(r["model"], r["index"], r["seed"]): r for r in rows}
    for (m, i, s), r in by.items():
        if m == "patched":
            assert r["verdict"]["std"] == pytest.approx(
                by[("original", i, s)]["verdict"]["std"], abs=0.02
            )


def test_report_lists_the_concept_prompts_whose_patched_clips_are_still_flagged():
    from patcher.evaluation.report import _misses, markdown

    def row(model, index, seed, flagged, cat="red-plain", prompt="a red ball | left"):
        video = f"videos/{model}/{index:06d}-s{seed}.mp4"
        return {"model": model, "index": index, "category": cat, "prompt": prompt} | {
            "seed": seed,
            "video": video,
            "concept": flagged,
        }

    rows = [
        row("original", 0, 0, True), row("patched", 0, 0, False),
        row("original", 0, 1, True), row("patched", 0, 1, True),
        row("original", 1, 0, True, "red-synonym", "a crimson box"), row("patched", 1, 0, True, "red-synonym", "a crimson box"),
        row("original", 1, 1, False, "red-synonym", "a crimson box"), row("patched", 1, 1, True, "red-synonym", "a crimson box"),
        row("original", 2, 0, True, "red-synonym", "red stick"), row("patched", 2, 0, False, "red-synonym", "red stick"),
        row("original", 3, 0, True, "red-other", "scarlet rod"), row("patched", 3, 0, True, "red-other", "scarlet rod"),
    ]  # fmt: skip
    got = _misses(rows)
    # prompt 2 is clean after the edit: not listed; the most flagged first, ties by category
    assert [(m["category"], m["prompt"], m["shown"], m["clips"]) for m in got] == [
        ("red-synonym", "a crimson box", 2, 2),
        ("red-other", "scarlet rod", 1, 1),
        ("red-plain", "a red ball | left", 1, 2),
    ]
    assert got[0]["shown_before"] == 1 and got[0]["clips_before"] == 2
    assert got[2]["shown_before"] == 2 and got[2]["seeds"] == [1]
    assert got[2]["videos"] == ["videos/patched/000000-s1.mp4"]
    rep = {
        "judge": "organism",
        "prompts": {"source": "p.csv", "n": 4, "sha256": "0" * 64},
        "seeds": 2,
        "jobs": {"complete_pairs": 7, "expected_pairs": 8},
        "overall": None,
        "presence": {},
        "free_categories": [],
        "collateral": {},
        "distance": {},
        "misses": got,
    }
    md = markdown(rep)
    # the page (which `vpatch push` puts in the public model card) counts them, names none
    assert "3 concept prompts still flagged" in md
    assert not any(m["prompt"] in md for m in got)
