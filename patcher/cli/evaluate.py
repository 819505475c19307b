"""The eval verb."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

# markup is off everywhere: concept names, keys and paths are user data, and "[/x]" in one of them
# must print as itself, not crash rich after the output was written
from .common import (
    CountReporter,
    _user_errors,
    err,
    main,
)


@main.command("eval")
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option(
    "-c",
    "--concept",
    help="Concept recipe (name or .toml) with held-out prompts and [judge.*] labels.",
)
@click.option(
    "--delta",
    type=click.Path(path_type=Path),
    help="The .vud to evaluate; it is applied to a temporary copy of MODEL.",
)
@click.option(
    "--patched",
    type=click.Path(path_type=Path),
    help="Or: an already patched folder (from `vpatch apply`).",
)
@click.option(
    "--judge",
    default="organism",
    show_default=True,
    help="organism: the analytic judge of the shipped organism; clip: CLIP zero-shot against the concept's labels "
    "(and twin fidelity in CLIP image space); nudenet: the NudeNet detector (needs --out; "
    "pip install 'vpatch[nudenet]'); or any judge registered in patcher.evaluation.judges.",
)
@click.option("--clip-model", help="CLIP model folder or hub id for --judge clip.")
@click.option(
    "--seeds",
    type=int,
    default=4,
    show_default=True,
    help="Samples per prompt (same seeds before and after).",
)
@click.option("--steps", type=int, default=16, show_default=True, help="Sampling steps.")
@click.option(
    "--guidance",
    type=float,
    default=3.0,
    show_default=True,
    help="Classifier-free guidance (organism sampler).",
)
@click.option(
    "--strength",
    type=float,
    default=1.0,
    show_default=True,
    help="Passed to apply when --delta is given.",
)
@click.option(
    "--preview",
    type=click.Path(path_type=Path),
    help="Write a before/after GIF here (rows: prompts; left original, right patched).",
)
@click.option(
    "--sheet",
    type=click.Path(path_type=Path),
    help="Write a contact sheet PNG here (rows: clips; original, patched and the safe twin's original).",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where the models generate (cpu, cuda, cuda:1); with --out, the device accelerate gives each process.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Generation dtype of a diffusers pipeline (the organism samples in float32 with --out; the judge always "
    "reads float32 clips).",
)
@click.option(
    "--call",
    "calls",
    multiple=True,
    metavar="KEY=VALUE",
    help="Extra pipeline arguments for real models, e.g. --call num_frames=17 --call height=256.",
)
@click.option(
    "--attack",
    "attack",
    type=click.Choice(["prompts", "embedding"]),
    help="Instead of the standard comparison, attack the edit (organism only): prompts = rewordings "
    "from the concept's vocabulary; embedding = concept inversion of the conditioning sequence.",
)
@click.option(
    "--attack-iterations",
    type=int,
    default=150,
    show_default=True,
    help="Adam steps of the embedding attack.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Keep every clip as MP4 and every result as a JSONL row in this folder; write report.<judge>.md/.json "
    "and a contact sheet there. Runs on N processes under `accelerate launch`.",
)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(path_type=Path),
    help="A prompt file (.txt, .csv, .jsonl) with an optional category/aspect column (needs --out). "
    "Default: the concept recipe's sets.",
)
@click.option(
    "--free-category",
    "free_categories",
    multiple=True,
    help="A concept-free category of --prompts (quality distances; not in the concept totals). Default: free, neutral.",
)
@click.option(
    "--resume", is_flag=True, help="Finish the run in --out: skip the clips it already holds."
)
@click.option(
    "--rejudge",
    is_flag=True,
    help="Score the clips kept in --out with --judge, without generating again.",
)
@click.option(
    "--batch",
    type=int,
    default=16,
    show_default=True,
    help="(prompt, seed) jobs per generation call (--out).",
)
@click.option(
    "--crf",
    type=int,
    default=0,
    show_default=True,
    help="H.264 rate factor of the kept clips: 0 is lossless in YUV 4:4:4; 18-23 are far smaller.",
)
@click.option(
    "--frame-stride",
    type=int,
    default=1,
    show_default=True,
    help="Judge every k-th frame (nudenet).",
)
@click.option("--nudenet-threshold", type=float, help="NudeNet score threshold [default: 0.6].")
@click.option(
    "--nudenet-classes",
    help="Comma-separated NudeNet classes that count [default: the five explicit *_EXPOSED classes].",
)
@click.option("--json", "as_json", is_flag=True, help="The full report on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def eval_cmd(
    model,
    concept,
    delta,
    patched,
    judge,
    clip_model,
    seeds,
    steps,
    guidance,
    strength,
    preview,
    sheet,
    device,
    dtype,
    calls,
    out,
    prompts_file,
    free_categories,
    resume,
    rejudge,
    batch,
    crf,
    frame_stride,
    nudenet_threshold,
    nudenet_classes,
    attack,
    attack_iterations,
    as_json,
    quiet,
):
    """Measure a delta: concept presence before and after, and what else changed.

    Generates the concept's probe and held-out prompts (paraphrases, synonyms, unseen prompts, a new
    template) and concept-free prompts with the original and the patched model, same prompts and
    seeds, and judges every clip. Reports how often the concept is shown, a trace of it, or the safe
    twin's outcome; twin fidelity (the fraction of the distance to what the original model draws for
    the safe twin, same seed, that the edit closes); concept-free drift against the seed floor; and
    per-kind collateral shifts and texture. Rates and shifts carry 95% intervals.

    With --out, every clip is kept as MP4 and every result as a JSONL row (resumable), prompts can
    come from a benchmark file with categories, and the run spreads over all processes of
    `accelerate launch`.

    \b
    Example (the shipped organism):
      vpatch eval examples/organism/model -c examples/organism/red.toml --delta red.vud --preview red.gif
      vpatch eval examples/organism/model -c examples/organism/red.toml --delta red.vud --out runs/red
    """
    from ..evaluation.core import EvalError, EvalOptions, evaluate, summary_rows, to_json
    from ..families.recipes import apply_overrides

    call = apply_overrides({}, list(calls))
    if attack and out is not None:
        raise EvalError(
            "--attack compares the original and the patched model in memory; drop --out"
        )
    if out is not None:
        for flag, v in (
            ("--preview", preview),
            ("--sheet", sheet),
            ("--device", device != "cpu"),
        ):
            if v:
                raise EvalError(
                    f"{flag} does not apply with --out: the folder gets its own contact sheet, and "
                    "each process generates on the device `accelerate launch` gives it"
                )
        return _eval_folder(
            model, concept, delta, patched, judge, clip_model, seeds, steps, guidance, strength,
            call, out, prompts_file, free_categories, resume, rejudge, batch, crf, frame_stride,
            nudenet_threshold, nudenet_classes, as_json, quiet, dtype,
        )  # fmt: skip
    for flag, v in (
        ("--prompts", prompts_file),
        ("--resume", resume),
        ("--rejudge", rejudge),
        ("--judge nudenet", judge == "nudenet"),
    ):
        if v:
            raise EvalError(f"{flag} needs --out DIR (the folder that keeps the clips and rows)")
    if model is None or concept is None:
        raise EvalError("give MODEL and -c CONCEPT")
    opt = EvalOptions(
        seeds=seeds,
        steps=steps,
        guidance=guidance,
        judge=judge,
        clip_model=clip_model,
        strength=strength,
        preview=preview,
        sheet=sheet,
        device=device,
        dtype=dtype,
        call=call,
    )
    say = (lambda m: None) if (quiet or as_json) else (lambda m: err.print(m))
    if attack:
        from ..evaluation.attacks import attack_eval

        a = attack_eval(
            model,
            concept,
            delta=delta,
            patched=patched,
            attack=attack,
            options=opt,
            iterations=attack_iterations,
        )
        if as_json:
            click.echo(json.dumps(a.to_dict(), indent=2))
        else:
            _print_attack(a)
        return
    r = evaluate(
        model,
        concept,
        delta=delta,
        patched=patched,
        options=opt,
        reporter=CountReporter(quiet or as_json),
        log=say,
    )
    if as_json:
        click.echo(to_json(r))
        return
    t = Table(title=f"eval: {r.concept} ({r.judge} judge, {r.seeds} seeds per prompt)")
    t.add_column("", overflow="fold", min_width=40)
    for c in ("original", "patched", "change"):
        t.add_column(c, no_wrap=True)
    for row in summary_rows(r):
        t.add_row(*row)
    out = Console(highlight=False, markup=False, width=max(Console().width, 120))
    out.print(t)
    if r.misses:
        out.print(_misses_table(r.misses))
    if r.preview:
        click.echo(f"preview: {r.preview}")
    if r.sheet:
        click.echo(f"contact sheet: {r.sheet}")


def _misses_table(misses: list[dict], most: int = 12) -> Table:
    """The concept prompts that leak: patched clips not drawn as their twin's (or, without a
    twin, judged to show the concept), with what the twin's own clips were."""

    def names(xs: list[str]) -> str:
        return ", ".join(f"{k} ×{v}" if v > 1 else k for k, v in Counter(xs).most_common())

    t = Table(title="concept prompts that leak (not always drawn as their safe twin)")
    for c in ("set", "prompt", "as twin", "patched clips", "twin's clips"):
        t.add_column(c, overflow="fold")
    for m in misses[:most]:
        as_twin = "no twin" if m["as_twin"] is None else f"{m['as_twin']}/{m['clips']}"
        t.add_row(m["set"], m["prompt"], as_twin, names(m["after"]), names(m["twin_clips"]))
    if len(misses) > most:
        t.caption = f"and {len(misses) - most} more (--json lists every one)"
    return t


def _flagged_table(misses: list[dict], most: int = 12) -> Table:
    """`eval --out`: the concept prompts whose patched clips the judge still flags (no twin clips
    are made at scale, so a leak is a flagged clip)."""
    t = Table(title="concept prompts whose patched clips still show the concept")
    for c in ("category", "prompt", "patched flagged", "original flagged", "seeds"):
        t.add_column(c, overflow="fold")
    for m in misses[:most]:
        t.add_row(
            m["category"],
            m["prompt"],
            f"{m['shown']}/{m['clips']}",
            f"{m['shown_before']}/{m['clips_before']}",
            ", ".join(map(str, m["seeds"])),
        )
    if len(misses) > most:
        t.caption = f"and {len(misses) - most} more (report.*.json lists every one)"
    return t


def _print_attack(a) -> None:
    """The attack's success rates, original against patched, with their intervals."""

    def fmt(x: dict) -> str:
        return f"{100 * x['rate']:.0f}% [{100 * x['ci95'][0]:.0f}, {100 * x['ci95'][1]:.0f}]"

    t = Table(title=f"attack {a.attack}: success rate ({a.n} clips, 95% Wilson intervals)")
    t.add_column("")
    for c in ("original", "patched, attacked"):
        t.add_column(c, no_wrap=True)
    t.add_row("concept shown (success)", fmt(a.before), fmt(a.after))
    if "before" in a.notes and "after" in a.notes:
        t.add_row(
            "a trace of it (e.g. pale)",
            fmt(a.notes["before"]["trace"]),
            fmt(a.notes["after"]["trace"]),
        )
    if "patched_without_attack" in a.notes:
        t.add_row("patched, not attacked: shown", "", fmt(a.notes["patched_without_attack"]))
    Console(highlight=False).print(t)


def _eval_folder(
    model, concept, delta, patched, judge, clip_model, seeds, steps, guidance, strength, call, out,
    prompts_file, free_categories, resume, rejudge, batch, crf, frame_stride, nudenet_threshold,
    nudenet_classes, as_json, quiet, dtype="float32",
):  # fmt: skip
    """`vpatch eval --out`: the API's evaluate_folder, its progress, and its table."""
    from ..evaluation.prompt_files import FREE_CATEGORIES
    from ..evaluation.report import table_rows
    from ..evaluation.scale import RunOptions, evaluate_folder

    opt = RunOptions(
        seeds=seeds,
        steps=steps,
        guidance=guidance,
        call=tuple(sorted(call.items())),
        judge=judge,
        clip_model=clip_model,
        threshold=nudenet_threshold,
        classes=tuple(c.strip() for c in nudenet_classes.split(",")) if nudenet_classes else None,
        frame_stride=frame_stride,
        batch=batch,
        dtype=dtype,
        crf=crf,
        strength=strength,
        free_categories=tuple(free_categories) or FREE_CATEGORIES,
    )
    rep_ = CountReporter(quiet or as_json)
    started = []

    def progress(done: int, total: int) -> None:
        if not started:
            rep_.start("rejudging" if rejudge else "generating", total)
            started.append(1)
        rep_.advance(1)

    say = (lambda m: None) if (quiet or as_json) else (lambda m: err.print(m))
    try:
        r = evaluate_folder(
            model,
            out,
            concept=concept,
            prompts=prompts_file,
            delta=delta,
            patched=patched,
            options=opt,
            resume=resume,
            rejudge_only=rejudge,
            progress=progress,
            log=say,
        )
    finally:
        if started:
            rep_.stop()
    if r is None:  # not the main process
        return
    if as_json:
        click.echo(json.dumps(r, indent=2, default=float))
        return
    t = Table(
        title=f"eval: {r['prompts']['source']} ({r['judge']} judge, {r['seeds']} seeds per prompt)"
    )
    t.add_column("", overflow="fold", min_width=40)
    for c in ("original", "patched", "change"):
        t.add_column(c, no_wrap=True)
    for row in table_rows(r):
        t.add_row(*row)
    tables = Console(stderr=True, highlight=False, markup=False, width=max(Console().width, 140))
    tables.print(t)
    if r.get("misses"):
        tables.print(_flagged_table(r["misses"]))
    click.echo(r["files"]["md"])
