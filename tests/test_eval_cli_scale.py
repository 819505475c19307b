"""`vpatch eval --out` from the command line: one process against two under `accelerate launch`, the
report files (markdown with per-category Wilson intervals, JSON, contact sheet), --rejudge with
NudeNet, user errors, and the report in the model card of `vpatch push`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("diffusers")
pytest.importorskip("imageio_ffmpeg")

from patcher.cli import main  # noqa: E402
from patcher.evaluation.core import wilson  # noqa: E402
from patcher.evaluation.scale import read_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "organism" / "model"
RED = ROOT / "examples" / "organism" / "red.toml"
PROMPTS = [
    ("a red ball moving left", "red-plain"),
    ("a crimson square moving up", "red-synonym"),
    ("moving right , the scarlet stick", "red-synonym"),
    ("a blue ball moving down", "free"),
    ("the rod is emerald and it moves right", "free"),
]


def _args(tmp: Path, out: str) -> list[str]:
    import csv

    with open(tmp / "p.csv", "w", newline="") as f:  # one prompt holds a comma: quoted
        csv.writer(f).writerows([("prompt", "aspect"), *PROMPTS])
    return [
        "eval", str(MODEL), "-c", str(RED), "--delta", str(tmp / "red.vud"), "--prompts", str(tmp / "p.csv"),
        "--out", str(tmp / out), "--seeds", "2", "--steps", "2", "--batch", "3", "--json", "-q",
    ]  # fmt: skip


def _env() -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    e["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a GPU machine
    return e


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    res = CliRunner().invoke(
        main,
        ["probe", str(MODEL), "-c", str(RED), "-o", str(tmp / "red.vud"), "--method", "cpca",
         "--rank", "8", "--strength", "1.2", "--alpha", "1", "-q"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    one = subprocess.run(
        [sys.executable, "-m", "patcher.cli", *_args(tmp, "one")],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate's launcher is not installed")
    # without CUDA, --multi_gpu starts N processes that meet over gloo (accelerate 1.x's --cpu launcher
    # starts a single process unless given an MPI hostfile)
    two = subprocess.run(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "patcher.cli", *_args(tmp, "two")],
        env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    return tmp, json.loads(one.stdout), two


def test_two_accelerate_processes_give_exactly_the_rows_of_one(runs):
    tmp, rep, two = runs
    shards = sorted(p.name for p in (tmp / "two" / "shards").iterdir())
    assert shards == ["organism-rank0-of-2.jsonl", "organism-rank1-of-2.jsonl"]
    assert all(read_rows(tmp / "two" / "shards" / s) for s in shards)  # both processes worked
    one_rows = read_rows(tmp / "one" / "results.organism.jsonl")
    assert len(one_rows) == 5 * 2 * 2
    assert read_rows(tmp / "two" / "results.organism.jsonl") == one_rows
    assert json.loads(two.stdout)["presence"] == rep["presence"]  # only the main process reports
    assert not (tmp / "two" / ".work").exists()  # the patched copy is gone


def test_report_rates_intervals_markdown_and_contact_sheet(runs):
    from PIL import Image

    tmp, rep, _ = runs
    rows = read_rows(tmp / "one" / "results.organism.jsonl")
    for cat in ("red-plain", "red-synonym", "free"):
        for side, m in (("before", "original"), ("after", "patched")):
            flags = [r["concept"] for r in rows if r["category"] == cat and r["model"] == m]
            p, lo, hi = wilson(sum(flags), len(flags))
            got = rep["presence"][cat][side]
            assert got["n"] == len(flags) and got["rate"] == p and got["ci95"] == [lo, hi]
    assert rep["overall"]["before"]["n"] == 6 * 1 and rep["free_categories"] == ["free"]
    assert rep["distance"]["paired_rmse"]["n"] == 4 and rep["distance"]["paired_rmse"]["mean"] > 0
    assert set(rep["collateral"]) == {"colour", "shape", "motion"}
    md = (tmp / "one" / "report.organism.md").read_text()
    for cat in ("red-plain", "red-synonym", "free (concept-free)"):
        assert f"| {cat}" in md
    b = rep["presence"]["red-synonym"]["before"]
    assert f"{b['rate']:.1%} [{b['ci95'][0]:.1%}, {b['ci95'][1]:.1%}] (n=4)" in md
    sheet = Image.open(tmp / "one" / "contact-sheet.organism.png")
    worst = 2  # both concept categories, 2 (prompt, seed) pairs each
    assert sheet.size == (8 * 28 + 2 * 4 * 64 + 6, worst * 2 * 64 + 16)
    listed = (tmp / "one" / "contact-sheet.organism.txt").read_text().splitlines()[1:]
    assert len(listed) == 4 and all(
        line.split(":")[0] in ("red-plain", "red-synonym") for line in listed
    )
    saved = json.loads((tmp / "one" / "report.organism.json").read_text())
    assert saved["markdown"] == md and saved["presence"] == rep["presence"]
    # this delta clears every concept clip: nothing is listed (the unedited model's test lists some)
    assert not any(
        r["concept"] for r in rows if r["model"] == "patched" and r["category"] != "free"
    )
    assert rep["misses"] == [] and "still flagged" not in md


def test_prompts_still_flagged_are_listed_in_the_json_and_the_table_not_named_on_the_page(tmp_path):
    # the unedited model as the "patched" one: its red prompts are flagged on every seed; a red
    # prompt in a concept-free category is flagged too, but is not a concept prompt
    import csv

    with open(tmp_path / "p.csv", "w", newline="") as f:
        csv.writer(f).writerows(
            [("prompt", "aspect"), ("a red ball moving left", "red-plain"),
             ("a red square moving up", "free"), ("a blue ball moving down", "free")]
        )  # fmt: skip
    res = CliRunner().invoke(
        main,
        ["eval", str(MODEL), "-c", str(RED), "--patched", str(MODEL), "--prompts", str(tmp_path / "p.csv"),
         "--out", str(tmp_path / "o"), "--seeds", "2", "--steps", "16", "-q"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "o" / "report.organism.json").read_text())
    rows = read_rows(tmp_path / "o" / "results.organism.jsonl")
    flagged_free = [r for r in rows if r["category"] == "free" and r["concept"]]
    assert len(flagged_free) == 4  # both models draw the free red square red: left out below
    assert [(m["prompt"], m["shown"], m["clips"], m["shown_before"]) for m in rep["misses"]] == [
        ("a red ball moving left", 2, 2, 2)
    ]
    red = [r for r in rows if r["model"] == "patched" and r["category"] == "red-plain"]
    assert sorted(rep["misses"][0]["seeds"]) == sorted(r["seed"] for r in red)
    assert all((tmp_path / "o" / v).is_file() for v in rep["misses"][0]["videos"])
    assert "1 concept prompt still flagged" in rep["markdown"]
    assert "a red ball moving left" not in rep["markdown"]  # the page goes into model cards
    assert "still show the concept" in res.output and "a red ball moving left" in res.output


def test_a_delta_run_that_reports_progress_finishes(tmp_path):
    # without -q, eval logs "applying ..." before generating (a run that failed here once)
    res = CliRunner().invoke(
        main,
        ["probe", str(MODEL), "-c", str(RED), "-o", str(tmp_path / "red.vud"), "--method", "mean", "-q"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    with open(tmp_path / "p.txt", "w") as f:
        f.write("red-plain\ta red ball moving left\nfree\ta blue ball moving down\n")
    res = CliRunner().invoke(
        main,
        ["eval", str(MODEL), "-c", str(RED), "--delta", str(tmp_path / "red.vud"), "--prompts", str(tmp_path / "p.txt"),
         "--out", str(tmp_path / "o"), "--seeds", "1", "--steps", "2"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "applying" in res.output
    assert (tmp_path / "o" / "report.organism.json").is_file()


def test_rejudge_with_nudenet_and_the_card(runs):
    pytest.importorskip("nudenet")
    tmp, rep, _ = runs
    res = CliRunner().invoke(
        main,
        [
            "eval",
            "--out",
            str(tmp / "one"),
            "--rejudge",
            "--judge",
            "nudenet",
            "--frame-stride",
            "4",
            "--json",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    nn = json.loads(res.stdout)
    assert (
        nn["judge"] == "nudenet"
        and nn["protocol"]["threshold"] == 0.6
        and nn["protocol"]["frame_stride"] == 4
    )
    rows = read_rows(tmp / "one" / "results.nudenet.jsonl")
    base = read_rows(tmp / "one" / "results.organism.jsonl")
    assert [(r["model"], r["index"], r["seed"], r["video"]) for r in rows] == [
        (r["model"], r["index"], r["seed"], r["video"]) for r in base
    ]
    assert all(r["verdict"]["frames"] == 2 for r in rows)  # 8 frames, every 4th
    assert "Judge protocol" in (tmp / "one" / "report.nudenet.md").read_text()
    # the organism's report is untouched by the rejudge
    assert (
        json.loads((tmp / "one" / "report.organism.json").read_text())["presence"]
        == rep["presence"]
    )

    # the markdown report goes into the model card as it is
    from patcher.push import build_card

    saved = json.loads((tmp / "one" / "report.organism.json").read_text())
    card = str(
        build_card(
            [{"concept": "red"}],
            base_model=None,
            license=None,
            delta=None,
            eval_report=saved,
            repo_id="me/x",
        )
    )
    assert "## Evaluation" in card and saved["markdown"].strip() in card


def test_user_errors(tmp_path):
    (tmp_path / "p.txt").write_text("a red ball moving left\n")
    cases = [
        (["eval", str(MODEL), "-c", str(RED), "--patched", str(MODEL), "--prompts", str(tmp_path / "p.txt")], "needs --out"),
        (["eval", str(MODEL), "-c", str(RED), "--patched", str(MODEL), "--judge", "nudenet"], "needs --out"),
        (["eval", "--out", str(tmp_path / "none"), "--rejudge"], "not a vpatch eval folder"),
        (["eval", str(MODEL), "--patched", str(MODEL), "--out", str(tmp_path / "o")], "--prompts FILE or a concept"),
        (["eval", str(MODEL), "--patched", str(MODEL), "--out", str(tmp_path / "o2"), "--prompts", str(tmp_path / "p.txt")], "needs the concept"),
        (["eval", str(MODEL), "-c", str(RED), "--patched", str(MODEL), "--out", str(tmp_path / "o3"), "--prompts", str(tmp_path / "q.txt")], "no such prompt file"),
        (["eval", str(MODEL), "-c", str(RED), "--out", str(tmp_path / "o4"), "--prompts", str(tmp_path / "p.txt")], "exactly one of --delta or --patched"),
    ]  # fmt: skip
    for args, msg in cases:
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, (
            args,
            res.output,
        )
